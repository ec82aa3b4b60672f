//! Reading the maps back: everything reconcile needs ([`programmed`], at
//! start and after a failed apply), and read-only views of a running agent's
//! pins for the inspection commands and metrics.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, BorrowedFd},
    path::Path,
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use proxy_common::{
    Backend, Counter, CtKey, CtValue, NodeConfig, PIN_LAYOUT_VERSION, SelBlock, ServiceKey,
    ServiceValue, SockPeer, SourceRange, SvcCounters, SvcName, maps,
};

use super::{DatapathError, batch, is_missing, map_data, map_err};
use crate::{
    model::Cidr,
    programmed::{Programmed, Table},
};

/// The maps [`programmed`] reads.
pub(super) struct ServiceMaps<'a> {
    pub services: &'a Map,
    pub svc_table: &'a Map,
    pub selection: &'a Map,
    pub backends: &'a Map,
    pub ranges: &'a Map,
    pub names: &'a Map,
}

fn data<'a>(map: &'a Map, name: &'static str) -> Result<&'a MapData, DatapathError> {
    map_data(map).ok_or(DatapathError::MissingMap { name })
}

fn io_err(name: &'static str) -> impl Fn(std::io::Error) -> DatapathError {
    move |e| map_err(name)(MapError::IoError(e))
}

fn max_entries(map: &MapData, name: &'static str) -> Result<u32, DatapathError> {
    Ok(map.info().map_err(map_err(name))?.max_entries())
}

/// What the service maps hold. Reads in the reverse of the agent's write
/// order (frontends, then the tables they point at, then the backends those
/// list), so a snapshot taken while an agent writes never has a frontend
/// without its table or a table entry without its backend, only possibly
/// entries already left behind.
pub(super) fn programmed(m: &ServiceMaps<'_>) -> Result<Programmed, DatapathError> {
    let mut out = Programmed::default();
    let services: HashMap<_, ServiceKey, ServiceValue> =
        HashMap::try_from(m.services).map_err(map_err(maps::SERVICES))?;
    for entry in services.iter() {
        let (k, v) = entry.map_err(map_err(maps::SERVICES))?;
        out.services.insert(k, v);
    }
    (out.tables, out.regions) = tables(
        data(m.svc_table, maps::SVC_TABLE)?,
        data(m.selection, maps::SELECTION)?,
    )?;
    let backends = data(m.backends, maps::BACKENDS)?;
    let len = max_entries(backends, maps::BACKENDS)?;
    let all: Vec<Backend> =
        batch::read_array(backends.fd().as_fd(), 0, len).map_err(io_err(maps::BACKENDS))?;
    // Every set entry, also those no table refers to (left by an interrupted
    // apply): a full sync then deletes them.
    out.backends
        .extend((0u32..).zip(all).filter(|(_, b)| b.is_set()));
    let trie: LpmTrie<_, SourceRange, u32> =
        LpmTrie::try_from(m.ranges).map_err(map_err(maps::SOURCE_RANGES))?;
    for key in trie.keys() {
        let key = key.map_err(map_err(maps::SOURCE_RANGES))?;
        let range = key.data();
        if let Some(cidr) = Cidr::new(range.addr(), SourceRange::cidr_prefix(key.prefix_len())) {
            out.ranges.entry(range.svc_id()).or_default().insert(cidr);
        }
    }
    // A name that does not parse is as good as none: a full sync rewrites it.
    out.names = names(data(m.names, maps::SVC_NAMES)?)?
        .into_iter()
        .filter_map(|(id, text)| Some((id, text.parse().ok()?)))
        .collect();
    Ok(out)
}

/// svc id → name text of `SVC_NAMES`.
fn names(map: &MapData) -> Result<BTreeMap<u32, String>, DatapathError> {
    let entries: Vec<(u32, SvcName)> =
        batch::read_hash(map.fd().as_fd()).map_err(|source| DatapathError::Batch {
            name: maps::SVC_NAMES,
            source,
        })?;
    Ok(entries
        .into_iter()
        .map(|(id, v)| (id, v.text().to_owned()))
        .collect())
}

/// Reads the table of `svc_id` starting at block `first` of `SELECTION`
/// (`capacity` blocks).
fn table(
    selection: BorrowedFd<'_>,
    svc_id: u32,
    first: u32,
    capacity: u32,
) -> Result<Table, DatapathError> {
    let bad = || DatapathError::BadTable { svc_id };
    let header: Vec<SelBlock> =
        batch::read_array(selection, first, 1).map_err(io_err(maps::SELECTION))?;
    let len = Table::blocks_of_header(header.first().ok_or_else(bad)?);
    if u64::from(first) + u64::from(len) > u64::from(capacity) {
        return Err(bad());
    }
    let raw: Vec<SelBlock> =
        batch::read_array(selection, first, len).map_err(io_err(maps::SELECTION))?;
    Table::from_blocks(&raw).ok_or_else(bad)
}

/// The tables behind `SVC_TABLE` and their regions, checked not to overlap.
type Tables = (BTreeMap<u32, Table>, BTreeMap<u32, u32>);

fn tables(svc_table: &MapData, selection: &MapData) -> Result<Tables, DatapathError> {
    let svc_len = max_entries(svc_table, maps::SVC_TABLE)?;
    let capacity = max_entries(selection, maps::SELECTION)?;
    let firsts: Vec<u32> =
        batch::read_array(svc_table.fd().as_fd(), 0, svc_len).map_err(io_err(maps::SVC_TABLE))?;
    let mut tables = BTreeMap::new();
    let mut regions = BTreeMap::new();
    // Regions by start, to check none overlaps the next.
    let mut spans: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
    for (svc_id, first) in (0u32..).zip(firsts) {
        if first == 0 {
            continue;
        }
        let t = table(selection.fd().as_fd(), svc_id, first, capacity)?;
        spans.insert(first, (first + t.blocks(), svc_id));
        tables.insert(svc_id, t);
        regions.insert(svc_id, first);
    }
    let mut previous: Option<(u32, u32)> = None;
    for (end, id) in spans.values() {
        if let Some((prev_end, prev_id)) = previous
            && regions[id] < prev_end
        {
            return Err(DatapathError::TablesOverlap(prev_id, *id));
        }
        previous = Some((*end, *id));
    }
    Ok((tables, regions))
}

