//! Reconcile: diff the desired state against what the maps hold and produce the
//! map operations, in an order that never shows a packet a half-built service.
//!
//! Pure: no aya in here. The datapath module reads the maps into a
//! [`Programmed`] and executes the [`Op`]s.
//!
//! Order of operations, in phases (the datapath runs each phase as batches):
//! 1. frontends that go away (a removed service stops matching first),
//! 2. new backends,
//! 3. counters of newly used svc ids reset,
//! 4. selection tables: each written complete, then switched to atomically,
//! 5. frontends: new ones and those changing service, all pointing at
//!    complete tables by now,
//! 6. selection tables of removed services (after 5: a frontend that moves
//!    to another table, say when an external table is folded into the
//!    internal one, points at its old table until then),
//! 7. backends nothing refers to any more.
//!
//! Capacity is planned, not discovered: the agent is the only writer of these
//! maps, so a service that would not fit is refused whole (and keeps its
//! previous state, if any) before any operation is issued.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
};

use proxy_common::{
    BACKEND_F_LOCAL, Backend, SEL_F_DROP_WHEN_EMPTY, SEL_HDR_AFFINITY_TIMEOUT, SEL_HDR_ALGORITHM,
    SEL_HDR_COUNT, SEL_HDR_DRAINING, SEL_HDR_FLAGS, SEL_HDR_HASH_MODE, SEL_HDR_TABLE_BLOCK,
    SEL_HDR_TABLE_SIZE, SEL_HDR_WEIGHTS_BLOCK, SEL_WORDS, SVC_F_DSR, SVC_F_SOURCE_RANGES, SelBlock,
    ServiceKey, ServiceValue, hash_mode, scope, sel_backend_pos, sel_blocks, sel_entry_pos,
};

use crate::{
    maglev,
    model::{DesiredState, NodePortMode, ServicePlan, ServicePortName},
};

/// A selection table as the agent writes it (see `proxy_common::SelBlock`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// `proxy_common::algorithm`.
    pub algorithm: u32,
    /// `proxy_common::hash_mode`.
    pub hash_mode: u32,
    /// Backend ids eligible for new flows; Maglev entries index this list.
    pub backends: Vec<u32>,
    /// Weights, parallel to `backends`.
    pub weights: Vec<u32>,
    /// Backend ids that take no new flows but keep their existing ones.
    pub draining: Vec<u32>,
    /// Maglev table size; 0 without a table.
    pub table_size: u32,
    /// The Maglev table: `table_size` indices into `backends`.
    pub entries: Vec<u16>,
    /// With no backend: drop (`true`) or reject (`false`) new flows.
    pub drop_when_empty: bool,
    /// Session affinity timeout in seconds (0: none).
    pub affinity_timeout: u32,
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Table {
    /// First block of the weights and of the Maglev table.
    fn layout(&self) -> (u32, u32) {
        let n = len32(self.backends.len());
        let d = len32(self.draining.len());
        let weights = 1 + (n + d).div_ceil(SEL_WORDS as u32);
        (weights, weights + n.div_ceil(SEL_WORDS as u32))
    }

    /// Encodes the table into the blocks of its inner map.
    pub fn to_blocks(&self) -> Vec<SelBlock> {
        let n = len32(self.backends.len());
        let d = len32(self.draining.len());
        let (weights_block, table_block) = self.layout();
        let mut blocks = vec![SelBlock::default(); sel_blocks(n, d, self.table_size) as usize];
        let header = &mut blocks[0].w;
        header[SEL_HDR_COUNT] = n;
        header[SEL_HDR_ALGORITHM] = self.algorithm;
        header[SEL_HDR_TABLE_SIZE] = self.table_size;
        header[SEL_HDR_TABLE_BLOCK] = table_block;
        header[SEL_HDR_HASH_MODE] = self.hash_mode;
        header[SEL_HDR_DRAINING] = d;
        header[SEL_HDR_WEIGHTS_BLOCK] = weights_block;
        header[SEL_HDR_FLAGS] = if self.drop_when_empty {
            SEL_F_DROP_WHEN_EMPTY
        } else {
            0
        };
        header[SEL_HDR_AFFINITY_TIMEOUT] = self.affinity_timeout;
        for (i, id) in (0u32..).zip(self.backends.iter().chain(&self.draining)) {
            let (block, word) = sel_backend_pos(i);
            blocks[block as usize].w[word] = *id;
        }
        for (i, w) in (0u32..).zip(&self.weights) {
            let block = weights_block + i / SEL_WORDS as u32;
            blocks[block as usize].w[(i % SEL_WORDS as u32) as usize] = *w;
        }
        for (slot, e) in (0u32..).zip(&self.entries) {
            let (block, word, shift) = sel_entry_pos(slot);
            blocks[(table_block + block) as usize].w[word] |= u32::from(*e) << shift;
        }
        blocks
    }

    /// Decodes the blocks of an inner map; `None` if they are inconsistent.
    pub fn from_blocks(blocks: &[SelBlock]) -> Option<Self> {
        let h = &blocks.first()?.w;
        let (n, d, m) = (h[SEL_HDR_COUNT], h[SEL_HDR_DRAINING], h[SEL_HDR_TABLE_SIZE]);
        if blocks.len() < sel_blocks(n, d, m) as usize {
            return None;
        }
        let mut table = Self {
            algorithm: h[SEL_HDR_ALGORITHM],
            hash_mode: h[SEL_HDR_HASH_MODE],
            table_size: m,
            drop_when_empty: h[SEL_HDR_FLAGS] & SEL_F_DROP_WHEN_EMPTY != 0,
            affinity_timeout: h[SEL_HDR_AFFINITY_TIMEOUT],
            ..Self::default()
        };
        let ids: Vec<u32> = (0..n + d)
            .map(|i| {
                let (block, word) = sel_backend_pos(i);
                blocks[block as usize].w[word]
            })
            .collect();
        table.backends = ids[..n as usize].to_vec();
        table.draining = ids[n as usize..].to_vec();
        let (weights_block, table_block) = table.layout();
        if (weights_block, table_block) != (h[SEL_HDR_WEIGHTS_BLOCK], h[SEL_HDR_TABLE_BLOCK]) {
            return None;
        }
        table.weights = (0..n)
            .map(|i| {
                blocks[(weights_block + i / SEL_WORDS as u32) as usize].w
                    [(i % SEL_WORDS as u32) as usize]
            })
            .collect();
        table.entries = (0..m)
            .map(|slot| {
                let (block, word, shift) = sel_entry_pos(slot);
                (blocks[(table_block + block) as usize].w[word] >> shift) as u16
            })
            .collect();
        if table.entries.iter().any(|e| u32::from(*e) >= n) {
            return None;
        }
        Some(table)
    }

    /// The backend id the datapath picks for a new flow from `src` to `dst`
    /// with this table, when the choice is deterministic (Maglev); `None` for
    /// random selection or an empty table. Mirrors `proxy-ebpf/src/select.rs`
    /// with the same hash functions.
    pub fn predict(&self, src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Option<u32> {
        let hash = self.maglev_hash(src, dst, proto)?;
        let entry = self.entries.get((hash % self.table_size) as usize)?;
        self.backends.get(usize::from(*entry)).copied()
    }

    /// The hash a new flow's Maglev slot comes from (`hash % table_size`),
    /// for a Maglev table; `None` otherwise.
    pub fn maglev_hash(&self, src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Option<u32> {
        if self.algorithm != proxy_common::algorithm::MAGLEV || self.table_size == 0 {
            return None;
        }
        Some(if self.hash_mode == hash_mode::SOURCE {
            proxy_common::hash::source_hash(u32::from(*src.ip()))
        } else {
            proxy_common::hash::flow_hash(
                u32::from(*src.ip()),
                u32::from(*dst.ip()),
                src.port(),
                dst.port(),
                proto,
            )
        })
    }

    /// Bytes this table takes in the kernel.
    pub fn bytes(&self) -> u64 {
        maglev::table_bytes(
            len32(self.backends.len()),
            len32(self.draining.len()),
            self.table_size,
        )
    }
}

/// A client CIDR of `loadBalancerSourceRanges`: (address, prefix length).
pub type Range = (Ipv4Addr, u8);

/// What the service maps hold, in agent terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub tables: BTreeMap<u32, Table>,
    pub backends: BTreeMap<u32, Backend>,
    /// `SOURCE_RANGES`: per svc id, the client CIDRs its restricted
    /// (LoadBalancer) frontends accept.
    pub ranges: BTreeMap<u32, BTreeSet<Range>>,
}

/// Map capacities (max_entries). Ids run from 1 to capacity − 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub frontends: u32,
    pub services: u32,
    pub backends: u32,
    /// `SOURCE_RANGES` entries.
    pub ranges: u32,
}

