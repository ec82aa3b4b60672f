//! East-west: what pods send and what is delivered to them, on pod-facing
//! interfaces (TC).
//!
//! - [`pod_ingress`] (`tc_pod_ingress`, what a pod sends): a packet to a
//!   ClusterIP follows its flow or selects a backend and is DNATed (or
//!   rejected with ICMP when the Service has no endpoint, or sent straight
//!   back into the pod when it is its own backend: hairpin); a packet to
//!   anything else may be a reply that needs translating here (external
//!   flows' replies, hairpin replies).
//! - [`pod_egress`] (`tc_pod_egress`, what is delivered to a pod): replies
//!   get the frontend back as their source; ICMP errors about translated
//!   flows get their quote translated back.
//!
//! Established flows and replies take the inline fast paths; new flows and
//! handshakes go to a program of their own ([`slow_path`], `tc_pod_slow`,
//! by a tail call).

use aya_ebpf::programs::TcContext;
use aya_log_ebpf::debug;
use proxy_common::{
    CT_F_COUNTED, CT_F_DSR, CT_F_EXTERNAL, CT_F_HAIRPIN, Counter, CtValue, NODE_F_EXTERNAL,
    maps::slow, scope,
};

use crate::{
    conntrack::{self, Kind},
    external, fib,
    global::{self, Globals},
    icmp, lookup,
    maps::CONFIG,
    nat::{self, Side},
    parse::{self, Packet},
    stats::{self, SvcEvent},
    verdict::{Done, Leave, Path},
};

/// A packet a pod sends.
#[inline(always)]
pub fn pod_ingress(ctx: &TcContext) -> Path {
    let Some(pkt) = parse::parse(ctx)? else {
        return Ok(Done::NOT_OURS);
    };
    let Some(svc) = lookup::service(&pkt, scope::INTERNAL) else {
        return external_reply(ctx, &pkt);
    };
    // A LoadBalancer IP seen from inside: its source ranges hold here too.
    if !lookup::source_allowed(&svc, &pkt) {
        return Err(Counter::SourceRangeDenied.into());
    }
    // A SYN is a new connection (`conntrack::open`); it never looks here.
    if !pkt.tcp_syn_only
        && let Some(t) = conntrack::established(&pkt)
    {
        let now = conntrack::now();
        let v = t.value();
        // A flow tracked for another Service (address reused) starts anew;
        // UDP flows to departed backends are removed by the agent.
        if v.svc_id == svc.svc_id && !(conntrack::closing(&v) && conntrack::superseded(&pkt)) {
            conntrack::seen(t.entry, &pkt, now);
            return to_backend(ctx, &pkt, &v, SvcEvent::Packet, Counter::Established);
        }
    }
    ctx.hand_over(slow::POD, Some((&pkt, &svc)))
}

/// Sends a client's packet of flow `v` (its FORWARD value) to its backend,
/// counted `counter`: DNATed, or for a hairpin flow sent back into the pod.
#[inline(always)]
fn to_backend(
    ctx: &TcContext,
    pkt: &Packet,
    v: &CtValue,
    event: SvcEvent,
    counter: Counter,
) -> Path {
    stats::service(v.svc_id, pkt.l3_len, event);
    if v.flags & CT_F_HAIRPIN != 0 {
        return hairpin(
            ctx,
            pkt,
            (v.peer_addr_be, v.peer_port_be),
            (v.nat_addr_be, v.nat_port_be),
        );
    }
    nat::rewrite(ctx, pkt, Side::Dst, v.nat_addr_be, v.nat_port_be)?;
    Ok(Done::pass(counter))
}