/// Opens one of the maps pinned under `pin_root`.
/// The map `name` pinned under `pin_root`, opened read-only: inspection
/// never writes (the kernel refuses writes through this descriptor).
pub fn open_pinned(pin_root: &Path, name: &'static str) -> Result<MapData, DatapathError> {
    let path = pin_root
        .join(format!("v{PIN_LAYOUT_VERSION}"))
        .join("maps")
        .join(name);
    let fd = super::sys::obj_get_read_only(&path).map_err(|io_error| DatapathError::Map {
        name,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "BPF_OBJ_GET",
            io_error,
        }),
    })?;
    MapData::from_fd(fd).map_err(|source| DatapathError::Map { name, source })
}

/// Reads the service maps a running (or stopped) agent pinned under
/// `pin_root`, without loading anything: for inspection commands.
pub fn read_pinned(pin_root: &Path) -> Result<Programmed, DatapathError> {
    programmed(&ServiceMaps {
        services: &Map::HashMap(open_pinned(pin_root, maps::SERVICES)?),
        svc_table: &Map::Array(open_pinned(pin_root, maps::SVC_TABLE)?),
        selection: &Map::Array(open_pinned(pin_root, maps::SELECTION)?),
        backends: &Map::Array(open_pinned(pin_root, maps::BACKENDS)?),
        ranges: &Map::LpmTrie(open_pinned(pin_root, maps::SOURCE_RANGES)?),
        names: &Map::HashMap(open_pinned(pin_root, maps::SVC_NAMES)?),
    })
}

/// Read-only handles on an agent's pinned service maps, for looking at single
/// entries without reading everything (inspection, benchmarks, metrics).
pub struct PinnedView {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    svc_table: Array<MapData, u32>,
    selection: MapData,
    backends: Array<MapData, Backend>,
    names: MapData,
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
            names: open_pinned(pin_root, maps::SVC_NAMES)?,
        })
    }

    /// svc id → name text, as `SVC_NAMES` holds them.
    pub fn names(&self) -> Result<BTreeMap<u32, String>, DatapathError> {
        names(&self.names)
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
        let capacity = max_entries(&self.selection, maps::SELECTION)?;
        let table = table(self.selection.fd().as_fd(), svc.svc_id, first, capacity)?;
        let addrs = table
            .backends
            .iter()
            .map(|id| {
                self.backends
                    .get(id, 0)
                    .map(|b| b.addr())
                    .map_err(map_err(maps::BACKENDS))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some((table, addrs)))
    }
}

/// Every conntrack entry of the maps pinned under `pin_root` (inspection):
/// established flows (`CONNTRACK`), then half-open ones (`CT_NEW`).
pub fn read_pinned_conntrack(pin_root: &Path) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
    let mut all = Vec::new();
    for name in [maps::CONNTRACK, maps::CT_NEW] {
        let data = open_pinned(pin_root, name)?;
        let ct: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(name))?;
        for entry in ct.iter() {
            all.push(entry.map_err(map_err(name))?);
        }
    }
    Ok(all)
}

/// The connected sockets the hooks translated and that are still open
/// (`SOCK_PEER`, by socket cookie), from the pins (inspection).
pub fn read_pinned_sock_peers(pin_root: &Path) -> Result<Vec<(u64, SockPeer)>, DatapathError> {
    let data = open_pinned(pin_root, maps::SOCK_PEER)?;
    let m: HashMap<_, u64, SockPeer> =
        HashMap::try_from(Map::HashMap(data)).map_err(map_err(maps::SOCK_PEER))?;
    m.iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(maps::SOCK_PEER))
}

/// The `CONFIG` of a running (or stopped) agent, and the socket hooks it
/// attached (empty: socket-level load balancing off).
pub fn read_pinned_node(pin_root: &Path) -> Result<(NodeConfig, Vec<String>), DatapathError> {
    let m: Array<_, NodeConfig> = Array::try_from(Map::Array(open_pinned(pin_root, maps::CONFIG)?))
        .map_err(map_err(maps::CONFIG))?;
    let config = m.get(&0, 0).map_err(map_err(maps::CONFIG))?;
    let layout = pin_root.join(format!("v{PIN_LAYOUT_VERSION}"));
    Ok((config, super::sock::pinned_sock_hooks(&layout)))
}

/// Global counters of a running (or stopped) agent's pinned `STATS`, summed over CPUs.
pub fn read_pinned_counters(pin_root: &Path) -> Result<Vec<(Counter, u64)>, DatapathError> {
    let data = open_pinned(pin_root, maps::STATS)?;
    sum_counters(&PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(maps::STATS))?)
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

pub(super) fn sum_service<'a>(values: impl Iterator<Item = &'a SvcCounters>) -> SvcCounters {
    values.fold(SvcCounters::default(), |acc, v| SvcCounters {
        packets: acc.packets + v.packets,
        bytes: acc.bytes + v.bytes,
        new_flows: acc.new_flows + v.new_flows,
        rejected: acc.rejected + v.rejected,
    })
}

pub(super) fn sum_counters<T: std::borrow::Borrow<MapData>>(
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
