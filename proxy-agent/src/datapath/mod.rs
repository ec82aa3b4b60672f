//! The datapath wrapper: the only module that touches aya.
//!
//! Loads the embedded eBPF object, sizes and pins its maps under
//! `<pin root>/v<PIN_LAYOUT_VERSION>/maps/` (adopting existing pins, so a
//! restarted agent keeps the conntrack table and the services), loads the
//! programs, attaches them with tcx links pinned under `.../links/`, and reads
//! and writes the maps on behalf of reconcile.

mod batch;
mod bench;
pub mod bpffs;
mod links;
mod tables;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray},
    programs::{Program, ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use aya_log::EbpfLogger;
use proxy_common::{
    Backend, Counter, CtKey, CtValue, NodeConfig, PIN_LAYOUT_VERSION, ServiceKey, ServiceValue,
    SourceRange, SvcCounters, SvcName, maps,
};

pub use self::{
    bench::{
        BENCH_EMPTY, BENCH_EMPTY_XDP, BENCH_WRAPPER, BENCH_WRAPPER_XDP, BenchSpec,
        enable_run_stats, program_run_stats,
    },
    tables::{ApplyReport, Blocks, QUARANTINE},
};
use crate::reconcile::{Capacity, Programmed, Table};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time
/// (empty when the agent was built without it).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

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
    #[error("batch read of map {name}: {source}")]
    Batch {
        name: &'static str,
        source: std::io::Error,
    },
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
    /// 64-byte blocks for selection tables.
    pub selection_blocks: u32,
    /// `loadBalancerSourceRanges` CIDRs over all Services.
    pub source_ranges: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            frontends: maps::DEFAULT_MAX_FRONTENDS,
            services: maps::DEFAULT_MAX_SERVICES,
            backends: maps::DEFAULT_MAX_BACKENDS,
            conntrack: maps::DEFAULT_CT_ENTRIES,
            selection_blocks: maps::DEFAULT_SELECTION_BLOCKS,
            source_ranges: maps::DEFAULT_SOURCE_RANGES,
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
    /// Regions of `SELECTION` in use.
    blocks: Blocks,
}

