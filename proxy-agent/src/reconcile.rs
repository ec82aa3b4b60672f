//! Reconcile: diff the desired state against what the maps hold and produce the
//! map operations, in an order that never shows a packet a half-built service.
//!
//! Pure: no aya in here. The datapath module reads the maps into a
//! [`Programmed`] and executes the [`Op`]s.
//!
//! Order of operations:
//! 1. frontends that go away (a removed service stops matching first),
//! 2. selection tables of removed services,
//! 3. new backends,
//! 4. per service: its selection table (one atomic map swap), then its frontends,
//! 5. backends nothing refers to any more.
//!
//! Capacity is planned, not discovered: the agent is the only writer of these
//! maps, so a service that would not fit is refused whole (and keeps its
//! previous state, if any) before any operation is issued.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
};

use proxy_common::{
    Backend, SEL_HDR_ALGORITHM, SEL_HDR_COUNT, SEL_HDR_DRAINING, SEL_HDR_HASH_MODE,
    SEL_HDR_TABLE_BLOCK, SEL_HDR_TABLE_SIZE, SEL_HDR_WEIGHTS_BLOCK, SEL_WORDS, SelBlock,
    ServiceKey, ServiceValue, hash_mode, scope, sel_backend_pos, sel_blocks, sel_entry_pos,
};

use crate::{
    maglev,
    model::{DesiredState, ServicePlan, ServicePortName},
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
        if self.algorithm != proxy_common::algorithm::MAGLEV || self.table_size == 0 {
            return None;
        }
        let hash = if self.hash_mode == hash_mode::SOURCE {
            proxy_common::hash::source_hash(u32::from(*src.ip()))
        } else {
            proxy_common::hash::flow_hash(
                u32::from(*src.ip()),
                u32::from(*dst.ip()),
                src.port(),
                dst.port(),
                proto,
            )
        };
        let entry = self.entries.get((hash % self.table_size) as usize)?;
        self.backends.get(usize::from(*entry)).copied()
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

/// What the service maps hold, in agent terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub tables: BTreeMap<u32, Table>,
    pub backends: BTreeMap<u32, Backend>,
}

/// Map capacities (max_entries). Ids run from 1 to capacity − 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub frontends: u32,
    pub services: u32,
    pub backends: u32,
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
}

/// The operations to run, and the state they lead to.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub next: Programmed,
    /// Service ports that were not (re)programmed, and why.
    pub refused: Vec<(ServicePortName, String)>,
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

fn backend_entry(addr: SocketAddrV4) -> Backend {
    Backend {
        addr_be: addr_be(*addr.ip()),
        port_be: port_be(addr.port()),
        flags: 0,
        _pad: 0,
    }
}

/// Frontend keys of a service port.
pub fn frontend_keys(svc: &ServicePlan) -> Vec<ServiceKey> {
    svc.frontends
        .iter()
        .map(|f| ServiceKey {
            addr_be: addr_be(f.address),
            port_be: port_be(f.port),
            proto: svc.id.protocol.number(),
            scope: scope::INTERNAL,
        })
        .collect()
}

/// Lowest-free id allocator over `1..limit`, skipping ids in use.
struct Ids {
    limit: u32,
    taken: BTreeSet<u32>,
    cursor: u32,
}

impl Ids {
    fn new(limit: u32, taken: impl IntoIterator<Item = u32>) -> Self {
        Self {
            limit,
            taken: taken.into_iter().collect(),
            cursor: 1,
        }
    }

    fn take(&mut self) -> Option<u32> {
        while self.cursor < self.limit {
            let id = self.cursor;
            self.cursor += 1;
            if self.taken.insert(id) {
                return Some(id);
            }
        }
        None
    }

    fn give_back(&mut self, id: u32) {
        self.taken.remove(&id);
        self.cursor = self.cursor.min(id);
    }
}

