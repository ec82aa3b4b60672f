//! proxy-ebpf: Kubernetes Service load balancing in TC (tcx).
//!
//! Packet paths (see docs/ARCHITECTURE.md):
//! - `tc_pod_ingress`, on pod-facing interfaces, sees what pods send:
//!   parse → service lookup → conntrack → select → DNAT (or ICMP reject).
//! - `tc_pod_egress`, on the same interfaces, sees what is delivered to pods:
//!   parse → conntrack reply lookup → reverse NAT.
//!
//! Everything that is not a service's traffic returns `TCX_NEXT` untouched, so
//! programs attached after ours (a CNI's) keep working.
#![no_std]
#![no_main]

mod bench;
mod conntrack;
mod csum;
mod maps;
mod nat;
mod parse;
mod reject;
mod select;
mod stats;

use aya_ebpf::{
    bindings::tcx_action_base::{TCX_DROP, TCX_NEXT},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::{debug, warn};
use proxy_common::{Counter, ServiceKey, Verdict, scope};

use crate::{maps::SERVICES, nat::Side, parse::Packet, stats::SvcEvent};

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
    let key = ServiceKey {
        addr_be: pkt.daddr_be,
        port_be: pkt.dport_be,
        proto: pkt.proto,
        scope: scope::INTERNAL,
    };
    // SAFETY: the value is copied out at once.
    let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
        return Ok(Done::NotOurs);
    };
    dnat(ctx, &pkt, svc.svc_id)
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
        let (backend_id, addr_be, port_be) = unsafe {
            (
                (*entry).backend_id,
                (*entry).nat_addr_be,
                (*entry).nat_port_be,
            )
        };
        // A tracked flow keeps its backend for its whole life, even after the
        // backend leaves the Service (not ready, terminating, scaled away):
        // as with kube-proxy, a draining pod finishes its connections. Only a
        // new connection attempt (a SYN reusing the tuple) whose backend is
        // gone picks again. UDP flows to departed backends are removed by the
        // agent. A flow tracked for another Service (address reused) starts anew.
        if !pkt.tcp_syn_only || select::backend_is(backend_id, addr_be, port_be) {
            conntrack::touch(entry, now);
            nat::rewrite(ctx, pkt, Side::Dst, addr_be, port_be)?;
            stats::service(svc_id, pkt.l3_len, SvcEvent::Packet);
            return Ok(Done::Translated(Counter::Established));
        }
    }
    let Some((backend_id, backend)) = select::select(svc_id, pkt)? else {
        debug!(ctx, "svc {} has no endpoints: rejecting", svc_id);
        stats::service(svc_id, pkt.l3_len, SvcEvent::Rejected);
        let action = reject::reject(ctx, pkt)?;
        return Ok(Done::Redirected(Counter::RejectNoEndpoints, action));
    };
    conntrack::create(pkt, svc_id, backend_id, &backend, now)?;
    nat::rewrite(ctx, pkt, Side::Dst, backend.addr_be, backend.port_be)?;
    stats::service(svc_id, pkt.l3_len, SvcEvent::NewFlow);
    Ok(Done::Translated(Counter::NewFlow))
}

#[inline(always)]
fn pod_egress(ctx: &TcContext) -> Result<Done, Counter> {
    let Some(pkt) = parse::parse(ctx)? else {
        return Ok(Done::NotOurs);
    };
    let Some(entry) = conntrack::lookup(&conntrack::reply_key(&pkt)) else {
        return Ok(Done::NotOurs);
    };
    // SAFETY: entry is a valid map value pointer for this run.
    let (addr_be, port_be, svc_id) =
        unsafe { ((*entry).nat_addr_be, (*entry).nat_port_be, (*entry).svc_id) };
    conntrack::touch(entry, conntrack::now());
    nat::rewrite(ctx, &pkt, Side::Src, addr_be, port_be)?;
    stats::service(svc_id, pkt.l3_len, SvcEvent::Packet);
    Ok(Done::Translated(Counter::ReplyNat))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
