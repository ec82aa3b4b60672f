//! Conntrack from userspace: a handle on `CONNTRACK` that can live on another
//! thread (garbage collection, flows of departed backends), and whole-table reads.

use std::{collections::BTreeMap, os::fd::AsFd as _};

use aya::maps::{Array, HashMap, Map, MapData};
use proxy_common::{Backend, CtKey, CtValue, maps};

use super::{Datapath, DatapathError, batch, map_data, map_err};

impl Datapath {
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

    /// Every conntrack entry, established (`CONNTRACK`) then half-open (`CT_NEW`).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
        let mut all = self.ct_table(maps::CONNTRACK)?;
        all.extend(self.ct_table(maps::CT_NEW)?);
        Ok(all)
    }

    /// Removes every entry of one conntrack table, `CONNTRACK` or `CT_NEW`
    /// (benchmarks: a round that starts with room). Returns how many went.
    pub fn clear_ct(&mut self, name: &'static str) -> Result<usize, DatapathError> {
        let keys: Vec<CtKey> = self.ct_table(name)?.into_iter().map(|(k, _)| k).collect();
        let mut m: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        Ok(keys.iter().filter(|k| m.remove(k).is_ok()).count())
    }

    /// How many entries one conntrack table holds, and its capacity.
    pub fn ct_fill(&self, name: &'static str) -> Result<(usize, u32), DatapathError> {
        let data = map_data(self.map(name)?).ok_or(DatapathError::MissingMap { name })?;
        let entries = batch::read_hash::<CtKey, CtValue>(data.fd().as_fd())
            .map_err(|source| DatapathError::Batch { name, source })?
            .len();
        Ok((entries, data.info().map_err(map_err(name))?.max_entries()))
    }

    /// The entries of one conntrack table (`CONNTRACK` or `CT_NEW`).
    pub fn ct_table(&self, name: &'static str) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
        let m: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        m.iter().collect::<Result<_, _>>().map_err(map_err(name))
    }
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
                        .is_ok_and(|b| b.addr() == v.nat())
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
