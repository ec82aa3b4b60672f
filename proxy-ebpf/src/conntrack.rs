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

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use proxy_common::{Backend, CT_F_COUNTED, Counter, CtKey, CtValue, ct_dir, ct_state, proto};

use crate::{
    hdr::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    maps::CONNTRACK,
    parse::Packet,
};

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

/// Key of the REPLY entry of the flow an ICMP error quotes: the quote is the
/// packet as it left towards the backend, the REPLY entry is keyed by the
/// backend's answer.
#[inline(always)]
pub fn reply_key_of_quote(e: &crate::icmp::IcmpError) -> CtKey {
    CtKey {
        saddr_be: e.daddr_be,
        daddr_be: e.saddr_be,
        sport_be: e.dport_be,
        dport_be: e.sport_be,
        proto: e.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    }
}

/// Looks up an entry.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtValue> {
    CONNTRACK.get_ptr_mut(key)
}

/// Whether client packet `pkt` continues the flow whose FORWARD entry is
/// `v`. Anything but a SYN does: a tracked flow keeps its backend for its
/// whole life, even after the backend leaves the Service (not ready,
/// terminating, scaled away), so a draining pod finishes its connections as
/// with kube-proxy. A SYN reusing the tuple is a new connection when the
/// client has already closed this one (FIN or RST seen from it, as the
/// kernel's conntrack reopens a TIME_WAIT tuple) or its backend is gone;
/// the caller then picks a backend afresh and records the flow anew.
#[inline(always)]
pub fn continues(v: &CtValue, pkt: &Packet) -> bool {
    !pkt.tcp_syn_only
        || (v.state < ct_state::CLOSING
            && crate::select::backend_is(v.backend_id, v.nat_addr_be, v.nat_port_be))
}

/// The state a packet's TCP flags move a connection to, from `state`
/// (states only advance).
#[inline(always)]
pub fn next_state(state: u8, pkt: &Packet) -> u8 {
    if pkt.proto != proto::TCP {
        return ct_state::NONE;
    }
    let f = pkt.tcp_flags;
    let seen = if f & TCP_RST != 0 {
        ct_state::CLOSED
    } else if f & TCP_FIN != 0 {
        ct_state::CLOSING
    } else if f & TCP_SYN != 0 && f & TCP_ACK == 0 {
        ct_state::SYN_SENT
    } else {
        // An ACK (also a SYN-ACK): past the client's handshake.
        ct_state::ESTABLISHED
    };
    if seen > state { seen } else { state }
}

/// Moves an entry's TCP state on by `pkt`, writing only on a change; a
/// counted flow that starts closing stops counting as open.
#[inline(always)]
fn observe(entry: *mut CtValue, pkt: &Packet) {
    // SAFETY: `entry` came from a successful map lookup in this program run.
    unsafe {
        let next = next_state((*entry).state, pkt);
        if next != (*entry).state {
            (*entry).state = next;
            if next >= ct_state::CLOSING && (*entry).flags & CT_F_COUNTED != 0 {
                (*entry).flags &= !CT_F_COUNTED;
                crate::select::count_closed((*entry).backend_id);
            }
        }
    }
}

/// A packet of the entry's flow was seen: its TCP state moves on, and its
/// last-seen time is refreshed if older than `REFRESH_NS`.
#[inline(always)]
pub fn seen(entry: *mut CtValue, pkt: &Packet, now: u64) {
    observe(entry, pkt);
    // SAFETY: `entry` came from a successful map lookup in this program run.
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) > REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
    }
}

/// A new flow: what `create` records.
pub struct NewFlow<'a> {
    /// The client's packet, as it arrived (addressed to the frontend).
    pub pkt: &'a Packet,
    pub svc_id: u32,
    pub backend_id: u32,
    pub backend: &'a Backend,
    /// `CT_F_*` flags of both entries.
    pub flags: u8,
    /// Whether the backend's replies come back through this node (there is
    /// a REPLY entry to write).
    pub replies_here: bool,
    pub now: u64,
}

/// The REPLY key of a flow from `pkt`'s client to `backend`, as the backend answers.
#[inline(always)]
fn reply_key_to(pkt: &Packet, backend: &Backend) -> CtKey {
    CtKey {
        saddr_be: backend.addr_be,
        daddr_be: pkt.saddr_be,
        sport_be: backend.port_be,
        dport_be: pkt.sport_be,
        proto: pkt.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    }
}

/// The REPLY entry's value for a flow (frontend restored as the source).
#[inline(always)]
fn reply_value(f: &NewFlow) -> CtValue {
    CtValue {
        nat_addr_be: f.pkt.daddr_be,
        nat_port_be: f.pkt.dport_be,
        // Only the FORWARD entry carries the count.
        flags: f.flags & !CT_F_COUNTED,
        state: next_state(ct_state::NONE, f.pkt),
        backend_id: f.backend_id,
        svc_id: f.svc_id,
        created_ns: f.now,
        last_seen_ns: f.now,
        peer_addr_be: 0,
        peer_port_be: 0,
        _pad: 0,
    }
}

