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

use aya_ebpf::programs::TcContext;
use aya_log_ebpf::debug;
use proxy_common::{
    CT_F_COUNTED, CT_F_DSR, CT_F_EXTERNAL, CT_F_HAIRPIN, Counter, NODE_F_EXTERNAL, scope,
};

use crate::{
    conntrack::{self, NewFlow, Table},
    external, fib, icmp, lookup,
    maps::CONFIG,
    nat::{self, Side},
    parse::{self, Packet},
    reject, select,
    stats::{self, SvcEvent},
    verdict::{Done, Leave},
};

/// A packet a pod sends.
#[inline(always)]
pub fn pod_ingress(ctx: &TcContext) -> Result<Done, Counter> {
    let Some(pkt) = parse::parse(ctx)? else {
        return Ok(Done::NOT_OURS);
    };
    let Some(svc) = lookup::service(&pkt, scope::INTERNAL) else {
        return external_reply(ctx, &pkt);
    };
    // A LoadBalancer IP seen from inside: its source ranges hold here too.
    if !lookup::source_allowed(&svc, &pkt) {
        return Err(Counter::SourceRangeDenied);
    }
    dnat(ctx, &pkt, svc.svc_id)
}

/// A pod's packet to a non-service address:port may be a reply that needs
/// its translation here: a backend's reply to an external client (a local
/// backend of a NodePort, or a DSR flow: its source becomes the frontend
/// again and it goes straight to the client), or a hairpin reply (addressed
/// to a frontend address: back into the pod as the frontend's answer).
/// Conntrack is only consulted when one of them is possible.
#[inline(always)]
fn external_reply(ctx: &TcContext, pkt: &Packet) -> Result<Done, Counter> {
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(Done::NOT_OURS);
    };
    let daddr = u32::from_be(pkt.daddr_be);
    let hairpin_possible = cfg.vip_min <= daddr && daddr <= cfg.vip_max;
    if cfg.flags & NODE_F_EXTERNAL == 0 && !hairpin_possible {
        return Ok(Done::NOT_OURS);
    }
    let Some(entry) = conntrack::lookup_reply(pkt) else {
        return Ok(Done::NOT_OURS);
    };
    // SAFETY: a valid map value pointer for this run; copied out.
    let v = unsafe { *entry };
    if v.flags & CT_F_HAIRPIN != 0 {
        conntrack::seen(entry, pkt, conntrack::now());
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
    conntrack::seen(entry, pkt, conntrack::now());
    // The route from the translated source: sent straight out, not through
    // the kernel's input path (which refuses a node address as the source of
    // a packet from a pod, and may filter the reverse path of a DSR reply).
    let flow = fib::flow_of(ctx, v.nat_addr_be, pkt.daddr_be, pkt.proto);
    let route = fib::lookup(ctx, &flow);
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
fn hairpin(
    ctx: &TcContext,
    pkt: &Packet,
    src: (u32, u16),
    dst: (u32, u16),
) -> Result<Done, Counter> {
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

/// Sends a packet addressed to a frontend of `svc_id` to its backend: the
/// tracked one for a known flow, a newly selected one otherwise.
#[inline(always)]
fn dnat(ctx: &TcContext, pkt: &Packet, svc_id: u32) -> Result<Done, Counter> {
    let now = conntrack::now();
    let tracked = conntrack::lookup_forward(pkt);
    // A flow tracked for another Service (address reused) starts anew, as
    // does a SYN after the client closed (`continues`). UDP flows to
    // departed backends are removed by the agent.
    if let Some(t) = tracked
        && t.value().svc_id == svc_id
        && conntrack::continues(&t.value(), pkt)
    {
        let counter = t.path(pkt);
        let v = t.follow(pkt, now)?;
        stats::service(svc_id, pkt.l3_len, SvcEvent::Packet);
        if v.flags & CT_F_HAIRPIN != 0 {
            return hairpin(
                ctx,
                pkt,
                (v.peer_addr_be, v.peer_port_be),
                (v.nat_addr_be, v.nat_port_be),
            );
        }
        nat::rewrite(ctx, pkt, Side::Dst, v.nat_addr_be, v.nat_port_be)?;
        return Ok(Done::pass(counter));
    }
    let Some(choice) = select::select(svc_id, &pkt.tuple(), now)? else {
        if !pkt.l4 {
            // Its first fragment was refused already.
            return Err(Counter::Fragment);
        }
        debug!(ctx, "svc {} has no endpoints: rejecting", svc_id);
        stats::service(svc_id, pkt.l3_len, SvcEvent::Rejected);
        reject::reject(ctx, pkt)?;
        return Ok(Done::bounce(Counter::RejectNoEndpoints));
    };
    let backend = choice.backend;
    let mut flow = NewFlow {
        pkt,
        svc_id,
        backend_id: choice.backend_id,
        backend: &backend,
        flags: if choice.counted { CT_F_COUNTED } else { 0 },
        replies_here: true,
        table: Table::for_new(pkt, tracked),
        now,
    };
    if backend.addr_be == pkt.saddr_be {
        // The pod is its own backend: hairpin. Its packets come from an
        // address whose replies are looked up (a ClusterIP).
        flow.flags |= CT_F_HAIRPIN;
        let via_be = hairpin_source(pkt.daddr_be);
        conntrack::create_hairpin(&flow, via_be)?;
        stats::service(svc_id, pkt.l3_len, SvcEvent::NewFlow);
        return hairpin(
            ctx,
            pkt,
            (via_be, pkt.sport_be),
            (backend.addr_be, backend.port_be),
        );
    }
    conntrack::create(&flow)?;
    nat::rewrite(ctx, pkt, Side::Dst, backend.addr_be, backend.port_be)?;
    stats::service(svc_id, pkt.l3_len, SvcEvent::NewFlow);
    Ok(Done::pass(Counter::NewFlow))
}

/// A packet delivered to a pod.
#[inline(always)]
pub fn pod_egress(ctx: &TcContext) -> Result<Done, Counter> {
    let Some(pkt) = parse::parse(ctx)? else {
        return icmp_to_client(ctx);
    };
    let Some(entry) = conntrack::lookup_reply(&pkt) else {
        return Ok(Done::NOT_OURS);
    };
    // SAFETY: entry is a valid map value pointer for this run.
    let (addr_be, port_be, svc_id) =
        unsafe { ((*entry).nat_addr_be, (*entry).nat_port_be, (*entry).svc_id) };
    conntrack::seen(entry, &pkt, conntrack::now());
    nat::rewrite(ctx, &pkt, Side::Src, addr_be, port_be)?;
    stats::service(svc_id, pkt.l3_len, SvcEvent::Packet);
    Ok(Done::pass(Counter::ReplyNat))
}

/// An ICMP error on its way to a pod about a packet that pod sent to a
/// service (the quote shows the backend): the quote gets the frontend back,
/// and an error from the backend itself the frontend as its source.
#[inline(always)]
fn icmp_to_client(ctx: &TcContext) -> Result<Done, Counter> {
    let Some(e) = icmp::parse(ctx) else {
        return Ok(Done::NOT_OURS);
    };
    let Some(entry) = conntrack::lookup_quoted(&e) else {
        return Ok(Done::NOT_OURS);
    };
    // SAFETY: a valid map value pointer for this run; copied out.
    let v = unsafe { *entry };
    icmp::rewrite_inner(ctx, &e, Side::Dst, v.nat_addr_be, v.nat_port_be)?;
    if e.outer_saddr_be == e.daddr_be {
        icmp::rewrite_outer(ctx, &e, Side::Src, v.nat_addr_be)?;
    }
    Ok(Done::pass(Counter::IcmpTranslated))
}
