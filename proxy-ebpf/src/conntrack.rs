//! Connection tracking: which backend a flow uses, and how its replies are
//! translated back.
//!
//! A flow has two entries, each keyed by the 5-tuple as it is on the wire in
//! its direction:
//! - FORWARD `client → frontend` → backend (id and address:port);
//! - REPLY `backend → client` → frontend address:port to restore as source.
//!
//! Both tables are LRUs, so a full table evicts the least recently used flows
//! instead of refusing new ones. A TCP flow opened by a SYN starts in
//! `CT_NEW` and moves to `CONNTRACK` when the client's ACK completes the
//! handshake ([`Tracked::follow`]): a flood of SYNs from spoofed sources
//! churns `CT_NEW` alone and never evicts an established flow. Only a SYN-ACK
//! or RST from a backend can belong to a flow in `CT_NEW`, so every other
//! reply (and every packet that is not ours) is looked up in `CONNTRACK` alone.

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use proxy_common::{
    Backend, CT_F_COUNT_ON_PROMOTE, CT_F_COUNTED, CT_F_DSR, CT_F_EXTERNAL, CT_F_HAIRPIN, CT_F_SNAT,
    Counter, CtKey, CtValue, ct_dir, ct_state, proto,
};

use crate::{
    hdr::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    maps::{CONNTRACK, CT_NEW},
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

/// The table a flow's entries are in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `CONNTRACK`: established TCP flows, UDP flows.
    Main,
    /// `CT_NEW`: TCP flows whose client has not completed the handshake.
    New,
}

impl Table {
    /// The table a new flow from client packet `pkt` starts in: `CT_NEW`
    /// for a SYN, unless the tuple is already tracked in `CONNTRACK` (a
    /// reused tuple: its entries there are replaced, so none is left stale).
    #[inline(always)]
    pub fn for_new(pkt: &Packet, tracked: Option<Tracked>) -> Table {
        if pkt.tcp_syn_only && !tracked.is_some_and(|t| t.table == Table::Main) {
            Table::New
        } else {
            Table::Main
        }
    }

    #[inline(always)]
    fn insert(self, key: &CtKey, value: &CtValue, flags: u64) -> Result<(), Counter> {
        match self {
            Table::Main => CONNTRACK.insert(key, value, flags),
            Table::New => CT_NEW.insert(key, value, flags),
        }
        .map_err(|_| Counter::CtInsertFailed)
    }
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
fn reply_key(pkt: &Packet) -> CtKey {
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
fn reply_key_of_quote(e: &crate::icmp::IcmpError) -> CtKey {
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

/// A client packet's tracked flow: its FORWARD entry and where it is.
#[derive(Clone, Copy)]
pub struct Tracked {
    pub entry: *mut CtValue,
    pub table: Table,
}

/// The tracked flow client packet `pkt` belongs to: `CONNTRACK` first,
/// then (TCP) `CT_NEW`.
#[inline(always)]
pub fn lookup_forward(pkt: &Packet) -> Option<Tracked> {
    let key = forward_key(pkt);
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        return Some(Tracked {
            entry,
            table: Table::Main,
        });
    }
    if pkt.proto != proto::TCP {
        return None;
    }
    CT_NEW.get_ptr_mut(key).map(|entry| Tracked {
        entry,
        table: Table::New,
    })
}

impl Tracked {
    /// The entry's value, copied out.
    #[inline(always)]
    pub fn value(&self) -> CtValue {
        // SAFETY: a valid map value pointer for this run.
        unsafe { *self.entry }
    }

    /// Whether client packet `pkt` completes the handshake of this flow (an
    /// ACK without SYN or RST to a flow in `CT_NEW`): [`Tracked::follow`]
    /// moves it to `CONNTRACK`.
    #[inline(always)]
    pub fn completes(&self, pkt: &Packet) -> bool {
        self.table == Table::New && pkt.tcp_flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK
    }

    /// The path counter of client packet `pkt` of this flow: the packet
    /// that completes the handshake, or any other of an established flow.
    #[inline(always)]
    pub fn path(&self, pkt: &Packet) -> Counter {
        if self.completes(pkt) {
            Counter::HandshakeDone
        } else {
            Counter::Established
        }
    }

    /// Client packet `pkt` of this flow was seen: the entry is refreshed,
    /// or, when the packet completes the handshake, the flow moves to
    /// `CONNTRACK` (REPLY entry first, as in [`create`]) and starts
    /// counting for least-connections. Returns the FORWARD value.
    #[inline(always)]
    pub fn follow(&self, pkt: &Packet, now: u64) -> Result<CtValue, Counter> {
        if !self.completes(pkt) {
            seen(self.entry, pkt, now);
            return Ok(self.value());
        }
        let mut fwd = self.value();
        fwd.state = next_state(fwd.state, pkt);
        fwd.last_seen_ns = now;
        let counted = fwd.flags & CT_F_COUNT_ON_PROMOTE != 0;
        if counted {
            fwd.flags = (fwd.flags & !CT_F_COUNT_ON_PROMOTE) | CT_F_COUNTED;
        }
        let key = forward_key(pkt);
        if fwd.flags & CT_F_DSR == 0 {
            let (rkey, rval) = reply_of(&key, &fwd);
            record_reply(Table::Main, &rkey, &rval)?;
            let _ = CT_NEW.remove(rkey);
        }
        Table::Main.insert(&key, &fwd, 0)?;
        let _ = CT_NEW.remove(key);
        if counted {
            crate::select::count_open(fwd.backend_id);
        }
        Ok(fwd)
    }
}

/// The REPLY entry for a backend's packet `pkt`: an established flow's, or
/// (for a SYN-ACK or RST) one still in its handshake. A SYN without ACK
/// (a new connection to a pod or the node) never looks in `CT_NEW`.
#[inline(always)]
pub fn lookup_reply(pkt: &Packet) -> Option<*mut CtValue> {
    let key = reply_key(pkt);
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        return Some(entry);
    }
    let f = pkt.tcp_flags;
    let handshake_reply = f & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK || f & TCP_RST != 0;
    if pkt.proto != proto::TCP || !handshake_reply {
        return None;
    }
    CT_NEW.get_ptr_mut(key)
}

/// The REPLY entry of the flow an ICMP error quotes, in either table.
#[inline(always)]
pub fn lookup_quoted(e: &crate::icmp::IcmpError) -> Option<*mut CtValue> {
    let key = reply_key_of_quote(e);
    CONNTRACK
        .get_ptr_mut(key)
        .or_else(|| CT_NEW.get_ptr_mut(key))
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
    /// Where the entries go ([`Table::for_new`]).
    pub table: Table,
    pub now: u64,
}

impl NewFlow<'_> {
    /// The FORWARD entry's value, the client's source becoming `peer`
    /// (address, port; zeros: kept). A half-open flow is counted for
    /// least-connections only once its handshake completes.
    #[inline(always)]
    fn forward_value(&self, peer: (u32, u16)) -> CtValue {
        let flags = if self.table == Table::New && self.flags & CT_F_COUNTED != 0 {
            (self.flags & !CT_F_COUNTED) | CT_F_COUNT_ON_PROMOTE
        } else {
            self.flags
        };
        CtValue {
            nat_addr_be: self.backend.addr_be,
            nat_port_be: self.backend.port_be,
            flags,
            state: next_state(ct_state::NONE, self.pkt),
            backend_id: self.backend_id,
            svc_id: self.svc_id,
            created_ns: self.now,
            last_seen_ns: self.now,
            peer_addr_be: peer.0,
            peer_port_be: peer.1,
            _pad: 0,
        }
    }