/// The map data behind any map variant.
fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::LpmTrie(m)
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
            .map_max_entries(maps::SELECTION, sizes.selection_blocks)
            .map_max_entries(maps::SVC_TABLE, sizes.services)
            .map_max_entries(maps::SVC_STATS, sizes.services)
            .map_max_entries(maps::BACKENDS, sizes.backends)
            .map_max_entries(maps::CONNTRACK, sizes.conntrack)
            .map_max_entries(maps::SOURCE_RANGES, sizes.source_ranges)
            .map_max_entries(maps::BACKEND_CONNS, sizes.backends)
            .map_max_entries(maps::BACKEND_REAPED, sizes.backends)
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
            maps::programs::TC_EXT_INGRESS,
        ] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        for name in [maps::programs::XDP_EXT, maps::programs::XDP_PASS] {
            xdp(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let mut dp = Self {
            ebpf,
            layout_dir,
            logger,
            attached: BTreeSet::new(),
            blocks: Blocks::new(sizes.selection_blocks),
            capacity: Capacity {
                frontends: sizes.frontends,
                services: sizes.services,
                backends: sizes.backends,
                ranges: sizes.source_ranges,
            },
        };
        dp.capacity = Capacity {
            frontends: dp.max_entries(maps::SERVICES)?,
            services: dp
                .max_entries(maps::SVC_TABLE)?
                .min(dp.max_entries(maps::SVC_STATS)?),
            backends: dp.max_entries(maps::BACKENDS)?,
            ranges: dp.max_entries(maps::SOURCE_RANGES)?,
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

    /// Reads what the service maps hold, adopting the regions of the tables.
    pub fn read_programmed(&mut self) -> Result<Programmed, DatapathError> {
        let tables = self.read_tables()?;
        read_programmed_with(
            self.map(maps::SERVICES)?,
            self.map(maps::BACKENDS)?,
            self.map(maps::SOURCE_RANGES)?,
            || Ok(tables),
        )
    }

    /// Blocks of `SELECTION` in use, and its capacity.
    pub fn selection_usage(&self) -> (u32, u32) {
        (self.blocks.used(), self.blocks.capacity())
    }

    /// Global counters, summed over CPUs, in `Counter` order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, DatapathError> {
        sum_counters(&PerCpuArray::try_from(self.map(maps::STATS)?).map_err(map_err(maps::STATS))?)
    }

    /// Counters of one service port, summed over CPUs.
    pub fn service_counters(&self, svc_id: u32) -> Result<SvcCounters, DatapathError> {
        let m: PerCpuArray<_, SvcCounters> =
            PerCpuArray::try_from(self.map(maps::SVC_STATS)?).map_err(map_err(maps::SVC_STATS))?;
        let values = m.get(&svc_id, 0).map_err(map_err(maps::SVC_STATS))?;
        Ok(sum_service(values.iter()))
    }

    /// A conntrack handle for another thread.
    pub fn conntrack_handle(&self) -> Result<ConntrackHandle, DatapathError> {
        let id = |name: &'static str| -> Result<u32, DatapathError> {
            let data = map_data(self.map(name)?).ok_or(DatapathError::MissingMap { name })?;
            Ok(data.info().map_err(map_err(name))?.id())
        };
        Ok(ConntrackHandle {
            id: id(maps::CONNTRACK)?,
            backends_id: id(maps::BACKENDS)?,
            reaped_id: id(maps::BACKEND_REAPED)?,
        })
    }

    /// Every conntrack entry.
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
        let m: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.map(maps::CONNTRACK)?).map_err(map_err(maps::CONNTRACK))?;
        m.iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::CONNTRACK))
    }

    /// Names svc ids for inspection tools (`SVC_NAMES`): sets `set`, removes `gone`.
    pub fn set_svc_names(
        &mut self,
        set: &[(u32, String)],
        gone: &[u32],
    ) -> Result<(), DatapathError> {
        let mut m: HashMap<_, u32, SvcName> =
            HashMap::try_from(self.map_mut(maps::SVC_NAMES)?).map_err(map_err(maps::SVC_NAMES))?;
        for (id, text) in set {
            let mut v = SvcName::default();
            let bytes = text.as_bytes();
            let n = bytes.len().min(proxy_common::SVC_NAME_MAX);
            v.text[..n].copy_from_slice(&bytes[..n]);
            v.len = u32::try_from(n).unwrap_or(0);
            m.insert(id, v, 0).map_err(map_err(maps::SVC_NAMES))?;
        }
        for id in gone {
            ignore_missing(m.remove(id)).map_err(map_err(maps::SVC_NAMES))?;
        }
        Ok(())
    }

    /// This node's datapath settings.
    pub fn set_config(&mut self, config: &NodeConfig) -> Result<(), DatapathError> {
        let mut m: Array<_, NodeConfig> =
            Array::try_from(self.map_mut(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
        m.set(0, config, 0).map_err(map_err(maps::CONFIG))
    }

    /// Runs a program once on `frame` with BPF_PROG_TEST_RUN, returning the
    /// verdict and the output frame.
    pub fn test_run(
        &mut self,
        program: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutput, DatapathError> {
        self.test_run_on(program, frame, repeat, None)
    }

    /// As [`Datapath::test_run`], with the frame arriving on interface
    /// `ifindex` of the caller's network namespace (XDP:
    /// `xdp_md.ingress_ifindex`; TC: `__sk_buff.ingress_ifindex` and `ifindex`).
    pub fn test_run_on(
        &mut self,
        program: &'static str,
        frame: &[u8],
        repeat: u32,
        ifindex: Option<u32>,
    ) -> Result<TestRunOutput, DatapathError> {
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut xdp_md = [0u8; 24];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let err = |source| DatapathError::Program {
            name: program,
            source,
        };
        // struct __sk_buff (192 bytes): ingress_ifindex at 36, ifindex at 40.
        let mut skb = [0u8; 192];
        let result = match self.ebpf.program_mut(program) {
            Some(Program::SchedClassifier(p)) => {
                if let Some(index) = ifindex {
                    skb[36..40].copy_from_slice(&index.to_ne_bytes());
                    skb[40..44].copy_from_slice(&index.to_ne_bytes());
                    opts.ctx_in = Some(&skb);
                }
                p.test_run(opts).map_err(err)?
            }
            Some(Program::Xdp(p)) => {
                if let Some(index) = ifindex {
                    // The kernel wants data_end to be the frame's length.
                    let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
                    xdp_md[4..8].copy_from_slice(&len.to_ne_bytes());
                    xdp_md[12..16].copy_from_slice(&index.to_ne_bytes());
                    opts.ctx_in = Some(&xdp_md);
                }
                p.test_run(opts).map_err(err)?
            }
            Some(_) => {
                return Err(DatapathError::Bench(format!(
                    "{program}: not a TC or XDP program"
                )));
            }
            None => return Err(DatapathError::MissingProgram { name: program }),
        };
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            verdict: result.return_value as i32,
            frame: out,
            duration_ns: result.duration.as_nanos() as u64,
        })
    }
}

