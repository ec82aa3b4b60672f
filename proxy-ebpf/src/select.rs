//! Backend selection for a new flow: the one place that decides which backend
//! a service port's new flow goes to.
//!
//! `SVC_TABLE[svc_id]` names the first block of the service's table in
//! `SELECTION` (all plain array lookups, inlined by the verifier).
//! - Maglev: `flow_hash(5-tuple) % M` (or `source_hash(client)` with session
//!   affinity) indexes the Maglev table; the entry is an index into the
//!   backend list. The hash functions are `proxy_common::hash`, the very code
//!   the agent uses to predict and explain choices.
//! - Random: a random slot of the (weighted) table, or a random backend when
//!   the service has no table (equal weights).

use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_loop};
use proxy_common::{
    AffinityKey, AffinityValue, BACKEND_F_LOCAL, Backend, Counter, SEL_F_DROP_WHEN_EMPTY,
    SEL_HDR_AFFINITY_TIMEOUT, SEL_HDR_ALGORITHM, SEL_HDR_COUNT, SEL_HDR_DRAINING, SEL_HDR_FLAGS,
    SEL_HDR_HASH_MODE, SEL_HDR_TABLE_BLOCK, SEL_HDR_TABLE_SIZE, SEL_SCAN_MAX, SEL_WORDS, algorithm,
    hash::{flow_hash, source_hash},
    hash_mode, sel_backend_pos, sel_entry_pos,
};

use crate::{
    maps::{AFFINITY, BACKEND_CONNS, BACKEND_REAPED, BACKENDS, SELECTION, SVC_STATS, SVC_TABLE},
    parse::Tuple,
};

/// The hash a service's Maglev table is indexed with.
#[inline(always)]
fn flow_hash_of(t: &Tuple, mode: u32) -> u32 {
    let saddr = u32::from_be(t.saddr_be);
    if mode == hash_mode::SOURCE {
        source_hash(saddr)
    } else {
        flow_hash(
            saddr,
            u32::from_be(t.daddr_be),
            u16::from_be(t.sport_be),
            u16::from_be(t.dport_be),
            t.proto,
        )
    }
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_prandom_u32() }
}

/// A backend picked for a new flow. Plain values only: it crosses a
/// function verified apart (`global.rs`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Choice {
    pub backend_id: u32,
    pub backend: Backend,
    /// The flow is to be counted for least-connections (`CT_F_COUNTED`).
    pub counted: bool,
}

/// The backend id at `index` of a table starting at block `first`.
#[inline(always)]
fn backend_at(first: u32, index: u32) -> Option<u32> {
    let (block, word) = sel_backend_pos(index);
    SELECTION
        .get(first.wrapping_add(block))
        .map(|b| b.w[word & (SEL_WORDS - 1)])
}

/// Open flows of a backend (least-connections).
#[inline(always)]
fn active(backend_id: u32) -> u32 {
    let c = BACKEND_CONNS.get(backend_id).copied().unwrap_or_default();
    let reaped = BACKEND_REAPED.get(backend_id).copied().unwrap_or(0);
    c.opened.wrapping_sub(c.closed).wrapping_sub(reaped)
}

/// What a scan looks for.
const SCAN_LEAST: u32 = 0;
/// A scan for `wanted` (a backend id).
const SCAN_ID: u32 = 1;
/// A scan for a local backend at `addr_be:port_be`.
const SCAN_LOCAL_ADDR: u32 = 2;

/// State of a scan over a table's backends (`bpf_loop`).
#[repr(C)]
struct Scan {
    /// First block of the table.
    first: u32,
    /// Backends to look at.
    n: u32,
    /// Where the scan starts (least-connections ties spread from here).
    start: u32,
    /// `SCAN_*`.
    mode: u32,
    /// The backend id looked for (`SCAN_ID`).
    wanted: u32,
    /// The address and port looked for (`SCAN_LOCAL_ADDR`), network order.
    addr_be: u32,
    port_be: u16,
    _pad: u16,
    /// Result: the best index so far, and its open flows.
    best: u32,
    best_active: u32,
    /// Result: the wanted backend was found.
    found: u32,
}

impl Scan {
    /// A scan of `mode` over the first `n` backends of the table at `first`.
    #[inline(always)]
    fn new(mode: u32, first: u32, n: u32) -> Scan {
        Scan {
            first,
            n,
            start: 0,
            mode,
            wanted: 0,
            addr_be: 0,
            port_be: 0,
            _pad: 0,
            best: 0,
            best_active: u32::MAX,
            found: 0,
        }
    }
}

