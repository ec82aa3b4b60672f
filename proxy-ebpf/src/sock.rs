//! Socket-level load balancing: cgroup hooks that replace a frontend with a
//! backend where a socket names its peer, so nothing is translated per
//! packet afterwards (the fast path for pods, the only one for host-network
//! processes).
//!
//! - `connect4` (TCP, connected UDP): the frontend becomes a backend chosen
//!   by the Service's algorithm and affinity; both go into `SOCK_PEER`
//!   under the socket's cookie for getpeername and recvmsg; a UDP socket's
//!   cookie also into `SOCK_NAT`, where the agent finds the sockets to
//!   abort when their backend leaves.
//! - `sendmsg4` (unconnected UDP): the same per datagram, sticking to the
//!   backend `SOCK_NAT` recorded for this socket and frontend while it is
//!   still that backend (the agent forgets departed ones); the backend →
//!   frontend entry goes there too, for recvmsg.
//! - `recvmsg4`, `getpeername4`: the backend shows as the frontend.
//! - `sock_release`: a socket's `SOCK_PEER` entry goes with it.
//!
//! A frontend without usable endpoints fails the connect or send with
//! ECONNREFUSED at once. Frontends restricted by source ranges are left to
//! the packet path (the client's address is not known before routing).
//! Connections made here are not counted for least connections (they leave
//! no conntrack entry to count them closed).
//!
//! The client is identified by its network namespace (a pod), and each
//! connection by the socket's cookie: the addresses a Maglev hash would use
//! are not known before the kernel routes the socket.

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
};
use proxy_common::{
    Counter, NODE_F_SOCK_HOST_ONLY, SVC_F_SOURCE_RANGES, ServiceKey, SockKey, SockPeer, SockValue,
    ct_dir, proto, scope,
};

use crate::{
    conntrack, lookup,
    maps::{CONFIG, SOCK_NAT, SOCK_PEER},
    parse::Tuple,
    select,
    stats::{self, SvcEvent},
};

/// `ECONNREFUSED`.
const ECONNREFUSED: i32 = 111;

/// The hook allows the call (with the address as rewritten).
pub const ALLOW: i32 = 1;
/// The hook refuses the call (with the error set by `bpf_set_retval`).
const REFUSE: i32 = 0;

/// What a hook reads of a socket address.
struct Call<'a> {
    ctx: &'a SockAddrContext,
    /// The address the call names: the peer (connect, sendmsg) or where a
    /// datagram came from (recvmsg, getpeername). Raw network order.
    addr_be: u32,
    port_be: u16,
    proto: u8,
}

impl<'a> Call<'a> {
    /// The call's address and protocol, for TCP and UDP sockets.
    #[inline(always)]
    fn read(ctx: &'a SockAddrContext) -> Option<Self> {
        // SAFETY: reading this program's own context.
        let (ip, port, protocol) = unsafe {
            let sa = ctx.sock_addr;
            ((*sa).user_ip4, (*sa).user_port, (*sa).protocol)
        };
        let proto = match protocol {
            6 => proto::TCP,
            17 => proto::UDP,
            _ => return None,
        };
        Some(Self {
            ctx,
            addr_be: ip,
            port_be: port as u16,
            proto,
        })
    }

    /// Makes the call name `addr_be:port_be` instead.
    #[inline(always)]
    fn rewrite(&self, addr_be: u32, port_be: u16) {
        // SAFETY: the hooks may write these fields of their own context
        // (4-byte stores, the port in the low half as the kernel keeps it).
        unsafe {
            let sa = self.ctx.sock_addr;
            (*sa).user_ip4 = addr_be;
            (*sa).user_port = u32::from(port_be);
        }
    }

    #[inline(always)]
    fn cookie(&self) -> u64 {
        // SAFETY: helper on this program's own context.
        unsafe { bpf_get_socket_cookie(self.ctx.sock_addr.cast()) }
    }

    #[inline(always)]
    fn netns_cookie(&self) -> u64 {
        // SAFETY: helper on this program's own context.
        unsafe { bpf_get_netns_cookie(self.ctx.sock_addr.cast()) }
    }

