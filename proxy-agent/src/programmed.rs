//! The contract between reconcile and the datapath: what the service maps
//! hold, in agent terms ([`Programmed`]), their capacities ([`Capacity`]),
//! and the operations that change them ([`Op`]). Reconcile plans against a
//! `Programmed` and emits `Op`s; the datapath reads a `Programmed` back from
//! the kernel and runs the `Op`s. Neither knows the other.

use std::collections::{BTreeMap, BTreeSet};

pub use proxy_common::selection::Table;
use proxy_common::{Backend, ServiceKey, ServiceValue};

use crate::model::{Cidr, TableName};

/// What the service maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    /// `SERVICES`: frontends.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// The selection table of each svc id (`SVC_TABLE` → `SELECTION`).
    pub tables: BTreeMap<u32, Table>,
    /// The first `SELECTION` block of each svc id's table; the table takes
    /// `tables[id].blocks()` blocks from there.
    pub regions: BTreeMap<u32, u32>,
    /// `BACKENDS`: every set entry, by backend id.
    pub backends: BTreeMap<u32, Backend>,
    /// `SOURCE_RANGES`: per svc id, the client CIDRs its restricted
    /// (LoadBalancer) frontends accept.
    pub ranges: BTreeMap<u32, BTreeSet<Cidr>>,
    /// `SVC_NAMES`: what each svc id's table is.
    pub names: BTreeMap<u32, TableName>,
}

/// Map capacities (max_entries). Ids run from 1 to capacity − 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// `SERVICES` entries.
    pub frontends: u32,
    /// svc ids (`SVC_TABLE`, `SVC_STATS`).
    pub services: u32,
    /// Backend ids (`BACKENDS`).
    pub backends: u32,
    /// `SOURCE_RANGES` entries.
    pub ranges: u32,
    /// `SELECTION` blocks (block 0 is never used).
    pub blocks: u32,
}

/// One map operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    DelService(ServiceKey),
    /// Unhooks a svc id's table (`SVC_TABLE[id] = 0`).
    DelTable(u32),
    SetBackend(u32, Backend),
    /// Zero the per-service counters of a newly used svc id.
    ResetSvcStats(u32),
    /// Writes `table` into the free blocks from `first_block` on, then
    /// switches `svc_id` to it.
    SetTable {
        svc_id: u32,
        first_block: u32,
        table: Table,
    },
    SetService(ServiceKey, ServiceValue),
    DelBackend(u32),
    /// Source ranges of a svc id: CIDRs to add, then CIDRs to remove.
    SetRanges(u32, Vec<Cidr>, Vec<Cidr>),
    /// Names a svc id for inspection tools.
    SetName(u32, TableName),
    DelName(u32),
}

#[cfg(test)]
impl Programmed {
    /// What the maps hold after `ops` ran, checking after every operation
    /// that each visible frontend has a complete table whose backends all
    /// exist (the invariant the order of operations keeps). `Err` names the
    /// first operation that broke it.
    pub fn apply(mut self, ops: &[Op]) -> Result<Self, String> {
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::DelService(k) => {
                    self.services.remove(k);
                }
                Op::DelTable(id) => {
                    self.tables.remove(id);
                    self.regions.remove(id);
                }
                Op::SetBackend(id, b) => {
                    self.backends.insert(*id, *b);
                }
                Op::ResetSvcStats(_) => {}
                Op::SetTable {
                    svc_id,
                    first_block,
                    table,
                } => {
                    self.tables.insert(*svc_id, table.clone());
                    self.regions.insert(*svc_id, *first_block);
                }
                Op::SetService(k, v) => {
                    self.services.insert(*k, *v);
                }
                Op::DelBackend(id) => {
                    self.backends.remove(id);
                }
                Op::SetRanges(id, add, remove) => {
                    let set = self.ranges.entry(*id).or_default();
                    set.extend(add.iter().copied());
                    for r in remove {
                        set.remove(r);
                    }
                    if set.is_empty() {
                        self.ranges.remove(id);
                    }
                }
                Op::SetName(id, name) => {
                    self.names.insert(*id, name.clone());
                }
                Op::DelName(id) => {
                    self.names.remove(id);
                }
            }
            self.check()
                .map_err(|e| format!("after op {i} ({op:?}): {e}"))?;
        }
        Ok(self)
    }

    /// Every frontend has a table and every backend a table lists exists.
    fn check(&self) -> Result<(), String> {
        for (k, v) in &self.services {
            let table = self
                .tables
                .get(&v.svc_id)
                .ok_or_else(|| format!("frontend {} without table", k.frontend()))?;
            if let Some(id) = table
                .backends
                .iter()
                .chain(&table.draining)
                .find(|id| !self.backends.contains_key(id))
            {
                return Err(format!("svc {} refers to missing backend {id}", v.svc_id));
            }
        }
        Ok(())
    }
}