/// Plans the operations that turn `current` into `desired`.
pub fn plan(desired: &DesiredState, current: &Programmed, cap: &Capacity) -> Plan {
    let mut next = Programmed::default();
    let mut refused = Vec::new();

    let known_backends: HashMap<SocketAddrV4, u32> = current
        .backends
        .iter()
        .map(|(id, b)| (backend_sockaddr(b), *id))
        .collect();
    let mut new_backends: HashMap<SocketAddrV4, u32> = HashMap::new();
    let mut backend_ids = Ids::new(cap.backends, current.backends.keys().copied());
    // Ids of tables removed in this pass are not reused in the same pass.
    let mut svc_ids = Ids::new(cap.services, current.tables.keys().copied());
    let mut used_svc_ids = BTreeSet::new();
    let mut frontends = 0usize;
    let mut refused_existing = Vec::new();

    for svc in &desired.services {
        let keys = frontend_keys(svc);
        let existing = keys
            .iter()
            .filter_map(|k| current.services.get(k))
            .map(|v| v.svc_id)
            .find(|id| current.tables.contains_key(id) && !used_svc_ids.contains(id));
        let mut refuse = |why: String| {
            refused.push((svc.id.clone(), why));
            if let Some(id) = existing {
                refused_existing.push(id);
            }
        };
        if frontends + keys.len() > cap.frontends as usize {
            refuse(format!(
                "SERVICES map full ({} frontends); raise --max-frontends",
                cap.frontends
            ));
            continue;
        }
        let (svc_id, fresh_id) = match existing {
            Some(id) => (id, false),
            None => match svc_ids.take() {
                Some(id) => (id, true),
                None => {
                    refuse(format!(
                        "SELECTION map full ({} service ports); raise --max-services",
                        cap.services.saturating_sub(1)
                    ));
                    continue;
                }
            },
        };
        // The Maglev table: reused when its inputs did not change, built otherwise
        // (before any id is allocated, so a failure leaves nothing to undo).
        let table_size = svc.maglev_table_size.unwrap_or(0);
        let weights: Vec<u32> = svc
            .internal_backends
            .iter()
            .map(|b| svc.weight(b))
            .collect();
        let known_ids: Option<Vec<u32>> = svc
            .internal_backends
            .iter()
            .map(|b| known_backends.get(b).copied())
            .collect();
        let reusable = existing
            .and_then(|id| current.tables.get(&id))
            .filter(|t| {
                t.table_size == table_size
                    && t.weights == weights
                    && known_ids.as_ref() == Some(&t.backends)
            })
            .map(|t| t.entries.clone());
        let entries = match (reusable, table_size) {
            (Some(entries), _) => entries,
            (None, 0) => Vec::new(),
            (None, size) => {
                let pairs: Vec<(SocketAddrV4, u32)> = svc
                    .internal_backends
                    .iter()
                    .copied()
                    .zip(weights.iter().copied())
                    .collect();
                match maglev::build(&pairs, size) {
                    Ok(entries) => entries,
                    Err(e) => {
                        refuse(format!("Maglev table: {e}"));
                        continue;
                    }
                }
            }
        };
        let all_backends = svc.internal_backends.iter().chain(&svc.draining_backends);
        let mut ids = Vec::with_capacity(svc.internal_backends.len() + svc.draining_backends.len());
        let mut allocated = Vec::new();
        for b in all_backends.clone() {
            let id = known_backends
                .get(b)
                .or_else(|| new_backends.get(b))
                .copied()
                .or_else(|| {
                    let id = backend_ids.take()?;
                    allocated.push((*b, id));
                    Some(id)
                });
            match id {
                Some(id) => ids.push(id),
                None => break,
            }
        }
        if ids.len() < svc.internal_backends.len() + svc.draining_backends.len() {
            for (_, id) in allocated {
                backend_ids.give_back(id);
            }
            if fresh_id {
                svc_ids.give_back(svc_id);
            }
            refuse(format!(
                "BACKENDS map full ({} backends); raise --max-backends",
                cap.backends.saturating_sub(1)
            ));
            continue;
        }
        new_backends.extend(allocated);
        used_svc_ids.insert(svc_id);
        frontends += keys.len();
        let draining = ids.split_off(svc.internal_backends.len());
        next.tables.insert(
            svc_id,
            Table {
                algorithm: svc.algorithm.number(),
                hash_mode: if svc.session_affinity_timeout_seconds.is_some() {
                    hash_mode::SOURCE
                } else {
                    hash_mode::FIVE_TUPLE
                },
                backends: ids,
                weights,
                draining,
                table_size,
                entries,
            },
        );
        for key in keys {
            next.services.insert(key, ServiceValue { svc_id, flags: 0 });
        }
    }

    // A refused service that was programmed before keeps what it had.
    for id in refused_existing {
        if used_svc_ids.contains(&id) {
            continue;
        }
        if let Some(table) = current.tables.get(&id) {
            next.tables.insert(id, table.clone());
            for (key, value) in current.services.iter().filter(|(_, v)| v.svc_id == id) {
                next.services.entry(*key).or_insert(*value);
            }
        }
    }

    let by_id: HashMap<u32, SocketAddrV4> = known_backends
        .iter()
        .chain(new_backends.iter())
        .map(|(addr, id)| (*id, *addr))
        .collect();
    for id in next
        .tables
        .values()
        .flat_map(|t| t.backends.iter().chain(&t.draining))
    {
        let entry = current
            .backends
            .get(id)
            .copied()
            .or_else(|| by_id.get(id).map(|a| backend_entry(*a)));
        if let Some(entry) = entry {
            next.backends.insert(*id, entry);
        }
    }

    Plan {
        ops: diff(current, &next),
        next,
        refused,
    }
}

