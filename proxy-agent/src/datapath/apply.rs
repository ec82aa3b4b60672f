//! Selection tables in the kernel: a block allocator over the `SELECTION`
//! array, and the phased, batched application of reconcile's operations.
//!
//! A table change never touches blocks a packet may be reading: the new
//! table goes into a free region, then `SVC_TABLE[svc_id]` switches to it
//! (one 4-byte store), and the old region waits in quarantine before reuse.
//! Programs run for microseconds; the quarantine is half a second. Unlike
//! replacing an inner map of a map-of-maps, this needs no RCU grace period
//! per update (the kernel waits one for every map-in-map update: ~9 ms here).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    os::fd::{AsFd as _, BorrowedFd},
    time::{Duration, Instant},
};

use aya::maps::{
    HashMap, MapError,
    lpm_trie::{Key, LpmTrie},
};
use proxy_common::{
    Backend, BackendConns, SEL_HDR_COUNT, SEL_HDR_DRAINING, SEL_HDR_TABLE_SIZE, SelBlock,
    ServiceKey, ServiceValue, SourceRange, SvcCounters, maps, sel_blocks,
};

use super::{Datapath, DatapathError, batch, map_data, map_err};
use crate::reconcile::{Op, Range, Table};

/// How long a released region waits before it is reused.
pub const QUARANTINE: Duration = Duration::from_millis(500);

/// Free and used regions of the `SELECTION` array.
#[derive(Clone, Debug)]
pub struct Blocks {
    capacity: u32,
    /// Free regions, start → length, coalesced.
    free: BTreeMap<u32, u32>,
    /// Released regions and when.
    quarantine: VecDeque<(Instant, u32, u32)>,
    /// The region of each service's current table.
    regions: BTreeMap<u32, (u32, u32)>,
    /// Sum of the regions' lengths.
    used: u32,
}

impl Blocks {
    /// All of `capacity` free, except block 0 (it means "no table").
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 1 {
            free.insert(1, capacity - 1);
        }
        Self {
            capacity,
            free,
            quarantine: VecDeque::new(),
            regions: BTreeMap::new(),
            used: 0,
        }
    }

    /// Blocks in use by current tables.
    pub fn used(&self) -> u32 {
        self.used
    }

    fn set_region(&mut self, svc_id: u32, start: u32, len: u32) {
        if let Some((_, old)) = self.regions.insert(svc_id, (start, len)) {
            self.used -= old;
        }
        self.used += len;
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Marks an existing table's region as used (adoption at start).
    pub fn adopt(&mut self, svc_id: u32, start: u32, len: u32) -> bool {
        let Some((&fstart, &flen)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if start + len > fstart + flen {
            return false;
        }
        self.free.remove(&fstart);
        if start > fstart {
            self.free.insert(fstart, start - fstart);
        }
        if fstart + flen > start + len {
            self.free.insert(start + len, fstart + flen - start - len);
        }
        self.set_region(svc_id, start, len);
        true
    }

    fn insert_free(&mut self, start: u32, len: u32) {
        let mut start = start;
        let mut len = len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back()
            && ps + pl == start
        {
            self.free.remove(&ps);
            start = ps;
            len += pl;
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nl;
        }
        self.free.insert(start, len);
    }

    fn reclaim(&mut self, now: Instant, everything: bool) {
        while let Some(&(at, start, len)) = self.quarantine.front() {
            if !everything && now.duration_since(at) < QUARANTINE {
                break;
            }
            self.quarantine.pop_front();
            self.insert_free(start, len);
        }
    }

    /// First fit for `len` blocks.
    fn alloc(&mut self, len: u32, now: Instant) -> Option<u32> {
        self.reclaim(now, false);
        let (&start, &flen) = self.free.iter().find(|(_, l)| **l >= len)?;
        self.free.remove(&start);
        if flen > len {
            self.free.insert(start + len, flen - len);
        }
        Some(start)
    }

    /// Keeps `old`'s quarantined regions out of use (after a re-read, they may
    /// still be read by programs for a moment).
    fn carry_quarantine(&mut self, old: &Blocks) {
        for &(at, start, len) in &old.quarantine {
            if self.adopt(u32::MAX, start, len) {
                if let Some((_, l)) = self.regions.remove(&u32::MAX) {
                    self.used -= l;
                }
                self.quarantine.push_back((at, start, len));
            }
        }
    }

    /// The oldest quarantined region, if allocation must wait for it.
    fn next_release(&self) -> Option<Instant> {
        self.quarantine.front().map(|(at, _, _)| *at + QUARANTINE)
    }

    /// Gives a service's region back (into quarantine).
    fn release(&mut self, svc_id: u32, now: Instant) {
        if let Some((start, len)) = self.regions.remove(&svc_id) {
            self.used -= len;
            self.quarantine.push_back((now, start, len));
        }
    }
}

/// What an apply did not do.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    /// Service ports whose new table found no room in `SELECTION`: their
    /// frontends were left as they were (old table, or not programmed).
    pub refused: BTreeSet<u32>,
}

