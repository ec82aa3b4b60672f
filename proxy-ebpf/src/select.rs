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

use aya_ebpf::helpers::generated::bpf_get_prandom_u32;
use proxy_common::{
    Backend, Counter, SEL_F_DROP_WHEN_EMPTY, SEL_HDR_ALGORITHM, SEL_HDR_COUNT, SEL_HDR_FLAGS,
    SEL_HDR_HASH_MODE, SEL_HDR_TABLE_BLOCK, SEL_HDR_TABLE_SIZE, SEL_WORDS, algorithm,
    hash::{flow_hash, source_hash},
    hash_mode, sel_backend_pos, sel_entry_pos,
};

use crate::{
    maps::{BACKENDS, SELECTION, SVC_TABLE},
    parse::Packet,
};

/// The hash a service's Maglev table is indexed with.
#[inline(always)]
fn packet_hash(pkt: &Packet, mode: u32) -> u32 {
    let saddr = u32::from_be(pkt.saddr_be);
    if mode == hash_mode::SOURCE {
        source_hash(saddr)
    } else {
        flow_hash(
            saddr,
            u32::from_be(pkt.daddr_be),
            u16::from_be(pkt.sport_be),
            u16::from_be(pkt.dport_be),
            pkt.proto,
        )
    }
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_prandom_u32() }
}

/// Picks a backend for a new flow of service port `svc_id`.
///
/// `Ok(None)`: the service has no backend eligible for new flows (reject);
/// `Err(NoLocalEndpoints)` when its table says to drop instead.
#[inline(always)]
pub fn select(svc_id: u32, pkt: &Packet) -> Result<Option<(u32, Backend)>, Counter> {
    let first = SVC_TABLE
        .get(svc_id)
        .copied()
        .filter(|b| *b != 0)
        .ok_or(Counter::NoSelectionTable)?;
    let header = SELECTION.get(first).ok_or(Counter::NoSelectionTable)?;
    let (count, size, table_block, algo, mode, flags) = (
        header.w[SEL_HDR_COUNT],
        header.w[SEL_HDR_TABLE_SIZE],
        header.w[SEL_HDR_TABLE_BLOCK],
        header.w[SEL_HDR_ALGORITHM],
        header.w[SEL_HDR_HASH_MODE],
        header.w[SEL_HDR_FLAGS],
    );
    if count == 0 {
        if flags & SEL_F_DROP_WHEN_EMPTY != 0 {
            return Err(Counter::NoLocalEndpoints);
        }
        return Ok(None);
    }
    let index = if size == 0 {
        random() % count
    } else {
        let pick = if algo == algorithm::MAGLEV {
            packet_hash(pkt, mode)
        } else {
            random()
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
    let (block, word) = sel_backend_pos(index);
    let block = SELECTION
        .get(first.wrapping_add(block))
        .ok_or(Counter::BackendMissing)?;
    let backend_id = block.w[word & (SEL_WORDS - 1)];
    lookup_backend(backend_id)
        .map(|b| Some((backend_id, b)))
        .ok_or(Counter::BackendMissing)
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