/// One map operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    DelService(ServiceKey),
    DelTable(u32),
    SetBackend(u32, Backend),
    /// Zero the per-service counters of a newly used svc id.
    ResetSvcStats(u32),
    SetTable(u32, Table),
    SetService(ServiceKey, ServiceValue),
    DelBackend(u32),
    /// Source ranges of a svc id: CIDRs to add, then CIDRs to remove.
    SetRanges(u32, Vec<Range>, Vec<Range>),
}

/// The operations of one reconcile pass, and the Service ports it refused.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub ops: Vec<Op>,
    /// Service ports that were not (re)programmed, and why; they keep their
    /// previous state.
    pub refused: Vec<(ServicePortName, String)>,
    /// (svc id, backend id) pairs where the backend left a UDP service: its
    /// flows should be forgotten so clients move on.
    pub left: BTreeSet<(u32, u32)>,
    /// Backends no Service refers to any more (no slice lists them): their
    /// flows, of any protocol, should end.
    pub gone: BTreeSet<SocketAddrV4>,
    /// Tables that got a svc id in this batch (every table, for a full sync:
    /// `names_complete`), and svc ids that went.
    pub named: Vec<(TableName, u32)>,
    pub unnamed: Vec<u32>,
    pub names_complete: bool,
}

/// Raw network-order value of an address, as the datapath compares it.
pub fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Raw network-order value of a port.
pub fn port_be(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// Address:port of a backend entry.
pub fn backend_sockaddr(b: &Backend) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(b.addr_be.to_ne_bytes()),
        u16::from_be_bytes(b.port_be.to_ne_bytes()),
    )
}

fn backend_entry(addr: SocketAddrV4, local: bool) -> Backend {
    Backend {
        addr_be: addr_be(*addr.ip()),
        port_be: port_be(addr.port()),
        flags: if local { BACKEND_F_LOCAL } else { 0 },
        _pad: 0,
    }
}

/// Names one selection table of a Service port: the one its ClusterIPs use
/// (and its external frontends too, when they use the same backends), or the
/// external frontends' own.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub port: ServicePortName,
    pub external: bool,
}

/// One selection table to program and the frontends that use it.
#[derive(Clone, Debug)]
pub struct Unit<'a> {
    pub name: TableName,
    pub plan: &'a ServicePlan,
    /// Backends eligible for new flows.
    pub backends: &'a [SocketAddrV4],
    /// Maglev table size; `None` without a table.
    pub table_size: Option<u32>,
    /// Frontend keys and their `SVC_F_*` flags.
    pub keys: BTreeMap<ServiceKey, u32>,
    /// Source ranges its LoadBalancer frontends are restricted to (empty: none).
    pub ranges: BTreeSet<Range>,
}

/// The tables a service port needs and their frontends, as the datapath
/// serves them: ClusterIPs in the internal scope, NodePorts (on a known
/// address), LoadBalancer IPs and externalIPs in the external scope.
pub fn units(plan: &ServicePlan, mode: NodePortMode) -> Vec<Unit<'_>> {
    let proto = plan.id.protocol.number();
    let ext_flags = if mode.dsr(plan.id.protocol) {
        SVC_F_DSR
    } else {
        0
    };
    let key = |f: &crate::model::Frontend, scope| ServiceKey {
        addr_be: addr_be(f.address),
        port_be: port_be(f.port),
        proto,
        scope,
    };
    let internal: BTreeMap<ServiceKey, u32> = plan
        .frontends
        .iter()
        .filter(|f| f.kind.is_internal())
        .map(|f| (key(f, scope::INTERNAL), 0))
        .collect();
    // kube-proxy applies loadBalancerSourceRanges to LoadBalancer IPs only.
    let ranges: BTreeSet<Range> = plan
        .source_ranges
        .iter()
        .filter_map(|r| r.parse::<crate::translate::Cidr>().ok())
        .map(|c| (c.addr, c.prefix))
        .collect();
    let external: BTreeMap<ServiceKey, u32> = plan
        .frontends
        .iter()
        .filter(|f| !f.kind.is_internal() && !f.address.is_unspecified())
        .map(|f| {
            let restricted =
                f.kind == crate::model::FrontendKind::LoadBalancer && !ranges.is_empty();
            let flags = ext_flags | if restricted { SVC_F_SOURCE_RANGES } else { 0 };
            (key(f, scope::EXTERNAL), flags)
        })
        .collect();
    let restricted = external.values().any(|f| f & SVC_F_SOURCE_RANGES != 0);
    let ranges = if restricted { ranges } else { BTreeSet::new() };
    let unit = |external, backends, table_size, keys, ranges| Unit {
        name: TableName {
            port: plan.id.clone(),
            external,
        },
        plan,
        backends,
        table_size,
        keys,
        ranges,
    };
    if plan.has_external_table() {
        vec![
            unit(
                false,
                &plan.internal_backends[..],
                plan.maglev_table_size,
                internal,
                BTreeSet::new(),
            ),
            unit(
                true,
                &plan.external_backends[..],
                plan.external_maglev_table_size,
                external,
                ranges,
            ),
        ]
    } else {
        let mut keys = internal;
        keys.extend(external);
        vec![unit(
            false,
            &plan.internal_backends[..],
            plan.maglev_table_size,
            keys,
            ranges,
        )]
    }
}

/// Frontend keys of a service port, over all its tables.
pub fn frontend_keys(plan: &ServicePlan, mode: NodePortMode) -> Vec<ServiceKey> {
    units(plan, mode)
        .into_iter()
        .flat_map(|u| u.keys.into_keys())
        .collect()
}

/// Builds a unit's Maglev table from its backends and weights.
fn build_entries(unit: &Unit) -> Result<Vec<u16>, maglev::MaglevError> {
    let pairs: Vec<(SocketAddrV4, u32)> = unit
        .backends
        .iter()
        .map(|b| (*b, unit.plan.weight(b)))
        .collect();
    maglev::build(&pairs, unit.table_size.unwrap_or(0))
}