fn discriminant(op: &Op) -> u8 {
    match op {
        Op::DelService(_) => 0,
        Op::DelTable(_) => 1,
        Op::SetBackend(..) => 2,
        Op::ResetSvcStats(_) => 3,
        Op::SetTable(..) => 4,
        Op::SetService(..) => 5,
        Op::DelBackend(_) => 6,
        Op::SetRanges(..) => 7,
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
    pub fn apply(&mut self, ops: &[Op]) -> Result<ApplyReport, (usize, DatapathError)> {
        let mut report = ApplyReport::default();
        let mut i = 0;
        while i < ops.len() {
            let kind = discriminant(&ops[i]);
            let end = ops[i..]
                .iter()
                .position(|o| discriminant(o) != kind)
                .map_or(ops.len(), |n| i + n);
            self.apply_run(&ops[i..end], &mut report)
                .map_err(|e| (i, e))?;
            i = end;
        }
        Ok(report)
    }

    fn apply_run(&mut self, run: &[Op], report: &mut ApplyReport) -> Result<(), DatapathError> {
        let now = Instant::now();
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
                for id in ids {
                    self.blocks.release(id, now);
                }
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
            Op::SetTable(..) => self.write_tables(run, now, report)?,
            Op::SetRanges(..) => {
                let mut trie: LpmTrie<_, SourceRange, u32> =
                    LpmTrie::try_from(self.map_mut(maps::SOURCE_RANGES)?)
                        .map_err(map_err(maps::SOURCE_RANGES))?;
                let key = |id: u32, (addr, prefix): &Range| {
                    Key::new(
                        32 + u32::from(*prefix),
                        SourceRange {
                            svc_id_be: id.to_be(),
                            addr_be: u32::from_ne_bytes(addr.octets()),
                        },
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
                        Op::SetService(k, v) if !report.refused.contains(&v.svc_id) => {
                            Some((*k, *v))
                        }
                        _ => None,
                    })
                    .unzip();
                self.batch_update(maps::SERVICES, &keys, &values)?;
            }
        }
        Ok(())
    }

    /// Writes new tables into free regions, then switches services to them.
    fn write_tables(
        &mut self,
        run: &[Op],
        now: Instant,
        report: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        let mut block_keys: Vec<u32> = Vec::new();
        let mut block_values: Vec<SelBlock> = Vec::new();
        let mut switches: Vec<(u32, u32, u32)> = Vec::new();
        for op in run {
            let Op::SetTable(svc_id, table) = op else {
                continue;
            };
            let blocks = table.to_blocks();
            let len = u32::try_from(blocks.len()).unwrap_or(u32::MAX);
            let start = loop {
                if let Some(start) = self.blocks.alloc(len, Instant::now()) {
                    break Some(start);
                }
                // Room may be waiting in quarantine: wait for it (at most QUARANTINE).
                match self.blocks.next_release() {
                    Some(at) => std::thread::sleep(at.saturating_duration_since(Instant::now())),
                    None => break None,
                }
            };
            let Some(start) = start else {
                tracing::error!(
                    svc_id,
                    blocks = len,
                    used = self.blocks.used(),
                    capacity = self.blocks.capacity(),
                    "SELECTION has no free region for this table; raise --selection-blocks"
                );
                report.refused.insert(*svc_id);
                continue;
            };
            block_keys.extend(start..start + len);
            block_values.extend(blocks);
            switches.push((*svc_id, start, len));
        }
        if let Err(e) = self.batch_update(maps::SELECTION, &block_keys, &block_values) {
            for (_, start, len) in switches {
                self.blocks.quarantine.push_back((now, start, len));
            }
            return Err(e);
        }
        let (ids, firsts): (Vec<u32>, Vec<u32>) =
            switches.iter().map(|(id, start, _)| (*id, *start)).unzip();
        self.batch_update(maps::SVC_TABLE, &ids, &firsts)?;
        for (svc_id, start, len) in switches {
            self.blocks.release(svc_id, now);
            self.blocks.set_region(svc_id, start, len);
        }
        Ok(())
    }

    /// Reads every table `SVC_TABLE` points at, adopting their regions.
    pub(super) fn read_tables(&mut self) -> Result<BTreeMap<u32, Table>, DatapathError> {
        let svc_table = self.map(maps::SVC_TABLE)?;
        let selection = self.map(maps::SELECTION)?;
        let (tables, blocks) = read_tables_from(
            map_data(svc_table).ok_or(DatapathError::MissingMap {
                name: maps::SVC_TABLE,
            })?,
            map_data(selection).ok_or(DatapathError::MissingMap {
                name: maps::SELECTION,
            })?,
        )?;
        let mut blocks = blocks;
        blocks.carry_quarantine(&self.blocks);
        self.blocks = blocks;
        Ok(tables)
    }
}