/// What the service maps hold. Reads in the reverse of the agent's write
/// order (frontends, then the tables they point at, then the backends those
/// list), so a snapshot taken while an agent writes never has a frontend
/// without its table or a table entry without its backend, only possibly
/// entries already left behind.
fn read_programmed_with(
    services: &Map,
    backends: &Map,
    ranges: &Map,
    read_tables: impl FnOnce() -> Result<BTreeMap<u32, Table>, DatapathError>,
) -> Result<Programmed, DatapathError> {
    let mut out = Programmed::default();
    let services: HashMap<_, ServiceKey, ServiceValue> =
        HashMap::try_from(services).map_err(map_err(maps::SERVICES))?;
    for entry in services.iter() {
        let (k, v) = entry.map_err(map_err(maps::SERVICES))?;
        out.services.insert(k, v);
    }
    out.tables = read_tables()?;
    let backends_data = map_data(backends).ok_or(DatapathError::MissingMap {
        name: maps::BACKENDS,
    })?;
    let len = backends_data
        .info()
        .map_err(map_err(maps::BACKENDS))?
        .max_entries();
    let all: Vec<Backend> = batch::read_array(backends_data.fd().as_fd(), 0, len)
        .map_err(|e| map_err(maps::BACKENDS)(MapError::IoError(e)))?;
    // Every set entry, also those no table refers to (left by an interrupted
    // apply): a full sync then deletes them.
    out.backends
        .extend((0u32..).zip(all).filter(|(_, b)| b.is_set()));
    let trie: LpmTrie<_, SourceRange, u32> =
        LpmTrie::try_from(ranges).map_err(map_err(maps::SOURCE_RANGES))?;
    for key in trie.keys() {
        let key = key.map_err(map_err(maps::SOURCE_RANGES))?;
        let data = key.data();
        let prefix = u8::try_from(key.prefix_len().saturating_sub(32)).unwrap_or(32);
        out.ranges
            .entry(u32::from_be(data.svc_id_be))
            .or_default()
            .insert((Ipv4Addr::from(data.addr_be.to_ne_bytes()), prefix));
    }
    Ok(out)
}

/// Opens one of the maps pinned under `pin_root`.
fn open_pinned(pin_root: &Path, name: &'static str) -> Result<MapData, DatapathError> {
    let path = pin_root
        .join(format!("v{PIN_LAYOUT_VERSION}"))
        .join("maps")
        .join(name);
    MapData::from_pin(path).map_err(|source| DatapathError::Map { name, source })
}

/// Reads the service maps a running (or stopped) agent pinned under
/// `pin_root`, without loading anything: for inspection commands.
pub fn read_pinned(pin_root: &Path) -> Result<Programmed, DatapathError> {
    let svc_table = open_pinned(pin_root, maps::SVC_TABLE)?;
    let selection = open_pinned(pin_root, maps::SELECTION)?;
    read_programmed_with(
        &Map::HashMap(open_pinned(pin_root, maps::SERVICES)?),
        &Map::Array(open_pinned(pin_root, maps::BACKENDS)?),
        &Map::LpmTrie(open_pinned(pin_root, maps::SOURCE_RANGES)?),
        || Ok(tables::read_tables_from(&svc_table, &selection)?.0),
    )
}

/// A handle on the conntrack map that can live on another thread (for
/// scans that must not hold up the event loop).
pub struct ConntrackHandle {
    id: u32,
    backends_id: u32,
    reaped_id: u32,
}

impl ConntrackHandle {
    fn open(&self) -> Result<HashMap<MapData, CtKey, CtValue>, DatapathError> {
        let map = Map::LruHashMap(MapData::from_id(self.id).map_err(map_err(maps::CONNTRACK))?);
        HashMap::try_from(map).map_err(map_err(maps::CONNTRACK))
    }

    /// Every entry (entries the datapath adds or evicts meanwhile may be
    /// missed or seen: callers decide on a consistent-enough snapshot).
    /// Read in batches where the kernel can, key by key otherwise.
    pub fn entries(&self) -> Result<std::collections::HashMap<CtKey, CtValue>, DatapathError> {
        match self.entries_batched() {
            Ok(entries) => Ok(entries),
            Err(e) => {
                tracing::debug!("{e}; reading entry by entry");
                Ok(self.open()?.iter().filter_map(Result::ok).collect())
            }
        }
    }

