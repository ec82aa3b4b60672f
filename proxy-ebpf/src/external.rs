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
//!     the frontend in an IPv4 option (on TCP SYNs and every UDP datagram),
//!     and leaves at once after a FIB lookup; the backend's node answers the
//!     client itself;
//!   - remote backend, SNAT: the source becomes this node's address and a
//!     port no other flow to that backend uses; leaves after a FIB lookup.
//! - A reply to a SNATed flow (addressed to the SNAT address) is translated
//!   back and sent to the client the same way.
//! - A packet with the DSR option (this node hosts the backend) teaches
//!   conntrack the flow, then goes up the stack untouched, if the option
//!   names an external frontend here and the packet goes to a local backend
//!   of it; otherwise it is dropped (`dsr_refused`).
//!
//! When the next hop's MAC is unknown, XDP leaves the packet untouched for
//! TC, which has the kernel resolve it (`bpf_redirect_neigh`).

use proxy_common::{
    BACKEND_F_LOCAL, CT_F_COUNTED, CT_F_DSR, CT_F_EXTERNAL, CT_F_REMOTE, CT_F_SNAT, Counter,
    CtValue, DSR_OPT_LEN, SVC_F_DSR, ServiceKey, ServiceValue, proto, scope,
};

use crate::{
    conntrack::{self, NewFlow, Table},
    ctx::Ctx,
    dsr,
    fib::{self, Route, Via},
    icmp, lookup,
    maps::CONFIG,
    nat::{self, Side},
    parse::{self, Packet},
    reject, select,
    stats::{self, SvcEvent},
    verdict::Done,
};

/// Handles one packet arriving on an external interface.
#[inline(always)]
pub fn handle(ctx: &impl Ctx) -> Result<Done, Counter> {
    let Some(pkt) = parse::parse(ctx)? else {
        return icmp_to_snat_client(ctx);
    };
    if let Some(svc) = lookup::service(&pkt, scope::EXTERNAL) {
        return frontend(ctx, &pkt, &svc);
    }
    if let Some(cfg) = CONFIG.get(0)
        && cfg.snat_addr_be != 0
        && pkt.daddr_be == cfg.snat_addr_be
        && let Some(entry) = conntrack::lookup_reply(&pkt)
    {
        // SAFETY: a valid map value pointer for this run; copied out.
        let v = unsafe { *entry };
        if v.flags & CT_F_SNAT != 0 {
            return snat_reply(ctx, &pkt, entry, &v);
        }
    }
    if let Some((addr_be, port_be)) = dsr::option(ctx, &pkt) {
        return dsr_arrival(&pkt, addr_be, port_be);
    }
    Ok(Done::NOT_OURS)
}

