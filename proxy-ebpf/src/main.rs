//! proxy-ebpf: Kubernetes Service load balancing in TC (tcx) and XDP.
//!
//! The entry points, and nothing else (docs/ARCHITECTURE.md has the paths):
//! - `tc_pod_ingress` / `tc_pod_egress`, on pod-facing interfaces: east-west
//!   (`east_west.rs`): DNAT of what pods send to frontends, reverse NAT of
//!   what is delivered to them.
//! - `xdp_ext` / `tc_ext_ingress`, on external interfaces: north-south
//!   (`external.rs`): NodePort/LoadBalancer/externalIP frontends, SNAT
//!   replies and DSR options, the same code in both hooks.
//! - `sock_connect4` / `sock_sendmsg4` / `sock_recvmsg4` /
//!   `sock_getpeername4` / `sock_release`, on a cgroup: socket-level load
//!   balancing (`sock.rs`) for pods and host-network processes.
//!
//! Every path returns a [`verdict::Done`] or a drop reason; `verdict::finish`
//! turns it into the hook's action. Everything that is not a service's
//! traffic returns `TCX_NEXT` (or `XDP_PASS`) untouched, so programs attached
//! after ours (a CNI's) keep working.
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
mod east_west;
mod external;
mod fib;
mod frag;
mod global;
mod hdr;
mod icmp;
mod lookup;
mod maps;
mod nat;
mod parse;
mod reject;
mod select;
mod sock;
mod stats;
mod verdict;

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};

use crate::verdict::finish;

/// Frontend → backend: DNAT of pods' packets to service frontends.
#[classifier]
pub fn tc_pod_ingress(ctx: TcContext) -> i32 {
    finish(&ctx, east_west::pod_ingress(&ctx))
}

/// Backend → client: reverse NAT of replies delivered to pods.
#[classifier]
pub fn tc_pod_egress(ctx: TcContext) -> i32 {
    finish(&ctx, east_west::pod_egress(&ctx))
}

/// North-south: external frontends, SNAT replies, DSR options.
#[xdp]
pub fn xdp_ext(ctx: XdpContext) -> u32 {
    finish(&ctx, external::handle(&ctx))
}

/// North-south where XDP does not finish the job: packets XDP left to TC
/// (next hop unresolved), or every packet where XDP is not attached.
#[classifier]
pub fn tc_ext_ingress(ctx: TcContext) -> i32 {
    finish(&ctx, external::handle(&ctx))
}

/// The slow paths, programs of their own reached by a tail call (a frame
/// and a verification of their own): a packet to a frontend that is no
/// established flow's (new flows, handshakes). Never attached.
#[classifier]
pub fn tc_pod_slow(ctx: TcContext) -> i32 {
    finish(&ctx, east_west::slow_path(&ctx))
}

/// `tc_ext_ingress`'s slow path.
#[classifier]
pub fn tc_ext_slow(ctx: TcContext) -> i32 {
    finish(&ctx, external::slow_path(&ctx))
}

/// `xdp_ext`'s slow path.
#[xdp]
pub fn xdp_ext_slow(ctx: XdpContext) -> u32 {
    finish(&ctx, external::slow_path(&ctx))
}

/// Socket-level load balancing (`sock.rs`): a connect to a frontend goes to
/// a backend.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect4(&ctx)
}

/// An unconnected UDP datagram to a frontend goes to a backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg4(&ctx)
}

/// A datagram from a backend shows the frontend as its source.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reply4(&ctx)
}

/// A socket given a backend shows the frontend as its peer.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reply4(&ctx)
}

/// A socket goes: what the hooks kept for it goes too.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx)
}

/// Passes everything. For the far end of a veth whose near end runs
/// `xdp_ext`: frames XDP sends into a veth (XDP_TX, redirect) are only
/// received when the peer has an XDP program of its own.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