    /// Every entry, read thousands per system call (`BPF_MAP_LOOKUP_BATCH`).
    pub fn entries_batched(
        &self,
    ) -> Result<std::collections::HashMap<CtKey, CtValue>, DatapathError> {
        let data = MapData::from_id(self.id).map_err(map_err(maps::CONNTRACK))?;
        batch::read_hash::<CtKey, CtValue>(data.fd().as_fd())
            .map(|entries| entries.into_iter().collect())
            .map_err(|source| DatapathError::Batch {
                name: maps::CONNTRACK,
                source,
            })
    }

    /// Removes `keys` (entries of `entries`), returning how many were still
    /// there. FORWARD entries still counted for least-connections are
    /// recorded in `BACKEND_REAPED` (when the backend id still names their
    /// backend), so the datapath's open-flow counts stay true.
    pub fn remove(
        &self,
        entries: &std::collections::HashMap<CtKey, CtValue>,
        keys: &[CtKey],
    ) -> Result<usize, DatapathError> {
        self.remove_flows(entries, keys.iter().map(std::slice::from_ref), false)
    }

    /// As [`Self::remove`] for idle flows (each one or two keys of
    /// `entries`), except that a flow is re-read just before it goes and
    /// kept whole if any of its entries changed since `entries` was read: a
    /// packet refreshed it, or a new connection reused its tuple while the
    /// table was being scanned.
    pub fn remove_idle(
        &self,
        entries: &std::collections::HashMap<CtKey, CtValue>,
        flows: &[Vec<CtKey>],
    ) -> Result<usize, DatapathError> {
        self.remove_flows(entries, flows.iter().map(Vec::as_slice), true)
    }

    fn remove_flows<'a>(
        &self,
        entries: &std::collections::HashMap<CtKey, CtValue>,
        flows: impl Iterator<Item = &'a [CtKey]>,
        only_unchanged: bool,
    ) -> Result<usize, DatapathError> {
        // One writer of BACKEND_REAPED at a time (gc and flow cleanup run on
        // blocking threads).
        static REAPING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = REAPING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut ct = self.open()?;
        let backends: Array<_, Backend> = Array::try_from(Map::Array(
            MapData::from_id(self.backends_id).map_err(map_err(maps::BACKENDS))?,
        ))
        .map_err(map_err(maps::BACKENDS))?;
        let mut reaped: BTreeMap<u32, u32> = BTreeMap::new();
        let mut removed = 0;
        for flow in flows {
            if only_unchanged
                && flow
                    .iter()
                    .any(|k| ct.get(k, 0).is_ok_and(|now| Some(&now) != entries.get(k)))
            {
                continue;
            }
            for k in flow {
                if ct.remove(k).is_err() {
                    continue;
                }
                removed += 1;
                let Some(v) = entries.get(k) else { continue };
                let counted = k.dir == proxy_common::ct_dir::FORWARD
                    && v.flags & proxy_common::CT_F_COUNTED != 0;
                let same_backend = || {
                    backends
                        .get(&v.backend_id, 0)
                        .is_ok_and(|b| b.addr_be == v.nat_addr_be && b.port_be == v.nat_port_be)
                };
                if counted && same_backend() {
                    *reaped.entry(v.backend_id).or_default() += 1;
                }
            }
        }
        if reaped.is_empty() {
            return Ok(removed);
        }
        let mut counts: Array<_, u32> = Array::try_from(Map::Array(
            MapData::from_id(self.reaped_id).map_err(map_err(maps::BACKEND_REAPED))?,
        ))
        .map_err(map_err(maps::BACKEND_REAPED))?;
        for (id, n) in reaped {
            let before = counts.get(&id, 0).unwrap_or(0);
            counts
                .set(id, before.wrapping_add(n), 0)
                .map_err(map_err(maps::BACKEND_REAPED))?;
        }
        Ok(removed)
    }

    /// The table's capacity.
    pub fn capacity(&self) -> Result<u32, DatapathError> {
        let data = MapData::from_id(self.id).map_err(map_err(maps::CONNTRACK))?;
        Ok(data.info().map_err(map_err(maps::CONNTRACK))?.max_entries())
    }
}

/// Read-only handles on an agent's pinned service maps, for looking at single
/// entries without reading everything (inspection, benchmarks).
pub struct PinnedView {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    svc_table: Array<MapData, u32>,
    selection: MapData,
    backends: Array<MapData, Backend>,
}