/// Lowest-free id allocator over `1..limit`: ids below `high` that are free
/// are kept in a set, so taking and giving back are O(log n).
#[derive(Clone, Debug)]
struct Ids {
    limit: u32,
    /// Every id at or above this is free.
    high: u32,
    /// Free ids below `high`.
    free: BTreeSet<u32>,
}

impl Ids {
    fn new(limit: u32, taken: impl IntoIterator<Item = u32>) -> Self {
        let taken: BTreeSet<u32> = taken.into_iter().filter(|id| *id != 0).collect();
        let high = taken.last().map_or(1, |max| max + 1);
        let free = (1..high).filter(|id| !taken.contains(id)).collect();
        Self { limit, high, free }
    }

    fn take(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.high < self.limit).then(|| {
            self.high += 1;
            self.high - 1
        })
    }

    fn give_back(&mut self, id: u32) {
        if id + 1 == self.high {
            self.high -= 1;
            // Fold free ids just below the new high-water mark into it.
            while self.high > 1 && self.free.remove(&(self.high - 1)) {
                self.high -= 1;
            }
        } else if id < self.high {
            self.free.insert(id);
        }
    }
}

/// Keeps the service maps in step with the desired state.
///
/// Holds a mirror of what the maps hold and indexes over it, so a change to
/// one Service costs work for that Service only. The mirror is updated as
/// operations are planned: if running them fails, rebuild the reconciler
/// from the maps ([`Reconciler::new`] with `read_programmed`).
#[derive(Clone, Debug)]
pub struct Reconciler {
    cap: Capacity,
    mode: NodePortMode,
    maps: Programmed,
    names: BTreeMap<TableName, u32>,
    keys_of: BTreeMap<u32, BTreeSet<ServiceKey>>,
    refs: HashMap<u32, u32>,
    by_addr: HashMap<SocketAddrV4, u32>,
    svc_ids: Ids,
    backend_ids: Ids,
}

/// Work collected while planning one batch.
#[derive(Default)]
struct Work {
    dels: BTreeSet<ServiceKey>,
    del_tables: BTreeSet<u32>,
    new_backends: BTreeMap<u32, Backend>,
    resets: Vec<Op>,
    tables: Vec<Op>,
    frontends: Vec<Op>,
    /// Operations after the frontends moved: ranges no frontend needs any more.
    late: Vec<Op>,
    unref: BTreeSet<u32>,
    retired: Vec<u32>,
    named: Vec<(TableName, u32)>,
    unnamed: Vec<u32>,
    refused: Vec<(ServicePortName, String)>,
    left: BTreeSet<(u32, u32)>,
}

impl Reconciler {
    /// A reconciler for maps that hold `maps` (empty, or read back from the kernel).
    pub fn new(maps: Programmed, cap: Capacity) -> Self {
        let mut keys_of: BTreeMap<u32, BTreeSet<ServiceKey>> = BTreeMap::new();
        for (k, v) in &maps.services {
            keys_of.entry(v.svc_id).or_default().insert(*k);
        }
        let mut refs: HashMap<u32, u32> = HashMap::new();
        for t in maps.tables.values() {
            for id in t.backends.iter().chain(&t.draining) {
                *refs.entry(*id).or_insert(0) += 1;
            }
        }
        // An address held by a referenced id and by a stray one (left by an
        // interrupted apply) keeps the referenced id; the stray one goes.
        let mut by_addr: HashMap<SocketAddrV4, u32> = HashMap::new();
        for (id, b) in &maps.backends {
            let slot = by_addr.entry(backend_sockaddr(b)).or_insert(*id);
            if !refs.contains_key(slot) {
                *slot = *id;
            }
        }
        let svc_ids = Ids::new(cap.services, maps.tables.keys().copied());
        let backend_ids = Ids::new(cap.backends, maps.backends.keys().copied());
        Self {
            cap,
            mode: NodePortMode::default(),
            maps,
            names: BTreeMap::new(),
            keys_of,
            refs,
            by_addr,
            svc_ids,
            backend_ids,
        }
    }

    /// How external frontends reach remote backends (`--nodeport-mode`).
    #[must_use]
    pub fn with_mode(mut self, mode: NodePortMode) -> Self {
        self.mode = mode;
        self
    }

    /// What the maps hold once the planned operations have run.
    pub fn maps(&self) -> &Programmed {
        &self.maps
    }

    /// The svc id of a programmed service port (its internal table).
    pub fn svc_id(&self, name: &ServicePortName) -> Option<u32> {
        self.table_id(name, false)
    }

    /// Every programmed table and its svc id.
    pub fn tables(&self) -> impl Iterator<Item = (&TableName, u32)> {
        self.names.iter().map(|(n, id)| (n, *id))
    }

    /// The svc id of one of a programmed service port's tables.
    pub fn table_id(&self, name: &ServicePortName, external: bool) -> Option<u32> {
        self.names
            .get(&TableName {
                port: name.clone(),
                external,
            })
            .copied()
    }

    /// Plans everything: the maps end up holding exactly `desired`. Service
    /// ports are matched to existing svc ids through their frontends, so a
    /// restarted agent keeps ids, tables and counters.
    pub fn full(&mut self, desired: &DesiredState) -> Batch {
        let mut names = BTreeMap::new();
        let mut used = BTreeSet::new();
        for unit in desired.services.iter().flat_map(|s| units(s, self.mode)) {
            let existing = unit
                .keys
                .keys()
                .filter_map(|k| self.maps.services.get(k))
                .map(|v| v.svc_id)
                .find(|id| self.maps.tables.contains_key(id) && !used.contains(id));
            if let Some(id) = existing {
                used.insert(id);
                names.insert(unit.name, id);
            }
        }
        self.names = names;
        let orphans: Vec<u32> = self
            .keys_of
            .keys()
            .chain(self.maps.tables.keys())
            .filter(|id| !used.contains(id))
            .copied()
            .collect::<BTreeSet<u32>>()
            .into_iter()
            .collect();
        let changes: Vec<(ServicePortName, Option<&ServicePlan>)> = desired
            .services
            .iter()
            .map(|s| (s.id.clone(), Some(s)))
            .collect();
        let mut batch = self.plan(&changes, &orphans);
        batch.named = self.names.iter().map(|(n, id)| (n.clone(), *id)).collect();
        batch.names_complete = true;
        // Backends nothing refers to (left over from an interrupted apply).
        let stray: Vec<u32> = self
            .maps
            .backends
            .keys()
            .filter(|id| self.refs.get(id).copied().unwrap_or(0) == 0)
            .copied()
            .collect();
        for id in stray {
            batch.gone.extend(self.drop_backend(id));
            batch.ops.push(Op::DelBackend(id));
        }
        batch
    }

    /// Plans the changes of some service ports: `None` removes one.
    pub fn changes(&mut self, changes: &BTreeMap<ServicePortName, Option<ServicePlan>>) -> Batch {
        let changes: Vec<(ServicePortName, Option<&ServicePlan>)> = changes
            .iter()
            .map(|(n, p)| (n.clone(), p.as_ref()))
            .collect();
        self.plan(&changes, &[])
    }