/// A packet with the DSR option, addressed to a backend on this node: its
/// flow is learned when the option names an external frontend here of the
/// packet's protocol and the packet goes to a local backend of that
/// frontend's Service; anything else is dropped, nothing learned (a forged
/// option could otherwise give a pod's replies any source, or fill
/// conntrack). Known flows (every UDP datagram carries the option) are only
/// refreshed.
#[inline(always)]
fn dsr_arrival(pkt: &Packet, addr_be: u32, port_be: u16) -> Result<Done, Counter> {
    let now = conntrack::now();
    if !conntrack::dsr_known(pkt, addr_be, port_be, now) {
        let svc = dsr_frontend(pkt, addr_be, port_be).ok_or(Counter::DsrRefused)?;
        if !select::has_local_backend(svc.svc_id, pkt.daddr_be, pkt.dport_be) {
            return Err(Counter::DsrRefused);
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

/// Where a client's packet goes once translated, looked up before anything
/// changes: `None` when XDP should leave it to TC (next hop unknown).
#[inline(always)]
fn route_for<C: Ctx>(ctx: &C, pkt: &Packet, v: &CtValue, option: bool) -> Option<Route> {
    let saddr_be = if v.flags & CT_F_SNAT != 0 {
        v.peer_addr_be
    } else {
        pkt.saddr_be
    };
    let mut flow = fib::flow_of(ctx, saddr_be, v.nat_addr_be, pkt.proto);
    if option {
        flow.tot_len = flow.tot_len.wrapping_add(u16::from(DSR_OPT_LEN));
    }
    let route = fib::lookup(ctx, &flow);
    match route {
        r if C::XDP && r.via == Via::NoNeigh => None,
        r => Some(r),
    }
}

/// A packet to an external frontend.
#[inline(always)]
fn frontend(ctx: &impl Ctx, pkt: &Packet, svc: &ServiceValue) -> Result<Done, Counter> {
    if !lookup::source_allowed(svc, pkt) {
        return Err(Counter::SourceRangeDenied);
    }
    let now = conntrack::now();
    let tracked = conntrack::lookup_forward(pkt);
    if let Some(t) = tracked {
        let v = t.value();
        if v.svc_id == svc.svc_id && conntrack::continues(&v, pkt) {
            return send(
                ctx,
                pkt,
                &v,
                t.completes(pkt),
                SvcEvent::Packet,
                t.path(pkt),
                || t.follow(pkt, now).map(|v| v.peer_port_be),
            );
        }
    }
    let Some(choice) = select::select(svc.svc_id, &pkt.tuple(), now)? else {
        if !pkt.l4 {
            // Its first fragment was refused already.
            return Err(Counter::Fragment);
        }
        // As for ClusterIPs (and kube-proxy's REJECT): the client fails fast.
        stats::service(svc.svc_id, pkt.l3_len, SvcEvent::Rejected);
        reject::reject(ctx, pkt)?;
        return Ok(Done::bounce(Counter::NoEndpointsExternal));
    };
    let (backend_id, backend) = (choice.backend_id, choice.backend);
    let mut v = CtValue {
        nat_addr_be: backend.addr_be,
        nat_port_be: backend.port_be,
        flags: CT_F_EXTERNAL | if choice.counted { CT_F_COUNTED } else { 0 },
        ..CtValue::default()
    };
    let local = backend.flags & BACKEND_F_LOCAL != 0;
    if !local {
        v.flags |= CT_F_REMOTE;
        if svc.flags & SVC_F_DSR != 0 && dsr::fits(pkt) {
            v.flags |= CT_F_DSR;
        } else {
            let cfg = CONFIG.get(0).ok_or(Counter::SnatPortsExhausted)?;
            if cfg.snat_addr_be == 0 {
                return Err(Counter::SnatPortsExhausted);
            }
            v.flags |= CT_F_SNAT;
            v.peer_addr_be = cfg.snat_addr_be;
        }
    }
    let flow = NewFlow {
        pkt,
        svc_id: svc.svc_id,
        backend_id,
        backend: &backend,
        flags: v.flags,
        // Under DSR the reply never comes back here: no REPLY entry.
        replies_here: v.flags & CT_F_DSR == 0,
        table: Table::for_new(pkt, tracked),
        now,
    };
    send(
        ctx,
        pkt,
        &v,
        false,
        SvcEvent::NewFlow,
        Counter::NewFlow,
        || {
            if v.flags & CT_F_SNAT != 0 {
                let cfg = CONFIG.get(0).ok_or(Counter::SnatPortsExhausted)?;
                conntrack::create_snat(&flow, v.peer_addr_be, cfg.snat_port_min, cfg.snat_port_max)
            } else {
                conntrack::create(&flow).map(|()| 0)
            }
        },
    )
}

/// Whether a client's packet carries the DSR option: a TCP SYN, the packet
/// that completes the handshake (`completes`: the backend's node moves the
/// flow it learned to its main table), every UDP datagram.
#[inline(always)]
fn with_option(pkt: &Packet, v: &CtValue, completes: bool) -> bool {
    v.flags & CT_F_DSR != 0 && (pkt.tcp_syn_only || completes || pkt.proto == proto::UDP)
}

/// Where a flow's packet goes.
#[derive(Clone, Copy)]
enum Next {
    /// Up the stack, to a local backend.
    Local,
    /// To a remote backend, by this route.
    Remote(Route),
    /// XDP leaves it to TC (next hop unresolved).
    Defer,
    /// The DSR option does not fit the route's MTU.
    NoRoom,
}

/// Where a flow's packet goes, decided before anything changes.
#[inline(always)]
fn next(ctx: &impl Ctx, pkt: &Packet, v: &CtValue, completes: bool) -> Next {
    if v.flags & CT_F_REMOTE == 0 {
        return Next::Local;
    }
    let option = with_option(pkt, v, completes);
    match route_for(ctx, pkt, v, option) {
        Some(r) if option && r.via == Via::TooBig => Next::NoRoom,
        Some(r) => Next::Remote(r),
        None => Next::Defer,
    }
}

/// Translates a client's packet as its flow says and sends it on. Where it
/// goes is decided first: nothing is recorded (`commit`, which returns the
/// flow's SNAT port) for a packet XDP leaves to TC, which decides anew.
/// `completes`: the packet completes the flow's handshake.
#[inline(always)]
fn send(
    ctx: &impl Ctx,
    pkt: &Packet,
    v: &CtValue,
    completes: bool,
    event: SvcEvent,
    local: Counter,
    commit: impl FnOnce() -> Result<u16, Counter>,
) -> Result<Done, Counter> {
    let route = match next(ctx, pkt, v, completes) {
        Next::Local => None,
        Next::Remote(r) => Some(r),
        Next::Defer => return Ok(Done::pass(Counter::DeferredToTc)),
        Next::NoRoom => return Err(Counter::DsrNoRoom),
    };
    let snat_port_be = commit()?;
    let option = with_option(pkt, v, completes);
    stats::service(v.svc_id, pkt.l3_len, event);
    nat::rewrite(ctx, pkt, Side::Dst, v.nat_addr_be, v.nat_port_be)?;
    let Some(route) = route else {
        return Ok(Done::pass(local));
    };
    if v.flags & CT_F_SNAT != 0 {
        nat::rewrite(ctx, pkt, Side::Src, v.peer_addr_be, snat_port_be)?;
    }
    if option {
        // The option names the frontend the client addressed.
        dsr::insert(ctx, pkt.daddr_be, pkt.dport_be)?;
    }
    Ok(out(ctx, route, Counter::Forwarded))
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
fn snat_reply<C: Ctx>(
    ctx: &C,
    pkt: &Packet,
    entry: *mut CtValue,
    v: &CtValue,
) -> Result<Done, Counter> {
    let flow = fib::flow_of(ctx, v.nat_addr_be, v.peer_addr_be, pkt.proto);
    let route = fib::lookup(ctx, &flow);
    if C::XDP && route.via == Via::NoNeigh {
        return Ok(Done::pass(Counter::DeferredToTc));
    }
    conntrack::seen(entry, pkt, conntrack::now());
    stats::service(v.svc_id, pkt.l3_len, SvcEvent::Packet);
    nat::rewrite(ctx, pkt, Side::Src, v.nat_addr_be, v.nat_port_be)?;
    nat::rewrite(ctx, pkt, Side::Dst, v.peer_addr_be, v.peer_port_be)?;
    Ok(out(ctx, route, Counter::SnatReply))
}

/// An ICMP error addressed to the SNAT address about a SNATed flow (a hop
/// towards the backend could not take the packet): back to the client, its
/// quote showing what the client sent (client → frontend).
#[inline(always)]
fn icmp_to_snat_client<C: Ctx>(ctx: &C) -> Result<Done, Counter> {
    let Some(e) = icmp::parse(ctx) else {
        return Ok(Done::NOT_OURS);
    };
    if CONFIG
        .get(0)
        .is_none_or(|c| c.snat_addr_be == 0 || c.snat_addr_be != e.outer_daddr_be)
    {
        return Ok(Done::NOT_OURS);
    }
    let Some(entry) = conntrack::lookup_quoted(&e) else {
        return Ok(Done::NOT_OURS);
    };
    // SAFETY: a valid map value pointer for this run; copied out.
    let v = unsafe { *entry };
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