/// Reads the table of `svc_id` starting at block `first` of `SELECTION`
/// (`capacity` blocks), returning it and its length in blocks.
pub(super) fn read_table(
    selection: BorrowedFd<'_>,
    svc_id: u32,
    first: u32,
    capacity: u32,
) -> Result<(Table, u32), DatapathError> {
    let io = |e: std::io::Error| map_err(maps::SELECTION)(MapError::IoError(e));
    let bad = || DatapathError::BadTable { svc_id };
    let header: Vec<SelBlock> = batch::read_array(selection, first, 1).map_err(io)?;
    let h = header.first().ok_or_else(bad)?;
    let len = sel_blocks(
        h.w[SEL_HDR_COUNT],
        h.w[SEL_HDR_DRAINING],
        h.w[SEL_HDR_TABLE_SIZE],
    );
    if u64::from(first) + u64::from(len) > u64::from(capacity) {
        return Err(bad());
    }
    let raw: Vec<SelBlock> = batch::read_array(selection, first, len).map_err(io)?;
    let table = Table::from_blocks(&raw).ok_or_else(bad)?;
    Ok((table, len))
}

/// Reads the tables behind `SVC_TABLE` and the block usage they imply.
pub(super) fn read_tables_from(
    svc_table: &aya::maps::MapData,
    selection: &aya::maps::MapData,
) -> Result<(BTreeMap<u32, Table>, Blocks), DatapathError> {
    let io = |name: &'static str| move |e: std::io::Error| map_err(name)(MapError::IoError(e));
    let svc_len = svc_table
        .info()
        .map_err(map_err(maps::SVC_TABLE))?
        .max_entries();
    let capacity = selection
        .info()
        .map_err(map_err(maps::SELECTION))?
        .max_entries();
    let firsts: Vec<u32> =
        batch::read_array(svc_table.fd().as_fd(), 0, svc_len).map_err(io(maps::SVC_TABLE))?;
    let mut blocks = Blocks::new(capacity);
    let mut tables = BTreeMap::new();
    for (svc_id, first) in (0u32..).zip(firsts) {
        if first == 0 {
            continue;
        }
        let (table, len) = read_table(selection.fd().as_fd(), svc_id, first, capacity)?;
        if !blocks.adopt(svc_id, first, len) {
            return Err(DatapathError::BadTable { svc_id });
        }
        tables.insert(svc_id, table);
    }
    Ok((tables, blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_first_fit_coalescing_and_quarantine() {
        let mut b = Blocks::new(101);
        let t0 = Instant::now();
        let a = b.alloc(40, t0).unwrap();
        let c = b.alloc(40, t0).unwrap();
        assert_eq!((a, c), (1, 41));
        b.set_region(1, a, 40);
        b.set_region(2, c, 40);
        assert!(b.alloc(30, t0).is_none(), "only 20 blocks left");
        b.release(1, t0);
        assert!(
            b.alloc(30, t0).is_none(),
            "released blocks wait in quarantine"
        );
        let later = t0 + QUARANTINE;
        assert_eq!(b.alloc(30, later), Some(1));
        b.release(2, later);
        b.reclaim(later + QUARANTINE, false);
        // 31..101 coalesced: 70 blocks.
        assert_eq!(b.alloc(70, later + QUARANTINE), Some(31));
    }

    #[test]
    fn adoption_carves_used_regions() {
        let mut b = Blocks::new(100);
        assert!(b.adopt(7, 10, 5));
        assert!(b.adopt(8, 15, 5));
        assert!(!b.adopt(9, 12, 2), "overlap");
        assert_eq!(b.used(), 10);
        let now = Instant::now();
        assert_eq!(b.alloc(9, now), Some(1));
        assert_eq!(b.alloc(2, now), Some(20));
    }
}
