//! North-south traffic on external interfaces: NodePort, LoadBalancer and
//! externalIP frontends. The same code runs in XDP (`xdp_ext`, before an skb
//! exists) and in TC (`tc_ext_ingress`, for what XDP hands on, or where XDP
//! cannot attach).
//!
//! - A packet to an external frontend follows its flow or selects a backend
//!   from the frontend's table (only local endpoints under
//!   `externalTrafficPolicy: Local`; a Service without any endpoint is
//!   answered with an ICMP port unreachable), is DNATed, and then:
//!   - local backend: goes up the stack, already translated; the backend's
//!     replies are translated back in `tc_pod_ingress`;
//!   - remote backend, DSR (`SVC_F_DSR`): keeps the client's address, carries
//!     the frontend in an IPv4 option (on TCP SYNs, the packet completing
//!     the handshake and every UDP datagram), and leaves at once by the
//!     backend's remembered route; the backend's node answers the client
//!     itself;
//!   - remote backend, SNAT: the source becomes this node's address and a
//!     port no other flow to that backend uses; leaves the same way.
//! - A reply to a SNATed flow (addressed to the SNAT address, at a port of
//!   the SNAT range) is translated back and sent to the client.
//! - A packet with the DSR option (this node hosts the backend) teaches
//!   conntrack the flow, then goes up the stack untouched, if the option
//!   names an external frontend here and the packet goes to a local backend
//!   of it; otherwise it is dropped (`dsr_refused`).
//!
//! Established flows take the inline fast path ([`frontend`]); everything
//! else (new flows, handshakes, DSR learning, ICMP errors) is verified
//! apart (`global.rs`). When the next hop's MAC is unknown, XDP leaves the
//! packet untouched for TC, which has the kernel resolve it
//! (`bpf_redirect_neigh`).

use proxy_common::{
    BACKEND_F_LOCAL, CT_F_COUNTED, CT_F_DSR, CT_F_EXTERNAL, CT_F_REMOTE, CT_F_SNAT, Counter,
    CtValue, DSR_OPT_LEN, NodeConfig, SVC_F_DSR, ServiceKey, ServiceValue, maps::slow, proto,
    scope,
};

use crate::{
    conntrack::{self, Kind, Reply},
    ctx::Ctx,
    dsr,
    fib::{self, Route, Via},
    global::{self, Globals, SlowWork},
    icmp, lookup,
    maps::CONFIG,
    nat::{self, Side},
    parse::{self, Packet},
    select,
    stats::{self, SvcEvent},
    verdict::{Done, Path},
};

/// Handles one packet arriving on an external interface: established
/// flows, SNAT replies and known DSR flows here; anything else that may be
/// ours in the slow program ([`slow_path`]).
#[inline(always)]
pub fn handle<C: Globals>(ctx: &C) -> Path {
    let Some(pkt) = parse::parse(ctx)? else {
        if icmp::to_addr(ctx, snat_addr()) {
            return ctx.hand_over(slow::EXT, None);
        }
        return Ok(Done::NOT_OURS);
    };
    if let Some(svc) = lookup::service(&pkt, scope::EXTERNAL) {
        return frontend(ctx, &pkt, &svc);
    }
    if let Some(cfg) = CONFIG.get(0)
        && to_snat_port(cfg, &pkt)
        && let Some(r) = conntrack::lookup_reply(&pkt)
        && r.v.flags & CT_F_SNAT != 0
    {
        return snat_reply(ctx, &pkt, &r);
    }
    if let Some((addr_be, port_be)) = dsr::option(ctx, &pkt) {
        if conntrack::dsr_known(&pkt, addr_be, port_be, conntrack::now()) {
            return Ok(Done::pass(Counter::DsrLearned));
        }
        return ctx.dsr_arrival(&pkt, addr_be, port_be);
    }
    Ok(Done::NOT_OURS)
}

/// The SNAT address (0: none).
#[inline(always)]
fn snat_addr() -> u32 {
    CONFIG.get(0).map_or(0, |c| c.snat_addr_be)
}

/// The slow program's packet (`xdp_ext_slow`, `tc_ext_slow`), handed over
/// by [`handle`] untouched: a client packet to an external frontend that is
/// no established flow's (a half-open flow's, or a new flow), or an ICMP
/// packet to the SNAT address.
#[inline(always)]
pub fn slow_path<C: Globals>(ctx: &C) -> Path {
    let w = global::work()?;
    if w.handed == 0 {
        return ctx.icmp_to_snat_client();
    }
    // Copied out: the work area's other slots are written below.
    let (pkt, svc) = (w.pkt, w.svc);
    slow_frontend(ctx, &pkt, &svc)
}

