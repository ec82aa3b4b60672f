//! Running a program on a frame with BPF_PROG_TEST_RUN (datapath fixtures,
//! benchmarks).

use aya::programs::{Program, TestRun, TestRunOptions};

use super::{Datapath, DatapathError};

impl Datapath {
    /// Runs a program once on `frame` with BPF_PROG_TEST_RUN, returning the
    /// verdict and the output frame.
    pub fn test_run(
        &mut self,
        program: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutput, DatapathError> {
        self.test_run_on(program, frame, repeat, None)
    }

    /// As [`Datapath::test_run`], with the frame arriving on interface
    /// `ifindex` of the caller's network namespace (XDP:
    /// `xdp_md.ingress_ifindex`; TC: `__sk_buff.ingress_ifindex` and `ifindex`).
    pub fn test_run_on(
        &mut self,
        program: &'static str,
        frame: &[u8],
        repeat: u32,
        ifindex: Option<u32>,
    ) -> Result<TestRunOutput, DatapathError> {
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut xdp_md = [0u8; 24];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let err = |source| DatapathError::Program {
            name: program,
            source,
        };
        // struct __sk_buff (192 bytes): ingress_ifindex at 36, ifindex at 40.
        let mut skb = [0u8; 192];
        let result = match self.ebpf.program_mut(program) {
            Some(Program::SchedClassifier(p)) => {
                if let Some(index) = ifindex {
                    skb[36..40].copy_from_slice(&index.to_ne_bytes());
                    skb[40..44].copy_from_slice(&index.to_ne_bytes());
                    opts.ctx_in = Some(&skb);
                }
                p.test_run(opts).map_err(err)?
            }
            Some(Program::Xdp(p)) => {
                if let Some(index) = ifindex {
                    // The kernel wants data_end to be the frame's length.
                    let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
                    xdp_md[4..8].copy_from_slice(&len.to_ne_bytes());
                    xdp_md[12..16].copy_from_slice(&index.to_ne_bytes());
                    opts.ctx_in = Some(&xdp_md);
                }
                p.test_run(opts).map_err(err)?
            }
            Some(_) => {
                return Err(DatapathError::Bench(format!(
                    "{program}: not a TC or XDP program"
                )));
            }
            None => return Err(DatapathError::MissingProgram { name: program }),
        };
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            verdict: result.return_value as i32,
            frame: out,
            duration_ns: result.duration.as_nanos() as u64,
        })
    }
}

/// Result of one BPF_PROG_TEST_RUN.
#[derive(Clone, Debug)]
pub struct TestRunOutput {
    pub verdict: i32,
    pub frame: Vec<u8>,
    /// Kernel-measured average time per run.
    pub duration_ns: u64,
}
