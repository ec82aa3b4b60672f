//! Connection tracking: which backend a flow uses, and how its replies are
//! translated back.
//!
//! An established flow (`CONNTRACK`) has two entries, each keyed by the
//! 5-tuple as it is on the wire in its direction:
//! - FORWARD `client → frontend` → backend (id and address:port);
//! - REPLY `backend → client` → frontend address:port to restore as source.
//!
//! A TCP flow opened by a SYN starts in `CT_NEW` and moves to `CONNTRACK`
//! when the client's ACK completes the handshake ([`Tracked::follow`]): a
//! flood of SYNs from spoofed sources churns `CT_NEW` alone and never evicts
//! an established flow. There a flow is one entry keyed by its client
//! ([`ct_dir::CLIENT`]: client address and port) holding the frontend and
//! the backend, so the SYN costs one insert, made first (`BPF_NOEXIST`: a
//! retransmitted SYN finds its flow by the collision), and the backend's
//! SYN-ACK finds it by its destination. SNAT and hairpin flows, and a second
//! half-open flow of the same client port, keep FORWARD and REPLY entries
//! there instead. Only a SYN-ACK or RST from a backend can belong to a flow
//! in `CT_NEW`, so every other reply (and every packet that is not ours) is
//! looked up in `CONNTRACK` alone.
//!
//! A SYN never looks in `CONNTRACK`: it is a new connection even when its
//! tuple is tracked there (a client reusing the port of a connection it
//! closed). The old flow is replaced when the new one completes its
//! handshake: a client packet that finds a closing flow in `CONNTRACK`
//! (FIN or RST seen) first checks whether a newer half-open flow has the
//! tuple ([`superseded`]). A flow that is not closing is never replaced
//! this way, so a stray or spoofed SYN with a live connection's tuple
//! cannot take it over. Both tables are LRUs, so a full table evicts the
//! least recently used flows instead of refusing new ones.

#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values built in CT_WORK are handed to the map helpers by reference, so they are not copied onto the stack"
)]

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::generated::{bpf_ktime_get_coarse_ns, bpf_loop};
use proxy_common::{
    Backend, CT_F_COUNT_ON_PROMOTE, CT_F_COUNTED, CT_F_DSR, CT_F_EXTERNAL, CT_F_HAIRPIN, CT_F_SNAT,
    Counter, CtKey, CtValue, ct_dir, ct_state, proto,
};

use crate::{
    hdr::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    maps::{CONNTRACK, CT_NEW, CT_WORK},
    parse::Packet,
};

/// `last_seen_ns` is refreshed at most this often, to keep flow state writes
/// (and the cache-line bouncing between CPUs they cause) rare.
const REFRESH_NS: u64 = 1_000_000_000;

/// `-EEXIST`: an insert with `BPF_NOEXIST` found the key.
const EEXIST: i32 = -17;

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
    #[inline(always)]
    fn insert(self, key: &CtKey, value: &CtValue, flags: u64) -> Result<(), i32> {
        match self {
            Table::Main => CONNTRACK.insert(key, value, flags),
            Table::New => CT_NEW.insert(key, value, flags),
        }
    }

    #[inline(always)]
    fn put(self, key: &CtKey, value: &CtValue) -> Result<(), Counter> {
        self.insert(key, value, 0)
            .map_err(|_| Counter::CtInsertFailed)
    }
}

/// A conntrack key, direction `dir`.
#[inline(always)]
fn key(saddr_be: u32, daddr_be: u32, sport_be: u16, dport_be: u16, proto: u8, dir: u8) -> CtKey {
    CtKey {
        saddr_be,
        daddr_be,
        sport_be,
        dport_be,
        proto,
        dir,
        _pad: 0,
    }
}

/// The key of `pkt`'s tuple as it is on the wire, direction `dir`.
#[inline(always)]
fn wire_key(pkt: &Packet, dir: u8) -> CtKey {
    key(
        pkt.saddr_be,
        pkt.daddr_be,
        pkt.sport_be,
        pkt.dport_be,
        pkt.proto,
        dir,
    )
}