impl PinnedView {
    /// Opens the maps pinned under `pin_root`.
    pub fn open(pin_root: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            services: HashMap::try_from(Map::HashMap(open_pinned(pin_root, maps::SERVICES)?))
                .map_err(map_err(maps::SERVICES))?,
            svc_table: Array::try_from(Map::Array(open_pinned(pin_root, maps::SVC_TABLE)?))
                .map_err(map_err(maps::SVC_TABLE))?,
            selection: open_pinned(pin_root, maps::SELECTION)?,
            backends: Array::try_from(Map::Array(open_pinned(pin_root, maps::BACKENDS)?))
                .map_err(map_err(maps::BACKENDS))?,
        })
    }

    /// The selection table behind a frontend and its backends' addresses.
    pub fn table_for(
        &self,
        key: &ServiceKey,
    ) -> Result<Option<(Table, Vec<std::net::SocketAddrV4>)>, DatapathError> {
        let svc = match self.services.get(key, 0) {
            Ok(v) => v,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(map_err(maps::SERVICES)(e)),
        };
        let first = self
            .svc_table
            .get(&svc.svc_id, 0)
            .map_err(map_err(maps::SVC_TABLE))?;
        if first == 0 {
            return Ok(None);
        }
        let capacity = self
            .selection
            .info()
            .map_err(map_err(maps::SELECTION))?
            .max_entries();
        let (table, _) =
            tables::read_table(self.selection.fd().as_fd(), svc.svc_id, first, capacity)?;
        let addrs = table
            .backends
            .iter()
            .map(|id| {
                self.backends
                    .get(id, 0)
                    .map(|b| crate::reconcile::backend_sockaddr(&b))
                    .map_err(map_err(maps::BACKENDS))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some((table, addrs)))
    }
}

/// Every conntrack entry of the maps pinned under `pin_root` (inspection).
pub fn read_pinned_conntrack(pin_root: &Path) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
    let data = open_pinned(pin_root, maps::CONNTRACK)?;
    let ct: HashMap<_, CtKey, CtValue> =
        HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(maps::CONNTRACK))?;
    ct.iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(maps::CONNTRACK))
}

/// Global counters of a running (or stopped) agent's pinned `STATS`, summed over CPUs.
pub fn read_pinned_counters(pin_root: &Path) -> Result<Vec<(Counter, u64)>, DatapathError> {
    let data = open_pinned(pin_root, maps::STATS)?;
    sum_counters(&PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(maps::STATS))?)
}

/// svc id → name text from a pinned `SVC_NAMES`.
pub fn read_pinned_names(pin_root: &Path) -> Result<BTreeMap<u32, String>, DatapathError> {
    let m: HashMap<_, u32, SvcName> =
        HashMap::try_from(Map::HashMap(open_pinned(pin_root, maps::SVC_NAMES)?))
            .map_err(map_err(maps::SVC_NAMES))?;
    Ok(m.iter()
        .filter_map(Result::ok)
        .map(|(id, v)| {
            let n = (v.len as usize).min(proxy_common::SVC_NAME_MAX);
            (id, String::from_utf8_lossy(&v.text[..n]).into_owned())
        })
        .collect())
}

/// Per-service counters of `ids` from a pinned `SVC_STATS`, summed over CPUs.
pub fn read_pinned_service_counters(
    pin_root: &Path,
    ids: impl IntoIterator<Item = u32>,
) -> Result<Vec<(u32, SvcCounters)>, DatapathError> {
    let data = open_pinned(pin_root, maps::SVC_STATS)?;
    let m: PerCpuArray<_, SvcCounters> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(maps::SVC_STATS))?;
    ids.into_iter()
        .map(|id| {
            let values = m.get(&id, 0).map_err(map_err(maps::SVC_STATS))?;
            Ok((id, sum_service(values.iter())))
        })
        .collect()
}

fn sum_service<'a>(values: impl Iterator<Item = &'a SvcCounters>) -> SvcCounters {
    values.fold(SvcCounters::default(), |acc, v| SvcCounters {
        packets: acc.packets + v.packets,
        bytes: acc.bytes + v.bytes,
        new_flows: acc.new_flows + v.new_flows,
        rejected: acc.rejected + v.rejected,
    })
}

fn sum_counters<T: std::borrow::Borrow<MapData>>(
    m: &PerCpuArray<T, u64>,
) -> Result<Vec<(Counter, u64)>, DatapathError> {
    Counter::ALL
        .iter()
        .map(|c| {
            let values = m.get(&(*c as u32), 0).map_err(map_err(maps::STATS))?;
            Ok((*c, values.iter().sum()))
        })
        .collect()
}

/// Result of one BPF_PROG_TEST_RUN.
#[derive(Clone, Debug)]
pub struct TestRunOutput {
    pub verdict: i32,
    pub frame: Vec<u8>,
    /// Kernel-measured average time per run.
    pub duration_ns: u64,
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
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

/// Whether a map error means "no such entry (or object)".
fn is_missing(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(e) if is_missing(&e) => Ok(()),
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
