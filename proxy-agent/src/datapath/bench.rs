//! Benchmark support: runs a datapath program under BPF_PROG_TEST_RUN through
//! the `tc_bench` wrapper (see proxy-ebpf/src/bench.rs), which restores the
//! frame before every run.

use aya::{
    maps::{Array, ProgramArray},
    programs::Program,
};
use proxy_common::{BENCH_FRAME_MAX, BenchFrame, maps::programs};

use super::{Datapath, DatapathError, TestRunOutput, classifier, map_err, xdp};

/// The wrapper program.
pub const BENCH_WRAPPER: &str = "tc_bench";
/// The do-nothing program: the floor of every measurement.
pub const BENCH_EMPTY: &str = "tc_bench_empty";
/// The wrapper for XDP programs.
pub const BENCH_WRAPPER_XDP: &str = "xdp_bench";
/// The do-nothing XDP program: the floor of XDP measurements.
pub const BENCH_EMPTY_XDP: &str = programs::XDP_PASS;

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
    /// Interface the frame arrives on (FIB lookups), see `Datapath::test_run_on`.
    pub ifindex: Option<u32>,
}

impl Datapath {
    /// Loads the benchmark programs (never attached anywhere).
    pub fn load_bench_programs(&mut self) -> Result<(), DatapathError> {
        for name in [BENCH_WRAPPER, BENCH_EMPTY] {
            classifier(&mut self.ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let name = BENCH_WRAPPER_XDP;
        xdp(&mut self.ebpf, name)?
            .load()
            .map_err(|source| DatapathError::Program { name, source })
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
        let (fd, jump, wrapper) = match self.ebpf.program(spec.program) {
            Some(Program::Xdp(p)) => (p.fd(), "BENCH_JUMP_XDP", BENCH_WRAPPER_XDP),
            Some(Program::SchedClassifier(p)) => (p.fd(), "BENCH_JUMP", BENCH_WRAPPER),
            _ => {
                return Err(DatapathError::MissingProgram { name: spec.program });
            }
        };
        let fd = fd
            .map_err(|source| DatapathError::Program {
                name: spec.program,
                source,
            })?
            .try_clone()
            .map_err(|e| DatapathError::Bench(e.to_string()))?;
        let mut slots = ProgramArray::try_from(self.map_mut(jump)?).map_err(map_err(jump))?;
        slots.set(0, &fd, 0).map_err(map_err(jump))?;
        self.test_run_on(wrapper, spec.frame, spec.repeat, spec.ifindex)
    }
}

/// Kernel run-time statistics, counted for as long as the returned
/// descriptor stays open (BPF_ENABLE_STATS; nothing is left switched on).
pub fn enable_run_stats() -> Result<std::os::fd::OwnedFd, DatapathError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| DatapathError::Bench(format!("enabling run-time statistics: {e}")))
}

/// Runs and total run time, summed over every loaded program called `name`
/// (counted only while [`enable_run_stats`] is in force).
pub fn program_run_stats(name: &str) -> Result<(u64, std::time::Duration), DatapathError> {
    let mut total = (0, std::time::Duration::ZERO);
    for info in aya::programs::loaded_programs() {
        let info = info.map_err(|e| DatapathError::Bench(format!("listing programs: {e}")))?;
        if info.name_as_str() == Some(name) {
            total.0 += info.run_count();
            total.1 += info.run_time();
        }
    }
    Ok(total)
}