/// Key of the FORWARD entry of the flow `pkt` belongs to (pkt as sent by the client).
#[inline(always)]
pub fn forward_key(pkt: &Packet) -> CtKey {
    wire_key(pkt, ct_dir::FORWARD)
}

/// Key of the REPLY entry for a packet coming from a backend (as the backend sent it).
#[inline(always)]
fn reply_key(pkt: &Packet) -> CtKey {
    wire_key(pkt, ct_dir::REPLY)
}

/// Key of a half-open flow of client `addr_be:port_be` ([`ct_dir::CLIENT`]).
#[inline(always)]
fn client_key(addr_be: u32, port_be: u16, proto: u8) -> CtKey {
    key(addr_be, 0, port_be, 0, proto, ct_dir::CLIENT)
}

/// Whether the half-open client entry `v` is the flow to frontend
/// `addr_be:port_be` (its `peer`).
#[inline(always)]
fn to_frontend(v: *const CtValue, addr_be: u32, port_be: u16) -> bool {
    // SAFETY: a valid map value pointer for this run.
    unsafe { (*v).peer_addr_be == addr_be && (*v).peer_port_be == port_be }
}

/// How a flow's entries are kept.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// FORWARD and REPLY entries (or one of them).
    Pair,
    /// One [`ct_dir::CLIENT`] entry in `CT_NEW`: backend in `nat`, frontend in `peer`.
    Client,
}

/// A client packet's tracked flow: its FORWARD (or client) entry and where it is.
#[derive(Clone, Copy)]
pub struct Tracked {
    pub entry: *mut CtValue,
    pub table: Table,
    pub form: Form,
}

/// The established flow client packet `pkt` belongs to (`CONNTRACK`).
#[inline(always)]
pub fn established(pkt: &Packet) -> Option<Tracked> {
    CONNTRACK
        .get_ptr_mut(forward_key(pkt))
        .map(|entry| Tracked {
            entry,
            table: Table::Main,
            form: Form::Pair,
        })
}

/// The half-open flow client packet `pkt` belongs to (`CT_NEW`, TCP only):
/// its client entry, when it is for this frontend, else its FORWARD entry.
#[inline(always)]
pub fn half_open(pkt: &Packet) -> Option<Tracked> {
    if pkt.proto != proto::TCP {
        return None;
    }
    if let Some(entry) = CT_NEW.get_ptr_mut(client_key(pkt.saddr_be, pkt.sport_be, pkt.proto))
        && to_frontend(entry, pkt.daddr_be, pkt.dport_be)
    {
        return Some(Tracked {
            entry,
            table: Table::New,
            form: Form::Client,
        });
    }
    CT_NEW.get_ptr_mut(forward_key(pkt)).map(|entry| Tracked {
        entry,
        table: Table::New,
        form: Form::Pair,
    })
}

/// Whether the established flow `v` may have been replaced by a newer
/// connection on its tuple: only a closing one (FIN or RST seen) can be.
#[inline(always)]
pub fn closing(v: &CtValue) -> bool {
    v.state >= ct_state::CLOSING
}

/// Whether a half-open flow in `CT_NEW` holds client packet `pkt`'s tuple:
/// a new connection on it, which replaces the established flow there.
#[inline(always)]
pub fn superseded(pkt: &Packet) -> bool {
    half_open(pkt).is_some()
}