    /// The `SOCK_NAT` key of this socket for `addr_be:port_be` in `dir`.
    #[inline(always)]
    fn key(&self, cookie: u64, addr_be: u32, port_be: u16, dir: u8) -> SockKey {
        SockKey {
            cookie,
            addr_be,
            port_be,
            dir,
            _pad: 0,
        }
    }
}

/// The frontend a call names, when this socket is served here.
#[inline(always)]
fn frontend(call: &Call) -> Option<proxy_common::ServiceValue> {
    let cfg = CONFIG.get(0)?;
    if cfg.flags & NODE_F_SOCK_HOST_ONLY != 0 && call.netns_cookie() != cfg.host_netns_cookie {
        return None;
    }
    let key = ServiceKey {
        addr_be: call.addr_be,
        port_be: call.port_be,
        proto: call.proto,
        scope: scope::INTERNAL,
    };
    lookup::by_key(&key)
}

/// Folds a 64-bit cookie into 32 bits.
#[inline(always)]
fn fold(cookie: u64) -> u32 {
    (cookie ^ (cookie >> 32)) as u32
}

/// Which call names the peer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `connect()`: `SOCK_PEER` keeps the translation (and, for UDP,
    /// `SOCK_NAT` the cookie, for the agent).
    Connect,
    /// `sendto()` on an unconnected UDP socket: `SOCK_NAT` keeps it, and
    /// the socket sticks to the backend it has for the frontend.
    Send,
}

/// How a connect or send to a frontend ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not a frontend served here: the call goes on untouched.
    NotOurs,
    /// The call names the backend now.
    Translated,
    /// Left to the packet path (counted).
    Passed,
    /// No usable endpoint: ECONNREFUSED.
    Refused,
}

/// A connect or unconnected send to a frontend: picks (or, for sends,
/// reuses) the backend and records what getpeername and recvmsg show.
#[inline(always)]
fn translate(call: &Call, via: Via) -> Outcome {
    let Some(svc) = frontend(call) else {
        return Outcome::NotOurs;
    };
    if svc.flags & SVC_F_SOURCE_RANGES != 0 {
        return Outcome::Passed;
    }
    let cookie = call.cookie();
    let forward = call.key(cookie, call.addr_be, call.port_be, ct_dir::FORWARD);
    if via == Via::Send
        // SAFETY: the value is copied out at once.
        && let Some(v) = unsafe { SOCK_NAT.get(forward) }.copied()
        && v.svc_id == svc.svc_id
        && select::backend_is(v.backend_id, v.addr_be, v.port_be)
    {
        call.rewrite(v.addr_be, v.port_be);
        return Outcome::Translated;
    }
    let tuple = Tuple {
        saddr_be: fold(call.netns_cookie()),
        daddr_be: call.addr_be,
        sport_be: fold(cookie) as u16,
        dport_be: call.port_be,
        proto: call.proto,
    };
    let choice = match select::select(svc.svc_id, &tuple, conntrack::now()) {
        Ok(Some(choice)) => choice,
        // No endpoint at all, or none this traffic may use: fail fast.
        Ok(None) | Err(Counter::NoLocalEndpoints) => {
            stats::socket(svc.svc_id, SvcEvent::Rejected);
            return Outcome::Refused;
        }
        Err(reason) => {
            stats::count(reason);
            return Outcome::Passed;
        }
    };
    let b = choice.backend;
    let value = |addr_be, port_be| SockValue {
        addr_be,
        port_be,
        _pad: 0,
        backend_id: choice.backend_id,
        svc_id: svc.svc_id,
    };
    if via == Via::Connect {
        let peer = SockPeer {
            frontend_addr_be: call.addr_be,
            backend_addr_be: b.addr_be,
            frontend_port_be: call.port_be,
            backend_port_be: b.port_be,
            backend_id: choice.backend_id,
            svc_id: svc.svc_id,
            _pad: 0,
        };
        // Without it the socket works; getpeername shows the backend.
        if SOCK_PEER.insert(cookie, peer, 0).is_err() {
            stats::count(Counter::SockPeerFull);
        }
    }
    // UDP also in SOCK_NAT (best effort): an unconnected socket's recvmsg
    // and next datagram read it, and the agent finds there, by cookie, the
    // connected sockets to abort when their backend leaves. TCP needs no
    // entry: its connection ends with the backend's pod.
    if call.proto == proto::UDP {
        let _ = SOCK_NAT.insert(
            call.key(cookie, b.addr_be, b.port_be, ct_dir::REPLY),
            value(call.addr_be, call.port_be),
            0,
        );
        if via == Via::Send {
            let _ = SOCK_NAT.insert(forward, value(b.addr_be, b.port_be), 0);
        }
    }
    stats::socket(svc.svc_id, SvcEvent::NewFlow);
    call.rewrite(b.addr_be, b.port_be);
    Outcome::Translated
}