/// The slow program's packet (`tc_pod_slow`): a pod's packet to a
/// ClusterIP (or an external frontend seen from inside) that is no
/// established flow's, handed over by `pod_ingress` untouched: a half-open
/// flow's (the packet completing the handshake moves it to `CONNTRACK`), or
/// a new flow, which selects a backend.
#[inline(always)]
pub fn slow_path(ctx: &TcContext) -> Path {
    let w = global::work()?;
    if w.handed == 0 {
        return Err(Counter::Internal.into());
    }
    // Copied out: the work area's other slots are written below.
    let (pkt, svc_id) = (w.pkt, w.svc.svc_id);
    let pkt = &pkt;
    let now = conntrack::now();
    if !pkt.tcp_syn_only && global::peek(pkt, svc_id, &mut w.peek) {
        let v = global::follow(pkt, now)?;
        return to_backend(ctx, pkt, &v, SvcEvent::Packet, w.peek.counter);
    }
    if !global::choose(svc_id, &pkt.tuple(), now, &mut w.choice)? {
        if !pkt.l4 {
            // Its first fragment was refused already.
            return Err(Counter::Fragment.into());
        }
        debug!(ctx, "svc {} has no endpoints: rejecting", svc_id);
        stats::service(svc_id, pkt.l3_len, SvcEvent::Rejected);
        ctx.reject(pkt)?;
        return Ok(Done::bounce(Counter::RejectNoEndpoints));
    }
    let o = &mut w.open;
    o.kind = Kind::Plain;
    o.flags = if w.choice.counted { CT_F_COUNTED } else { 0 };
    o.replies_here = true;
    o.svc_id = svc_id;
    o.backend_id = w.choice.backend_id;
    o.backend = w.choice.backend;
    o.peer_addr_be = 0;
    o.now = now;
    let v = &mut w.delivery.v;
    *v = CtValue {
        nat_addr_be: o.backend.addr_be,
        nat_port_be: o.backend.port_be,
        backend_id: o.backend_id,
        svc_id,
        ..conntrack::ZERO
    };
    if o.backend.addr_be == pkt.saddr_be {
        // The pod is its own backend: hairpin. Its packets come from an
        // address whose replies are looked up (a ClusterIP).
        o.kind = Kind::Hairpin;
        o.flags |= CT_F_HAIRPIN;
        o.peer_addr_be = hairpin_source(pkt.daddr_be);
        v.peer_addr_be = o.peer_addr_be;
        v.peer_port_be = pkt.sport_be;
    }
    v.flags = o.flags;
    global::open(pkt, &w.open, &mut w.opened)?;
    if w.opened.again {
        // A retransmitted SYN: on to the backend its flow has (refreshed).
        return to_backend(
            ctx,
            pkt,
            &w.opened.v,
            SvcEvent::Packet,
            Counter::Established,
        );
    }
    to_backend(ctx, pkt, &w.delivery.v, SvcEvent::NewFlow, Counter::NewFlow)
}

/// A pod's packet to a non-service address:port may be a reply that needs
/// its translation here: a backend's reply to an external client (a local
/// backend of a NodePort, or a DSR flow: its source becomes the frontend
/// again and it goes straight to the client), or a hairpin reply (addressed
/// to a frontend address: back into the pod as the frontend's answer).
/// Conntrack is only consulted when one of them is possible.
#[inline(always)]
fn external_reply(ctx: &TcContext, pkt: &Packet) -> Path {
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(Done::NOT_OURS);
    };
    let daddr = u32::from_be(pkt.daddr_be);
    let hairpin_possible = cfg.vip_min <= daddr && daddr <= cfg.vip_max;
    if cfg.flags & NODE_F_EXTERNAL == 0 && !hairpin_possible {
        return Ok(Done::NOT_OURS);
    }
    let Some(r) = conntrack::lookup_reply(pkt) else {
        return Ok(Done::NOT_OURS);
    };
    let v = r.v;
    if v.flags & CT_F_HAIRPIN != 0 {
        conntrack::seen(r.entry, pkt, conntrack::now());
        stats::service(v.svc_id, pkt.l3_len, SvcEvent::Packet);
        return hairpin(
            ctx,
            pkt,
            (v.nat_addr_be, v.nat_port_be),
            (v.peer_addr_be, v.peer_port_be),
        );
    }
    if v.flags & CT_F_EXTERNAL == 0 {
        return Ok(Done::NOT_OURS);
    }
    conntrack::seen(r.entry, pkt, conntrack::now());
    // The route from the translated source: sent straight out, not through
    // the kernel's input path (which refuses a node address as the source of
    // a packet from a pod, and may filter the reverse path of a DSR reply).
    let flow = fib::flow_of(ctx, v.nat_addr_be, pkt.daddr_be, pkt.proto);
    let route = ctx.route(&flow);
    nat::rewrite(ctx, pkt, Side::Src, v.nat_addr_be, v.nat_port_be)?;
    if v.svc_id != 0 {
        stats::service(v.svc_id, pkt.l3_len, SvcEvent::Packet);
    }
    let counter = if v.flags & CT_F_DSR != 0 {
        Counter::DsrReply
    } else {
        Counter::ExternalReply
    };
    // Forwarded by the kernel when it cannot be sent by the route: still
    // counted as the reply it is.
    let done = external::out(ctx, route, counter);
    Ok(if done.leave == Leave::Send {
        done
    } else {
        Done::pass(counter)
    })
}

