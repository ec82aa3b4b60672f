//! proxy-ebpf: Kubernetes Service load balancing in TC (tcx).
//!
//! Packet paths (see docs/ARCHITECTURE.md):
//! - `tc_pod_ingress`, on pod-facing interfaces, sees what pods send:
//!   parse → service lookup → conntrack → select → DNAT (or ICMP reject).
//! - `tc_pod_egress`, on the same interfaces, sees what is delivered to pods:
//!   parse → conntrack reply lookup → reverse NAT.
//!
//! - `xdp_ext`, on external interfaces, sees what arrives from outside the
//!   node: NodePort/LoadBalancer/externalIP frontends, SNAT replies and DSR
//!   options (see `external.rs`).
//!
//! Everything that is not a service's traffic returns `TCX_NEXT` (or
//! `XDP_PASS`) untouched, so programs attached after ours (a CNI's) keep working.
#![no_std]
#![no_main]
// Atomic adds (`select::add_one`): core has no atomics for the BPF target.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "the atomic add intrinsic")
)]

mod bench;
mod conntrack;
mod csum;
mod ctx;
mod dsr;
mod external;
mod fib;
mod icmp;
mod lookup;
mod maps;
mod nat;
mod parse;
mod reject;
mod select;
mod stats;

use aya_ebpf::{
    bindings::{
        bpf_redir_neigh,
        tcx_action_base::{TCX_DROP, TCX_NEXT},
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::generated::{bpf_redirect, bpf_redirect_neigh},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::{debug, warn};
use proxy_common::{
    CT_F_COUNTED, CT_F_DSR, CT_F_EXTERNAL, CT_F_HAIRPIN, Counter, NODE_F_EXTERNAL, Verdict, scope,
};

use crate::{
    conntrack::NewFlow,
    ctx::Ctx,
    fib::{Route, Via},
    maps::CONFIG,
    nat::Side,
    parse::Packet,
    stats::SvcEvent,
};

/// Frontend → backend: DNAT of pods' packets to service frontends.
#[classifier]
pub fn tc_pod_ingress(ctx: TcContext) -> i32 {
    finish(&ctx, pod_ingress(&ctx))
}

/// Backend → client: reverse NAT of replies delivered to pods.
#[classifier]
pub fn tc_pod_egress(ctx: TcContext) -> i32 {
    finish(&ctx, pod_egress(&ctx))
}

/// North-south: external frontends, SNAT replies, DSR options.
#[xdp]
pub fn xdp_ext(ctx: XdpContext) -> u32 {
    match external::handle(&ctx) {
        Ok(external::Done::NotOurs) => XDP_PASS,
        Ok(external::Done::Pass(counter)) => {
            stats::count(counter);
            XDP_PASS
        }
        Ok(external::Done::Send(counter, route)) => {
            stats::count(counter);
            match route.via {
                Via::Out if route.ifindex == Ctx::ingress_ifindex(&ctx) => XDP_TX,
                // SAFETY: helper with plain arguments.
                Via::Out => unsafe { bpf_redirect(route.ifindex, 0) as u32 },
                // `external` leaves unresolved next hops to TC.
                Via::NoNeigh | Via::TooBig | Via::Kernel => XDP_PASS,
            }
        }
        Err(reason) => {
            stats::count(reason);
            match reason.verdict() {
                Verdict::Failed => {
                    warn!(&ctx, "packet dropped, reason {}", reason as u32);
                    XDP_DROP
                }
                Verdict::Dropped => XDP_DROP,
                Verdict::Passed | Verdict::Handled => XDP_PASS,
            }
        }
    }
}

/// Passes everything. For the far end of a veth whose near end runs
/// `xdp_ext`: frames XDP sends into a veth (XDP_TX, redirect) are only
/// received when the peer has an XDP program of its own.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// North-south where XDP does not finish the job: packets XDP left to TC
/// (next hop unresolved), or every packet where XDP is not attached.
#[classifier]
pub fn tc_ext_ingress(ctx: TcContext) -> i32 {
    let done = external::handle(&ctx).map(|d| match d {
        external::Done::NotOurs => Done::NotOurs,
        external::Done::Pass(counter) => Done::Translated(counter),
        external::Done::Send(counter, route) => Done::Redirected(counter, tc_send(route)),
    });
    finish(&ctx, done)
}

/// Sends a packet prepared for `route` from TC.
#[inline(always)]
fn tc_send(route: Route) -> i32 {
    match route.via {
        // SAFETY: helper with plain arguments.
        Via::Out => unsafe { bpf_redirect(route.ifindex, 0) as i32 },
        Via::NoNeigh => {
            let mut nh = bpf_redir_neigh {
                nh_family: 2, // AF_INET
                __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                    ipv4_nh: route.nh_be,
                },
            };
            // SAFETY: `nh` is a valid next-hop description of the size given.
            unsafe {
                bpf_redirect_neigh(
                    route.ifindex,
                    &raw mut nh,
                    size_of::<bpf_redir_neigh>() as i32,
                    0,
                ) as i32
            }
        }
        // `external::out` sends only the two above; anything else goes on.
        Via::TooBig | Via::Kernel => TCX_NEXT,
    }
}

/// How a handled packet leaves the program.
enum Done {
    /// Not a service's packet: untouched.
    NotOurs,
    /// Translated; continue through the stack. The counter names the path.
    Translated(Counter),
    /// Turned into a reply and redirected (TC action given).
    Redirected(Counter, i32),
}

#[inline(always)]
fn finish(ctx: &TcContext, result: Result<Done, Counter>) -> i32 {
    match result {
        Ok(Done::NotOurs) => TCX_NEXT,
        Ok(Done::Translated(counter)) => {
            stats::count(counter);
            TCX_NEXT
        }
        Ok(Done::Redirected(counter, action)) => {
            stats::count(counter);
            action
        }
        Err(reason) => {
            stats::count(reason);
            match reason.verdict() {
                Verdict::Failed => {
                    // Internal failures, never routine: worth a log line.
                    warn!(ctx, "packet dropped, reason {}", reason as u32);
                    TCX_DROP
                }
                Verdict::Dropped => TCX_DROP,
                Verdict::Passed | Verdict::Handled => TCX_NEXT,
            }
        }
    }
}

#[inline(always)]
fn pod_ingress(ctx: &TcContext) -> Result<Done, Counter> {
    let Some(pkt) = parse::parse(ctx)? else {
        return Ok(Done::NotOurs);
    };
    let Some(svc) = lookup::service(&pkt, scope::INTERNAL) else {
        return external_reply(ctx, &pkt);
    };
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
        return Ok(Done::NotOurs);
    };
    let daddr = u32::from_be(pkt.daddr_be);
    let hairpin_possible = cfg.vip_min <= daddr && daddr <= cfg.vip_max;
    if cfg.flags & NODE_F_EXTERNAL == 0 && !hairpin_possible {
        return Ok(Done::NotOurs);
    }
    let Some(entry) = conntrack::lookup(&conntrack::reply_key(pkt)) else {
        return Ok(Done::NotOurs);
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
        return Ok(Done::NotOurs);
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
    Ok(match external::out(ctx, route, counter) {
        external::Done::Send(counter, route) => Done::Redirected(counter, tc_send(route)),
        _ => Done::Translated(counter),
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
    let ifindex = Ctx::ingress_ifindex(ctx);
    // SAFETY: helper with plain arguments.
    let action = unsafe { bpf_redirect(ifindex, 0) as i32 };
    Ok(Done::Redirected(Counter::Hairpin, action))
}

/// Sends a packet addressed to a frontend of `svc_id` to its backend: the
/// tracked one for a known flow, a newly selected one otherwise.
#[inline(always)]
fn dnat(ctx: &TcContext, pkt: &Packet, svc_id: u32) -> Result<Done, Counter> {
    let now = conntrack::now();
    if let Some(entry) = conntrack::lookup(&conntrack::forward_key(pkt))
        // SAFETY: entry is a valid map value pointer for this run.
        && unsafe { (*entry).svc_id } == svc_id
    {
        // SAFETY: as above.
        let (addr_be, port_be) = unsafe { ((*entry).nat_addr_be, (*entry).nat_port_be) };
        // UDP flows to departed backends are removed by the agent. A flow
        // tracked for another Service (address reused) starts anew.
        // SAFETY: as above.
        if conntrack::continues(unsafe { &*entry }, pkt) {
            conntrack::seen(entry, pkt, now);
            // SAFETY: as above.
            let v = unsafe { *entry };
            if v.flags & CT_F_HAIRPIN != 0 {
                stats::service(svc_id, pkt.l3_len, SvcEvent::Packet);
                return hairpin(
                    ctx,
                    pkt,
                    (v.peer_addr_be, v.peer_port_be),
                    (addr_be, port_be),
                );
            }
            nat::rewrite(ctx, pkt, Side::Dst, addr_be, port_be)?;
            stats::service(svc_id, pkt.l3_len, SvcEvent::Packet);
            return Ok(Done::Translated(Counter::Established));
        }
    }
    let Some(choice) = select::select(svc_id, pkt, now)? else {
        debug!(ctx, "svc {} has no endpoints: rejecting", svc_id);
        stats::service(svc_id, pkt.l3_len, SvcEvent::Rejected);
        let action = reject::reject(ctx, pkt)?;
        return Ok(Done::Redirected(Counter::RejectNoEndpoints, action));
    };
    let backend = choice.backend;
    let mut flow = NewFlow {
        pkt,
        svc_id,
        backend_id: choice.backend_id,
        backend: &backend,
        flags: if choice.counted { CT_F_COUNTED } else { 0 },
        replies_here: true,
        now,
    };
    if backend.addr_be == pkt.saddr_be {
        // The pod is its own backend: hairpin.
        flow.flags |= CT_F_HAIRPIN;
        conntrack::create_hairpin(&flow)?;
        stats::service(svc_id, pkt.l3_len, SvcEvent::NewFlow);
        return hairpin(
            ctx,
            pkt,
            (pkt.daddr_be, pkt.sport_be),
            (backend.addr_be, backend.port_be),
        );
    }
    conntrack::create(&flow)?;
    nat::rewrite(ctx, pkt, Side::Dst, backend.addr_be, backend.port_be)?;
    stats::service(svc_id, pkt.l3_len, SvcEvent::NewFlow);
    Ok(Done::Translated(Counter::NewFlow))
}

#[inline(always)]
fn pod_egress(ctx: &TcContext) -> Result<Done, Counter> {
    let Some(pkt) = parse::parse(ctx)? else {
        return icmp_to_client(ctx);
    };
    let Some(entry) = conntrack::lookup(&conntrack::reply_key(&pkt)) else {
        return Ok(Done::NotOurs);
    };
    // SAFETY: entry is a valid map value pointer for this run.
    let (addr_be, port_be, svc_id) =
        unsafe { ((*entry).nat_addr_be, (*entry).nat_port_be, (*entry).svc_id) };
    conntrack::seen(entry, &pkt, conntrack::now());
    nat::rewrite(ctx, &pkt, Side::Src, addr_be, port_be)?;
    stats::service(svc_id, pkt.l3_len, SvcEvent::Packet);
    Ok(Done::Translated(Counter::ReplyNat))
}

/// An ICMP error on its way to a pod about a packet that pod sent to a
/// service (the quote shows the backend): the quote gets the frontend back,
/// and an error from the backend itself the frontend as its source.
#[inline(always)]
fn icmp_to_client(ctx: &TcContext) -> Result<Done, Counter> {
    let Some(e) = icmp::parse(ctx) else {
        return Ok(Done::NotOurs);
    };
    let Some(entry) = conntrack::lookup(&conntrack::reply_key_of_quote(&e)) else {
        return Ok(Done::NotOurs);
    };
    // SAFETY: a valid map value pointer for this run; copied out.
    let v = unsafe { *entry };
    icmp::rewrite_inner(ctx, &e, Side::Dst, v.nat_addr_be, v.nat_port_be)?;
    if e.outer_saddr_be == e.daddr_be {
        icmp::rewrite_outer(ctx, &e, Side::Src, v.nat_addr_be)?;
    }
    Ok(Done::Translated(Counter::IcmpTranslated))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
