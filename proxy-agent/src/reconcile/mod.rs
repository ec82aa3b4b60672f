//! Reconcile: diff the desired state against what the maps hold and plan
//! the map operations, in an order that never shows a packet a half-built
//! service.
//!
//! Pure: no aya in here. The datapath reads the maps into a
//! [`Programmed`] and runs the [`Op`]s (the contract in
//! [`crate::programmed`]).
//!
//! Order of operations, in phases (the datapath runs each phase as batches):
//! 1. frontends that go away (a removed service stops matching first),
//! 2. new backends,
//! 3. counters of newly used svc ids reset,
//! 4. source ranges new frontends will need, then selection tables: each
//!    written complete into a free region, then switched to atomically,
//! 5. frontends: new ones and those changing service, all pointing at
//!    complete tables by now,
//! 6. names of new svc ids (`SVC_NAMES`, for inspection tools),
//! 7. source ranges no frontend needs any more,
//! 8. selection tables of removed services (after 5: a frontend that moves
//!    to another table, say when an external table is folded into the
//!    internal one, points at its old table until then), and their names,
//! 9. backends nothing refers to any more.
//!
//! Capacity is planned, not discovered: the agent is the only writer of these
//! maps, so a service that would not fit (frontends, source ranges, svc ids,
//! backends, `SELECTION` blocks) is refused whole, and keeps its previous
//! state, before any operation is issued.

mod blocks;
mod ids;
#[cfg(test)]
mod tests;
mod units;
mod upsert;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddrV4,
    time::Instant,
};

use proxy_common::{Backend, ServiceKey};

use self::{blocks::Blocks, ids::Ids};
pub use self::{
    blocks::QUARANTINE,
    units::{Unit, frontend_keys, units},
};
use crate::{
    maglev,
    model::{Cidr, DesiredState, NodePortMode, ServicePlan, ServicePortName, TableName, TableRole},
    programmed::{Capacity, Op, Programmed, Table},
};

/// Why a Service port was not (re)programmed; it keeps its previous state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A map has no room for it.
    #[error("{map} map full ({capacity} {what}); raise {flag}")]
    MapFull {
        map: &'static str,
        capacity: u32,
        what: &'static str,
        flag: &'static str,
    },
    /// Its Maglev table cannot be built.
    #[error("Maglev table: {0}")]
    Maglev(#[from] maglev::MaglevError),
}

/// The operations of one reconcile pass, and the Service ports it refused.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub ops: Vec<Op>,
    /// Service ports that were not (re)programmed, and why.
    pub refused: Vec<(ServicePortName, Refusal)>,
    /// (svc id, backend id) pairs where the backend left a UDP service: its
    /// flows should be forgotten so clients move on.
    pub left: BTreeSet<(u32, u32)>,
    /// The addresses of those backends: sockets connected to them (socket-
    /// level load balancing) should be told.
    pub left_addrs: BTreeSet<SocketAddrV4>,
    /// Backends no Service refers to any more (no slice lists them): their
    /// flows, of any protocol, should end.
    pub gone: BTreeSet<SocketAddrV4>,
    /// The tables may be written only from this instant on: some of their
    /// blocks were released by an earlier batch less than [`QUARANTINE`] ago.
    pub tables_not_before: Option<Instant>,
}

/// Keeps the service maps in step with the desired state.
///
/// Holds a mirror of what the maps hold and indexes over it, so a change to
/// one Service costs work for that Service only. The mirror is updated as
/// operations are planned: tell it when they ran ([`Reconciler::applied`]),
/// and if running them failed, rebuild it from the maps
/// ([`Reconciler::rebuild`]).
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
    blocks: Blocks,
}

/// Work collected while planning one batch, by phase.
struct Work {
    now: Instant,
    dels: BTreeSet<ServiceKey>,
    del_tables: BTreeSet<u32>,
    new_backends: BTreeMap<u32, Backend>,
    resets: Vec<Op>,
    ranges_added: Vec<Op>,
    tables: Vec<Op>,
    frontends: Vec<Op>,
    names: Vec<Op>,
    /// Ranges no frontend needs any more.
    ranges_removed: Vec<Op>,
    del_names: Vec<Op>,
    unref: BTreeSet<u32>,
    retired: Vec<u32>,
    refused: Vec<(ServicePortName, Refusal)>,
    left: BTreeSet<(u32, u32)>,
    left_addrs: BTreeSet<SocketAddrV4>,
    not_before: Option<Instant>,
}

