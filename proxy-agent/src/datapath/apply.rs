//! Running reconcile's operations: each run of one kind as one batch.
//!
//! A table is written into the region reconcile planned for it (free blocks
//! no packet reads), then `SVC_TABLE[svc_id]` switches to it with one 4-byte
//! store. Unlike replacing an inner map of a map-of-maps, this needs no RCU
//! grace period per update (the kernel waits one for every map-in-map
//! update: ~9 ms here).

use std::{os::fd::AsFd as _, time::Instant};

use aya::maps::{
    HashMap, MapError,
    lpm_trie::{Key, LpmTrie},
};
use proxy_common::{
    Backend, BackendConns, SelBlock, ServiceKey, ServiceValue, SourceRange, SvcCounters, SvcName,
    maps,
};

use super::{Datapath, DatapathError, batch, map_data, map_err};
use crate::{model::Cidr, programmed::Op};

fn discriminant(op: &Op) -> u8 {
    match op {
        Op::DelService(_) => 0,
        Op::DelTable(_) => 1,
        Op::SetBackend(..) => 2,
        Op::ResetSvcStats(_) => 3,
        Op::SetTable { .. } => 4,
        Op::SetService(..) => 5,
        Op::DelBackend(_) => 6,
        Op::SetRanges(..) => 7,
        Op::SetName(..) => 8,
        Op::DelName(_) => 9,
    }
}

