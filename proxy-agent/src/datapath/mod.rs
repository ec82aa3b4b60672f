//! The datapath wrapper: the only module that touches aya.
//!
//! Loads the embedded eBPF object, sizes and pins its maps under
//! `<pin root>/v<PIN_LAYOUT_VERSION>/maps/` (adopting existing pins, so a
//! restarted agent keeps the conntrack table and the services), loads the
//! programs, attaches them with tcx links pinned under `.../links/`, and reads
//! and writes the maps on behalf of reconcile.

mod bench;
pub mod bpffs;
mod links;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, HashOfMaps, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions},
};
use aya_log::EbpfLogger;
use proxy_common::{
    Backend, Counter, CtKey, CtValue, PIN_LAYOUT_VERSION, SelBlock, ServiceKey, ServiceValue,
    SvcCounters, maps,
};

pub use self::bench::{BENCH_EMPTY, BENCH_WRAPPER, BenchSpec};
use crate::reconcile::{Capacity, Op, Programmed, Table};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time
/// (empty when the agent was built without it).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

/// `BPF_F_INNER_MAP`: inner maps of one outer map may differ in length.
const BPF_F_INNER_MAP: u32 = 1 << 12;

/// Errors of the datapath layer.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this proxy-agent was built without its eBPF object; run `cargo xtask build-ebpf` and rebuild"
    )]
    NoObject,
    #[error("preparing the pin root {path}: {source}")]
    PinRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("attaching to {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error("benchmark: {0}")]
    Bench(String),
    #[error("selection table of svc {svc_id} is unreadable")]
    BadTable { svc_id: u32 },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Capacities of the maps the agent sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub frontends: u32,
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            frontends: maps::DEFAULT_MAX_FRONTENDS,
            services: maps::DEFAULT_MAX_SERVICES,
            backends: maps::DEFAULT_MAX_BACKENDS,
            conntrack: maps::DEFAULT_CT_ENTRIES,
        }
    }
}

/// How to load the datapath.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub sizes: MapSizes,
    /// Pin root on bpffs; `None` loads unpinned (tests).
    pub pin_root: Option<PathBuf>,
}

/// Which tcx hook a program is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    Ingress,
    Egress,
}

/// The loaded datapath.
pub struct Datapath {
    ebpf: Ebpf,
    layout_dir: Option<PathBuf>,
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
    capacity: Capacity,
    /// Interfaces (ifindex, name) this process has attached to or adopted.
    attached: BTreeSet<(u32, String)>,
}

/// The map data behind any map variant.
fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::HashOfMaps(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::RingBuf(m) => Some(m),
        _ => None,
    }
}

/// aya-log level threshold matching the agent's tracing level.
fn bpf_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

impl Datapath {
    /// Loads the object, creating or adopting pinned maps, and loads the programs.
    pub fn load(opts: &LoadOptions) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let layout_dir = match &opts.pin_root {
            Some(root) => Some(prepare_pin_dirs(root)?),
            None => None,
        };
        let sizes = opts.sizes;
        let level = bpf_log_level();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(maps::SERVICES, sizes.frontends)
            .map_max_entries(maps::SELECTION, sizes.services)
            .map_max_entries(maps::SVC_STATS, sizes.services)
            .map_max_entries(maps::BACKENDS, sizes.backends)
            .map_max_entries(maps::CONNTRACK, sizes.conntrack)
            .override_global("AYA_LOG_LEVEL", &level, false);
        if let Some(dir) = &layout_dir {
            for name in maps::PINNED {
                loader.map_pin_path(name, dir.join("maps").join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("kernel-side logging unavailable: {e}");
                None
            }
        };
        for name in [
            maps::programs::TC_POD_INGRESS,
            maps::programs::TC_POD_EGRESS,
        ] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let mut dp = Self {
            ebpf,
            layout_dir,
            logger,
            attached: BTreeSet::new(),
            capacity: Capacity {
                frontends: sizes.frontends,
                services: sizes.services,
                backends: sizes.backends,
            },
        };
        dp.capacity = Capacity {
            frontends: dp.max_entries(maps::SERVICES)?,
            services: dp
                .max_entries(maps::SELECTION)?
                .min(dp.max_entries(maps::SVC_STATS)?),
            backends: dp.max_entries(maps::BACKENDS)?,
        };
        if dp.capacity.frontends != sizes.frontends
            || dp.capacity.backends != sizes.backends
            || dp.capacity.services != sizes.services
        {
            tracing::warn!(
                actual = ?dp.capacity,
                requested = ?sizes,
                "adopted pinned maps keep their original sizes; remove the pins to resize"
            );
        }
        Ok(dp)
    }