impl Tracked {
    /// The entry's value, as a FORWARD entry (a client entry's frontend is
    /// in the key of the FORWARD entry it becomes, so `peer` is cleared).
    #[inline(always)]
    pub fn value(&self) -> CtValue {
        // SAFETY: a valid map value pointer for this run.
        let mut v = unsafe { *self.entry };
        if self.form == Form::Client {
            v.peer_addr_be = 0;
            v.peer_port_be = 0;
        }
        v
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
    /// `CONNTRACK` (REPLY entry first, as in [`NewFlow::record`]) and starts
    /// counting for least-connections. Returns the FORWARD value.
    #[inline(always)]
    pub fn follow(&self, pkt: &Packet, now: u64) -> Result<CtValue, Counter> {
        if !self.completes(pkt) {
            seen(self.entry, pkt, now);
            return Ok(self.value());
        }
        let w = work()?;
        w.key = forward_key(pkt);
        w.value = self.value();
        w.value.state = next_state(w.value.state, pkt);
        w.value.last_seen_ns = now;
        let counted = w.value.flags & CT_F_COUNT_ON_PROMOTE != 0;
        if counted {
            w.value.flags = (w.value.flags & !CT_F_COUNT_ON_PROMOTE) | CT_F_COUNTED;
        }
        // The connection it replaces on this tuple (a reused client port)
        // stops counting as open.
        if let Some(old) = CONNTRACK.get_ptr_mut(&w.key) {
            close_count(old);
        }
        if w.value.flags & CT_F_DSR == 0 {
            w.reply();
            record_reply(Table::Main, &w.rkey, &w.rvalue)?;
            if self.form == Form::Pair {
                let _ = CT_NEW.remove(&w.rkey);
            }
        }
        Table::Main.put(&w.key, &w.value)?;
        let _ = match self.form {
            Form::Pair => CT_NEW.remove(&w.key),
            Form::Client => CT_NEW.remove(client_key(pkt.saddr_be, pkt.sport_be, pkt.proto)),
        };
        if counted {
            crate::select::count_open(w.value.backend_id);
        }
        Ok(w.value)
    }
}

/// A backend's packet's tracked flow: the entry, and the frontend (and for
/// SNAT and hairpin flows the client) it translates back to.
#[derive(Clone, Copy)]
pub struct Reply {
    pub entry: *mut CtValue,
    /// The entry as a REPLY entry: `nat` is the frontend, `peer` the client
    /// (SNAT, hairpin), `flags`, `svc_id` and `state` the flow's.
    pub v: CtValue,
}

impl Reply {
    /// A REPLY (or reply-shaped) entry.
    #[inline(always)]
    fn pair(entry: *mut CtValue) -> Reply {
        // SAFETY: a valid map value pointer for this run.
        let v = unsafe { *entry };
        Reply { entry, v }
    }

