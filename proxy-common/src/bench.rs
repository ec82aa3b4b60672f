//! The benchmark wrapper's template frame (`BENCH_FRAME`), never used on real traffic.

use crate::pod;

/// Largest frame the benchmark wrapper restores (a power of two).
pub const BENCH_FRAME_MAX: usize = 256;

/// How the benchmark wrapper prepares each run.
pub mod bench_mode {
    /// The same frame every run: after the first, an established flow.
    pub const SAME: u32 = 0;
    /// A new source port and address every run: every run a new flow.
    pub const NEW_FLOW: u32 = 1;
}

/// The benchmark wrapper's template (value of `BENCH_FRAME`; never used on
/// real traffic).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchFrame {
    /// Frame length in bytes.
    pub len: u32,
    /// A `bench_mode` value.
    pub mode: u32,
    /// Offset of the source port (NEW_FLOW mode).
    pub vary_off: u16,
    /// Offset of the low two bytes of the source address (NEW_FLOW mode).
    pub vary_addr_off: u16,
    /// Explicit padding.
    pub _pad: u32,
    /// The frame.
    pub data: [u8; BENCH_FRAME_MAX],
}

pod!(BenchFrame);
