//! Backend selection for a new flow: the one place that decides which backend
//! a service port's new flow goes to.

use aya_ebpf::helpers::generated::bpf_get_prandom_u32;
use proxy_common::{Backend, Counter, SEL_HDR_COUNT, SEL_WORDS, sel_backend_pos};

use crate::{
    maps::{BACKENDS, SELECTION},
    parse::Packet,
};

/// Picks a backend for a new flow of service port `svc_id`.
///
/// `Ok(None)`: the service has no backend eligible for new flows (reject).
#[inline(always)]
pub fn select(svc_id: u32, _pkt: &Packet) -> Result<Option<(u32, Backend)>, Counter> {
    // SAFETY: the selection table is an array map; the kernel keeps it alive for
    // this program run even if the agent swaps it out of SELECTION meanwhile.
    let table = unsafe { SELECTION.get(&svc_id) }.ok_or(Counter::NoSelectionTable)?;
    let header = table.get(0).ok_or(Counter::NoSelectionTable)?;
    let count = header.w[SEL_HDR_COUNT];
    if count == 0 {
        return Ok(None);
    }
    // SAFETY: helper without arguments.
    let index = unsafe { bpf_get_prandom_u32() } % count;
    let (block, word) = sel_backend_pos(index);
    let block = table.get(block).ok_or(Counter::BackendMissing)?;
    let backend_id = block.w[word & (SEL_WORDS - 1)];
    lookup_backend(backend_id)
        .map(|b| Some((backend_id, b)))
        .ok_or(Counter::BackendMissing)
}

/// The backend with id `backend_id`, if that slot is set.
#[inline(always)]
pub fn lookup_backend(backend_id: u32) -> Option<Backend> {
    BACKENDS.get(backend_id).filter(|b| b.is_set()).copied()
}
