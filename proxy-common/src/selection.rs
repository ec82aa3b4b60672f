//! Selection tables: the `SELECTION` block array and `SVC_TABLE`, and the
//! algorithms and hash modes a table header names.

use crate::pod;

/// Number of `u32` words in one [`SelBlock`].
pub const SEL_WORDS: usize = 16;

/// One 64-byte element of a selection table; a table is a contiguous region of
/// blocks in the `SELECTION` array, found through `SVC_TABLE[svc_id]`. Array
/// map values are stored in 8-byte multiples, so packing words into blocks
/// keeps the table as small as its content.
///
/// Layout of a selection table with `n` eligible backends, `d` draining ones
/// and a Maglev table of `m` entries (block numbers relative to the table's
/// first block):
/// - block 0: the header, words `SEL_HDR_*`;
/// - from block 1: backend ids, `u32` each, 16 per block: the `n` eligible
///   ones (index `i` is what the Maglev table stores), then the `d` draining
///   ones (kept only so their existing flows live on; never selected);
/// - from block `SEL_HDR_WEIGHTS_BLOCK`: the `n` weights, `u32` each (read by
///   the agent only);
/// - from block `SEL_HDR_TABLE_BLOCK`: the Maglev table, `u16` backend indices,
///   32 per block (two per word, the even index in the low half).
///
/// A new table is written into blocks no packet reads, then `SVC_TABLE` is
/// switched to it with one 4-byte store, so a packet sees either the old table
/// or the new one, never a mix. The old region is reused only after a
/// quarantine far longer than any program run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SelBlock {
    /// The words of this block.
    pub w: [u32; SEL_WORDS],
}

impl Default for SelBlock {
    fn default() -> Self {
        Self { w: [0; SEL_WORDS] }
    }
}

/// Header word: number of backends eligible for new flows (`n`).
pub const SEL_HDR_COUNT: usize = 0;
/// Header word: the selection algorithm ([`algorithm`]).
pub const SEL_HDR_ALGORITHM: usize = 1;
/// Header word: Maglev table size `m` (prime), 0 without a table.
pub const SEL_HDR_TABLE_SIZE: usize = 2;
/// Header word: first block of the Maglev table.
pub const SEL_HDR_TABLE_BLOCK: usize = 3;
/// Header word: what the flow hash covers ([`hash_mode`]).
pub const SEL_HDR_HASH_MODE: usize = 4;
/// Header word: number of draining backends (`d`).
pub const SEL_HDR_DRAINING: usize = 5;
/// Header word: first block of the weights.
pub const SEL_HDR_WEIGHTS_BLOCK: usize = 6;
/// Header word: `SEL_F_*` flags.
pub const SEL_HDR_FLAGS: usize = 7;
/// Header word: `sessionAffinity: ClientIP` timeout in seconds (0: no affinity).
pub const SEL_HDR_AFFINITY_TIMEOUT: usize = 8;

/// Flag: with no backend, drop new flows instead of rejecting them (a Local
/// traffic policy on a node without local endpoints, while endpoints exist
/// elsewhere).
pub const SEL_F_DROP_WHEN_EMPTY: u32 = 1;

/// Maglev table entries per block.
pub const SEL_ENTRIES_PER_BLOCK: u32 = 2 * SEL_WORDS as u32;

/// Backend selection algorithms, stored in a selection table's header.
pub mod algorithm {
    /// Random: uniform over the backends, or proportional to their weights
    /// (a random slot of the weighted table) when weights differ.
    pub const RANDOM: u32 = 0;
    /// Maglev consistent hashing of the flow hash (the 5-tuple, or the
    /// source address alone for source hashing: `hash_mode`).
    pub const MAGLEV: u32 = 1;
    /// Round robin: each new flow the next backend (the next slot of the
    /// weighted table when weights differ).
    pub const ROUND_ROBIN: u32 = 2;
    /// Least connections: the backend with the fewest open flows (counted
    /// in `BACKEND_CONNS`), ties broken from a random start.
    pub const LEAST_CONN: u32 = 3;
}

/// How many eligible backends least-connections compares, and how many an
/// affinity entry is checked against (the first ones of the table).
pub const SEL_SCAN_MAX: u32 = 256;

/// What the flow hash covers, stored in a selection table's header.
pub mod hash_mode {
    /// The 5-tuple: every connection is placed on its own.
    pub const FIVE_TUPLE: u32 = 0;
    /// The source address only: a client sticks to one backend (session affinity).
    pub const SOURCE: u32 = 1;
}

/// Block of a selection table that holds backend `index`, and the word in it.
#[inline(always)]
pub const fn sel_backend_pos(index: u32) -> (u32, usize) {
    (
        1 + index / SEL_WORDS as u32,
        (index % SEL_WORDS as u32) as usize,
    )
}

/// Block (relative to the table start) and word holding Maglev entry `slot`,
/// and the shift of its half.
#[inline(always)]
pub const fn sel_entry_pos(slot: u32) -> (u32, usize, u32) {
    let in_block = slot % SEL_ENTRIES_PER_BLOCK;
    (
        slot / SEL_ENTRIES_PER_BLOCK,
        (in_block / 2) as usize,
        (in_block % 2) * 16,
    )
}

