//! Planning `SELECTION`: which free region of 64-byte blocks each new table
//! goes into.
//!
//! A table change never touches blocks a packet may be reading: the new
//! table goes into a free region, then `SVC_TABLE[svc_id]` switches to it
//! (one 4-byte store), and the old region waits in quarantine before reuse.
//! Programs run for microseconds; the quarantine is half a second, counted
//! from the end of the apply that switched away from the region
//! ([`Blocks::stamp`]). Regions are planned like every other capacity, so a
//! table that does not fit refuses its Service before anything is written.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

/// How long a released region waits before it is reused.
pub const QUARANTINE: Duration = Duration::from_millis(500);

/// Free and used regions of the `SELECTION` array.
#[derive(Clone, Debug)]
pub struct Blocks {
    capacity: u32,
    /// Free regions, start → length, coalesced.
    free: BTreeMap<u32, u32>,
    /// Released regions: (when the apply that released them ended, start,
    /// length); `None` until then (released by the batch being planned).
    quarantine: VecDeque<(Option<Instant>, u32, u32)>,
    /// The region of each svc id's current table.
    regions: BTreeMap<u32, (u32, u32)>,
    /// Sum of the regions' lengths.
    used: u32,
}

/// A region planned for a new table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u32,
    pub len: u32,
    /// Writing it must wait until then: it came out of quarantine early.
    pub ready_at: Option<Instant>,
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

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Carves `[start, start + len)` out of the free regions; false if it
    /// is not entirely free.
    fn carve(&mut self, start: u32, len: u32) -> bool {
        let Some((&fstart, &flen)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if u64::from(start) + u64::from(len) > u64::from(fstart) + u64::from(flen) {
            return false;
        }
        self.free.remove(&fstart);
        if start > fstart {
            self.free.insert(fstart, start - fstart);
        }
        if fstart + flen > start + len {
            self.free.insert(start + len, fstart + flen - start - len);
        }
        true
    }

    /// Marks an existing table's region as used (adoption at start).
    pub fn adopt(&mut self, svc_id: u32, start: u32, len: u32) -> bool {
        if !self.carve(start, len) {
            return false;
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

    /// Frees the quarantined regions whose time is up at `now` (all stamped
    /// ones when `everything`), returning when the last of them was due.
    fn reclaim(&mut self, now: Instant, everything: bool) -> Option<Instant> {
        let mut due = None;
        let mut keep = VecDeque::new();
        while let Some((at, start, len)) = self.quarantine.pop_front() {
            match at {
                Some(at) if everything || now.duration_since(at) >= QUARANTINE => {
                    due = due.max(Some(at + QUARANTINE));
                    self.insert_free(start, len);
                }
                _ => keep.push_back((at, start, len)),
            }
        }
        self.quarantine = keep;
        due
    }

    fn first_fit(&mut self, len: u32) -> Option<u32> {
        let (&start, &flen) = self.free.iter().find(|(_, l)| **l >= len)?;
        self.free.remove(&start);
        if flen > len {
            self.free.insert(start + len, flen - len);
        }
        Some(start)
    }

    /// Plans a region of `len` blocks, first fit: from free blocks, else
    /// from quarantined ones (the batch's tables must then wait until
    /// `ready_at`, which covers every region freed early). `None`:
    /// `SELECTION` is full.
    pub fn alloc(&mut self, len: u32, now: Instant) -> Option<Region> {
        self.reclaim(now, false);
        if let Some(start) = self.first_fit(len) {
            return Some(Region {
                start,
                len,
                ready_at: None,
            });
        }
        // Rare (SELECTION nearly full): try on a copy, so a failure frees nothing early.
        let mut waiting = self.clone();
        let ready_at = waiting.reclaim(now, true);
        let start = waiting.first_fit(len)?;
        *self = waiting;
        Some(Region {
            start,
            len,
            ready_at: ready_at.filter(|at| *at > now),
        })
    }

    /// Gives back a region [`Self::alloc`] planned but that is not used.
    #[cfg(test)]
    pub fn unalloc(&mut self, region: Region) {
        self.insert_free(region.start, region.len);
    }

    /// Makes `region` svc id's current one; its previous region (if any)
    /// goes into quarantine.
    pub fn set_region(&mut self, svc_id: u32, start: u32, len: u32) {
        if let Some((old_start, old_len)) = self.regions.insert(svc_id, (start, len)) {
            self.used -= old_len;
            self.quarantine.push_back((None, old_start, old_len));
        }
        self.used += len;
    }

    /// Releases svc id's region into quarantine.
    pub fn release(&mut self, svc_id: u32) {
        if let Some((start, len)) = self.regions.remove(&svc_id) {
            self.used -= len;
            self.quarantine.push_back((None, start, len));
        }
    }

    /// The apply that released the pending regions ended at `at`: their
    /// quarantine starts.
    pub fn stamp(&mut self, at: Instant) {
        for q in &mut self.quarantine {
            q.0.get_or_insert(at);
        }
    }

    /// Keeps `old`'s quarantined regions out of use (after the maps were
    /// read back, they may still be read by programs for a moment); pending
    /// ones are stamped `now`.
    pub fn carry_quarantine(&mut self, old: &Blocks, now: Instant) {
        for &(at, start, len) in &old.quarantine {
            if self.carve(start, len) {
                self.quarantine
                    .push_back((Some(at.unwrap_or(now)), start, len));
            }
        }
    }
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
        assert_eq!((a.start, c.start), (1, 41));
        assert_eq!(a.ready_at, None);
        b.set_region(1, a.start, 40);
        b.set_region(2, c.start, 40);
        assert!(b.alloc(30, t0).is_none(), "only 20 blocks left");
        b.release(1);
        assert!(
            b.alloc(30, t0 + QUARANTINE * 10).is_none(),
            "released by the batch being planned: not reusable at all"
        );
        b.stamp(t0);
        // Quarantined: usable only by waiting for it.
        let early = b.alloc(30, t0).unwrap();
        assert_eq!(early.start, 1);
        assert_eq!(early.ready_at, Some(t0 + QUARANTINE));
        b.unalloc(early);
        // Past the quarantine: free.
        let later = t0 + QUARANTINE;
        let r = b.alloc(30, later).unwrap();
        assert_eq!((r.start, r.ready_at), (1, None));
        b.set_region(3, r.start, 30);
        b.release(2);
        b.stamp(later);
        b.reclaim(later + QUARANTINE, false);
        // 31..101 coalesced: 70 blocks.
        assert_eq!(b.alloc(70, later + QUARANTINE).map(|r| r.start), Some(31));
        assert_eq!(b.used(), 30);
    }

    #[test]
    fn adoption_carves_used_regions_and_quarantine_is_carried() {
        let mut b = Blocks::new(100);
        assert!(b.adopt(7, 10, 5));
        assert!(b.adopt(8, 15, 5));
        assert!(!b.adopt(9, 12, 2), "overlap");
        assert_eq!(b.used(), 10);
        let now = Instant::now();
        assert_eq!(b.alloc(9, now).map(|r| r.start), Some(1));
        assert_eq!(b.alloc(2, now).map(|r| r.start), Some(20));
        b.release(7);
        let mut again = Blocks::new(100);
        assert!(again.adopt(8, 15, 5));
        again.carry_quarantine(&b, now);
        assert_eq!(again.alloc(80, now).map(|r| r.start), Some(20));
        let r = again.alloc(12, now).unwrap();
        assert_eq!(
            (r.start, r.ready_at),
            (1, Some(now + QUARANTINE)),
            "10..15 still quarantined"
        );
    }
}