    /// A half-open client entry, seen from its backend: the frontend (its
    /// `peer`) becomes the source again; the client's address stays.
    #[inline(always)]
    fn client(entry: *mut CtValue) -> Reply {
        // SAFETY: a valid map value pointer for this run.
        let mut v = unsafe { *entry };
        v.nat_addr_be = v.peer_addr_be;
        v.nat_port_be = v.peer_port_be;
        v.peer_addr_be = 0;
        v.peer_port_be = 0;
        Reply { entry, v }
    }
}

/// Whether a backend's TCP flags can belong to a flow still in its
/// handshake (a SYN-ACK, or a RST refusing it).
#[inline(always)]
fn handshake_reply(proto: u8, flags: u8) -> bool {
    proto == proto::TCP
        && (flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK || flags & TCP_RST != 0)
}

/// The half-open flow a backend at `saddr_be:sport_be` answering client
/// `daddr_be:dport_be` belongs to: the client's entry when its backend is
/// this one (and the reply comes back here, not DSR), else a REPLY entry
/// keyed `rkey`.
#[inline(always)]
fn half_open_reply(
    rkey: CtKey,
    saddr_be: u32,
    sport_be: u16,
    daddr_be: u32,
    dport_be: u16,
) -> Option<Reply> {
    if let Some(entry) = CT_NEW.get_ptr_mut(client_key(daddr_be, dport_be, rkey.proto))
        // SAFETY: a valid map value pointer for this run.
        && unsafe {
            (*entry).nat_addr_be == saddr_be
                && (*entry).nat_port_be == sport_be
                && (*entry).flags & CT_F_DSR == 0
        }
    {
        return Some(Reply::client(entry));
    }
    CT_NEW.get_ptr_mut(rkey).map(Reply::pair)
}

/// The tracked flow of backend packet `pkt`: an established flow's REPLY
/// entry, or (for a SYN-ACK or RST) a flow still in its handshake. A SYN
/// without ACK (a new connection to a pod or the node) never looks in
/// `CT_NEW`.
#[inline(always)]
pub fn lookup_reply(pkt: &Packet) -> Option<Reply> {
    let rkey = reply_key(pkt);
    if let Some(entry) = CONNTRACK.get_ptr_mut(rkey) {
        return Some(Reply::pair(entry));
    }
    if !handshake_reply(pkt.proto, pkt.tcp_flags) {
        return None;
    }
    half_open_reply(rkey, pkt.saddr_be, pkt.sport_be, pkt.daddr_be, pkt.dport_be)
}

/// The flow an ICMP error quotes (the quote is the packet as it left
/// towards the backend), in either table.
#[inline(always)]
pub fn lookup_quoted(e: &crate::icmp::IcmpError) -> Option<Reply> {
    let rkey = key(
        e.daddr_be,
        e.saddr_be,
        e.dport_be,
        e.sport_be,
        e.proto,
        ct_dir::REPLY,
    );
    if let Some(entry) = CONNTRACK.get_ptr_mut(rkey) {
        return Some(Reply::pair(entry));
    }
    half_open_reply(rkey, e.daddr_be, e.dport_be, e.saddr_be, e.sport_be)
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

/// A counted flow stops counting as open (it closes, or a new connection
/// replaces it).
#[inline(always)]
fn close_count(entry: *mut CtValue) {
    // SAFETY: `entry` came from a successful map lookup in this program run.
    unsafe {
        if (*entry).flags & CT_F_COUNTED != 0 {
            (*entry).flags &= !CT_F_COUNTED;
            crate::select::count_closed((*entry).backend_id);
        }
    }
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
            if next >= ct_state::CLOSING {
                close_count(entry);
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

/// A new flow: what the `open_*` functions record.
struct NewFlow<'a> {
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

/// How recording a new flow went: recorded (`again` false; a SNAT flow's
/// port in `snat_port_be`), or the flow was there already (`again`: a
/// retransmitted SYN, which follows its flow; `v` is that flow's FORWARD
/// value, refreshed). Plain values only: it crosses a function verified
/// apart (`global.rs`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Opened {
    pub again: bool,
    pub snat_port_be: u16,
    pub v: CtValue,
}

impl Opened {
    /// Recorded as a new flow, SNAT port `snat_port_be` (0: none).
    #[inline(always)]
    pub const fn new(snat_port_be: u16) -> Opened {
        Opened {
            again: false,
            snat_port_be,
            v: ZERO,
        }
    }

    /// Found recorded: flow `t`, which packet `pkt` refreshes.
    #[inline(always)]
    fn again(t: Tracked, pkt: &Packet, now: u64) -> Opened {
        seen(t.entry, pkt, now);
        let v = t.value();
        Opened {
            again: true,
            snat_port_be: v.peer_port_be,
            v,
        }
    }
}

/// An all-zero value.
pub const ZERO: CtValue = CtValue {
    nat_addr_be: 0,
    nat_port_be: 0,
    flags: 0,
    state: 0,
    backend_id: 0,
    svc_id: 0,
    created_ns: 0,
    last_seen_ns: 0,
    peer_addr_be: 0,
    peer_port_be: 0,
    _pad: 0,
};

/// Which kind of new flow [`open`] records.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// DNAT only (a client entry in `CT_NEW` for a SYN).
    Plain,
    /// The source becomes `Open::peer_addr_be` and a free port of the range.
    Snat,
    /// A pod reaching itself: the source becomes `Open::peer_addr_be`,
    /// the client port kept.
    Hairpin,
}

/// A new flow of a client's packet to record ([`open`]). Plain values
/// only: it crosses a function verified apart (`global.rs`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Open {
    pub kind: Kind,
    /// `CT_F_*` flags of both entries.
    pub flags: u8,
    /// Whether the backend's replies come back through this node (there is
    /// a REPLY entry to write).
    pub replies_here: bool,
    pub _pad: u8,
    pub svc_id: u32,
    pub backend_id: u32,
    pub backend: Backend,
    /// SNAT: the SNAT address; hairpin: the source the pod sees.
    pub peer_addr_be: u32,
    /// SNAT: the port range (host order).
    pub port_min: u16,
    pub port_max: u16,
    pub now: u64,
}

/// Records the new flow `o` of client packet `pkt`: see [`open_plain`],
/// [`open_snat`], [`open_hairpin`]. Its callers know the kind, so each
/// keeps one branch.
#[inline(always)]
pub fn open(pkt: &Packet, o: &Open) -> Result<Opened, Counter> {
    let f = NewFlow {
        pkt,
        svc_id: o.svc_id,
        backend_id: o.backend_id,
        backend: &o.backend,
        flags: o.flags,
        replies_here: o.replies_here,
        now: o.now,
    };
    match o.kind {
        Kind::Plain => open_plain(&f),
        Kind::Snat => open_snat(&f, o.peer_addr_be, o.port_min, o.port_max),
        Kind::Hairpin => open_hairpin(&f, o.peer_addr_be),
    }
}

/// A half-open flow a client's packet belongs to, as seen before anything
/// changes ([`peek`]): its FORWARD value, whether the packet completes its
/// handshake (`first`), its path counter. Plain values only.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Peek {
    pub v: CtValue,
    pub first: bool,
    pub counter: Counter,
}

