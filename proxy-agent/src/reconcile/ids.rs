//! Lowest-free id allocation for svc ids and backend ids.

use std::collections::BTreeSet;

/// Lowest-free id allocator over `1..limit`: ids below `high` that are free
/// are kept in a set, so taking and giving back are O(log n).
#[derive(Clone, Debug)]
pub struct Ids {
    limit: u32,
    /// Every id at or above this is free.
    high: u32,
    /// Free ids below `high`.
    free: BTreeSet<u32>,
}

impl Ids {
    /// Ids below `limit`, `taken` (0 is never an id) already in use.
    pub fn new(limit: u32, taken: impl IntoIterator<Item = u32>) -> Self {
        let taken: BTreeSet<u32> = taken.into_iter().filter(|id| *id != 0).collect();
        let high = taken.last().map_or(1, |max| max + 1);
        let free = (1..high).filter(|id| !taken.contains(id)).collect();
        Self { limit, high, free }
    }

    /// The lowest free id, now taken.
    pub fn take(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.high < self.limit).then(|| {
            self.high += 1;
            self.high - 1
        })
    }

    /// Frees `id`.
    pub fn give_back(&mut self, id: u32) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
