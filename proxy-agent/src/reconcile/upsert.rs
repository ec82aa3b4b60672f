//! Planning one table's new state, in steps that each either succeed or
//! leave nothing behind: admit (room for its frontends and source ranges),
//! table (the Maglev entries, reused or built), ids (backend ids and the
//! svc id), region (its `SELECTION` blocks), then commit (the mirror and
//! the operations).

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddrV4,
};

use proxy_common::{Backend, ServiceKey, ServiceValue, hash_mode};

use super::{
    Reconciler, Refusal, Work,
    blocks::Region,
    units::{Unit, build_entries, units},
};
use crate::{
    maglev::MaglevError,
    model::{Algorithm, Protocol, ServicePlan, ServicePortName, TableName},
    programmed::{Op, Table},
};

/// The ids a table's commit uses.
struct Assigned {
    svc_id: u32,
    /// The svc id is new (allocated for this table).
    new_svc: bool,
    /// Ids of the unit's backends, then of its plan's resting ones.
    backends: Vec<u32>,
    /// Addresses that got a new backend id.
    allocated: Vec<(SocketAddrV4, u32)>,
}

impl Reconciler {
    /// Plans one unit's new state.
    pub(super) fn upsert(
        &mut self,
        unit: &Unit,
        prebuilt: Option<Result<Vec<u16>, MaglevError>>,
        work: &mut Work,
    ) -> Result<(), Refusal> {
        let old_id = self.names.get(&unit.name).copied();
        self.admit(unit, old_id)?;
        let entries = self.entries(unit, prebuilt)?;
        let ids = self.assign_ids(unit, old_id)?;
        let table = table_of(unit, &ids, entries);
        let region = match self.region(&ids, &table, work) {
            Ok(region) => region,
            Err(why) => {
                self.give_back(ids);
                return Err(why);
            }
        };
        self.commit(unit, ids, table, region, work);
        Ok(())
    }