/// The half-open flow of service port `svc_id` client packet `pkt`
/// belongs to, unchanged.
#[inline(always)]
pub fn peek(pkt: &Packet, svc_id: u32) -> Option<Peek> {
    let t = half_open(pkt)?;
    let v = t.value();
    (v.svc_id == svc_id).then(|| Peek {
        v,
        first: t.completes(pkt),
        counter: t.path(pkt),
    })
}

/// Client packet `pkt` of the half-open flow [`peek`] found is on its way:
/// the flow is refreshed or, when the packet completes the handshake, moved
/// to `CONNTRACK` ([`Tracked::follow`]). Returns its FORWARD value.
#[inline(always)]
pub fn follow(pkt: &Packet, now: u64) -> Result<CtValue, Counter> {
    // Gone since the peek (evicted): the packet goes on as peeked.
    let Some(t) = half_open(pkt) else {
        return Err(Counter::CtInsertFailed);
    };
    t.follow(pkt, now)
}

impl NewFlow<'_> {
    /// The table a flow from the client's packet starts in: `CT_NEW` for a
    /// SYN, `CONNTRACK` otherwise (UDP; TCP picked up mid-stream).
    #[inline(always)]
    fn table(&self) -> Table {
        if self.pkt.tcp_syn_only {
            Table::New
        } else {
            Table::Main
        }
    }

    /// Writes the FORWARD entry's value into `w` (its key is the caller's),
    /// the client's source becoming `peer` (address, port; zeros: kept). A
    /// half-open flow is counted for least-connections only once its
    /// handshake completes.
    #[inline(always)]
    fn forward_into(&self, w: &mut CtWork, peer: (u32, u16)) {
        let flags = if self.table() == Table::New && self.flags & CT_F_COUNTED != 0 {
            (self.flags & !CT_F_COUNTED) | CT_F_COUNT_ON_PROMOTE
        } else {
            self.flags
        };
        let v = &mut w.value;
        v.nat_addr_be = self.backend.addr_be;
        v.nat_port_be = self.backend.port_be;
        v.flags = flags;
        v.state = next_state(ct_state::NONE, self.pkt);
        v.backend_id = self.backend_id;
        v.svc_id = self.svc_id;
        v.created_ns = self.now;
        v.last_seen_ns = self.now;
        v.peer_addr_be = peer.0;
        v.peer_port_be = peer.1;
        v._pad = 0;
    }

    /// Records the flow as FORWARD and REPLY entries, the client's source
    /// becoming `peer`: REPLY first (once the FORWARD entry exists, packets
    /// of this flow may reach the backend and its answer must already find
    /// its translation), then FORWARD, counted when asked.
    #[inline(always)]
    fn record(&self, w: &mut CtWork, peer: (u32, u16)) -> Result<(), Counter> {
        w.key = forward_key(self.pkt);
        self.forward_into(w, peer);
        if self.replies_here {
            w.reply();
            self.table().put(&w.rkey, &w.rvalue)?;
        }
        self.insert_forward(w)
    }

    /// Inserts the FORWARD entry in `w` (its REPLY entry is in place) and
    /// counts the flow for least-connections when asked.
    #[inline(always)]
    fn insert_forward(&self, w: &CtWork) -> Result<(), Counter> {
        self.table().put(&w.key, &w.value)?;
        if w.value.flags & CT_F_COUNTED != 0 {
            crate::select::count_open(self.backend_id);
        }
        Ok(())
    }

    /// A half-open flow of this tuple already recorded as FORWARD and
    /// REPLY entries (a retransmitted SYN), if its backend still serves.
    #[inline(always)]
    fn again_as_pair(&self) -> Option<Opened> {
        let entry = CT_NEW.get_ptr_mut(forward_key(self.pkt))?;
        // SAFETY: a valid map value pointer for this run.
        let v = unsafe { *entry };
        let t = Tracked {
            entry,
            table: Table::New,
            form: Form::Pair,
        };
        (v.svc_id == self.svc_id && still_serves(&v)).then(|| Opened::again(t, self.pkt, self.now))
    }
}