/// Whether `pkt` is addressed to a port of the SNAT range on the SNAT
/// address: only those can be replies of SNATed flows (the node's own
/// traffic to its address is never looked up).
#[inline(always)]
fn to_snat_port(cfg: &NodeConfig, pkt: &Packet) -> bool {
    let port = u16::from_be(pkt.dport_be);
    cfg.snat_addr_be != 0
        && pkt.daddr_be == cfg.snat_addr_be
        && cfg.snat_port_min <= port
        && port <= cfg.snat_port_max
}

/// A packet with the DSR option for a flow not known here (known flows,
/// such as every UDP datagram's after the first, are refreshed by
/// [`handle`]), addressed to a backend on this node: its flow is learned
/// when the option names an external frontend here of the packet's protocol
/// and the packet goes to a local backend of that frontend's Service;
/// anything else is dropped, nothing learned (a forged option could
/// otherwise give a pod's replies any source, or fill conntrack).
#[inline(always)]
pub fn dsr_arrival(pkt: &Packet, addr_be: u32, port_be: u16) -> Path {
    let now = conntrack::now();
    if !conntrack::dsr_known(pkt, addr_be, port_be, now) {
        let svc = dsr_frontend(pkt, addr_be, port_be).ok_or(Counter::DsrRefused)?;
        if !select::has_local_backend(svc.svc_id, pkt.daddr_be, pkt.dport_be) {
            return Err(Counter::DsrRefused.into());
        }
        conntrack::learn_dsr(pkt, addr_be, port_be, now)?;
    }
    Ok(Done::pass(Counter::DsrLearned))
}

/// The external frontend a DSR option names: a LoadBalancer IP or
/// externalIP is one here too; another node's address on a NodePort is
/// checked as this node's NodePort of that port.
#[inline(always)]
fn dsr_frontend(pkt: &Packet, addr_be: u32, port_be: u16) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr_be,
        port_be,
        proto: pkt.proto,
        scope: scope::EXTERNAL,
    };
    if let Some(svc) = lookup::by_key(&key) {
        return Some(svc);
    }
    let node_be = CONFIG.get(0)?.nodeport_addr_be;
    if node_be == 0 {
        return None;
    }
    lookup::by_key(&ServiceKey {
        addr_be: node_be,
        ..key
    })
}

/// Where a client's packet goes once translated, decided before anything
/// changes: `None` when XDP should leave it to TC (next hop unknown).
#[inline(always)]
fn route_for<C: Globals>(ctx: &C, pkt: &Packet, v: &CtValue, option: bool) -> Option<Route> {
    let saddr_be = if v.flags & CT_F_SNAT != 0 {
        v.peer_addr_be
    } else {
        pkt.saddr_be
    };
    let mut flow = fib::flow_of(ctx, saddr_be, v.nat_addr_be, pkt.proto);
    if option {
        flow.tot_len = flow.tot_len.wrapping_add(u16::from(DSR_OPT_LEN));
    }
    let route = fib::to_backend(ctx, v.backend_id, &flow);
    match route {
        r if C::XDP && r.via == Via::NoNeigh => None,
        r => Some(r),
    }
}

/// A packet to an external frontend: an established flow's is sent on
/// here; anything else goes to the slow program ([`slow_path`]).
#[inline(always)]
fn frontend<C: Globals>(ctx: &C, pkt: &Packet, svc: &ServiceValue) -> Path {
    if !lookup::source_allowed(svc, pkt) {
        return Err(Counter::SourceRangeDenied.into());
    }
    // A SYN is a new connection (`conntrack::open`); it never looks here.
    if !pkt.tcp_syn_only
        && let Some(t) = conntrack::established(pkt)
    {
        let now = conntrack::now();
        let v = t.value();
        if v.svc_id == svc.svc_id && !(conntrack::closing(&v) && conntrack::superseded(pkt)) {
            return send(
                ctx,
                pkt,
                &v,
                false,
                SvcEvent::Packet,
                Counter::Established,
                || {
                    conntrack::seen(t.entry, pkt, now);
                    Ok(v.peer_port_be)
                },
            );
        }
    }
    ctx.hand_over(slow::EXT, Some((pkt, svc)))
}