    /// The kernel's max_entries of a map (the adopted one, for pinned maps).
    fn max_entries(&self, name: &'static str) -> Result<u32, DatapathError> {
        let map = self
            .ebpf
            .map(name)
            .ok_or(DatapathError::MissingMap { name })?;
        let data = map_data(map).ok_or(DatapathError::MissingMap { name })?;
        Ok(data.info().map_err(map_err(name))?.max_entries())
    }

    /// Capacities reconcile must plan within.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// `<pin root>/v<N>`, when pinned.
    pub fn layout_dir(&self) -> Option<&Path> {
        self.layout_dir.as_deref()
    }

    /// The kernel-side log reader, for the event loop to poll.
    pub fn logger_mut(&mut self) -> Option<&mut EbpfLogger<&'static dyn log::Log>> {
        self.logger.as_mut()
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, DatapathError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })
    }

    fn map(&self, name: &'static str) -> Result<&Map, DatapathError> {
        self.ebpf
            .map(name)
            .ok_or(DatapathError::MissingMap { name })
    }

    /// Reads what the service maps hold.
    pub fn read_programmed(&self) -> Result<Programmed, DatapathError> {
        read_programmed_from(
            self.map(maps::SERVICES)?,
            self.map(maps::SELECTION)?,
            self.map(maps::BACKENDS)?,
        )
    }

    /// Runs reconcile's operations in order, stopping at the first failure
    /// (every prefix of a plan is a consistent state).
    pub fn apply(&mut self, ops: &[Op]) -> Result<(), (usize, DatapathError)> {
        for (i, op) in ops.iter().enumerate() {
            self.apply_one(op).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    fn apply_one(&mut self, op: &Op) -> Result<(), DatapathError> {
        match op {
            Op::DelService(key) => {
                let mut m: HashMap<_, ServiceKey, ServiceValue> =
                    HashMap::try_from(self.map_mut(maps::SERVICES)?)
                        .map_err(map_err(maps::SERVICES))?;
                ignore_missing(m.remove(key)).map_err(map_err(maps::SERVICES))
            }
            Op::SetService(key, value) => {
                let mut m: HashMap<_, ServiceKey, ServiceValue> =
                    HashMap::try_from(self.map_mut(maps::SERVICES)?)
                        .map_err(map_err(maps::SERVICES))?;
                m.insert(key, value, 0).map_err(map_err(maps::SERVICES))
            }
            Op::SetBackend(id, backend) => self.set_backend(*id, *backend),
            Op::DelBackend(id) => self.set_backend(*id, Backend::default()),
            Op::ResetSvcStats(id) => {
                let mut m: PerCpuArray<_, SvcCounters> =
                    PerCpuArray::try_from(self.map_mut(maps::SVC_STATS)?)
                        .map_err(map_err(maps::SVC_STATS))?;
                let cpus = aya::util::nr_cpus()
                    .map_err(|(_, e)| map_err(maps::SVC_STATS)(MapError::IoError(e)))?;
                let zero = PerCpuValues::try_from(vec![SvcCounters::default(); cpus])
                    .map_err(|e| map_err(maps::SVC_STATS)(MapError::IoError(e)))?;
                m.set(*id, zero, 0).map_err(map_err(maps::SVC_STATS))
            }
            Op::SetTable(id, table) => {
                let blocks = table.to_blocks();
                let len = u32::try_from(blocks.len()).unwrap_or(u32::MAX);
                let mut inner = Array::<MapData, SelBlock>::create(len, BPF_F_INNER_MAP)
                    .map_err(map_err(maps::SELECTION))?;
                for (i, block) in (0u32..).zip(&blocks) {
                    inner.set(i, block, 0).map_err(map_err(maps::SELECTION))?;
                }
                let mut outer: HashOfMaps<_, u32, Array<MapData, SelBlock>> =
                    HashOfMaps::try_from(self.map_mut(maps::SELECTION)?)
                        .map_err(map_err(maps::SELECTION))?;
                outer
                    .insert(id, &inner, 0)
                    .map_err(map_err(maps::SELECTION))
            }
            Op::DelTable(id) => {
                let mut outer: HashOfMaps<_, u32, Array<MapData, SelBlock>> =
                    HashOfMaps::try_from(self.map_mut(maps::SELECTION)?)
                        .map_err(map_err(maps::SELECTION))?;
                ignore_missing(outer.remove(id)).map_err(map_err(maps::SELECTION))
            }
        }
    }

    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), DatapathError> {
        let mut m: Array<_, Backend> =
            Array::try_from(self.map_mut(maps::BACKENDS)?).map_err(map_err(maps::BACKENDS))?;
        m.set(id, backend, 0).map_err(map_err(maps::BACKENDS))
    }

    /// Global counters, summed over CPUs, in `Counter` order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, DatapathError> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map(maps::STATS)?).map_err(map_err(maps::STATS))?;
        Counter::ALL
            .iter()
            .map(|c| {
                let values = m.get(&(*c as u32), 0).map_err(map_err(maps::STATS))?;
                Ok((*c, values.iter().sum()))
            })
            .collect()
    }

    /// Counters of one service port, summed over CPUs.
    pub fn service_counters(&self, svc_id: u32) -> Result<SvcCounters, DatapathError> {
        let m: PerCpuArray<_, SvcCounters> =
            PerCpuArray::try_from(self.map(maps::SVC_STATS)?).map_err(map_err(maps::SVC_STATS))?;
        let values = m.get(&svc_id, 0).map_err(map_err(maps::SVC_STATS))?;
        Ok(values
            .iter()
            .fold(SvcCounters::default(), |acc, v| SvcCounters {
                packets: acc.packets + v.packets,
                bytes: acc.bytes + v.bytes,
                new_flows: acc.new_flows + v.new_flows,
                rejected: acc.rejected + v.rejected,
            }))
    }

    /// A conntrack handle for another thread.
    pub fn conntrack_handle(&self) -> Result<ConntrackHandle, DatapathError> {
        let map = self.map(maps::CONNTRACK)?;
        let data = map_data(map).ok_or(DatapathError::MissingMap {
            name: maps::CONNTRACK,
        })?;
        let info = data.info().map_err(map_err(maps::CONNTRACK))?;
        Ok(ConntrackHandle { id: info.id() })
    }

    /// Every conntrack entry.
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
        let m: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.map(maps::CONNTRACK)?).map_err(map_err(maps::CONNTRACK))?;
        m.iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::CONNTRACK))
    }

    /// Runs a program once on `frame` with BPF_PROG_TEST_RUN, returning the
    /// verdict and the output frame.
    pub fn test_run(
        &mut self,
        program: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutput, DatapathError> {
        let prog = classifier(&mut self.ebpf, program)?;
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let result = prog
            .test_run(opts)
            .map_err(|source| DatapathError::Program {
                name: program,
                source,
            })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            verdict: result.return_value as i32,
            frame: out,
            duration_ns: result.duration.as_nanos() as u64,
        })
    }
}

