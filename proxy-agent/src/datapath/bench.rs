//! Benchmark support: runs a datapath program under BPF_PROG_TEST_RUN through
//! the `tc_bench` wrapper (see proxy-ebpf/src/bench.rs), which restores the
//! frame before every run.

use aya::maps::{Array, ProgramArray};
use proxy_common::{BENCH_FRAME_MAX, BenchFrame};

use super::{Datapath, DatapathError, TestRunOutput, classifier, map_err};

/// The wrapper program.
pub const BENCH_WRAPPER: &str = "tc_bench";
/// The do-nothing program: the floor of every measurement.
pub const BENCH_EMPTY: &str = "tc_bench_empty";

/// One benchmark setup.
#[derive(Clone, Debug)]
pub struct BenchSpec<'a> {
    /// Program under test (tail-called by the wrapper).
    pub program: &'static str,
    pub frame: &'a [u8],
    /// A `proxy_common::bench_mode` value.
    pub mode: u32,
    /// Offsets of the source port and of the low half of the source address.
    pub vary_off: u16,
    pub vary_addr_off: u16,
    pub repeat: u32,
}

impl Datapath {
    /// Loads the benchmark programs (never attached anywhere).
    pub fn load_bench_programs(&mut self) -> Result<(), DatapathError> {
        for name in [BENCH_WRAPPER, BENCH_EMPTY] {
            classifier(&mut self.ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(())
    }

    /// Runs `spec.program` `spec.repeat` times through the wrapper; the
    /// kernel-measured time per run includes the wrapper (measure
    /// `BENCH_EMPTY` the same way for the floor).
    pub fn bench(&mut self, spec: &BenchSpec<'_>) -> Result<TestRunOutput, DatapathError> {
        if spec.frame.len() >= BENCH_FRAME_MAX {
            return Err(DatapathError::Bench(format!(
                "frame longer than {BENCH_FRAME_MAX} bytes"
            )));
        }
        let mut data = [0u8; BENCH_FRAME_MAX];
        data[..spec.frame.len()].copy_from_slice(spec.frame);
        let template = BenchFrame {
            len: u32::try_from(spec.frame.len()).unwrap_or(0),
            mode: spec.mode,
            vary_off: spec.vary_off,
            vary_addr_off: spec.vary_addr_off,
            _pad: 0,
            data,
        };
        let mut frames: Array<_, BenchFrame> =
            Array::try_from(self.map_mut("BENCH_FRAME")?).map_err(map_err("BENCH_FRAME"))?;
        frames.set(0, template, 0).map_err(map_err("BENCH_FRAME"))?;
        let fd = classifier(&mut self.ebpf, spec.program)?
            .fd()
            .map_err(|source| DatapathError::Program {
                name: spec.program,
                source,
            })?
            .try_clone()
            .map_err(|e| DatapathError::Bench(e.to_string()))?;
        let mut jump =
            ProgramArray::try_from(self.map_mut("BENCH_JUMP")?).map_err(map_err("BENCH_JUMP"))?;
        jump.set(0, &fd, 0).map_err(map_err("BENCH_JUMP"))?;
        self.test_run(BENCH_WRAPPER, spec.frame, spec.repeat)
    }
}
