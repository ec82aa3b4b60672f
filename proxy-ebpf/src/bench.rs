//! Benchmark support, never attached to an interface: `tc_bench` restores a
//! template frame (BPF_PROG_TEST_RUN with `repeat` otherwise feeds each run
//! the previous run's rewritten output), optionally gives every run a new
//! source port (a new flow), and tail-calls the program under test.
//! `tc_bench_empty` is the floor a measurement subtracts.

use aya_ebpf::{
    EbpfContext as _,
    bindings::tcx_action_base::{TCX_DROP, TCX_NEXT},
    btf_maps::{Array, PerCpuArray, ProgramArray},
    helpers::generated::bpf_skb_store_bytes,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use proxy_common::{BENCH_FRAME_MAX, BenchFrame, bench_mode};

/// The frame to restore before every run, and how. Written by the benchmark runner.
#[btf_map]
static BENCH_FRAME: Array<BenchFrame, 1> = Array::new();

/// Slot 0: the program under test. Written by the benchmark runner.
#[btf_map]
static BENCH_JUMP: ProgramArray<1> = ProgramArray::new();

/// Per-CPU run counter, the source of new-flow source ports. Written by `tc_bench`.
#[btf_map]
static BENCH_SEQ: PerCpuArray<u32, 1> = PerCpuArray::new();

/// Restores the template, varies the flow if asked, and runs the program under test.
#[classifier]
pub fn tc_bench(ctx: TcContext) -> i32 {
    let Some(frame) = BENCH_FRAME.get(0) else {
        return TCX_DROP;
    };
    let len = (frame.len as usize) & (BENCH_FRAME_MAX - 1);
    if len == 0 {
        return TCX_DROP;
    }
    let skb = ctx.as_ptr().cast();
    // SAFETY: `frame.data` holds BENCH_FRAME_MAX bytes and `len` is below that.
    let stored = unsafe { bpf_skb_store_bytes(skb, 0, frame.data.as_ptr().cast(), len as u32, 0) };
    if stored != 0 {
        return TCX_DROP;
    }
    if frame.mode == bench_mode::NEW_FLOW
        && let Some(seq) = BENCH_SEQ.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot, only this CPU touches it while we run.
        let n = unsafe {
            *seq = (*seq).wrapping_add(1);
            *seq
        };
        // Source port and the low half of the source address: 2^32 distinct flows.
        let vary: [u8; 4] = n.to_be_bytes();
        let off = u32::from(frame.vary_off);
        // SAFETY: writes inside the frame just restored (offsets set by the runner).
        unsafe {
            bpf_skb_store_bytes(skb, off, vary.as_ptr().cast(), 2, 0);
            bpf_skb_store_bytes(
                skb,
                u32::from(frame.vary_addr_off),
                vary.as_ptr().add(2).cast(),
                2,
                0,
            );
        }
    }
    // SAFETY: tail call into the program under test; returns only on failure.
    unsafe { BENCH_JUMP.tail_call(&ctx, 0) };
    TCX_DROP
}

/// The floor: does nothing.
#[classifier]
pub fn tc_bench_empty(_ctx: TcContext) -> i32 {
    TCX_NEXT
}