/// Reads what the service maps hold from the three maps.
fn read_programmed_from(
    services: &Map,
    selection: &Map,
    backends: &Map,
) -> Result<Programmed, DatapathError> {
    let mut out = Programmed::default();
    let services: HashMap<_, ServiceKey, ServiceValue> =
        HashMap::try_from(services).map_err(map_err(maps::SERVICES))?;
    for entry in services.iter() {
        let (k, v) = entry.map_err(map_err(maps::SERVICES))?;
        out.services.insert(k, v);
    }
    let selection: HashOfMaps<_, u32, Array<MapData, SelBlock>> =
        HashOfMaps::try_from(selection).map_err(map_err(maps::SELECTION))?;
    for svc_id in selection.keys() {
        let svc_id = svc_id.map_err(map_err(maps::SELECTION))?;
        let inner = selection
            .get(&svc_id, 0)
            .map_err(map_err(maps::SELECTION))?;
        let blocks = inner
            .iter()
            .collect::<Result<Vec<SelBlock>, _>>()
            .map_err(map_err(maps::SELECTION))?;
        let table = Table::from_blocks(&blocks).ok_or(DatapathError::BadTable { svc_id })?;
        out.tables.insert(svc_id, table);
    }
    let backends: Array<_, Backend> = Array::try_from(backends).map_err(map_err(maps::BACKENDS))?;
    for id in out
        .tables
        .values()
        .flat_map(|t| t.backends.iter().chain(&t.draining))
    {
        if out.backends.contains_key(id) {
            continue;
        }
        let b = backends.get(id, 0).map_err(map_err(maps::BACKENDS))?;
        if b.is_set() {
            out.backends.insert(*id, b);
        }
    }
    Ok(out)
}