/// Sends a hairpin packet back into the pod it came from, from `src` to
/// `dst` (address, port; network order): the client's packets go to the
/// backend from the frontend address, replies to the client from the frontend.
#[inline(always)]
fn hairpin(ctx: &TcContext, pkt: &Packet, src: (u32, u16), dst: (u32, u16)) -> Path {
    nat::rewrite(ctx, pkt, Side::Dst, dst.0, dst.1)?;
    nat::rewrite(ctx, pkt, Side::Src, src.0, src.1)?;
    nat::swap_macs(ctx)?;
    Ok(Done::bounce(Counter::Hairpin))
}

/// The source a hairpinned pod sees: the frontend when it is a ClusterIP,
/// else (a NodePort, LoadBalancer IP or externalIP reached from inside) the
/// lowest ClusterIP, so the pod's replies fall in the range whose replies
/// are looked up ([`external_reply`]).
#[inline(always)]
fn hairpin_source(frontend_be: u32) -> u32 {
    let Some(cfg) = CONFIG.get(0) else {
        return frontend_be;
    };
    let frontend = u32::from_be(frontend_be);
    if (cfg.vip_min <= frontend && frontend <= cfg.vip_max) || cfg.vip_min > cfg.vip_max {
        frontend_be
    } else {
        cfg.vip_min.to_be()
    }
}

/// A packet delivered to a pod.
#[inline(always)]
pub fn pod_egress(ctx: &TcContext) -> Path {
    let Some(pkt) = parse::parse(ctx)? else {
        return icmp_to_client(ctx);
    };
    let Some(r) = conntrack::lookup_reply(&pkt) else {
        return Ok(Done::NOT_OURS);
    };
    conntrack::seen(r.entry, &pkt, conntrack::now());
    nat::rewrite(ctx, &pkt, Side::Src, r.v.nat_addr_be, r.v.nat_port_be)?;
    stats::service(r.v.svc_id, pkt.l3_len, SvcEvent::Packet);
    Ok(Done::pass(Counter::ReplyNat))
}

/// An ICMP error on its way to a pod about a packet that pod sent to a
/// service (the quote shows the backend): the quote gets the frontend back,
/// and an error from the backend itself the frontend as its source.
#[inline(always)]
fn icmp_to_client(ctx: &TcContext) -> Path {
    let Some(e) = icmp::parse(ctx) else {
        return Ok(Done::NOT_OURS);
    };
    let Some(r) = conntrack::lookup_quoted(&e) else {
        return Ok(Done::NOT_OURS);
    };
    let v = r.v;
    icmp::rewrite_inner(ctx, &e, Side::Dst, v.nat_addr_be, v.nat_port_be)?;
    if e.outer_saddr_be == e.daddr_be {
        icmp::rewrite_outer(ctx, &e, Side::Src, v.nat_addr_be)?;
    }
    Ok(Done::pass(Counter::IcmpTranslated))
}