/// Whether the backend a flow `v` was given still has its id.
#[inline(always)]
fn still_serves(v: &CtValue) -> bool {
    crate::select::backend_is(v.backend_id, v.nat_addr_be, v.nat_port_be)
}

/// Scratch, one per CPU (`CT_WORK`): the entries recording a flow builds,
/// off the stack (the verifier allows 512 bytes along a chain of calls).
/// Only TC and XDP programs use it, and they do not interrupt each other
/// on a CPU.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CtWork {
    pub key: CtKey,
    pub value: CtValue,
    pub rkey: CtKey,
    pub rvalue: CtValue,
}

/// This CPU's scratch entries.
#[inline(always)]
fn work() -> Result<&'static mut CtWork, Counter> {
    let w = CT_WORK.get_ptr_mut(0).ok_or(Counter::CtInsertFailed)?;
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    Ok(unsafe { &mut *w })
}

impl CtWork {
    /// Writes the REPLY entry of the FORWARD entry in `key`/`value`: keyed
    /// by the backend's answer (to the client, or to the address the
    /// client's source became), restoring the frontend as the source (and
    /// the client as the destination when its source was translated).
    #[inline(always)]
    fn reply(&mut self) {
        let (key, fwd) = (&self.key, &self.value);
        let translated = fwd.flags & (CT_F_SNAT | CT_F_HAIRPIN) != 0;
        let (to, client) = if translated {
            (
                (fwd.peer_addr_be, fwd.peer_port_be),
                (key.saddr_be, key.sport_be),
            )
        } else {
            ((key.saddr_be, key.sport_be), (0, 0))
        };
        self.rkey = CtKey {
            saddr_be: fwd.nat_addr_be,
            daddr_be: to.0,
            sport_be: fwd.nat_port_be,
            dport_be: to.1,
            proto: key.proto,
            dir: ct_dir::REPLY,
            _pad: 0,
        };
        self.rvalue = CtValue {
            nat_addr_be: key.daddr_be,
            nat_port_be: key.dport_be,
            // Only the FORWARD entry carries the count.
            flags: fwd.flags & !(CT_F_COUNTED | CT_F_COUNT_ON_PROMOTE),
            peer_addr_be: client.0,
            peer_port_be: client.1,
            ..*fwd
        };
    }
}