/// Records a new flow from client `pkt` (to the frontend) DNATed to `backend`.
#[inline(always)]
pub fn create(f: &NewFlow) -> Result<(), Counter> {
    let reply_val = reply_value(f);
    // Reply entry first: once the forward entry exists, packets of this flow may
    // reach the backend and its answer must already find its translation.
    if f.replies_here {
        CONNTRACK
            .insert(reply_key_to(f.pkt, f.backend), reply_val, 0)
            .map_err(|_| Counter::CtInsertFailed)?;
    }
    let fwd_val = CtValue {
        nat_addr_be: f.backend.addr_be,
        nat_port_be: f.backend.port_be,
        flags: f.flags,
        ..reply_val
    };
    insert_forward(f, fwd_val)
}

/// Inserts a new flow's FORWARD entry and counts the flow when asked.
#[inline(always)]
fn insert_forward(f: &NewFlow, value: CtValue) -> Result<(), Counter> {
    CONNTRACK
        .insert(forward_key(f.pkt), value, 0)
        .map_err(|_| Counter::CtInsertFailed)?;
    if f.flags & CT_F_COUNTED != 0 {
        crate::select::count_open(f.backend_id);
    }
    Ok(())
}

/// How many ports a new SNAT flow tries before giving up.
const SNAT_TRIES: u32 = 16;

/// Records a new external flow SNATed to `snat_addr_be` on a port of
/// `[port_min, port_max]` that no other flow to the same backend uses (the
/// REPLY key is inserted with `BPF_NOEXIST`, so two CPUs never share a
/// port). Returns the port, network byte order.
#[inline(always)]
pub fn create_snat(
    f: &NewFlow,
    snat_addr_be: u32,
    port_min: u16,
    port_max: u16,
) -> Result<u16, Counter> {
    let range = u32::from(port_max.saturating_sub(port_min)) + 1;
    let start = proxy_common::hash::flow_hash(
        f.pkt.saddr_be,
        f.pkt.daddr_be,
        f.pkt.sport_be,
        f.pkt.dport_be,
        f.pkt.proto,
    );
    let mut reply_val = reply_value(f);
    reply_val.peer_addr_be = f.pkt.saddr_be;
    reply_val.peer_port_be = f.pkt.sport_be;
    let mut key = CtKey {
        saddr_be: f.backend.addr_be,
        daddr_be: snat_addr_be,
        sport_be: f.backend.port_be,
        dport_be: 0,
        proto: f.pkt.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    let mut i = 0;
    let mut found = None;
    while i < SNAT_TRIES {
        let port = port_min.wrapping_add((start.wrapping_add(i) % range) as u16);
        key.dport_be = port.to_be();
        if CONNTRACK
            .insert(key, reply_val, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            found = Some(key.dport_be);
            break;
        }
        i += 1;
    }
    let port_be = found.ok_or(Counter::SnatPortsExhausted)?;
    let fwd_val = CtValue {
        nat_addr_be: f.backend.addr_be,
        nat_port_be: f.backend.port_be,
        flags: f.flags,
        peer_addr_be: snat_addr_be,
        peer_port_be: port_be,
        ..reply_val
    };
    insert_forward(f, fwd_val)?;
    Ok(port_be)
}

/// Records a hairpin flow: pod `pkt.saddr` reaching itself through the
/// frontend `pkt.daddr:dport`. Its packets get `via_be` (the frontend, or a
/// ClusterIP for other frontends) as their source, the client port kept, so
/// the pod's reply is addressed there and comes back through the datapath.
#[inline(always)]
pub fn create_hairpin(f: &NewFlow, via_be: u32) -> Result<(), Counter> {
    let mut reply_val = reply_value(f);
    reply_val.peer_addr_be = f.pkt.saddr_be;
    reply_val.peer_port_be = f.pkt.sport_be;
    let reply = CtKey {
        saddr_be: f.backend.addr_be,
        daddr_be: via_be,
        sport_be: f.backend.port_be,
        dport_be: f.pkt.sport_be,
        proto: f.pkt.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    CONNTRACK
        .insert(reply, reply_val, 0)
        .map_err(|_| Counter::CtInsertFailed)?;
    let fwd_val = CtValue {
        nat_addr_be: f.backend.addr_be,
        nat_port_be: f.backend.port_be,
        flags: f.flags,
        peer_addr_be: via_be,
        peer_port_be: f.pkt.sport_be,
        ..reply_val
    };
    insert_forward(f, fwd_val)
}

/// Records what a DSR option taught this (the backend's) node: replies from
/// the backend `pkt` is addressed to go back to its client with the service
/// address `svc_addr_be:svc_port_be` as their source.
#[inline(always)]
pub fn learn_dsr(
    pkt: &Packet,
    svc_addr_be: u32,
    svc_port_be: u16,
    now: u64,
) -> Result<(), Counter> {
    let key = CtKey {
        saddr_be: pkt.daddr_be,
        daddr_be: pkt.saddr_be,
        sport_be: pkt.dport_be,
        dport_be: pkt.sport_be,
        proto: pkt.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    if let Some(entry) = lookup(&key)
        // SAFETY: a valid map value pointer for this run.
        && unsafe { (*entry).nat_addr_be == svc_addr_be && (*entry).nat_port_be == svc_port_be }
    {
        seen(entry, pkt, now);
        return Ok(());
    }
    let value = CtValue {
        nat_addr_be: svc_addr_be,
        nat_port_be: svc_port_be,
        flags: proxy_common::CT_F_EXTERNAL | proxy_common::CT_F_DSR,
        created_ns: now,
        last_seen_ns: now,
        ..CtValue::default()
    };
    CONNTRACK
        .insert(key, value, 0)
        .map_err(|_| Counter::CtInsertFailed)
}
