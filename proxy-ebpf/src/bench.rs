//! Benchmark support, never attached to an interface: `tc_bench` restores a
//! template frame (BPF_PROG_TEST_RUN with `repeat` otherwise feeds each run
//! the previous run's rewritten output), optionally gives every run a new
//! source port (a new flow), and tail-calls the program under test.
//! `tc_bench_empty` is the floor a measurement subtracts. `xdp_bench` does
//! the same for XDP programs (undoing a head the program under test grew),
//! with `xdp_pass` as its floor.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        tcx_action_base::{TCX_DROP, TCX_NEXT},
        xdp_action::XDP_ABORTED,
    },
    btf_maps::{Array, PerCpuArray, ProgramArray},
    helpers::generated::{
        bpf_get_smp_processor_id, bpf_skb_store_bytes, bpf_xdp_adjust_head, bpf_xdp_store_bytes,
    },
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use proxy_common::{BENCH_FRAME_MAX, BenchFrame, bench_mode};

/// The frame to restore before every run, and how. Written by the benchmark runner.
#[btf_map]
static BENCH_FRAME: Array<BenchFrame, 1> = Array::new();

/// Slot 0: the program under test. Written by the benchmark runner.
#[btf_map]
static BENCH_JUMP: ProgramArray<1> = ProgramArray::new();

/// Slot 0: the XDP program under test. Written by the benchmark runner.
#[btf_map]
static BENCH_JUMP_XDP: ProgramArray<1> = ProgramArray::new();

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
    // Source port and the low half of the source address: 2^32 distinct flows.
    if let Some(vary) = next_flow(frame) {
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

/// The next flow's source port and address low half (network order), when
/// the template asks for a new flow every run. The top byte is the CPU, so a
/// run that migrates between CPUs never repeats another CPU's flows (each
/// CPU has 2^24 before its own wrap).
#[inline(always)]
fn next_flow(frame: &BenchFrame) -> Option<[u8; 4]> {
    if frame.mode != bench_mode::NEW_FLOW {
        return None;
    }
    let seq = BENCH_SEQ.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, only this CPU touches it while we run.
    let n = unsafe {
        *seq = (*seq).wrapping_add(1);
        *seq
    };
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    Some(((cpu << 24) | (n & 0x00ff_ffff)).to_be_bytes())
}

/// `tc_bench` for XDP: restores the template (first shrinking the head back
/// if the program under test grew it, as DSR does), varies the flow if
/// asked, and tail-calls the XDP program under test.
#[xdp]
pub fn xdp_bench(ctx: XdpContext) -> u32 {
    let Some(frame) = BENCH_FRAME.get(0) else {
        return XDP_ABORTED;
    };
    let len = (frame.len as usize) & (BENCH_FRAME_MAX - 1);
    let now = ctx.data_end() - ctx.data();
    let raw = ctx.as_ptr().cast();
    if now > len {
        // SAFETY: this program's own context; shrinking by what was added.
        if unsafe { bpf_xdp_adjust_head(raw, (now - len) as i32) } != 0 {
            return XDP_ABORTED;
        }
    }
    if len == 0 || ctx.data_end() - ctx.data() != len {
        return XDP_ABORTED;
    }
    // SAFETY: `frame.data` holds BENCH_FRAME_MAX bytes and `len` is below that.
    let stored = unsafe { bpf_xdp_store_bytes(raw, 0, frame.data.as_ptr() as *mut _, len as u32) };
    if stored != 0 {
        return XDP_ABORTED;
    }
    if let Some(vary) = next_flow(frame) {
        // SAFETY: writes inside the frame just restored (offsets set by the runner).
        unsafe {
            bpf_xdp_store_bytes(raw, u32::from(frame.vary_off), vary.as_ptr() as *mut _, 2);
            bpf_xdp_store_bytes(
                raw,
                u32::from(frame.vary_addr_off),
                vary.as_ptr().add(2) as *mut _,
                2,
            );
        }
    }
    // SAFETY: tail call into the program under test; returns only on failure.
    unsafe { BENCH_JUMP_XDP.tail_call(&ctx, 0) };
    XDP_ABORTED
}

/// The floor: does nothing.
#[classifier]
pub fn tc_bench_empty(_ctx: TcContext) -> i32 {
    TCX_NEXT
}