    /// Whether the maps have room for the unit's frontends and source ranges.
    fn admit(&self, unit: &Unit, old_id: Option<u32>) -> Result<(), Refusal> {
        let old_keys = old_id.and_then(|id| self.keys_of.get(&id));
        let adding = unit
            .keys
            .keys()
            .filter(|k| !self.maps.services.contains_key(k))
            .count();
        let freeing = old_keys.map_or(0, |old| {
            old.iter().filter(|k| !unit.keys.contains_key(k)).count()
        });
        if self.maps.services.len() + adding > self.cap.frontends as usize + freeing {
            return Err(Refusal::MapFull {
                map: "SERVICES",
                capacity: self.cap.frontends,
                what: "frontends",
                flag: "--max-frontends",
            });
        }
        let old_ranges = old_id
            .and_then(|id| self.maps.ranges.get(&id))
            .map_or(0, BTreeSet::len);
        if self.ranges_in_use() - old_ranges + unit.ranges.len() > self.cap.ranges as usize {
            return Err(Refusal::MapFull {
                map: "SOURCE_RANGES",
                capacity: self.cap.ranges,
                what: "CIDRs",
                flag: "--max-source-ranges",
            });
        }
        Ok(())
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
    pub(super) fn prebuild(
        &self,
        changes: &[(ServicePortName, Option<&ServicePlan>)],
    ) -> HashMap<TableName, Result<Vec<u16>, MaglevError>> {
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

    /// The unit's Maglev entries: reused when their inputs did not change,
    /// built otherwise (usually already, in parallel), before any id is
    /// allocated so a failure leaves nothing to undo.
    fn entries(
        &self,
        unit: &Unit,
        prebuilt: Option<Result<Vec<u16>, MaglevError>>,
    ) -> Result<Vec<u16>, Refusal> {
        let built = match (prebuilt, unit.table_size.unwrap_or(0)) {
            (Some(result), _) => result,
            (None, 0) => Ok(Vec::new()),
            (None, _) => self
                .table_reusable(unit)
                .map_or_else(|| build_entries(unit), |t| Ok(t.entries.clone())),
        };
        Ok(built?)
    }

    /// Backend ids (allocating for new addresses) and the svc id; on
    /// failure everything allocated is given back.
    fn assign_ids(&mut self, unit: &Unit, old_id: Option<u32>) -> Result<Assigned, Refusal> {
        let plan = unit.plan;
        let wanted =
            unit.backends.len() + plan.draining_backends.len() + plan.inactive_backends.len();
        let mut ids = Assigned {
            svc_id: 0,
            new_svc: old_id.is_none(),
            backends: Vec::with_capacity(wanted),
            allocated: Vec::new(),
        };
        for b in unit.backends.iter().chain(plan.resting()) {
            let id = self
                .by_addr
                .get(b)
                .copied()
                .or_else(|| {
                    ids.allocated
                        .iter()
                        .find(|(a, _)| a == b)
                        .map(|(_, id)| *id)
                })
                .or_else(|| {
                    let id = self.backend_ids.take()?;
                    ids.allocated.push((*b, id));
                    Some(id)
                });
            match id {
                Some(id) => ids.backends.push(id),
                None => {
                    self.give_back(ids);
                    return Err(Refusal::MapFull {
                        map: "BACKENDS",
                        capacity: self.cap.backends.saturating_sub(1),
                        what: "backends",
                        flag: "--max-backends",
                    });
                }
            }
        }
        match old_id.or_else(|| self.svc_ids.take()) {
            Some(id) => ids.svc_id = id,
            None => {
                self.give_back(ids);
                return Err(Refusal::MapFull {
                    map: "SVC_TABLE",
                    capacity: self.cap.services.saturating_sub(1),
                    what: "service ports",
                    flag: "--max-services",
                });
            }
        }
        Ok(ids)
    }

    /// Undoes [`Self::assign_ids`].
    fn give_back(&mut self, ids: Assigned) {
        for (_, id) in ids.allocated {
            self.backend_ids.give_back(id);
        }
        if ids.new_svc && ids.svc_id != 0 {
            self.svc_ids.give_back(ids.svc_id);
        }
    }

    /// The `SELECTION` region a changed table goes into; `None` when the
    /// table is unchanged (nothing to write).
    fn region(
        &mut self,
        ids: &Assigned,
        table: &Table,
        work: &Work,
    ) -> Result<Option<Region>, Refusal> {
        if self.maps.tables.get(&ids.svc_id) == Some(table) {
            return Ok(None);
        }
        self.blocks
            .alloc(table.blocks(), work.now)
            .map(Some)
            .ok_or(Refusal::MapFull {
                map: "SELECTION",
                capacity: self.blocks.capacity(),
                what: "64-byte blocks",
                flag: "--selection-blocks",
            })
    }

    /// Records the unit's new state in the mirror and plans its operations.
    fn commit(
        &mut self,
        unit: &Unit,
        ids: Assigned,
        table: Table,
        region: Option<Region>,
        work: &mut Work,
    ) {
        let plan = unit.plan;
        let svc_id = ids.svc_id;
        for (addr, id) in ids.allocated {
            let b = Backend::new(addr, plan.is_local(&addr));
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
            let wanted = Backend::new(*addr, plan.is_local(addr));
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
        if ids.new_svc {
            work.resets.push(Op::ResetSvcStats(svc_id));
        }
        if let Some(r) = region {
            self.blocks.set_region(svc_id, r.start, r.len);
            self.maps.regions.insert(svc_id, r.start);
            work.not_before = work.not_before.max(r.ready_at);
            work.tables.push(Op::SetTable {
                svc_id,
                first_block: r.start,
                table: table.clone(),
            });
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
            if plan.id.protocol == Protocol::Udp {
                self.note_left(
                    svc_id,
                    old.backends.iter().filter(|b| !kept.contains(b)),
                    work,
                );
            }
        }
        let keys: BTreeSet<ServiceKey> = unit.keys.keys().copied().collect();
        let old_keys = self.keys_of.get(&svc_id).cloned().unwrap_or_default();
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
        if self.maps.names.get(&svc_id) != Some(&unit.name) {
            self.maps.names.insert(svc_id, unit.name.clone());
            work.names.push(Op::SetName(svc_id, unit.name.clone()));
        }
        self.names.insert(unit.name.clone(), svc_id);
    }
}

/// The table a unit gets with `ids`.
fn table_of(unit: &Unit, ids: &Assigned, entries: Vec<u16>) -> Table {
    let plan = unit.plan;
    let mut backends = ids.backends.clone();
    let draining = backends.split_off(unit.backends.len());
    Table {
        algorithm: plan.algorithm.number(),
        hash_mode: if plan.session_affinity_timeout_seconds.is_some()
            || plan.algorithm == Algorithm::SourceHash
        {
            hash_mode::SOURCE
        } else {
            hash_mode::FIVE_TUPLE
        },
        backends,
        weights: unit.backends.iter().map(|b| plan.weight(b)).collect(),
        draining,
        table_size: unit.table_size.unwrap_or(0),
        entries,
        drop_when_empty: unit.backends.is_empty() && plan.has_endpoints,
        affinity_timeout: plan.session_affinity_timeout_seconds.unwrap_or(0),
    }
}