/// Bytes a selection table takes in the kernel.
pub const fn sel_bytes(backends: u32, draining: u32, table_size: u32) -> u64 {
    sel_blocks(backends, draining, table_size) as u64 * size_of::<SelBlock>() as u64
}

/// Number of blocks a selection table needs.
pub const fn sel_blocks(backends: u32, draining: u32, table_size: u32) -> u32 {
    1 + (backends + draining).div_ceil(SEL_WORDS as u32)
        + backends.div_ceil(SEL_WORDS as u32)
        + table_size.div_ceil(SEL_ENTRIES_PER_BLOCK)
}

pod!(SelBlock);

/// A selection table decoded (userspace): what the agent writes and reads
/// back, encoded into blocks exactly as the layout above says.
#[cfg(feature = "user")]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// [`algorithm`].
    pub algorithm: u32,
    /// [`hash_mode`].
    pub hash_mode: u32,
    /// Backend ids eligible for new flows; Maglev entries index this list.
    pub backends: std::vec::Vec<u32>,
    /// Weights, parallel to `backends`.
    pub weights: std::vec::Vec<u32>,
    /// Backend ids that take no new flows but keep their existing ones.
    pub draining: std::vec::Vec<u32>,
    /// Maglev table size; 0 without a table.
    pub table_size: u32,
    /// The Maglev table: `table_size` indices into `backends`.
    pub entries: std::vec::Vec<u16>,
    /// With no backend: drop (`true`) or reject (`false`) new flows.
    pub drop_when_empty: bool,
    /// Session affinity timeout in seconds (0: none).
    pub affinity_timeout: u32,
}

#[cfg(feature = "user")]
mod user {
    use std::{vec, vec::Vec};

    use super::*;

    fn len32(n: usize) -> u32 {
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    impl Table {
        /// Number of blocks the table takes.
        pub fn blocks(&self) -> u32 {
            sel_blocks(
                len32(self.backends.len()),
                len32(self.draining.len()),
                self.table_size,
            )
        }

        /// Bytes the table takes in the kernel.
        pub fn bytes(&self) -> u64 {
            sel_bytes(
                len32(self.backends.len()),
                len32(self.draining.len()),
                self.table_size,
            )
        }

        /// First block of the weights and of the Maglev table.
        fn layout(&self) -> (u32, u32) {
            let n = len32(self.backends.len());
            let d = len32(self.draining.len());
            let weights = 1 + (n + d).div_ceil(SEL_WORDS as u32);
            (weights, weights + n.div_ceil(SEL_WORDS as u32))
        }

        /// Encodes the table into the blocks of its region of `SELECTION`.
        pub fn to_blocks(&self) -> Vec<SelBlock> {
            let n = len32(self.backends.len());
            let d = len32(self.draining.len());
            let (weights_block, table_block) = self.layout();
            let mut blocks = vec![SelBlock::default(); self.blocks() as usize];
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

        /// Decodes a region's blocks; `None` if they are inconsistent.
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

        /// Length in blocks of the table whose header block is `header`.
        pub fn blocks_of_header(header: &SelBlock) -> u32 {
            let h = &header.w;
            sel_blocks(h[SEL_HDR_COUNT], h[SEL_HDR_DRAINING], h[SEL_HDR_TABLE_SIZE])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_positions() {
        assert_eq!(sel_backend_pos(0), (1, 0));
        assert_eq!(sel_backend_pos(15), (1, 15));
        assert_eq!(sel_backend_pos(16), (2, 0));
        assert_eq!(sel_entry_pos(0), (0, 0, 0));
        assert_eq!(sel_entry_pos(1), (0, 0, 16));
        assert_eq!(sel_entry_pos(31), (0, 15, 16));
        assert_eq!(sel_entry_pos(32), (1, 0, 0));
        assert_eq!(sel_blocks(0, 0, 0), 1);
        assert_eq!(sel_blocks(1, 0, 0), 3);
        assert_eq!(sel_blocks(16, 1, 0), 1 + 2 + 1);
        assert_eq!(sel_blocks(10, 0, 1009), 1 + 1 + 1 + 32);
        assert_eq!(sel_bytes(10, 0, 1009), 64 * 35);
        assert_eq!(sel_bytes(100, 0, 10_007), 64 * (1 + 7 + 7 + 313));
    }

    #[cfg(feature = "user")]
    #[test]
    fn table_blocks_roundtrip() {
        use std::vec::Vec;
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
                Vec::new()
            } else {
                (0..m).map(|i| (i % n) as u16).collect()
            };
            let t = Table {
                algorithm: algorithm::MAGLEV,
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
            assert_eq!(t.blocks(), sel_blocks(n, d, m));
            assert_eq!(Table::blocks_of_header(&blocks[0]), t.blocks());
            assert_eq!(Table::from_blocks(&blocks), Some(t));
        }
        assert_eq!(Table::from_blocks(&[]), None);
    }
}