/// Reads the service maps a running (or stopped) agent pinned under
/// `pin_root`, without loading anything: for inspection commands.
pub fn read_pinned(pin_root: &Path) -> Result<Programmed, DatapathError> {
    let dir = pin_root.join(format!("v{PIN_LAYOUT_VERSION}")).join("maps");
    let open = |name: &'static str| {
        MapData::from_pin(dir.join(name)).map_err(|source| DatapathError::Map { name, source })
    };
    read_programmed_from(
        &Map::HashMap(open(maps::SERVICES)?),
        &Map::HashOfMaps(open(maps::SELECTION)?),
        &Map::Array(open(maps::BACKENDS)?),
    )
}

/// A handle on the conntrack map that can live on another thread (for
/// scans that must not hold up the event loop).
pub struct ConntrackHandle {
    id: u32,
}

impl ConntrackHandle {
    /// Removes the UDP flows (both directions) whose (svc id, backend id) is
    /// in `left`, returning how many entries went.
    pub fn forget_udp_flows(
        &mut self,
        left: &BTreeSet<(u32, u32)>,
    ) -> Result<usize, DatapathError> {
        let map = Map::LruHashMap(MapData::from_id(self.id).map_err(map_err(maps::CONNTRACK))?);
        let mut ct: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(map).map_err(map_err(maps::CONNTRACK))?;
        let doomed: Vec<CtKey> = ct
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                k.proto == proxy_common::proto::UDP && left.contains(&(v.svc_id, v.backend_id))
            })
            .map(|(k, _)| k)
            .collect();
        let mut removed = 0;
        for k in &doomed {
            if ct.remove(k).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Every conntrack entry of the maps pinned under `pin_root` (inspection).
pub fn read_pinned_conntrack(pin_root: &Path) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
    let path = pin_root
        .join(format!("v{PIN_LAYOUT_VERSION}"))
        .join("maps")
        .join(maps::CONNTRACK);
    let data = MapData::from_pin(path).map_err(map_err(maps::CONNTRACK))?;
    let ct: HashMap<_, CtKey, CtValue> =
        HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(maps::CONNTRACK))?;
    ct.iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(maps::CONNTRACK))
}

/// Result of one BPF_PROG_TEST_RUN.
#[derive(Clone, Debug)]
pub struct TestRunOutput {
    pub verdict: i32,
    pub frame: Vec<u8>,
    /// Kernel-measured average time per run.
    pub duration_ns: u64,
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn prepare_pin_dirs(root: &Path) -> Result<PathBuf, DatapathError> {
    let err = |source| DatapathError::PinRoot {
        path: root.to_path_buf(),
        source,
    };
    bpffs::ensure(root).map_err(err)?;
    let dir = root.join(format!("v{PIN_LAYOUT_VERSION}"));
    std::fs::create_dir_all(dir.join("maps")).map_err(err)?;
    std::fs::create_dir_all(dir.join("links")).map_err(err)?;
    Ok(dir)
}