/// A client packet to an external frontend that is no established flow's
/// (in the slow program; its source was allowed): a half-open flow's (the
/// packet completing the handshake moves it to `CONNTRACK`), or a new flow.
/// Each step is a function verified apart (`global.rs`), working in this
/// CPU's `SlowWork`, so the program's own frame stays small.
#[inline(always)]
fn slow_frontend<C: Globals>(ctx: &C, pkt: &Packet, svc: &ServiceValue) -> Path {
    let w = global::work()?;
    let now = conntrack::now();
    if !pkt.tcp_syn_only && global::peek(pkt, svc.svc_id, &mut w.peek) {
        w.delivery.v = w.peek.v;
        let (first, counter) = (w.peek.first, w.peek.counter);
        return send_slow(ctx, pkt, w, first, SvcEvent::Packet, counter, || {
            global::follow(pkt, now).map(|v| v.peer_port_be)
        });
    }
    new_flow(ctx, pkt, svc, now, w)
}

/// A new flow to an external frontend: a backend is selected, the route
/// to it looked up (a packet XDP leaves to TC records nothing), the flow
/// recorded and the packet sent. A retransmitted SYN finds its flow
/// recorded and follows it.
#[inline(always)]
fn new_flow<C: Globals>(
    ctx: &C,
    pkt: &Packet,
    svc: &ServiceValue,
    now: u64,
    w: &mut SlowWork,
) -> Path {
    if !global::choose(svc.svc_id, &pkt.tuple(), now, &mut w.choice)? {
        if !pkt.l4 {
            // Its first fragment was refused already.
            return Err(Counter::Fragment.into());
        }
        // As for ClusterIPs (and kube-proxy's REJECT): the client fails fast.
        stats::service(svc.svc_id, pkt.l3_len, SvcEvent::Rejected);
        ctx.reject(pkt)?;
        return Ok(Done::bounce(Counter::NoEndpointsExternal));
    }
    let o = &mut w.open;
    o.kind = Kind::Plain;
    o.flags = CT_F_EXTERNAL | if w.choice.counted { CT_F_COUNTED } else { 0 };
    o.replies_here = true;
    o.svc_id = svc.svc_id;
    o.backend_id = w.choice.backend_id;
    o.backend = w.choice.backend;
    o.peer_addr_be = 0;
    o.now = now;
    if o.backend.flags & BACKEND_F_LOCAL == 0 {
        o.flags |= CT_F_REMOTE;
        if svc.flags & SVC_F_DSR != 0 && dsr::fits(pkt) {
            o.flags |= CT_F_DSR;
            // The reply never comes back here: no REPLY entry.
            o.replies_here = false;
        } else {
            let cfg = CONFIG.get(0).ok_or(Counter::SnatPortsExhausted)?;
            if cfg.snat_addr_be == 0 {
                return Err(Counter::SnatPortsExhausted.into());
            }
            o.kind = Kind::Snat;
            o.flags |= CT_F_SNAT;
            o.peer_addr_be = cfg.snat_addr_be;
            o.port_min = cfg.snat_port_min;
            o.port_max = cfg.snat_port_max;
        }
    }
    w.delivery.v = CtValue {
        nat_addr_be: o.backend.addr_be,
        nat_port_be: o.backend.port_be,
        flags: o.flags,
        backend_id: o.backend_id,
        svc_id: svc.svc_id,
        peer_addr_be: o.peer_addr_be,
        ..conntrack::ZERO
    };
    // A TCP flow picked up mid-stream carries the DSR option on its first
    // packet, as a handshake's last one does, so the backend's node learns it.
    let first = pkt.proto == proto::TCP && !pkt.tcp_syn_only;
    let next = next(ctx, pkt, &w.delivery.v, first);
    match next.way {
        Way::Defer => return Ok(Done::pass(Counter::DeferredToTc)),
        Way::NoRoom => return Err(Counter::DsrNoRoom.into()),
        Way::Local | Way::Remote => {}
    }
    global::open(pkt, &w.open, &mut w.opened)?;
    if w.opened.again {
        // A retransmitted SYN: on to the backend its flow has (refreshed).
        w.delivery.v = w.opened.v;
        let port = w.opened.snat_port_be;
        return send_slow(
            ctx,
            pkt,
            w,
            false,
            SvcEvent::Packet,
            Counter::Established,
            || Ok(port),
        );
    }
    let d = &mut w.delivery;
    d.how = How {
        next,
        snat_port_be: w.opened.snat_port_be,
        option: with_option(pkt, &d.v, first),
        event: SvcEvent::NewFlow,
        local: Counter::NewFlow,
    };
    ctx.deliver(pkt, d)
}

