//! Connection tracking: which backend a flow uses, and how its replies are
//! translated back.
//!
//! A flow has two entries in `CONNTRACK`, each keyed by the 5-tuple as it is on
//! the wire in its direction:
//! - FORWARD `client → frontend` → backend (id and address:port);
//! - REPLY `backend → client` → frontend address:port to restore as source.
//!
//! The map is an LRU, so a full table evicts the least recently used flows
//! instead of refusing new ones.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use proxy_common::{Backend, Counter, CtKey, CtValue, ct_dir};

use crate::{maps::CONNTRACK, parse::Packet};

/// `last_seen_ns` is refreshed at most this often, to keep flow state writes
/// (and the cache-line bouncing between CPUs they cause) rare.
const REFRESH_NS: u64 = 1_000_000_000;

/// Current time for conntrack timestamps.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Key of the FORWARD entry of the flow `pkt` belongs to (pkt as sent by the client).
#[inline(always)]
pub fn forward_key(pkt: &Packet) -> CtKey {
    CtKey {
        saddr_be: pkt.saddr_be,
        daddr_be: pkt.daddr_be,
        sport_be: pkt.sport_be,
        dport_be: pkt.dport_be,
        proto: pkt.proto,
        dir: ct_dir::FORWARD,
        _pad: 0,
    }
}

/// Key of the REPLY entry for a packet coming from a backend (as the backend sent it).
#[inline(always)]
pub fn reply_key(pkt: &Packet) -> CtKey {
    CtKey {
        saddr_be: pkt.saddr_be,
        daddr_be: pkt.daddr_be,
        sport_be: pkt.sport_be,
        dport_be: pkt.dport_be,
        proto: pkt.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    }
}

/// Looks up an entry.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtValue> {
    CONNTRACK.get_ptr_mut(key)
}

/// Refreshes an entry's last-seen time if it is older than `REFRESH_NS`.
#[inline(always)]
pub fn touch(entry: *mut CtValue, now: u64) {
    // SAFETY: `entry` came from a successful map lookup in this program run.
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) > REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
    }
}

/// Records a new flow from client `pkt` (to the frontend) DNATed to `backend`.
#[inline(always)]
pub fn create(
    pkt: &Packet,
    svc_id: u32,
    backend_id: u32,
    backend: &Backend,
    now: u64,
) -> Result<(), Counter> {
    let reply = CtKey {
        saddr_be: backend.addr_be,
        daddr_be: pkt.saddr_be,
        sport_be: backend.port_be,
        dport_be: pkt.sport_be,
        proto: pkt.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    let reply_val = CtValue {
        nat_addr_be: pkt.daddr_be,
        nat_port_be: pkt.dport_be,
        flags: 0,
        state: 0,
        backend_id,
        svc_id,
        created_ns: now,
        last_seen_ns: now,
    };
    // Reply entry first: once the forward entry exists, packets of this flow may
    // reach the backend and its answer must already find its translation.
    CONNTRACK
        .insert(reply, reply_val, 0)
        .map_err(|_| Counter::CtInsertFailed)?;
    let fwd_val = CtValue {
        nat_addr_be: backend.addr_be,
        nat_port_be: backend.port_be,
        ..reply_val
    };
    CONNTRACK
        .insert(forward_key(pkt), fwd_val, 0)
        .map_err(|_| Counter::CtInsertFailed)
}