/// One step of a scan: the `i`-th backend from the start.
#[inline(never)]
extern "C" fn scan_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let scan = ctx.cast::<Scan>();
    // SAFETY: bpf_loop hands back the pointer to our Scan on the stack.
    let s = unsafe { &mut *scan };
    if s.n == 0 {
        return 1;
    }
    let index = (s.start + i as u32) % s.n;
    let Some(id) = backend_at(s.first, index) else {
        return 0;
    };
    match s.mode {
        SCAN_ID => {
            if id == s.wanted {
                s.found = 1;
                return 1; // stop
            }
        }
        SCAN_LOCAL_ADDR => {
            if lookup_backend(id).is_some_and(|b| {
                b.addr_be == s.addr_be && b.port_be == s.port_be && b.flags & BACKEND_F_LOCAL != 0
            }) {
                s.found = 1;
                return 1;
            }
        }
        _ => {
            let a = active(id);
            if a < s.best_active {
                s.best_active = a;
                s.best = index;
            }
        }
    }
    0
}

/// Runs a scan over its `n` backends (`bpf_loop` takes at most 2^23).
#[inline(always)]
fn scan(mut s: Scan) -> Scan {
    // SAFETY: the callback and its context are valid for the whole call.
    unsafe {
        bpf_loop(
            s.n,
            scan_step as *mut core::ffi::c_void,
            (&raw mut s).cast(),
            0,
        );
    }
    s
}

/// Index of the eligible backend with the fewest open flows among the
/// first `SEL_SCAN_MAX`, scanning from a random start so ties spread.
#[inline(always)]
fn least_connections(first: u32, count: u32) -> u32 {
    let n = if count < SEL_SCAN_MAX {
        count
    } else {
        SEL_SCAN_MAX
    };
    let start = random() % n;
    let mut s = Scan::new(SCAN_LEAST, first, n);
    s.start = start;
    s.best = start;
    scan(s).best
}

/// Whether `backend_id` is among the first `SEL_SCAN_MAX` eligible backends
/// of the table.
#[inline(always)]
fn eligible(first: u32, count: u32, backend_id: u32) -> bool {
    let n = if count < SEL_SCAN_MAX {
        count
    } else {
        SEL_SCAN_MAX
    };
    let mut s = Scan::new(SCAN_ID, first, n);
    s.wanted = backend_id;
    scan(s).found != 0
}

/// Whether service port `svc_id` has a backend on this node at
/// `addr_be:port_be`, eligible or draining (a DSR option's claim). Scans
/// the whole backend list: it runs only for flows not yet known.
#[inline(always)]
pub fn has_local_backend(svc_id: u32, addr_be: u32, port_be: u16) -> bool {
    let Some(first) = SVC_TABLE.get(svc_id).copied().filter(|b| *b != 0) else {
        return false;
    };
    let Some(header) = SELECTION.get(first) else {
        return false;
    };
    let n = header.w[SEL_HDR_COUNT].saturating_add(header.w[SEL_HDR_DRAINING]);
    let mut s = Scan::new(SCAN_LOCAL_ADDR, first, n);
    s.addr_be = addr_be;
    s.port_be = port_be;
    scan(s).found != 0
}

/// Adds one to a counter every CPU writes (a BPF atomic add; core has no
/// atomics for the BPF target, so the intrinsic directly).
///
/// # Safety
/// `counter` points into a map value.
#[inline(always)]
unsafe fn add_one(counter: *mut u32) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's pointer is valid; the add is atomic.
    unsafe {
        core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, 1,
        );
    }
    // Host builds (clippy) only.
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above.
    unsafe {
        *counter = (*counter).wrapping_add(1);
    }
}

/// Counts a new flow to `backend_id` for least-connections.
#[inline(always)]
pub fn count_open(backend_id: u32) {
    if let Some(c) = BACKEND_CONNS.get_ptr_mut(backend_id) {
        // SAFETY: a valid map value.
        unsafe { add_one(&raw mut (*c).opened) };
    }
}

/// Counts a flow to `backend_id` as closed for least-connections.
#[inline(always)]
pub fn count_closed(backend_id: u32) {
    if let Some(c) = BACKEND_CONNS.get_ptr_mut(backend_id) {
        // SAFETY: a valid map value.
        unsafe { add_one(&raw mut (*c).closed) };
    }
}