/// Whether a client's packet carries the DSR option: a TCP SYN, the packet
/// that completes the handshake or starts tracking a flow (`first`: the
/// backend's node moves the flow it learned to its main table), every UDP
/// datagram.
#[inline(always)]
fn with_option(pkt: &Packet, v: &CtValue, first: bool) -> bool {
    v.flags & CT_F_DSR != 0 && (pkt.tcp_syn_only || first || pkt.proto == proto::UDP)
}

/// Where a flow's packet goes.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Up the stack, to a local backend.
    Local,
    /// To a remote backend, by the route.
    Remote,
    /// XDP leaves it to TC (next hop unresolved).
    Defer,
    /// The DSR option does not fit the route's MTU.
    NoRoom,
}

/// Where a flow's packet goes, and by which route (for `Way::Remote`). A
/// plain struct with every field always set, not an enum with payloads (see
/// `fib::Route`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Next {
    pub way: Way,
    pub route: Route,
}

impl Next {
    #[inline(always)]
    const fn just(way: Way) -> Next {
        Next {
            way,
            route: Route::NONE,
        }
    }
}

/// Where a flow's packet goes, decided before anything changes.
#[inline(always)]
fn next<C: Globals>(ctx: &C, pkt: &Packet, v: &CtValue, first: bool) -> Next {
    if v.flags & CT_F_REMOTE == 0 {
        return Next::just(Way::Local);
    }
    let option = with_option(pkt, v, first);
    match route_for(ctx, pkt, v, option) {
        Some(r) if option && r.via == Via::TooBig => Next::just(Way::NoRoom),
        Some(route) => Next {
            way: Way::Remote,
            route,
        },
        None => Next::just(Way::Defer),
    }
}

/// Translates a client's packet as its flow says and sends it on. Where it
/// goes is decided first: nothing is recorded (`commit`, which returns the
/// flow's SNAT port) for a packet XDP leaves to TC, which decides anew.
/// `first`: the packet completes the flow's handshake.
#[inline(always)]
fn send<C: Globals>(
    ctx: &C,
    pkt: &Packet,
    v: &CtValue,
    first: bool,
    event: SvcEvent,
    local: Counter,
    commit: impl FnOnce() -> Result<u16, Counter>,
) -> Path {
    let next = next(ctx, pkt, v, first);
    match next.way {
        Way::Defer => return Ok(Done::pass(Counter::DeferredToTc)),
        Way::NoRoom => return Err(Counter::DsrNoRoom.into()),
        Way::Local | Way::Remote => {}
    }
    let snat_port_be = commit()?;
    let how = How {
        next,
        snat_port_be,
        option: with_option(pkt, v, first),
        event,
        local,
    };
    deliver::<C, false>(ctx, pkt, v, &how)
}

/// [`send`] in a slow program: the flow is `w.delivery.v`, and the
/// sending is left to a function verified apart (`Globals::deliver`).
#[inline(always)]
fn send_slow<C: Globals>(
    ctx: &C,
    pkt: &Packet,
    w: &mut SlowWork,
    first: bool,
    event: SvcEvent,
    local: Counter,
    commit: impl FnOnce() -> Result<u16, Counter>,
) -> Path {
    let next = next(ctx, pkt, &w.delivery.v, first);
    match next.way {
        Way::Defer => return Ok(Done::pass(Counter::DeferredToTc)),
        Way::NoRoom => return Err(Counter::DsrNoRoom.into()),
        Way::Local | Way::Remote => {}
    }
    let snat_port_be = commit()?;
    let d = &mut w.delivery;
    d.how = How {
        next,
        snat_port_be,
        option: with_option(pkt, &d.v, first),
        event,
        local,
    };
    ctx.deliver(pkt, d)
}

/// How a client's packet of a flow leaves ([`deliver`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct How {
    /// Where it goes (`Way::Local`: up the stack, counted `local`).
    pub next: Next,
    /// Its SNAT port (network order).
    pub snat_port_be: u16,
    /// It carries the DSR option.
    pub option: bool,
    /// What the packet is to its Service.
    pub event: SvcEvent,
    /// The counter of a packet that goes up the stack.
    pub local: Counter,
}

/// A flow and how its packet leaves, for the slow programs' function
/// verified apart (`Globals::deliver`). Plain values only.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Delivery {
    /// The flow's FORWARD value.
    pub v: CtValue,
    pub how: How,
}