    fn plan(
        &mut self,
        changes: &[(ServicePortName, Option<&ServicePlan>)],
        orphans: &[u32],
    ) -> Batch {
        let mut work = Work::default();
        for id in orphans {
            self.remove_svc_id(*id, &mut work);
        }
        let mut built = self.prebuild(changes);
        for (name, plan) in changes {
            let wanted: Vec<Unit> = plan
                .map(|p| units(p, self.mode))
                .unwrap_or_default()
                .into_iter()
                .filter(|u| !u.keys.is_empty())
                .collect();
            for external in [false, true] {
                let table = TableName {
                    port: name.clone(),
                    external,
                };
                match wanted.iter().find(|u| u.name == table) {
                    Some(unit) => {
                        let prebuilt = built.remove(&table);
                        self.upsert(unit, prebuilt, &mut work);
                    }
                    None => {
                        if let Some(id) = self.names.remove(&table) {
                            self.remove_svc_id(id, &mut work);
                        }
                    }
                }
            }
        }
        let mut ops: Vec<Op> = work
            .dels
            .iter()
            .filter(|k| !self.maps.services.contains_key(k))
            .map(|k| Op::DelService(*k))
            .collect();
        ops.extend(
            work.new_backends
                .iter()
                .map(|(id, b)| Op::SetBackend(*id, *b)),
        );
        ops.append(&mut work.resets);
        ops.append(&mut work.tables);
        ops.append(&mut work.frontends);
        ops.append(&mut work.late);
        ops.extend(work.del_tables.iter().map(|id| Op::DelTable(*id)));
        let mut gone = BTreeSet::new();
        for id in &work.unref {
            if self.refs.get(id).copied().unwrap_or(0) == 0 && self.maps.backends.contains_key(id) {
                gone.extend(self.drop_backend(*id));
                ops.push(Op::DelBackend(*id));
            }
        }
        // Ids retired in this batch become reusable only now.
        for id in work.retired {
            self.svc_ids.give_back(id);
        }
        Batch {
            ops,
            refused: work.refused,
            left: work.left,
            gone,
            named: work.named,
            unnamed: work.unnamed,
            names_complete: false,
        }
    }

    /// Forgets backend `id`; returns its address when no other id holds it
    /// (the backend is gone, not just a stray duplicate).
    fn drop_backend(&mut self, id: u32) -> Option<SocketAddrV4> {
        let addr = self.maps.backends.remove(&id).map(|b| backend_sockaddr(&b));
        self.refs.remove(&id);
        self.backend_ids.give_back(id);
        let addr = addr?;
        if self.by_addr.get(&addr) == Some(&id) {
            self.by_addr.remove(&addr);
            Some(addr)
        } else {
            None
        }
    }

    fn unref_table(&mut self, table: &Table, work: &mut Work) {
        for id in table.backends.iter().chain(&table.draining) {
            if let Some(r) = self.refs.get_mut(id) {
                *r = r.saturating_sub(1);
            }
            work.unref.insert(*id);
        }
    }

    /// Plans a svc id's source ranges to become `wanted`: additions before
    /// the frontends that need them, removals after the frontends stop.
    fn set_ranges(&mut self, id: u32, wanted: &BTreeSet<Range>, work: &mut Work) {
        let empty = BTreeSet::new();
        let have = self.maps.ranges.get(&id).unwrap_or(&empty);
        let add: Vec<Range> = wanted.difference(have).copied().collect();
        let remove: Vec<Range> = have.difference(wanted).copied().collect();
        if !add.is_empty() {
            work.tables.push(Op::SetRanges(id, add, Vec::new()));
        }
        if !remove.is_empty() {
            work.late.push(Op::SetRanges(id, Vec::new(), remove));
        }
        if wanted.is_empty() {
            self.maps.ranges.remove(&id);
        } else {
            self.maps.ranges.insert(id, wanted.clone());
        }
    }

    fn ranges_in_use(&self) -> usize {
        self.maps.ranges.values().map(BTreeSet::len).sum()
    }

    /// Removes a svc id's frontends and table.
    fn remove_svc_id(&mut self, id: u32, work: &mut Work) {
        self.set_ranges(id, &BTreeSet::new(), work);
        let keys = self.keys_of.remove(&id).unwrap_or_default();
        let udp = keys.iter().any(|k| k.proto == proxy_common::proto::UDP);
        for k in keys {
            if self.maps.services.get(&k).map(|v| v.svc_id) == Some(id) {
                self.maps.services.remove(&k);
                work.dels.insert(k);
            }
        }
        if let Some(table) = self.maps.tables.remove(&id) {
            self.unref_table(&table, work);
            work.left.extend(
                table
                    .backends
                    .iter()
                    .chain(&table.draining)
                    .filter(|_| udp)
                    .map(|b| (id, *b)),
            );
            work.del_tables.insert(id);
            work.retired.push(id);
            work.unnamed.push(id);
        }
    }

    /// The current table of a unit, when it has the same inputs (backends,
    /// weights, size), so its Maglev entries can be reused.
    fn table_reusable(&self, unit: &Unit) -> Option<&Table> {
        let t = self.maps.tables.get(self.names.get(&unit.name)?)?;
        let same = t.table_size == unit.table_size.unwrap_or(0)
            && t.backends.len() == unit.backends.len()
            && unit
                .backends
                .iter()
                .zip(&t.backends)
                .zip(&t.weights)
                .all(|((b, id), w)| self.by_addr.get(b) == Some(id) && unit.plan.weight(b) == *w);
        same.then_some(t)
    }