/// Writes a REPLY entry into `table`. A SNAT flow's entry claims its port
/// (`BPF_NOEXIST`, so two CPUs never share one; in `CT_NEW` the port must
/// be free in `CONNTRACK` too); finding the same flow's entry there is fine.
#[inline(always)]
fn record_reply(table: Table, key: &CtKey, value: &CtValue) -> Result<(), Counter> {
    if value.flags & CT_F_SNAT == 0 {
        return table.put(key, value);
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
        Err(_) => Err(Counter::CtInsertFailed),
    }
}

/// Records a new flow from client `pkt` (to the frontend) DNATed to its
/// backend: a SYN's as one client entry in `CT_NEW`, inserted first (a
/// retransmitted SYN finds its flow there: [`Opened`]); anything
/// else (UDP, TCP picked up mid-stream) as FORWARD and REPLY entries in
/// `CONNTRACK`.
#[inline(always)]
fn open_plain(f: &NewFlow) -> Result<Opened, Counter> {
    let pkt = f.pkt;
    let w = work()?;
    if f.table() == Table::Main {
        return f.record(w, (0, 0)).map(|()| Opened::new(0));
    }
    w.key = client_key(pkt.saddr_be, pkt.sport_be, pkt.proto);
    f.forward_into(w, (pkt.daddr_be, pkt.dport_be));
    match CT_NEW.insert(&w.key, &w.value, u64::from(BPF_NOEXIST)) {
        Ok(()) => return Ok(Opened::new(0)),
        Err(EEXIST) => {}
        Err(_) => return Err(Counter::CtInsertFailed),
    }
    let Some(entry) = CT_NEW.get_ptr_mut(&w.key) else {
        // Gone meanwhile (evicted): record it again.
        return Table::New.put(&w.key, &w.value).map(|()| Opened::new(0));
    };
    if to_frontend(entry, pkt.daddr_be, pkt.dport_be) {
        // SAFETY: a valid map value pointer for this run; copied out.
        let v = unsafe { *entry };
        if v.svc_id == f.svc_id && still_serves(&v) {
            let t = Tracked {
                entry,
                table: Table::New,
                form: Form::Client,
            };
            return Ok(Opened::again(t, pkt, f.now));
        }
        // Its backend is gone (or the frontend names another Service now):
        // the SYN starts the flow anew.
        return Table::New.put(&w.key, &w.value).map(|()| Opened::new(0));
    }
    // The client port has a half-open flow to another frontend: this one
    // keeps FORWARD and REPLY entries.
    if let Some(again) = f.again_as_pair() {
        return Ok(again);
    }
    f.record(w, (0, 0)).map(|()| Opened::new(0))
}

/// How many ports a new SNAT flow tries before giving up.
const SNAT_TRIES: u32 = 16;