impl Work {
    fn new(now: Instant) -> Self {
        Self {
            now,
            dels: BTreeSet::new(),
            del_tables: BTreeSet::new(),
            new_backends: BTreeMap::new(),
            resets: Vec::new(),
            ranges_added: Vec::new(),
            tables: Vec::new(),
            frontends: Vec::new(),
            names: Vec::new(),
            ranges_removed: Vec::new(),
            del_names: Vec::new(),
            unref: BTreeSet::new(),
            retired: Vec::new(),
            refused: Vec::new(),
            left: BTreeSet::new(),
            left_addrs: BTreeSet::new(),
            not_before: None,
        }
    }
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
            let slot = by_addr.entry(b.addr()).or_insert(*id);
            if !refs.contains_key(slot) {
                *slot = *id;
            }
        }
        let mut blocks = Blocks::new(cap.blocks);
        for (id, start) in &maps.regions {
            if let Some(t) = maps.tables.get(id) {
                // The datapath checked regions do not overlap when it read them.
                blocks.adopt(*id, *start, t.blocks());
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
            blocks,
        }
    }

    /// A reconciler for what the maps were read back as after planned
    /// operations failed: it keeps this one's quarantined `SELECTION` regions
    /// out of use (programs may still read them for a moment).
    #[must_use]
    pub fn rebuild(&self, maps: Programmed) -> Self {
        let mut r = Self::new(maps, self.cap).with_mode(self.mode);
        r.blocks.carry_quarantine(&self.blocks, Instant::now());
        r
    }

    /// How external frontends reach remote backends (`--nodeport-mode`).
    #[must_use]
    pub fn with_mode(mut self, mode: NodePortMode) -> Self {
        self.mode = mode;
        self
    }

    /// The planned operations ran, ending at `at`: regions they switched
    /// away from start their quarantine.
    pub fn applied(&mut self, at: Instant) {
        self.blocks.stamp(at);
    }

    /// What the maps hold once the planned operations have run.
    pub fn maps(&self) -> &Programmed {
        &self.maps
    }

    /// The map capacities planned within.
    pub fn capacity(&self) -> Capacity {
        self.cap
    }

    /// `SELECTION` blocks used by current tables, and the capacity.
    pub fn selection_usage(&self) -> (u32, u32) {
        (self.blocks.used(), self.blocks.capacity())
    }

    /// The svc id of a programmed service port (its internal table).
    pub fn svc_id(&self, name: &ServicePortName) -> Option<u32> {
        self.table_id(name, TableRole::Internal)
    }

    /// Every programmed table and its svc id.
    pub fn tables(&self) -> impl Iterator<Item = (&TableName, u32)> {
        self.names.iter().map(|(n, id)| (n, *id))
    }

    /// The svc id of one of a programmed service port's tables.
    pub fn table_id(&self, name: &ServicePortName, role: TableRole) -> Option<u32> {
        self.names
            .get(&TableName {
                port: name.clone(),
                role,
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
        // Left over from an interrupted apply: names of ids without a table,
        // backends nothing refers to.
        let stale: Vec<u32> = self
            .maps
            .names
            .keys()
            .filter(|id| !self.maps.tables.contains_key(id))
            .copied()
            .collect();
        for id in stale {
            self.maps.names.remove(&id);
            batch.ops.push(Op::DelName(id));
        }
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
        let mut work = Work::new(Instant::now());
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
            for role in TableRole::ALL {
                let table = TableName {
                    port: name.clone(),
                    role,
                };
                match wanted.iter().find(|u| u.name == table) {
                    Some(unit) => {
                        let prebuilt = built.remove(&table);
                        if let Err(why) = self.upsert(unit, prebuilt, &mut work) {
                            work.refused.push((name.clone(), why));
                        }
                    }
                    None => {
                        if let Some(id) = self.names.remove(&table) {
                            self.remove_svc_id(id, &mut work);
                        }
                    }
                }
            }
        }
        self.finish(work)
    }

    /// Puts a batch's operations in phase order.
    fn finish(&mut self, work: Work) -> Batch {
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
        ops.extend(work.resets);
        ops.extend(work.ranges_added);
        ops.extend(work.tables);
        ops.extend(work.frontends);
        ops.extend(work.names);
        ops.extend(work.ranges_removed);
        ops.extend(work.del_tables.iter().map(|id| Op::DelTable(*id)));
        ops.extend(work.del_names);
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
            left_addrs: work.left_addrs,
            gone,
            tables_not_before: work.not_before,
        }
    }

    /// Forgets backend `id`; returns its address when no other id holds it
    /// (the backend is gone, not just a stray duplicate).
    fn drop_backend(&mut self, id: u32) -> Option<SocketAddrV4> {
        let addr = self.maps.backends.remove(&id).map(|b| b.addr());
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
    fn set_ranges(&mut self, id: u32, wanted: &BTreeSet<Cidr>, work: &mut Work) {
        let empty = BTreeSet::new();
        let have = self.maps.ranges.get(&id).unwrap_or(&empty);
        let add: Vec<Cidr> = wanted.difference(have).copied().collect();
        let remove: Vec<Cidr> = have.difference(wanted).copied().collect();
        if !add.is_empty() {
            work.ranges_added.push(Op::SetRanges(id, add, Vec::new()));
        }
        if !remove.is_empty() {
            work.ranges_removed
                .push(Op::SetRanges(id, Vec::new(), remove));
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

    /// Backends `ids` left UDP service port `svc_id`: their flows and
    /// connected sockets are to be told.
    fn note_left<'a>(&self, svc_id: u32, ids: impl Iterator<Item = &'a u32>, work: &mut Work) {
        for id in ids {
            work.left.insert((svc_id, *id));
            if let Some(b) = self.maps.backends.get(id) {
                work.left_addrs.insert(b.addr());
            }
        }
    }

    /// Removes a svc id's frontends, table and name.
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
            self.maps.regions.remove(&id);
            self.blocks.release(id);
            self.unref_table(&table, work);
            if udp {
                self.note_left(id, table.backends.iter().chain(&table.draining), work);
            }
            work.del_tables.insert(id);
            work.retired.push(id);
        }
        if self.maps.names.remove(&id).is_some() {
            work.del_names.push(Op::DelName(id));
        }
    }
}