    /// Records the flow: REPLY entry first (once the FORWARD entry exists,
    /// packets of this flow may reach the backend and its answer must
    /// already find its translation), then FORWARD, counted when asked.
    #[inline(always)]
    fn record(&self, fwd: &CtValue) -> Result<(), Counter> {
        let key = forward_key(self.pkt);
        if self.replies_here {
            let (rkey, rval) = reply_of(&key, fwd);
            self.table.insert(&rkey, &rval, 0)?;
        }
        self.insert_forward(&key, fwd)
    }

    /// Inserts the FORWARD entry (its REPLY entry is in place) and counts
    /// the flow for least-connections when asked.
    #[inline(always)]
    fn insert_forward(&self, key: &CtKey, fwd: &CtValue) -> Result<(), Counter> {
        self.table.insert(key, fwd, 0)?;
        if fwd.flags & CT_F_COUNTED != 0 {
            crate::select::count_open(self.backend_id);
        }
        Ok(())
    }
}

/// The REPLY entry of a flow, from its FORWARD key and value: keyed by the
/// backend's answer (to the client, or to the address the client's source
/// became), restoring the frontend as the source (and the client as the
/// destination when its source was translated).
#[inline(always)]
fn reply_of(key: &CtKey, fwd: &CtValue) -> (CtKey, CtValue) {
    let translated = fwd.flags & (CT_F_SNAT | CT_F_HAIRPIN) != 0;
    let (to, client) = if translated {
        (
            (fwd.peer_addr_be, fwd.peer_port_be),
            (key.saddr_be, key.sport_be),
        )
    } else {
        ((key.saddr_be, key.sport_be), (0, 0))
    };
    let rkey = CtKey {
        saddr_be: fwd.nat_addr_be,
        daddr_be: to.0,
        sport_be: fwd.nat_port_be,
        dport_be: to.1,
        proto: key.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    let rval = CtValue {
        nat_addr_be: key.daddr_be,
        nat_port_be: key.dport_be,
        // Only the FORWARD entry carries the count.
        flags: fwd.flags & !(CT_F_COUNTED | CT_F_COUNT_ON_PROMOTE),
        peer_addr_be: client.0,
        peer_port_be: client.1,
        ..*fwd
    };
    (rkey, rval)
}

/// Writes a REPLY entry into `table`. A SNAT flow's entry claims its port
/// (`BPF_NOEXIST`, so two CPUs never share one; in `CT_NEW` the port must
/// be free in `CONNTRACK` too); finding the same flow's entry there is fine.
#[inline(always)]
fn record_reply(table: Table, key: &CtKey, value: &CtValue) -> Result<(), Counter> {
    if value.flags & CT_F_SNAT == 0 {
        return table.insert(key, value, 0);
    }
    let same_flow = |e: *mut CtValue| {
        // SAFETY: a valid map value pointer for this run.
        let v = unsafe { *e };
        v.peer_addr_be == value.peer_addr_be && v.peer_port_be == value.peer_port_be
    };
    let held = CONNTRACK.get_ptr_mut(key);
    if table == Table::New && held.is_some() {
        return Err(Counter::CtInsertFailed);
    }
    match table.insert(key, value, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(()),
        Err(_) if held.is_some_and(same_flow) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Records a new flow from client `pkt` (to the frontend) DNATed to `backend`.
#[inline(always)]
pub fn create(f: &NewFlow) -> Result<(), Counter> {
    f.record(&f.forward_value((0, 0)))
}

/// How many ports a new SNAT flow tries before giving up.
const SNAT_TRIES: u32 = 16;

/// Records a new external flow SNATed to `snat_addr_be` on a port of
/// `[port_min, port_max]` that no other flow to the same backend uses.
/// Returns the port, network byte order.
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
    let key = forward_key(f.pkt);
    let mut i = 0;
    let mut found = None;
    while i < SNAT_TRIES {
        let port_be = port_min
            .wrapping_add((start.wrapping_add(i) % range) as u16)
            .to_be();
        let fwd = f.forward_value((snat_addr_be, port_be));
        let (rkey, rval) = reply_of(&key, &fwd);
        if record_reply(f.table, &rkey, &rval).is_ok() {
            found = Some((port_be, fwd));
            break;
        }
        i += 1;
    }
    let (port_be, fwd) = found.ok_or(Counter::SnatPortsExhausted)?;
    f.insert_forward(&key, &fwd)?;
    Ok(port_be)
}

/// Records a hairpin flow: pod `pkt.saddr` reaching itself through the
/// frontend `pkt.daddr:dport`. Its packets get `via_be` (the frontend, or a
/// ClusterIP for other frontends) as their source, the client port kept, so
/// the pod's reply is addressed there and comes back through the datapath.
#[inline(always)]
pub fn create_hairpin(f: &NewFlow, via_be: u32) -> Result<(), Counter> {
    f.record(&f.forward_value((via_be, f.pkt.sport_be)))
}

/// Whether the DSR flow `pkt` (arriving with an option naming
/// `svc_addr_be:svc_port_be`) is already known here; refreshed if so.
#[inline(always)]
pub fn dsr_known(pkt: &Packet, svc_addr_be: u32, svc_port_be: u16, now: u64) -> bool {
    let key = dsr_reply_key(pkt);
    if let Some(entry) = CONNTRACK.get_ptr_mut(key)
        // SAFETY: a valid map value pointer for this run.
        && unsafe { (*entry).nat_addr_be == svc_addr_be && (*entry).nat_port_be == svc_port_be }
    {
        seen(entry, pkt, now);
        return true;
    }
    false
}

/// The REPLY key of the DSR flow a client's packet `pkt` (addressed to the
/// backend) belongs to.
#[inline(always)]
fn dsr_reply_key(pkt: &Packet) -> CtKey {
    CtKey {
        saddr_be: pkt.daddr_be,
        daddr_be: pkt.saddr_be,
        sport_be: pkt.dport_be,
        dport_be: pkt.sport_be,
        proto: pkt.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    }
}

/// Records what a (checked) DSR option taught this, the backend's, node:
/// replies from the backend `pkt` is addressed to go back to its client
/// with the service address `svc_addr_be:svc_port_be` as their source. A
/// SYN's flow waits in `CT_NEW`; the entry node puts the option on the
/// client's packet that completes the handshake too, which moves it to
/// `CONNTRACK` (where UDP flows go at once).
#[inline(always)]
pub fn learn_dsr(
    pkt: &Packet,
    svc_addr_be: u32,
    svc_port_be: u16,
    now: u64,
) -> Result<(), Counter> {
    let key = dsr_reply_key(pkt);
    let value = CtValue {
        nat_addr_be: svc_addr_be,
        nat_port_be: svc_port_be,
        flags: CT_F_EXTERNAL | CT_F_DSR,
        created_ns: now,
        last_seen_ns: now,
        ..CtValue::default()
    };
    if pkt.tcp_syn_only {
        return Table::New.insert(&key, &value, 0);
    }
    Table::Main.insert(&key, &value, 0)?;
    if pkt.proto == proto::TCP {
        let _ = CT_NEW.remove(key);
    }
    Ok(())
}