/// The return value of a connect or send hook, counting the outcome.
#[inline(always)]
fn finish(outcome: Outcome) -> i32 {
    match outcome {
        Outcome::NotOurs => ALLOW,
        Outcome::Translated => {
            stats::count(Counter::SockTranslated);
            ALLOW
        }
        Outcome::Passed => {
            stats::count(Counter::SockPassed);
            ALLOW
        }
        Outcome::Refused => {
            stats::count(Counter::SockRefused);
            // SAFETY: helper with a plain argument.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REFUSE
        }
    }
}

/// `connect()` of a TCP or UDP socket.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    let Some(call) = Call::read(ctx) else {
        return ALLOW;
    };
    let outcome = translate(&call, Via::Connect);
    // A UDP socket may connect again, elsewhere: what it was given before
    // no longer holds. (A TCP socket connects once.)
    if call.proto == proto::UDP && matches!(outcome, Outcome::NotOurs | Outcome::Passed) {
        forget_peer(call.cookie());
    }
    finish(outcome)
}

/// `sendmsg()`/`sendto()` with an address on an unconnected UDP socket.
#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    match Call::read(ctx) {
        Some(call) if call.proto == proto::UDP => finish(translate(&call, Via::Send)),
        _ => ALLOW,
    }
}

/// An address a socket reports (recvmsg's source, getpeername's peer):
/// the frontend where the socket was given a backend.
#[inline(always)]
pub fn reply4(ctx: &SockAddrContext) -> i32 {
    let Some(call) = Call::read(ctx) else {
        return ALLOW;
    };
    let cookie = call.cookie();
    // SAFETY: the value is copied out at once.
    if let Some(peer) = unsafe { SOCK_PEER.get(cookie) }.copied()
        && peer.backend_addr_be == call.addr_be
        && peer.backend_port_be == call.port_be
    {
        call.rewrite(peer.frontend_addr_be, peer.frontend_port_be);
        stats::count(Counter::SockReplyNat);
        return ALLOW;
    }
    // Only UDP sockets have entries there.
    if call.proto != proto::UDP {
        return ALLOW;
    }
    let key = call.key(cookie, call.addr_be, call.port_be, ct_dir::REPLY);
    // SAFETY: the value is copied out at once.
    if let Some(v) = unsafe { SOCK_NAT.get(key) }.copied() {
        call.rewrite(v.addr_be, v.port_be);
        stats::count(Counter::SockReplyNat);
    }
    ALLOW
}

/// Removes socket `cookie`'s `SOCK_PEER` entry, if it has one. Looked up
/// first: a lookup takes no lock, a delete locks its bucket even to miss,
/// and most sockets (every process's, on the root cgroup) have none.
#[inline(always)]
fn forget_peer(cookie: u64) {
    // SAFETY: only tested for presence.
    if unsafe { SOCK_PEER.get(cookie) }.is_some() {
        let _ = SOCK_PEER.remove(cookie);
    }
}

/// A socket goes: its `SOCK_PEER` entry, if any, with it.
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    // SAFETY: reading this program's own context; the helper takes it.
    let cookie = unsafe {
        let protocol = (*ctx.sock).protocol;
        if protocol != 6 && protocol != 17 {
            return ALLOW;
        }
        bpf_get_socket_cookie(ctx.sock.cast())
    };
    forget_peer(cookie);
    ALLOW
}