/// Records a new external flow SNATed to `snat_addr_be` on a port of
/// `[port_min, port_max]` that no other flow to the same backend uses
/// (network byte order, in `Opened::snat_port_be`), or finds the flow a
/// retransmitted SYN belongs to.
#[inline(always)]
fn open_snat(
    f: &NewFlow,
    snat_addr_be: u32,
    port_min: u16,
    port_max: u16,
) -> Result<Opened, Counter> {
    if f.pkt.tcp_syn_only
        && let Some(again) = f.again_as_pair()
    {
        return Ok(again);
    }
    let range = u32::from(port_max.saturating_sub(port_min)) + 1;
    let start = proxy_common::hash::flow_hash(
        f.pkt.saddr_be,
        f.pkt.daddr_be,
        f.pkt.sport_be,
        f.pkt.dport_be,
        f.pkt.proto,
    );
    let w = work()?;
    w.key = forward_key(f.pkt);
    f.forward_into(w, (snat_addr_be, 0));
    let mut search = SnatSearch {
        start,
        range,
        port_min: u32::from(port_min),
        main: u32::from(f.table() == Table::Main),
        found: 0,
        port_be: 0,
    };
    // SAFETY: the callback and its context are valid for the whole call.
    unsafe {
        bpf_loop(
            SNAT_TRIES,
            snat_try as *mut core::ffi::c_void,
            (&raw mut search).cast(),
            0,
        );
    }
    if search.found == 0 {
        return Err(Counter::SnatPortsExhausted);
    }
    let w = work()?;
    w.value.peer_port_be = search.port_be as u16;
    f.insert_forward(w)?;
    Ok(Opened::new(search.port_be as u16))
}

/// A SNAT port search (`bpf_loop`, so the verifier checks one try, not
/// each): the flow's FORWARD entry waits in `CT_WORK`, its port to be set.
#[repr(C)]
struct SnatSearch {
    /// Where the tries start in the range (the flow's hash).
    start: u32,
    /// Ports in the range (at least 1).
    range: u32,
    /// First port of the range (host order).
    port_min: u32,
    /// The flow goes to `CONNTRACK` (else `CT_NEW`).
    main: u32,
    /// Result: a port was claimed, and which (network order).
    found: u32,
    port_be: u32,
}

/// One SNAT try: the `i`-th port from the start, claimed if its REPLY key
/// is free (`record_reply`).
#[inline(never)]
extern "C" fn snat_try(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer to our search on the stack.
    let s = unsafe { &mut *ctx.cast::<SnatSearch>() };
    let Some(offset) = s.start.wrapping_add(i as u32).checked_rem(s.range) else {
        return 1;
    };
    let port_be = (s.port_min as u16).wrapping_add(offset as u16).to_be();
    let Ok(w) = work() else {
        return 1;
    };
    w.value.peer_port_be = port_be;
    w.reply();
    let table = if s.main != 0 { Table::Main } else { Table::New };
    if record_reply(table, &w.rkey, &w.rvalue).is_ok() {
        s.found = 1;
        s.port_be = u32::from(port_be);
        return 1;
    }
    0
}

/// Records a hairpin flow: pod `pkt.saddr` reaching itself through the
/// frontend `pkt.daddr:dport`. Its packets get `via_be` (the frontend, or a
/// ClusterIP for other frontends) as their source, the client port kept, so
/// the pod's reply is addressed there and comes back through the datapath.
#[inline(always)]
fn open_hairpin(f: &NewFlow, via_be: u32) -> Result<Opened, Counter> {
    if f.pkt.tcp_syn_only
        && let Some(again) = f.again_as_pair()
    {
        return Ok(again);
    }
    f.record(work()?, (via_be, f.pkt.sport_be))
        .map(|()| Opened::new(0))
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
    key(
        pkt.daddr_be,
        pkt.saddr_be,
        pkt.dport_be,
        pkt.sport_be,
        pkt.proto,
        ct_dir::REPLY,
    )
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
    let w = work()?;
    w.key = dsr_reply_key(pkt);
    w.value = CtValue {
        nat_addr_be: svc_addr_be,
        nat_port_be: svc_port_be,
        flags: CT_F_EXTERNAL | CT_F_DSR,
        created_ns: now,
        last_seen_ns: now,
        ..ZERO
    };
    if pkt.tcp_syn_only {
        return Table::New.put(&w.key, &w.value);
    }
    Table::Main.put(&w.key, &w.value)?;
    if pkt.proto == proto::TCP {
        let _ = CT_NEW.remove(&w.key);
    }
    Ok(())
}