impl Datapath {
    fn batch_update<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        keys: &[K],
        values: &[V],
    ) -> Result<(), DatapathError> {
        self.batch_update_per_cpu(name, keys, values, 1)
    }

    fn batch_update_per_cpu<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        keys: &[K],
        values: &[V],
        cpus: usize,
    ) -> Result<(), DatapathError> {
        let map = self.map(name)?;
        let data = map_data(map).ok_or(DatapathError::MissingMap { name })?;
        batch::update(data.fd().as_fd(), keys, values, cpus)
            .map_err(|e| map_err(name)(MapError::IoError(e)))
    }

    /// Runs reconcile's operations, each run of one kind as a batch, stopping
    /// at the first failure (every prefix of the phases is consistent).
    /// Tables are written no earlier than `tables_not_before` (their blocks
    /// come out of quarantine then).
    pub fn apply(
        &mut self,
        ops: &[Op],
        tables_not_before: Option<Instant>,
    ) -> Result<(), (usize, DatapathError)> {
        let mut i = 0;
        while i < ops.len() {
            let kind = discriminant(&ops[i]);
            let end = ops[i..]
                .iter()
                .position(|o| discriminant(o) != kind)
                .map_or(ops.len(), |n| i + n);
            if let (Op::SetTable { .. }, Some(at)) = (&ops[i], tables_not_before) {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
            self.apply_run(&ops[i..end]).map_err(|e| (i, e))?;
            i = end;
        }
        Ok(())
    }

    fn apply_run(&mut self, run: &[Op]) -> Result<(), DatapathError> {
        match &run[0] {
            Op::DelService(_) => {
                let mut m: HashMap<_, ServiceKey, ServiceValue> =
                    HashMap::try_from(self.map_mut(maps::SERVICES)?)
                        .map_err(map_err(maps::SERVICES))?;
                for op in run {
                    if let Op::DelService(k) = op {
                        super::ignore_missing(m.remove(k)).map_err(map_err(maps::SERVICES))?;
                    }
                }
            }
            Op::DelTable(_) => {
                let ids: Vec<u32> = run
                    .iter()
                    .filter_map(|o| match o {
                        Op::DelTable(id) => Some(*id),
                        _ => None,
                    })
                    .collect();
                self.batch_update(maps::SVC_TABLE, &ids, &vec![0u32; ids.len()])?;
            }
            Op::SetBackend(..) | Op::DelBackend(_) => {
                let (ids, backends): (Vec<u32>, Vec<Backend>) = run
                    .iter()
                    .filter_map(|o| match o {
                        Op::SetBackend(id, b) => Some((*id, *b)),
                        Op::DelBackend(id) => Some((*id, Backend::default())),
                        _ => None,
                    })
                    .unzip();
                self.batch_update(maps::BACKENDS, &ids, &backends)?;
                // A freed id starts its least-connections counts from zero
                // when it is used again.
                let freed: Vec<u32> = run
                    .iter()
                    .filter_map(|o| match o {
                        Op::DelBackend(id) => Some(*id),
                        _ => None,
                    })
                    .collect();
                if !freed.is_empty() {
                    let zero = vec![BackendConns::default(); freed.len()];
                    self.batch_update(maps::BACKEND_CONNS, &freed, &zero)?;
                    self.batch_update(maps::BACKEND_REAPED, &freed, &vec![0u32; freed.len()])?;
                }
            }
            Op::ResetSvcStats(_) => {
                let cpus = aya::util::nr_cpus()
                    .map_err(|(_, e)| map_err(maps::SVC_STATS)(MapError::IoError(e)))?;
                let ids: Vec<u32> = run
                    .iter()
                    .filter_map(|o| match o {
                        Op::ResetSvcStats(id) => Some(*id),
                        _ => None,
                    })
                    .collect();
                let zeros = vec![SvcCounters::default(); ids.len() * cpus];
                self.batch_update_per_cpu(maps::SVC_STATS, &ids, &zeros, cpus)?;
            }
            Op::SetTable { .. } => self.write_tables(run)?,
            Op::SetRanges(..) => {
                let mut trie: LpmTrie<_, SourceRange, u32> =
                    LpmTrie::try_from(self.map_mut(maps::SOURCE_RANGES)?)
                        .map_err(map_err(maps::SOURCE_RANGES))?;
                let key = |id: u32, c: &Cidr| {
                    Key::new(
                        SourceRange::key_prefix_len(c.prefix),
                        SourceRange::new(id, c.addr),
                    )
                };
                for op in run {
                    if let Op::SetRanges(id, add, remove) = op {
                        for r in add {
                            trie.insert(&key(*id, r), 1, 0)
                                .map_err(map_err(maps::SOURCE_RANGES))?;
                        }
                        for r in remove {
                            super::ignore_missing(trie.remove(&key(*id, r)))
                                .map_err(map_err(maps::SOURCE_RANGES))?;
                        }
                    }
                }
            }
            Op::SetService(..) => {
                let (keys, values): (Vec<ServiceKey>, Vec<ServiceValue>) = run
                    .iter()
                    .filter_map(|o| match o {
                        Op::SetService(k, v) => Some((*k, *v)),
                        _ => None,
                    })
                    .unzip();
                self.batch_update(maps::SERVICES, &keys, &values)?;
            }
            Op::SetName(..) | Op::DelName(_) => {
                let mut m: HashMap<_, u32, SvcName> =
                    HashMap::try_from(self.map_mut(maps::SVC_NAMES)?)
                        .map_err(map_err(maps::SVC_NAMES))?;
                for op in run {
                    match op {
                        Op::SetName(id, name) => m
                            .insert(id, SvcName::new(&name.to_string()), 0)
                            .map_err(map_err(maps::SVC_NAMES))?,
                        Op::DelName(id) => {
                            super::ignore_missing(m.remove(id)).map_err(map_err(maps::SVC_NAMES))?
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes new tables into their planned regions, then switches services to them.
    fn write_tables(&mut self, run: &[Op]) -> Result<(), DatapathError> {
        let mut block_keys: Vec<u32> = Vec::new();
        let mut block_values: Vec<SelBlock> = Vec::new();
        let mut ids: Vec<u32> = Vec::new();
        let mut firsts: Vec<u32> = Vec::new();
        for op in run {
            let Op::SetTable {
                svc_id,
                first_block,
                table,
            } = op
            else {
                continue;
            };
            let blocks = table.to_blocks();
            let len = u32::try_from(blocks.len()).unwrap_or(u32::MAX);
            block_keys.extend(*first_block..first_block.saturating_add(len));
            block_values.extend(blocks);
            ids.push(*svc_id);
            firsts.push(*first_block);
        }
        self.batch_update(maps::SELECTION, &block_keys, &block_values)?;
        self.batch_update(maps::SVC_TABLE, &ids, &firsts)
    }
}
