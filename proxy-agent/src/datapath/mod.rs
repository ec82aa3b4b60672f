//! The datapath wrapper: the only module that touches aya.
//!
//! Loads the embedded eBPF object, sizes and pins its maps under
//! `<pin root>/v<PIN_LAYOUT_VERSION>/maps/` (adopting existing pins, so a
//! restarted agent keeps the conntrack table and the services), loads the
//! programs, attaches them with tcx links pinned under `.../links/`, and reads
//! and writes the maps on behalf of reconcile.

mod apply;
mod batch;
mod bench;
pub mod bpffs;
mod conntrack;
mod links;
mod migrate;
mod read;
mod sock;
mod sys;
mod test_run;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapError, PerCpuArray},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use aya_log::EbpfLogger;
use proxy_common::{Counter, NodeConfig, PIN_LAYOUT_VERSION, SvcCounters, maps};

pub use self::{
    bench::{
        BENCH_EMPTY, BENCH_EMPTY_XDP, BENCH_WRAPPER, BENCH_WRAPPER_XDP, BenchSpec,
        enable_run_stats, program_run_stats,
    },
    conntrack::ConntrackHandle,
    migrate::{Migration, carried},
    read::{
        PinnedView, open_pinned, read_pinned, read_pinned_conntrack, read_pinned_counters,
        read_pinned_node, read_pinned_service_counters, read_pinned_sock_peers,
    },
    sock::{SockHandle, pinned_sock_hooks},
    test_run::TestRunOutput,
};
use crate::programmed::{Capacity, Programmed};

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
    #[error("selection tables of svc {0} and svc {1} overlap")]
    TablesOverlap(u32, u32),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// An error with its sources (aya's syscall errors keep the errno there).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Capacities of the maps the agent sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub frontends: u32,
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
    /// `CT_NEW` entries (half-open TCP flows, two each).
    pub ct_new: u32,
    /// 64-byte blocks for selection tables.
    pub selection_blocks: u32,
    /// `loadBalancerSourceRanges` CIDRs over all Services.
    pub source_ranges: u32,
    /// `SOCK_NAT` entries (socket-level load balancing).
    pub sock_entries: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            frontends: maps::DEFAULT_MAX_FRONTENDS,
            services: maps::DEFAULT_MAX_SERVICES,
            backends: maps::DEFAULT_MAX_BACKENDS,
            conntrack: maps::DEFAULT_CT_ENTRIES,
            ct_new: maps::DEFAULT_CT_NEW_ENTRIES,
            selection_blocks: maps::DEFAULT_SELECTION_BLOCKS,
            source_ranges: maps::DEFAULT_SOURCE_RANGES,
            sock_entries: maps::DEFAULT_SOCK_ENTRIES,
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
    /// Socket hook links of a datapath without pins (they live as long as it).
    sock_links: Vec<aya::programs::links::FdLink>,
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
            .map_max_entries(maps::SVC_NAMES, sizes.services)
            .map_max_entries(maps::BACKENDS, sizes.backends)
            .map_max_entries(maps::CONNTRACK, sizes.conntrack)
            .map_max_entries(maps::CT_NEW, sizes.ct_new)
            .map_max_entries(maps::SOURCE_RANGES, sizes.source_ranges)
            .map_max_entries(maps::SOCK_NAT, sizes.sock_entries)
            .map_max_entries(maps::SOCK_PEER, sizes.sock_entries)
            .map_max_entries(maps::BACKEND_CONNS, sizes.backends)
            .map_max_entries(maps::BACKEND_REAPED, sizes.backends)
            .map_max_entries(maps::ROUTES, sizes.backends)
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
        for name in [
            maps::programs::XDP_EXT,
            maps::programs::XDP_PASS,
            maps::programs::XDP_EXT_SLOW,
        ] {
            xdp(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        for name in [maps::programs::TC_POD_SLOW, maps::programs::TC_EXT_SLOW] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        link_slow_programs(&mut ebpf)?;
        let mut dp = Self {
            ebpf,
            layout_dir,
            logger,
            attached: BTreeSet::new(),
            sock_links: Vec::new(),
            capacity: Capacity {
                frontends: 0,
                services: 0,
                backends: 0,
                ranges: 0,
                blocks: 0,
            },
        };
        dp.load_sock_programs()?;
        // Routes remembered before this load (by an agent before us, while
        // the network may have changed) are looked up again.
        dp.bump_route_generation()?;
        dp.capacity = Capacity {
            frontends: dp.max_entries(maps::SERVICES)?,
            services: dp
                .max_entries(maps::SVC_TABLE)?
                .min(dp.max_entries(maps::SVC_STATS)?)
                .min(dp.max_entries(maps::SVC_NAMES)?),
            backends: dp.max_entries(maps::BACKENDS)?,
            ranges: dp.max_entries(maps::SOURCE_RANGES)?,
            blocks: dp.max_entries(maps::SELECTION)?,
        };
        if dp.capacity.frontends != sizes.frontends
            || dp.capacity.backends != sizes.backends
            || dp.capacity.services != sizes.services
            || dp.capacity.blocks != sizes.selection_blocks
        {
            tracing::warn!(
                actual = ?dp.capacity,
                requested = ?sizes,
                "adopted pinned maps keep their original sizes; remove the pins to resize"
            );
        }
        Ok(dp)
    }

    /// What the verifier did for each loaded program: (name, instructions
    /// it processed), in `maps::programs::ALL` order. Program load time is
    /// mostly verification, so this is what the agent's start costs.
    pub fn verified_instructions(&self) -> Result<Vec<(&'static str, u32)>, DatapathError> {
        maps::programs::ALL
            .iter()
            .map(|&name| {
                let program = self
                    .ebpf
                    .program(name)
                    .ok_or(DatapathError::MissingProgram { name })?;
                let info = program
                    .info()
                    .map_err(|source| DatapathError::Program { name, source })?;
                Ok((name, info.verified_instruction_count().unwrap_or(0)))
            })
            .collect()
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
        read::programmed(&read::ServiceMaps {
            services: self.map(maps::SERVICES)?,
            svc_table: self.map(maps::SVC_TABLE)?,
            selection: self.map(maps::SELECTION)?,
            backends: self.map(maps::BACKENDS)?,
            ranges: self.map(maps::SOURCE_RANGES)?,
            names: self.map(maps::SVC_NAMES)?,
        })
    }

    /// Global counters, summed over CPUs, in `Counter` order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, DatapathError> {
        read::sum_counters(
            &PerCpuArray::try_from(self.map(maps::STATS)?).map_err(map_err(maps::STATS))?,
        )
    }

    /// Counters of one service port, summed over CPUs.
    pub fn service_counters(&self, svc_id: u32) -> Result<SvcCounters, DatapathError> {
        let m: PerCpuArray<_, SvcCounters> =
            PerCpuArray::try_from(self.map(maps::SVC_STATS)?).map_err(map_err(maps::SVC_STATS))?;
        let values = m.get(&svc_id, 0).map_err(map_err(maps::SVC_STATS))?;
        Ok(read::sum_service(values.iter()))
    }

    /// Makes every route the datapath remembers (`ROUTES`) stale: the next
    /// packet to each remote backend looks its route up again. Called at
    /// load and whenever a route, address, link or neighbour changes.
    pub fn bump_route_generation(&mut self) -> Result<(), DatapathError> {
        let mut m: Array<_, u32> =
            Array::try_from(self.map_mut(maps::ROUTE_GEN)?).map_err(map_err(maps::ROUTE_GEN))?;
        let current = m.get(&0, 0).map_err(map_err(maps::ROUTE_GEN))?;
        // 0 means "remember nothing": skipped when the counter wraps.
        let next = current.wrapping_add(1).max(1);
        m.set(0, next, 0).map_err(map_err(maps::ROUTE_GEN))
    }

    /// This node's datapath settings.
    pub fn set_config(&mut self, config: &NodeConfig) -> Result<(), DatapathError> {
        let mut m: Array<_, NodeConfig> =
            Array::try_from(self.map_mut(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
        m.set(0, config, 0).map_err(map_err(maps::CONFIG))
    }
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

/// Puts the slow programs into their program arrays (`SLOW_TC`,
/// `SLOW_XDP`), where the fast programs' tail calls find them.
fn link_slow_programs(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    use maps::{programs, slow};
    for (array, slot, name) in [
        (maps::SLOW_TC, slow::EXT, programs::TC_EXT_SLOW),
        (maps::SLOW_TC, slow::POD, programs::TC_POD_SLOW),
        (maps::SLOW_XDP, slow::EXT, programs::XDP_EXT_SLOW),
    ] {
        let fd = match ebpf.program(name) {
            Some(aya::programs::Program::Xdp(p)) => p.fd(),
            Some(aya::programs::Program::SchedClassifier(p)) => p.fd(),
            _ => return Err(DatapathError::MissingProgram { name }),
        }
        .map_err(|source| DatapathError::Program { name, source })?
        .try_clone()
        .map_err(|e| DatapathError::Bench(e.to_string()))?;
        let map = ebpf
            .map_mut(array)
            .ok_or(DatapathError::MissingMap { name: array })?;
        let mut slots = aya::maps::ProgramArray::try_from(map).map_err(map_err(array))?;
        slots.set(slot, &fd, 0).map_err(map_err(array))?;
    }
    Ok(())
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
    // The root is ours unless it is the bpffs mount itself, which other
    // tools share.
    if !bpffs::is_mount_point(root) {
        bpffs::private_dir(root).map_err(err)?;
    }
    let dir = root.join(format!("v{PIN_LAYOUT_VERSION}"));
    for d in [dir.clone(), dir.join("maps"), dir.join("links")] {
        bpffs::private_dir(&d).map_err(err)?;
    }
    Ok(dir)
}