/// Rewrites a client's packet of flow `v` as `how` says and sends it on,
/// with the DSR option if asked (`APART`: in a function verified apart,
/// which calls no other).
#[inline(always)]
pub fn deliver<C: Globals, const APART: bool>(
    ctx: &C,
    pkt: &Packet,
    v: &CtValue,
    how: &How,
) -> Path {
    stats::service(v.svc_id, pkt.l3_len, how.event);
    nat::rewrite(ctx, pkt, Side::Dst, v.nat_addr_be, v.nat_port_be)?;
    if how.next.way != Way::Remote {
        return Ok(Done::pass(how.local));
    }
    if v.flags & CT_F_SNAT != 0 {
        nat::rewrite(ctx, pkt, Side::Src, v.peer_addr_be, how.snat_port_be)?;
    }
    if how.option {
        // The option names the frontend the client addressed.
        if APART {
            dsr::insert(ctx, pkt.daddr_be, pkt.dport_be)?;
        } else {
            ctx.dsr_insert(pkt.daddr_be, pkt.dport_be)?;
        }
    }
    Ok(out(ctx, how.next.route, Counter::Forwarded))
}

/// The packet leaves by `route` if it can; otherwise the kernel forwards it.
#[inline(always)]
pub fn out(ctx: &impl Ctx, route: Route, counter: Counter) -> Done {
    match route {
        r if matches!(r.via, Via::Out | Via::NoNeigh) && fib::prepare(ctx) => {
            Done::send(counter, route)
        }
        _ => Done::pass(Counter::ForwardedByKernel),
    }
}

/// A backend's reply to a SNATed flow: back to the client, from the frontend.
#[inline(always)]
fn snat_reply<C: Globals>(ctx: &C, pkt: &Packet, r: &Reply) -> Path {
    let v = &r.v;
    let flow = fib::flow_of(ctx, v.nat_addr_be, v.peer_addr_be, pkt.proto);
    let route = ctx.route(&flow);
    if C::XDP && route.via == Via::NoNeigh {
        return Ok(Done::pass(Counter::DeferredToTc));
    }
    conntrack::seen(r.entry, pkt, conntrack::now());
    stats::service(v.svc_id, pkt.l3_len, SvcEvent::Packet);
    nat::rewrite(ctx, pkt, Side::Src, v.nat_addr_be, v.nat_port_be)?;
    nat::rewrite(ctx, pkt, Side::Dst, v.peer_addr_be, v.peer_port_be)?;
    Ok(out(ctx, route, Counter::SnatReply))
}

/// An ICMP error addressed to the SNAT address about a SNATed flow (a hop
/// towards the backend could not take the packet): back to the client, its
/// quote showing what the client sent (client → frontend).
#[inline(always)]
pub fn icmp_to_snat_client<C: Ctx>(ctx: &C) -> Path {
    let Some(e) = icmp::parse(ctx) else {
        return Ok(Done::NOT_OURS);
    };
    if CONFIG
        .get(0)
        .is_none_or(|c| c.snat_addr_be == 0 || c.snat_addr_be != e.outer_daddr_be)
    {
        return Ok(Done::NOT_OURS);
    }
    let Some(r) = conntrack::lookup_quoted(&e) else {
        return Ok(Done::NOT_OURS);
    };
    let v = r.v;
    if v.flags & CT_F_SNAT == 0 {
        return Ok(Done::NOT_OURS);
    }
    let from_backend = e.outer_saddr_be == e.daddr_be;
    let saddr_be = if from_backend {
        v.nat_addr_be
    } else {
        e.outer_saddr_be
    };
    let route = fib::lookup(
        ctx,
        &fib::flow_of(ctx, saddr_be, v.peer_addr_be, proto::ICMP),
    );
    if C::XDP && route.via == Via::NoNeigh {
        return Ok(Done::pass(Counter::DeferredToTc));
    }
    icmp::rewrite_inner(ctx, &e, Side::Src, v.peer_addr_be, v.peer_port_be)?;
    icmp::rewrite_inner(ctx, &e, Side::Dst, v.nat_addr_be, v.nat_port_be)?;
    icmp::rewrite_outer(ctx, &e, Side::Dst, v.peer_addr_be)?;
    if from_backend {
        icmp::rewrite_outer(ctx, &e, Side::Src, v.nat_addr_be)?;
    }
    Ok(out(ctx, route, Counter::IcmpTranslated))
}