/// Picks a backend for a new flow `t` of service port `svc_id`: the
/// client's affinity backend while it is fresh and still eligible, else by
/// the service's algorithm (recording the affinity). The client is
/// `t.saddr_be` (affinity, source hashing).
///
/// `Ok(None)`: the service has no backend eligible for new flows (reject);
/// `Err(NoLocalEndpoints)` when its table says to drop instead.
#[inline(always)]
pub fn select(svc_id: u32, t: &Tuple, now: u64) -> Result<Option<Choice>, Counter> {
    let first = SVC_TABLE
        .get(svc_id)
        .copied()
        .filter(|b| *b != 0)
        .ok_or(Counter::NoSelectionTable)?;
    let header = SELECTION.get(first).ok_or(Counter::NoSelectionTable)?;
    let (count, size, table_block, algo, mode, flags, affinity) = (
        header.w[SEL_HDR_COUNT],
        header.w[SEL_HDR_TABLE_SIZE],
        header.w[SEL_HDR_TABLE_BLOCK],
        header.w[SEL_HDR_ALGORITHM],
        header.w[SEL_HDR_HASH_MODE],
        header.w[SEL_HDR_FLAGS],
        header.w[SEL_HDR_AFFINITY_TIMEOUT],
    );
    if count == 0 {
        if flags & SEL_F_DROP_WHEN_EMPTY != 0 {
            return Err(Counter::NoLocalEndpoints);
        }
        return Ok(None);
    }
    let counted = algo == algorithm::LEAST_CONN;
    let key = AffinityKey {
        svc_id,
        client_be: t.saddr_be,
    };
    if affinity != 0
        && let Some(a) = AFFINITY.get_ptr_mut(key)
    {
        // SAFETY: a valid map value pointer for this run.
        let (id, last) = unsafe { ((*a).backend_id, (*a).last_ns) };
        if now.wrapping_sub(last) < u64::from(affinity) * 1_000_000_000
            && eligible(first, count, id)
            && let Some(backend) = lookup_backend(id)
        {
            // SAFETY: as above.
            unsafe { (*a).last_ns = now };
            return Ok(Some(Choice {
                backend_id: id,
                backend,
                counted,
            }));
        }
    }
    let index = if algo == algorithm::LEAST_CONN {
        least_connections(first, count)
    } else if size == 0 {
        let pick = if algo == algorithm::ROUND_ROBIN {
            round_robin(svc_id)
        } else {
            random()
        };
        pick % count
    } else {
        let pick = match algo {
            algorithm::MAGLEV => flow_hash_of(t, mode),
            algorithm::ROUND_ROBIN => round_robin(svc_id),
            _ => random(),
        };
        let (block, word, shift) = sel_entry_pos(pick % size);
        let block = SELECTION
            .get(first.wrapping_add(table_block).wrapping_add(block))
            .ok_or(Counter::BackendMissing)?;
        (block.w[word & (SEL_WORDS - 1)] >> (shift & 16)) & 0xffff
    };
    if index >= count {
        return Err(Counter::BackendMissing);
    }
    let backend_id = backend_at(first, index).ok_or(Counter::BackendMissing)?;
    let backend = lookup_backend(backend_id).ok_or(Counter::BackendMissing)?;
    if affinity != 0 {
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            last_ns: now,
        };
        // Best effort: without the entry the next flow is placed afresh.
        let _ = AFFINITY.insert(key, value, 0);
    }
    Ok(Some(Choice {
        backend_id,
        backend,
        counted,
    }))
}

/// Round robin position of a service port: its new flows so far on this
/// CPU (per-CPU counters, so no CPU waits for another).
#[inline(always)]
fn round_robin(svc_id: u32) -> u32 {
    SVC_STATS.get(svc_id).map_or(0, |c| c.new_flows as u32)
}

/// Whether `backend_id` still names the backend at this address and port
/// (ids are freed and reused).
#[inline(always)]
pub fn backend_is(backend_id: u32, addr_be: u32, port_be: u16) -> bool {
    lookup_backend(backend_id).is_some_and(|b| b.addr_be == addr_be && b.port_be == port_be)
}

/// The backend with id `backend_id`, if that slot is set.
#[inline(always)]
fn lookup_backend(backend_id: u32) -> Option<Backend> {
    BACKENDS.get(backend_id).filter(|b| b.is_set()).copied()
}