/// The ordered operations that turn `current` into `next`.
pub fn diff(current: &Programmed, next: &Programmed) -> Vec<Op> {
    let mut ops = Vec::new();
    for key in current.services.keys() {
        if !next.services.contains_key(key) {
            ops.push(Op::DelService(*key));
        }
    }
    for id in current.tables.keys() {
        if !next.tables.contains_key(id) {
            ops.push(Op::DelTable(*id));
        }
    }
    for (id, b) in &next.backends {
        if current.backends.get(id) != Some(b) {
            ops.push(Op::SetBackend(*id, *b));
        }
    }
    let mut frontends_by_id: BTreeMap<u32, Vec<(ServiceKey, ServiceValue)>> = BTreeMap::new();
    for (key, value) in &next.services {
        frontends_by_id
            .entry(value.svc_id)
            .or_default()
            .push((*key, *value));
    }
    for (id, table) in &next.tables {
        if current.tables.get(id) != Some(table) {
            if !current.tables.contains_key(id) {
                ops.push(Op::ResetSvcStats(*id));
            }
            ops.push(Op::SetTable(*id, table.clone()));
        }
        for (key, value) in frontends_by_id.remove(id).unwrap_or_default() {
            if current.services.get(&key) != Some(&value) {
                ops.push(Op::SetService(key, value));
            }
        }
    }
    for id in current.backends.keys() {
        if !next.backends.contains_key(id) {
            ops.push(Op::DelBackend(*id));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Frontend, FrontendKind, Protocol};

    const CAP: Capacity = Capacity {
        frontends: 100,
        services: 100,
        backends: 100,
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
            }
            for v in model.services.values() {
                let table = model.tables.get(&v.svc_id).expect("frontend without table");
                for b in &table.backends {
                    assert!(
                        model.backends.contains_key(b),
                        "table refers to missing backend"
                    );
                }
            }
        }
        model
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
            };
            let blocks = t.to_blocks();
            assert_eq!(blocks.len() as u32, sel_blocks(n, d, m));
            assert_eq!(Table::from_blocks(&blocks), Some(t));
        }
        assert_eq!(Table::from_blocks(&[]), None);
    }

    #[test]
    fn unchanged_maglev_tables_are_reused_and_changed_ones_rebuilt() {
        let one = state(vec![svc(
            "a",
            [10, 96, 0, 1],
            &["10.0.0.1:80", "10.0.0.2:80"],
        )]);
        let p = plan(&one, &Programmed::default(), &CAP);
        let maps = apply(Programmed::default(), &p.ops);
        let t = maps.tables.values().next().unwrap();
        assert_eq!(t.table_size, 211, "smallest prime >= 100 x 2 backends");
        assert_eq!(t.entries.len(), 211);
        assert_eq!(plan(&one, &maps, &CAP).ops, vec![], "nothing rebuilt");
        let mut weighted = one.clone();
        weighted.services[0]
            .backend_weights
            .insert("10.0.0.2:80".parse().unwrap(), 3);
        let p = plan(&weighted, &maps, &CAP);
        let Some(Op::SetTable(_, new)) = p.ops.iter().find(|o| matches!(o, Op::SetTable(..)))
        else {
            panic!("weight change must rebuild the table: {:?}", p.ops);
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
        let p = plan(&state(vec![s]), &Programmed::default(), &CAP);
        let t = p.next.tables.values().next().unwrap();
        assert_eq!(t.backends.len(), 1);
        assert_eq!(t.draining.len(), 1);
        assert!(t.entries.iter().all(|e| *e == 0));
        assert_eq!(
            p.next.backends.len(),
            2,
            "the draining backend keeps its id"
        );
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
        let mut maps = Programmed::default();
        for desired in &steps {
            let p = plan(desired, &maps, &CAP);
            assert!(p.refused.is_empty());
            maps = apply(maps, &p.ops);
            assert_eq!(maps, p.next);
            // Nothing left to do.
            assert_eq!(plan(desired, &maps, &CAP).ops, vec![]);
            // Every desired service is there with exactly its backends.
            for s in &desired.services {
                let v = maps.services[&frontend_keys(s)[0]];
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

    #[test]
    fn ids_are_stable_and_backends_shared() {
        let one = state(vec![svc("a", [10, 96, 0, 1], &["10.0.0.1:80"])]);
        let p = plan(&one, &Programmed::default(), &CAP);
        let maps = apply(Programmed::default(), &p.ops);
        let two = state(vec![
            svc("a", [10, 96, 0, 1], &["10.0.0.1:80", "10.0.0.2:80"]),
            svc("b", [10, 96, 0, 2], &["10.0.0.1:80"]),
        ]);
        let p2 = plan(&two, &maps, &CAP);
        let key_a = frontend_keys(&two.services[0])[0];
        assert_eq!(
            p2.next.services[&key_a], maps.services[&key_a],
            "svc id kept"
        );
        assert_eq!(
            p2.next.backends.len(),
            2,
            "10.0.0.1:80 shared, one new backend"
        );
        // The existing table is swapped, not deleted.
        assert!(!p2.ops.iter().any(|o| matches!(o, Op::DelTable(_))));
        assert!(!p2.ops.iter().any(|o| matches!(o, Op::DelService(_))));
    }

    #[test]
    fn full_maps_refuse_whole_services_and_keep_old_state() {
        let cap = Capacity {
            frontends: 100,
            services: 100,
            backends: 4, // ids 1..=3
        };
        let first = state(vec![svc(
            "a",
            [10, 96, 0, 1],
            &["10.0.0.1:80", "10.0.0.2:80"],
        )]);
        let p = plan(&first, &Programmed::default(), &cap);
        let maps = apply(Programmed::default(), &p.ops);
        // a wants two more backends: only one id is left, so a is refused as a whole
        // and keeps its old table; b fits.
        let second = state(vec![
            svc(
                "a",
                [10, 96, 0, 1],
                &["10.0.0.1:80", "10.0.0.3:80", "10.0.0.4:80"],
            ),
            svc("b", [10, 96, 0, 2], &["10.0.0.2:80"]),
        ]);
        let p2 = plan(&second, &maps, &cap);
        assert_eq!(p2.refused.len(), 1);
        assert_eq!(p2.refused[0].0.name, "a");
        assert!(p2.refused[0].1.contains("BACKENDS map full"));
        let maps2 = apply(maps.clone(), &p2.ops);
        let key_a = frontend_keys(&second.services[0])[0];
        let id_a = maps2.services[&key_a].svc_id;
        assert_eq!(maps2.tables[&id_a], maps.tables[&id_a]);
        assert_eq!(maps2.services.len(), 2);

        let cap_frontends = Capacity {
            frontends: 1,
            ..CAP
        };
        let p3 = plan(
            &state(vec![
                svc("a", [10, 96, 0, 1], &[]),
                svc("b", [10, 96, 0, 2], &[]),
            ]),
            &Programmed::default(),
            &cap_frontends,
        );
        assert_eq!(p3.next.services.len(), 1);
        assert!(p3.refused[0].1.contains("SERVICES map full"));
    }

    #[test]
    fn removal_happens_before_additions() {
        let a = state(vec![svc("a", [10, 96, 0, 1], &["10.0.0.1:80"])]);
        let p = plan(&a, &Programmed::default(), &CAP);
        let maps = apply(Programmed::default(), &p.ops);
        let b = state(vec![svc("b", [10, 96, 0, 2], &["10.0.0.9:80"])]);
        let ops = plan(&b, &maps, &CAP).ops;
        let first_set = ops
            .iter()
            .position(|o| matches!(o, Op::SetBackend(..) | Op::SetTable(..)))
            .unwrap();
        let last_del = ops
            .iter()
            .rposition(|o| matches!(o, Op::DelService(_) | Op::DelTable(_)))
            .unwrap();
        assert!(last_del < first_set, "{ops:?}");
        assert!(matches!(ops.last(), Some(Op::DelBackend(_))));
        // The removed table's id is not reused in the same pass.
        let new_id = ops.iter().find_map(|o| match o {
            Op::SetTable(id, _) => Some(*id),
            _ => None,
        });
        assert_ne!(new_id, Some(1));
    }
}