    /// Builds the Maglev tables of a batch that cannot be reused, on every
    /// core when there are many (a cold sync of 10k Services builds 10k tables).
    fn prebuild(
        &self,
        changes: &[(ServicePortName, Option<&ServicePlan>)],
    ) -> HashMap<TableName, Result<Vec<u16>, maglev::MaglevError>> {
        let wanted: Vec<Unit> = changes
            .iter()
            .filter_map(|(_, p)| *p)
            .flat_map(|p| units(p, self.mode))
            .filter(|u| u.table_size.unwrap_or(0) > 0 && self.table_reusable(u).is_none())
            .collect();
        let build = |u: &Unit| (u.name.clone(), build_entries(u));
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        if wanted.len() < 64 || threads < 2 {
            return wanted.iter().map(build).collect();
        }
        let chunk = wanted.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = wanted
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().map(&build).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        })
    }

    /// Plans one service port's new state.
    fn upsert(
        &mut self,
        unit: &Unit,
        prebuilt: Option<Result<Vec<u16>, maglev::MaglevError>>,
        work: &mut Work,
    ) {
        let plan = unit.plan;
        let name = plan.id.clone();
        let refuse = |work: &mut Work, why: String| work.refused.push((name.clone(), why));
        let keys: BTreeSet<ServiceKey> = unit.keys.keys().copied().collect();
        let old_id = self.names.get(&unit.name).copied();
        let old_keys = old_id
            .and_then(|id| self.keys_of.get(&id))
            .cloned()
            .unwrap_or_default();
        let adding = keys
            .iter()
            .filter(|k| !self.maps.services.contains_key(k))
            .count();
        let freeing = old_keys.difference(&keys).count();
        if self.maps.services.len() + adding > self.cap.frontends as usize + freeing {
            refuse(
                work,
                format!(
                    "SERVICES map full ({} frontends); raise --max-frontends",
                    self.cap.frontends
                ),
            );
            return;
        }
        let old_ranges = old_id
            .and_then(|id| self.maps.ranges.get(&id))
            .map_or(0, BTreeSet::len);
        if self.ranges_in_use() - old_ranges + unit.ranges.len() > self.cap.ranges as usize {
            refuse(
                work,
                format!(
                    "SOURCE_RANGES map full ({} CIDRs); raise --max-source-ranges",
                    self.cap.ranges
                ),
            );
            return;
        }

        // The table: Maglev entries reused when their inputs did not change,
        // built otherwise (usually already, in parallel), before any id is
        // allocated so a failure leaves nothing to undo.
        let table_size = unit.table_size.unwrap_or(0);
        let built = match (prebuilt, table_size) {
            (Some(result), _) => result,
            (None, 0) => Ok(Vec::new()),
            (None, _) => self
                .table_reusable(unit)
                .map_or_else(|| build_entries(unit), |t| Ok(t.entries.clone())),
        };
        let entries = match built {
            Ok(entries) => entries,
            Err(e) => {
                refuse(work, format!("Maglev table: {e}"));
                return;
            }
        };

        // Backend ids, allocating for new addresses.
        let resting = plan.draining_backends.len() + plan.inactive_backends.len();
        let mut ids = Vec::with_capacity(unit.backends.len() + resting);
        let mut allocated: Vec<(SocketAddrV4, u32)> = Vec::new();
        for b in unit.backends.iter().chain(plan.resting()) {
            let id = self
                .by_addr
                .get(b)
                .copied()
                .or_else(|| allocated.iter().find(|(a, _)| a == b).map(|(_, id)| *id))
                .or_else(|| {
                    let id = self.backend_ids.take()?;
                    allocated.push((*b, id));
                    Some(id)
                });
            match id {
                Some(id) => ids.push(id),
                None => break,
            }
        }
        let svc_id = match old_id {
            Some(id) => Some(id),
            None => self.svc_ids.take(),
        };
        let fits = ids.len() == unit.backends.len() + resting;
        let Some(svc_id) = svc_id.filter(|_| fits) else {
            for (_, id) in allocated {
                self.backend_ids.give_back(id);
            }
            if let (None, Some(id)) = (old_id, svc_id) {
                self.svc_ids.give_back(id);
            }
            let why = if fits {
                format!(
                    "SELECTION map full ({} service ports); raise --max-services",
                    self.cap.services.saturating_sub(1)
                )
            } else {
                format!(
                    "BACKENDS map full ({} backends); raise --max-backends",
                    self.cap.backends.saturating_sub(1)
                )
            };
            refuse(work, why);
            return;
        };
        let draining = ids.split_off(unit.backends.len());
        let table = Table {
            algorithm: plan.algorithm.number(),
            hash_mode: if plan.session_affinity_timeout_seconds.is_some()
                || plan.algorithm == crate::model::Algorithm::SourceHash
            {
                hash_mode::SOURCE
            } else {
                hash_mode::FIVE_TUPLE
            },
            backends: ids,
            weights: unit.backends.iter().map(|b| plan.weight(b)).collect(),
            draining,
            table_size,
            entries,
            drop_when_empty: unit.backends.is_empty() && plan.has_endpoints,
            affinity_timeout: plan.session_affinity_timeout_seconds.unwrap_or(0),
        };

        // Commit to the mirror and collect operations.
        for (addr, id) in allocated {
            let b = backend_entry(addr, plan.is_local(&addr));
            self.maps.backends.insert(id, b);
            self.by_addr.insert(addr, id);
            work.new_backends.insert(id, b);
        }
        // A known address whose node changed (pod IPs are reused) gets its
        // locality updated in place.
        for (addr, id) in unit
            .backends
            .iter()
            .chain(plan.resting())
            .zip(table.backends.iter().chain(&table.draining))
        {
            let wanted = backend_entry(*addr, plan.is_local(addr));
            if let Some(b) = self.maps.backends.get_mut(id)
                && *b != wanted
            {
                *b = wanted;
                work.new_backends.insert(*id, wanted);
            }
        }
        for id in table.backends.iter().chain(&table.draining) {
            *self.refs.entry(*id).or_insert(0) += 1;
        }
        if old_id.is_none() {
            work.resets.push(Op::ResetSvcStats(svc_id));
        }
        if self.maps.tables.get(&svc_id) != Some(&table) {
            work.tables.push(Op::SetTable(svc_id, table.clone()));
        }
        // UDP flows continue to eligible and drained (weight 0) backends;
        // those to backends that stopped taking traffic are forgotten, as
        // kube-proxy clears them, so clients move on.
        let kept: BTreeSet<u32> = table
            .backends
            .iter()
            .chain(&table.draining[..plan.draining_backends.len().min(table.draining.len())])
            .copied()
            .collect();
        if let Some(old) = self.maps.tables.insert(svc_id, table) {
            self.unref_table(&old, work);
            let udp = plan.id.protocol == crate::model::Protocol::Udp;
            work.left.extend(
                old.backends
                    .iter()
                    .filter(|b| udp && !kept.contains(b))
                    .map(|b| (svc_id, *b)),
            );
        }
        for k in old_keys.difference(&keys) {
            if self.maps.services.get(k).map(|v| v.svc_id) == Some(svc_id) {
                self.maps.services.remove(k);
                work.dels.insert(*k);
            }
        }
        self.set_ranges(svc_id, &unit.ranges, work);
        for (k, flags) in &unit.keys {
            let value = ServiceValue {
                svc_id,
                flags: *flags,
            };
            if self.maps.services.get(k) != Some(&value) {
                if let Some(previous) = self.maps.services.insert(*k, value)
                    && let Some(set) = self.keys_of.get_mut(&previous.svc_id)
                {
                    set.remove(k);
                }
                work.frontends.push(Op::SetService(*k, value));
            }
        }
        self.keys_of.insert(svc_id, keys);
        if old_id.is_none() {
            work.named.push((unit.name.clone(), svc_id));
        }
        self.names.insert(unit.name.clone(), svc_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Frontend, FrontendKind, Protocol};

    const CAP: Capacity = Capacity {
        frontends: 100,
        services: 100,
        backends: 100,
        ranges: 100,
    };

    fn svc(name: &str, vip: [u8; 4], backends: &[&str]) -> ServicePlan {
        ServicePlan::new(
            ServicePortName {
                namespace: "ns".into(),
                name: name.into(),
                port_name: String::new(),
                protocol: Protocol::Tcp,
            },
            vec![Frontend {
                kind: FrontendKind::ClusterIP,
                address: Ipv4Addr::from(vip),
                port: 80,
            }],
            backends.iter().map(|b| b.parse().unwrap()).collect(),
        )
    }

    fn state(services: Vec<ServicePlan>) -> DesiredState {
        let mut services = services;
        services.sort_by(|a, b| a.id.cmp(&b.id));
        DesiredState { services }
    }

    /// Applies ops to a model of the maps, checking at every step that each
    /// visible frontend has a complete table whose backends all exist.
    fn apply(mut model: Programmed, ops: &[Op]) -> Programmed {
        for op in ops {
            match op {
                Op::DelService(k) => {
                    model.services.remove(k);
                }
                Op::DelTable(id) => {
                    model.tables.remove(id);
                }
                Op::SetBackend(id, b) => {
                    model.backends.insert(*id, *b);
                }
                Op::ResetSvcStats(_) => {}
                Op::SetTable(id, t) => {
                    model.tables.insert(*id, t.clone());
                }
                Op::SetService(k, v) => {
                    model.services.insert(*k, *v);
                }
                Op::DelBackend(id) => {
                    model.backends.remove(id);
                }
                Op::SetRanges(id, add, remove) => {
                    let set = model.ranges.entry(*id).or_default();
                    set.extend(add.iter().copied());
                    for r in remove {
                        set.remove(r);
                    }
                    if set.is_empty() {
                        model.ranges.remove(id);
                    }
                }
            }
            for v in model.services.values() {
                let table = model.tables.get(&v.svc_id).expect("frontend without table");
                for b in table.backends.iter().chain(&table.draining) {
                    assert!(
                        model.backends.contains_key(b),
                        "table refers to missing backend"
                    );
                }
            }
        }
        model
    }

    /// What a client sees: frontend → (backend addresses, slot owners), ids resolved.
    fn resolved(maps: &Programmed) -> BTreeMap<ServiceKey, (Vec<SocketAddrV4>, Vec<SocketAddrV4>)> {
        maps.services
            .iter()
            .map(|(k, v)| {
                let t = &maps.tables[&v.svc_id];
                let addr = |id: &u32| backend_sockaddr(&maps.backends[id]);
                let list: Vec<SocketAddrV4> = t.backends.iter().map(addr).collect();
                let slots = t.entries.iter().map(|e| list[usize::from(*e)]).collect();
                (*k, (list, slots))
            })
            .collect()
    }

    #[test]
    fn table_blocks_roundtrip() {
        for (n, d, m) in [
            (0u32, 0u32, 0u32),
            (1, 0, 101),
            (15, 2, 0),
            (16, 0, 1009),
            (17, 5, 1009),
            (100, 1, 10_007),
        ] {
            let backends: Vec<u32> = (1..=n).collect();
            let entries = if m == 0 {
                vec![]
            } else {
                (0..m).map(|i| (i % n) as u16).collect()
            };
            let t = Table {
                algorithm: proxy_common::algorithm::MAGLEV,
                hash_mode: hash_mode::SOURCE,
                weights: backends.iter().map(|b| b % 7).collect(),
                backends,
                draining: (1000..1000 + d).collect(),
                table_size: m,
                entries,
                drop_when_empty: n == 0,
                affinity_timeout: m % 11,
            };
            let blocks = t.to_blocks();
            assert_eq!(blocks.len() as u32, sel_blocks(n, d, m));
            assert_eq!(Table::from_blocks(&blocks), Some(t));
        }
        assert_eq!(Table::from_blocks(&[]), None);
    }

    #[test]
    fn converges_in_safe_order_and_is_idempotent() {
        let steps = [
            state(vec![svc(
                "a",
                [10, 96, 0, 1],
                &["10.0.0.1:80", "10.0.0.2:80"],
            )]),
            state(vec![
                svc("a", [10, 96, 0, 1], &["10.0.0.2:80", "10.0.0.3:80"]),
                svc("b", [10, 96, 0, 2], &["10.0.0.2:80"]),
            ]),
            state(vec![svc("b", [10, 96, 0, 2], &[])]),
            state(vec![]),
        ];
        let mut r = Reconciler::new(Programmed::default(), CAP);
        let mut maps = Programmed::default();
        for desired in &steps {
            let batch = r.full(desired);
            assert!(batch.refused.is_empty());
            maps = apply(maps, &batch.ops);
            assert_eq!(&maps, r.maps());
            assert_eq!(r.full(desired).ops, vec![], "nothing left to do");
            for s in &desired.services {
                let v = maps.services[&frontend_keys(s, NodePortMode::Snat)[0]];
                let got: Vec<SocketAddrV4> = maps.tables[&v.svc_id]
                    .backends
                    .iter()
                    .map(|id| backend_sockaddr(&maps.backends[id]))
                    .collect();
                assert_eq!(got, s.internal_backends);
            }
        }
        assert_eq!(maps, Programmed::default());
    }

    /// `web` with a NodePort on 192.168.1.10 (and one on an unknown node
    /// address), backends .1 (local) and .2; `local_policy` narrows external
    /// traffic to the local one.
    fn node_port(local_policy: bool) -> ServicePlan {
        let mut p = svc("web", [10, 96, 0, 1], &["10.0.0.1:80", "10.0.0.2:80"]);
        for address in [Ipv4Addr::new(192, 168, 1, 10), Ipv4Addr::UNSPECIFIED] {
            p.frontends.push(Frontend {
                kind: FrontendKind::NodePort,
                address,
                port: 30080,
            });
        }
        p.local_backends = vec!["10.0.0.1:80".parse().unwrap()];
        p.external_backends = if local_policy {
            p.local_backends.clone()
        } else {
            p.internal_backends.clone()
        };
        p.external_maglev_table_size = local_policy.then_some(101);
        p
    }

    #[test]
    fn external_frontends_share_or_get_their_own_table() {
        let nodeport_key = ServiceKey {
            addr_be: addr_be(Ipv4Addr::new(192, 168, 1, 10)),
            port_be: port_be(30080),
            proto: proxy_common::proto::TCP,
            scope: scope::EXTERNAL,
        };
        for (mode, flags) in [(NodePortMode::Snat, 0), (NodePortMode::Dsr, SVC_F_DSR)] {
            // Same backends: one table for every frontend.
            let mut r = Reconciler::new(Programmed::default(), CAP).with_mode(mode);
            let maps = apply(
                Programmed::default(),
                &r.full(&state(vec![node_port(false)])).ops,
            );
            assert_eq!(maps.services.len(), 2, "the unknown address is skipped");
            assert_eq!(maps.tables.len(), 1);
            let v = maps.services[&nodeport_key];
            assert_eq!(v.flags, flags, "{mode:?}");
            let locals: Vec<bool> = maps
                .backends
                .values()
                .map(|b| b.flags & BACKEND_F_LOCAL != 0)
                .collect();
            assert_eq!(locals, [true, false]);

            // externalTrafficPolicy Local: an external table of its own, with
            // the local backend only; the ClusterIP keeps its table and id.
            let cluster_key = frontend_keys(&node_port(false), mode)[0];
            let cluster_id = maps.services[&cluster_key].svc_id;
            let maps = apply(maps, &r.full(&state(vec![node_port(true)])).ops);
            assert_eq!(maps.tables.len(), 2);
            assert_eq!(maps.services[&cluster_key].svc_id, cluster_id);
            let ext = maps.services[&nodeport_key];
            assert_ne!(ext.svc_id, cluster_id);
            assert_eq!(ext.flags, flags);
            let ext_table = &maps.tables[&ext.svc_id];
            assert_eq!(ext_table.backends.len(), 1);
            assert_eq!(ext_table.table_size, 101);
            assert_eq!(maps.tables[&cluster_id].backends.len(), 2);
            assert_eq!(r.table_id(&node_port(true).id, true), Some(ext.svc_id));

            // And back: the external table goes, its frontend rejoins.
            let maps = apply(maps, &r.full(&state(vec![node_port(false)])).ops);
            assert_eq!(maps.tables.len(), 1);
            assert_eq!(maps.services[&nodeport_key].svc_id, cluster_id);
            assert_eq!(r.full(&state(vec![node_port(false)])).ops, vec![]);
        }
    }

    #[test]
    fn source_ranges_restrict_load_balancer_frontends_only() {
        let lb_key = ServiceKey {
            addr_be: addr_be(Ipv4Addr::new(192, 168, 60, 1)),
            port_be: port_be(80),
            proto: proxy_common::proto::TCP,
            scope: scope::EXTERNAL,
        };
        let with_ranges = |ranges: &[&str]| {
            let mut p = node_port(false);
            p.frontends.push(Frontend {
                kind: FrontendKind::LoadBalancer,
                address: Ipv4Addr::new(192, 168, 60, 1),
                port: 80,
            });
            p.source_ranges = ranges.iter().map(|r| (*r).to_owned()).collect();
            p
        };
        let mut r = Reconciler::new(Programmed::default(), CAP);
        let ops = r
            .full(&state(vec![with_ranges(&[
                "10.0.0.0/8",
                "192.168.50.0/24",
            ])]))
            .ops;
        let maps = apply(Programmed::default(), &ops);
        let id = maps.services[&lb_key].svc_id;
        assert_eq!(maps.services[&lb_key].flags, SVC_F_SOURCE_RANGES);
        assert!(
            maps.services
                .iter()
                .filter(|(k, _)| **k != lb_key)
                .all(|(_, v)| v.flags & SVC_F_SOURCE_RANGES == 0),
            "NodePort and ClusterIP stay open"
        );
        assert_eq!(maps.ranges[&id].len(), 2);
        let pos = |ops: &[Op], f: fn(&Op) -> bool| ops.iter().position(f).unwrap();
        assert!(
            pos(&ops, |o| matches!(o, Op::SetRanges(..)))
                < pos(&ops, |o| matches!(o, Op::SetService(..))),
            "ranges exist before a frontend needs them: {ops:?}"
        );

        // Narrowed: the new range added, the old one removed after.
        let ops = r.full(&state(vec![with_ranges(&["192.168.50.0/24"])])).ops;
        assert_eq!(
            ops,
            vec![Op::SetRanges(
                id,
                vec![],
                vec![(Ipv4Addr::new(10, 0, 0, 0), 8)]
            )]
        );
        let maps = apply(maps, &ops);
        // No ranges any more: the flag goes first, then the ranges.
        let ops = r.full(&state(vec![with_ranges(&[])])).ops;
        assert!(
            pos(&ops, |o| matches!(o, Op::SetService(..)))
                < pos(&ops, |o| matches!(o, Op::SetRanges(..))),
            "{ops:?}"
        );
        let maps = apply(maps, &ops);
        assert!(maps.ranges.is_empty());
        assert_eq!(maps.services[&lb_key].flags, 0);

        // Capacity: a Service whose ranges do not fit is refused whole.
        let mut small = Reconciler::new(Programmed::default(), Capacity { ranges: 1, ..CAP });
        let batch = small.full(&state(vec![with_ranges(&[
            "10.0.0.0/8",
            "192.168.50.0/24",
        ])]));
        assert!(batch.refused[0].1.contains("SOURCE_RANGES map full"));
        assert!(small.maps().services.is_empty());
    }

    #[test]
    fn ids_are_stable_and_backends_shared() {
        let mut r = Reconciler::new(Programmed::default(), CAP);
        let one = state(vec![svc("a", [10, 96, 0, 1], &["10.0.0.1:80"])]);
        let maps = apply(Programmed::default(), &r.full(&one).ops);
        let two = state(vec![
            svc("a", [10, 96, 0, 1], &["10.0.0.1:80", "10.0.0.2:80"]),
            svc("b", [10, 96, 0, 2], &["10.0.0.1:80"]),
        ]);
        let ops = r.full(&two).ops;
        let key_a = frontend_keys(&two.services[0], NodePortMode::Snat)[0];
        assert_eq!(
            r.maps().services[&key_a],
            maps.services[&key_a],
            "svc id kept"
        );
        assert_eq!(
            r.maps().backends.len(),
            2,
            "10.0.0.1:80 shared, one new backend"
        );
        assert!(
            !ops.iter()
                .any(|o| matches!(o, Op::DelTable(_) | Op::DelService(_)))
        );
        // A restarted agent (reconciler rebuilt from the maps) keeps every id.
        let maps = apply(maps, &ops);
        let mut again = Reconciler::new(maps.clone(), CAP);
        assert_eq!(again.full(&two).ops, vec![]);
    }

    #[test]
    fn stray_backends_are_deleted_and_referenced_ids_kept() {
        let mut r = Reconciler::new(Programmed::default(), CAP);
        let desired = state(vec![svc("a", [10, 96, 0, 1], &["10.0.0.1:80"])]);
        let mut maps = apply(Programmed::default(), &r.full(&desired).ops);
        let (id, b) = maps.backends.iter().map(|(i, b)| (*i, *b)).next().unwrap();
        // Left by interrupted applies: one unrelated, one with the same address.
        maps.backends
            .insert(50, backend_entry("10.0.0.9:80".parse().unwrap(), false));
        maps.backends.insert(60, b);
        let mut again = Reconciler::new(maps.clone(), CAP);
        let batch = again.full(&desired);
        // Only the unrelated address is gone; the duplicate's address lives on.
        assert_eq!(batch.gone, BTreeSet::from(["10.0.0.9:80".parse().unwrap()]));
        let ops = batch.ops;
        assert_eq!(ops, vec![Op::DelBackend(50), Op::DelBackend(60)]);
        assert!(
            again.full(&desired).ops.is_empty(),
            "the kept id still maps its address"
        );
        // A backend no slice lists any more is gone; one turning inactive is not.
        let mut inactive = desired.clone();
        inactive.services[0].internal_backends.clear();
        inactive.services[0].inactive_backends = vec!["10.0.0.1:80".parse().unwrap()];
        let batch = again.full(&inactive);
        assert!(batch.gone.is_empty(), "{:?}", batch.ops);
        let mut removed = inactive.clone();
        removed.services[0].inactive_backends.clear();
        let batch = again.full(&removed);
        assert_eq!(batch.gone, BTreeSet::from(["10.0.0.1:80".parse().unwrap()]));
        let maps = apply(maps, &ops);
        assert_eq!(maps.backends.keys().copied().collect::<Vec<_>>(), vec![id]);
    }

    #[test]
    fn full_maps_refuse_whole_services_and_keep_old_state() {
        let cap = Capacity {
            ranges: 100,
            frontends: 100,
            services: 100,
            backends: 4, // ids 1..=3
        };
        let mut r = Reconciler::new(Programmed::default(), cap);
        let first = state(vec![svc(
            "a",
            [10, 96, 0, 1],
            &["10.0.0.1:80", "10.0.0.2:80"],
        )]);
        let maps = apply(Programmed::default(), &r.full(&first).ops);
        // a wants two more backends: only one id is left, so a is refused as a
        // whole and keeps its old table; b fits.
        let second = state(vec![
            svc(
                "a",
                [10, 96, 0, 1],
                &["10.0.0.1:80", "10.0.0.3:80", "10.0.0.4:80"],
            ),
            svc("b", [10, 96, 0, 2], &["10.0.0.2:80"]),
        ]);
        let batch = r.full(&second);
        assert_eq!(batch.refused.len(), 1);
        assert_eq!(batch.refused[0].0.name, "a");
        assert!(batch.refused[0].1.contains("BACKENDS map full"));
        let maps2 = apply(maps.clone(), &batch.ops);
        assert_eq!(&maps2, r.maps());
        let key_a = frontend_keys(&second.services[0], NodePortMode::Snat)[0];
        let id_a = maps2.services[&key_a].svc_id;
        assert_eq!(maps2.tables[&id_a], maps.tables[&id_a]);
        assert_eq!(maps2.services.len(), 2);

        let mut r = Reconciler::new(
            Programmed::default(),
            Capacity {
                frontends: 1,
                ..CAP
            },
        );
        let batch = r.full(&state(vec![
            svc("a", [10, 96, 0, 1], &[]),
            svc("b", [10, 96, 0, 2], &[]),
        ]));
        assert_eq!(r.maps().services.len(), 1);
        assert!(batch.refused[0].1.contains("SERVICES map full"));
    }

    #[test]
    fn frontends_go_first_tables_after_and_ids_wait_a_batch() {
        let mut r = Reconciler::new(Programmed::default(), CAP);
        let a = state(vec![svc("a", [10, 96, 0, 1], &["10.0.0.1:80"])]);
        let maps = apply(Programmed::default(), &r.full(&a).ops);
        let b = state(vec![svc("b", [10, 96, 0, 2], &["10.0.0.9:80"])]);
        let ops = r.full(&b).ops;
        let first_set = ops
            .iter()
            .position(|o| matches!(o, Op::SetBackend(..) | Op::SetTable(..)))
            .unwrap();
        let last_del = ops
            .iter()
            .rposition(|o| matches!(o, Op::DelService(_)))
            .unwrap();
        assert!(last_del < first_set, "{ops:?}");
        let last_frontend = ops
            .iter()
            .rposition(|o| matches!(o, Op::SetService(..)))
            .unwrap();
        let del_table = ops
            .iter()
            .position(|o| matches!(o, Op::DelTable(_)))
            .unwrap();
        assert!(last_frontend < del_table, "{ops:?}");
        assert!(matches!(ops.last(), Some(Op::DelBackend(_))));
        let new_id = ops.iter().find_map(|o| match o {
            Op::SetTable(id, _) => Some(*id),
            _ => None,
        });
        assert_ne!(
            new_id,
            Some(1),
            "a removed table's id is not reused in the same batch"
        );
        let _ = apply(maps, &ops);
    }

    #[test]
    fn unchanged_maglev_tables_are_reused_and_changed_ones_rebuilt() {
        let mut r = Reconciler::new(Programmed::default(), CAP);
        let one = state(vec![svc(
            "a",
            [10, 96, 0, 1],
            &["10.0.0.1:80", "10.0.0.2:80"],
        )]);
        r.full(&one);
        let t = r.maps().tables.values().next().unwrap().clone();
        assert_eq!(t.table_size, 211, "smallest prime >= 100 x 2 backends");
        assert_eq!(t.entries.len(), 211);
        assert_eq!(r.full(&one).ops, vec![], "nothing rebuilt");
        let mut weighted = one.clone();
        weighted.services[0]
            .backend_weights
            .insert("10.0.0.2:80".parse().unwrap(), 3);
        let ops = r.full(&weighted).ops;
        let Some(Op::SetTable(_, new)) = ops.iter().find(|o| matches!(o, Op::SetTable(..))) else {
            panic!("weight change must rebuild the table: {ops:?}");
        };
        let heavy = new.entries.iter().filter(|e| **e == 1).count();
        assert!(
            (156..=160).contains(&heavy),
            "weight 3 of 4 gets 3/4 of 211 slots: {heavy}"
        );
    }

    #[test]
    fn draining_backends_stay_programmed_but_out_of_the_table() {
        let mut s = svc("a", [10, 96, 0, 1], &["10.0.0.1:80"]);
        s.draining_backends = vec!["10.0.0.2:80".parse().unwrap()];
        let mut r = Reconciler::new(Programmed::default(), CAP);
        r.full(&state(vec![s]));
        let t = r.maps().tables.values().next().unwrap();
        assert_eq!(t.backends.len(), 1);
        assert_eq!(t.draining.len(), 1);
        assert!(t.entries.iter().all(|e| *e == 0));
        assert_eq!(
            r.maps().backends.len(),
            2,
            "the draining backend keeps its id"
        );
    }

    #[test]
    fn empty_tables_drop_or_reject() {
        let mut none = svc("a", [10, 96, 0, 1], &[]);
        let mut r = Reconciler::new(Programmed::default(), CAP);
        r.full(&state(vec![none.clone()]));
        assert!(
            !r.maps().tables.values().next().unwrap().drop_when_empty,
            "no endpoints: reject"
        );
        none.has_endpoints = true;
        r.full(&state(vec![none]));
        assert!(
            r.maps().tables.values().next().unwrap().drop_when_empty,
            "endpoints elsewhere: drop"
        );
    }

    #[test]
    fn ids_are_lowest_free_first() {
        let mut ids = Ids::new(10, [1, 2, 5]);
        assert_eq!(ids.take(), Some(3));
        assert_eq!(ids.take(), Some(4));
        assert_eq!(ids.take(), Some(6));
        ids.give_back(2);
        ids.give_back(6);
        assert_eq!(ids.take(), Some(2));
        assert_eq!(ids.take(), Some(6));
        for want in 7..10 {
            assert_eq!(ids.take(), Some(want));
        }
        assert_eq!(ids.take(), None, "limit reached");
        for id in [9, 8, 7] {
            ids.give_back(id);
        }
        assert_eq!((ids.high, ids.free.len()), (7, 0), "folded back");
    }

    /// xorshift32 for reproducible random change sequences.
    struct Rng(u32);
    impl Rng {
        fn next(&mut self, n: u32) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 17;
            self.0 ^= self.0 << 5;
            self.0 % n
        }
    }

    #[test]
    fn incremental_changes_match_a_full_plan() {
        let mut rng = Rng(0x9e37_79b9);
        let mut desired: BTreeMap<ServicePortName, ServicePlan> = BTreeMap::new();
        let mut r = Reconciler::new(Programmed::default(), CAP);
        let mut maps = Programmed::default();
        for step in 0..300 {
            let mut changes = BTreeMap::new();
            for _ in 0..=rng.next(3) {
                let i = rng.next(12) as u8;
                let name = format!("s{i}");
                let change = if rng.next(5) == 0 {
                    None
                } else {
                    let n = rng.next(6);
                    let backends: Vec<String> = (0..n)
                        .map(|_| format!("10.0.{}.{}:80", rng.next(3), rng.next(8)))
                        .collect();
                    let mut backends: Vec<&str> = backends.iter().map(String::as_str).collect();
                    backends.sort();
                    backends.dedup();
                    let mut plan = svc(&name, [10, 96, 1, i], &backends);
                    if rng.next(4) == 0 && !plan.internal_backends.is_empty() {
                        let b = plan.internal_backends[0];
                        plan.backend_weights.insert(b, 1 + rng.next(4));
                    }
                    Some(plan)
                };
                let key = svc(&name, [0; 4], &[]).id;
                match &change {
                    Some(p) => desired.insert(key.clone(), p.clone()),
                    None => desired.remove(&key),
                };
                changes.insert(key, change);
            }
            let batch = r.changes(&changes);
            assert!(batch.refused.is_empty(), "step {step}: {:?}", batch.refused);
            maps = apply(maps, &batch.ops);
            assert_eq!(&maps, r.maps(), "step {step}: mirror and maps agree");
            // A reconciler built from scratch sees nothing to do, and a full
            // plan from empty maps gives clients the same view.
            let everything = DesiredState {
                services: desired.values().cloned().collect(),
            };
            let mut rebuilt = Reconciler::new(maps.clone(), CAP);
            assert_eq!(rebuilt.full(&everything).ops, vec![], "step {step}");
            let mut fresh = Reconciler::new(Programmed::default(), CAP);
            fresh.full(&everything);
            assert_eq!(resolved(fresh.maps()), resolved(&maps), "step {step}");
        }
    }
}
