//! Sending a translated packet on ourselves: a FIB lookup gives the output
//! interface and the next hop's MAC, and the packet leaves without the
//! kernel's forwarding path (which would refuse a packet whose source is one
//! of the node's own addresses coming in from a pod, and would apply
//! reverse-path filtering to a DSR reply).
//!
//! The lookup is made before the packet is rewritten, from the addresses it
//! will have, so that an XDP program can still hand the packet untouched to
//! TC when the next hop's MAC is not known yet (TC can have the kernel
//! resolve it, `bpf_redirect_neigh`; XDP cannot).
//!
//! Routes to remote backends are remembered per backend ([`to_backend`],
//! `ROUTES`), so a flow's packets after the first skip the lookup (about
//! 100 ns): an entry holds while `ROUTE_GEN` is unchanged (the agent bumps
//! it on every route, neighbour, address or link change) and the packet is
//! no longer than one the route took. The route to a backend is taken to
//! depend on its address alone, as node routing does (not on the client's
//! source or the interface the packet came in on).

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{bindings::bpf_fib_lookup, helpers::generated::bpf_fib_lookup as fib_lookup};
use proxy_common::NextHop;

use crate::{
    ctx::Ctx,
    hdr::{ETH_LEN, IP_CSUM_OFF, IP_TTL_OFF},
    maps::{FIB_REQUEST, ROUTE_GEN, ROUTES},
    parse::ptr_at,
};

const AF_INET: u8 = 2;
const RET_SUCCESS: i64 = 0;
const RET_NO_NEIGH: i64 = 7;
const RET_FRAG_NEEDED: i64 = 8;

/// How a packet leaves, from a FIB lookup.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Out of `ifindex`; the frame already carries the next hop's MACs.
    Out,
    /// Out of `ifindex` via next hop `nh_be`, whose MAC is not known yet.
    NoNeigh,
    /// Larger than the route's MTU.
    TooBig,
    /// Anything else (local delivery, no route, forwarding off): the kernel decides.
    Kernel,
}

/// Where a packet goes. A plain struct with every field always set, not an
/// enum with payloads: payload bits a variant leaves undefined may be
/// compiled into reads of uninitialised registers, which the verifier refuses.
#[derive(Clone, Copy)]
pub struct Route {
    pub via: Via,
    pub ifindex: u32,
    pub nh_be: u32,
}

impl Route {
    /// No route (where none is needed).
    pub const NONE: Route = Route::to(Via::Kernel);

    const fn to(via: Via) -> Self {
        Self {
            via,
            ifindex: 0,
            nh_be: 0,
        }
    }
}

/// The addresses a packet will have when it is sent.
pub struct Flow {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub proto: u8,
    pub tos: u8,
    /// IPv4 total length it will have.
    pub tot_len: u16,
}

/// Looks up the route of `flow` as if it arrived on this packet's interface.
/// For `Via::Out` the frame's MACs are set for the next hop already (the
/// kernel rewrites them anyway if the packet ends up forwarded by it). The
/// request lives in `FIB_REQUEST` (per CPU), not on the stack: the
/// verifier allows 512 bytes of stack along a chain of calls.
#[inline(always)]
pub fn lookup(ctx: &impl Ctx, flow: &Flow) -> Route {
    let Some(req) = FIB_REQUEST.get_ptr_mut(0) else {
        return Route::to(Via::Kernel);
    };
    let p = req.cast::<bpf_fib_lookup>();
    // SAFETY: `req` is this CPU's 64-byte request, in map memory; nothing
    // else runs on this CPU between filling it and reading the answer.
    // Volatile stores, so the zeroing is not turned into a memset call.
    unsafe {
        let mut i = 0;
        while i < 8 {
            write_volatile(&raw mut (*req)[i], 0);
            i += 1;
        }
        (*p).family = AF_INET;
        (*p).l4_protocol = flow.proto;
        (*p).__bindgen_anon_1.tot_len = flow.tot_len;
        (*p).ifindex = ctx.ingress_ifindex();
        (*p).__bindgen_anon_2.tos = flow.tos;
        (*p).__bindgen_anon_3.ipv4_src = flow.saddr_be;
        (*p).__bindgen_anon_4.ipv4_dst = flow.daddr_be;
    }
    // SAFETY: `p` is a valid, writable lookup request of the size given.
    let rc = unsafe { fib_lookup(ctx.raw(), p, size_of::<bpf_fib_lookup>() as i32, 0) };
    match rc {
        RET_SUCCESS => {
            let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
                return Route::to(Via::Kernel);
            };
            // SAFETY: the answer in this CPU's request; `eth` is
            // bounds-checked against data_end.
            unsafe {
                let mut i = 0;
                while i < 6 {
                    (*eth)[i] = (*p).dmac[i];
                    (*eth)[6 + i] = (*p).smac[i];
                    i += 1;
                }
                Route {
                    via: Via::Out,
                    ifindex: (*p).ifindex,
                    nh_be: 0,
                }
            }
        }
        // SAFETY: the answer in this CPU's request; the kernel wrote the
        // next hop into ipv4_dst.
        RET_NO_NEIGH => unsafe {
            Route {
                via: Via::NoNeigh,
                ifindex: (*p).ifindex,
                nh_be: (*p).__bindgen_anon_4.ipv4_dst,
            }
        },
        RET_FRAG_NEEDED => Route::to(Via::TooBig),
        _ => Route::to(Via::Kernel),
    }
}

/// The route of `flow` to backend `backend_id`: remembered, else looked up
/// (and remembered when the packet can leave by it) by a function verified
/// apart.
#[inline(always)]
pub fn to_backend<C: crate::global::Globals>(ctx: &C, backend_id: u32, flow: &Flow) -> Route {
    match remembered(ctx, backend_id, flow) {
        Some(route) => route,
        None => ctx.route_fill(backend_id, flow),
    }
}

/// The remembered route of `flow` to `backend_id`, with the frame's MACs
/// set for it: while its generation is current, for the same address, and
/// for packets no longer than one it took.
#[inline(always)]
fn remembered(ctx: &impl Ctx, backend_id: u32, flow: &Flow) -> Option<Route> {
    let current = *ROUTE_GEN.get(0)?;
    let hop = ROUTES.get_ptr(backend_id)?;
    // SAFETY: a valid map value pointer for this run. The generation is
    // read first and written last by `remember`, so a current one means
    // the fields after it are whole.
    unsafe {
        if current == 0 || read_volatile(&raw const (*hop).generation) != current {
            return None;
        }
        let (daddr_be, max_len, ifindex) = (
            read_volatile(&raw const (*hop).daddr_be),
            read_volatile(&raw const (*hop).max_len),
            read_volatile(&raw const (*hop).ifindex),
        );
        if daddr_be != flow.daddr_be || flow.tot_len > max_len {
            return None;
        }
        // The MACs start 4-byte aligned (offset 16).
        let words = (&raw const (*hop).macs).cast::<u32>();
        let macs = [
            read_volatile(words),
            read_volatile(words.add(1)),
            read_volatile(words.add(2)),
        ];
        let eth = ptr_at::<[u8; 12]>(ctx, 0)?;
        let (a, b, c) = (
            macs[0].to_ne_bytes(),
            macs[1].to_ne_bytes(),
            macs[2].to_ne_bytes(),
        );
        *eth = [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3],
        ];
        Some(Route {
            via: Via::Out,
            ifindex,
            nh_be: 0,
        })
    }
}

/// Looks `flow` up and remembers the route for `backend_id` when the
/// packet can leave by it (the frame's MACs set): the verified-apart body
/// of `Globals::route_fill`.
#[inline(always)]
pub fn fill(ctx: &impl Ctx, backend_id: u32, flow: &Flow) -> Route {
    let route = lookup(ctx, flow);
    if route.via != Via::Out {
        return route;
    }
    let (Some(current), Some(hop), Some(eth)) = (
        ROUTE_GEN.get(0).copied(),
        ROUTES.get_ptr_mut(backend_id),
        ptr_at::<[u8; 12]>(ctx, 0),
    ) else {
        return route;
    };
    if current == 0 {
        return route;
    }
    // SAFETY: a valid map value pointer for this run, and the frame's MACs
    // (bounds-checked) as the lookup set them. The generation is cleared
    // first and set last, so a reader never takes a half-written entry.
    unsafe {
        let macs = *eth;
        // A larger packet the route took before (the same route) still fits.
        let mut max_len = flow.tot_len;
        if read_volatile(&raw const (*hop).generation) == current
            && read_volatile(&raw const (*hop).daddr_be) == flow.daddr_be
            && read_volatile(&raw const (*hop).ifindex) == route.ifindex
        {
            let known = read_volatile(&raw const (*hop).max_len);
            if known > max_len {
                max_len = known;
            }
        }
        write_volatile(&raw mut (*hop).generation, 0);
        write_volatile(
            hop,
            NextHop {
                generation: 0,
                daddr_be: flow.daddr_be,
                ifindex: route.ifindex,
                max_len,
                _pad: 0,
                macs,
            },
        );
        write_volatile(&raw mut (*hop).generation, current);
    }
    route
}

/// The route flow of the packet as it is now (for replies, translated in place).
#[inline(always)]
pub fn flow_of(ctx: &impl Ctx, saddr_be: u32, daddr_be: u32, proto: u8) -> Flow {
    let (tos, tot_len) = ptr_at::<[u8; 4]>(ctx, ETH_LEN).map_or((0, 0), |h| {
        // SAFETY: bounds-checked against data_end.
        let h = unsafe { *h };
        (h[1], u16::from_be_bytes([h[2], h[3]]))
    });
    Flow {
        saddr_be,
        daddr_be,
        proto,
        tos,
        tot_len,
    }
}

/// Prepares a (translated) packet to leave on its own as a router would:
/// one hop less. Returns false when the kernel should forward it instead
/// (TTL running out, unexpected layout).
#[inline(always)]
pub fn prepare(ctx: &impl Ctx) -> bool {
    let Some(word) = ptr_at::<[u8; 2]>(ctx, IP_TTL_OFF) else {
        return false;
    };
    // SAFETY: bounds-checked against data_end.
    let old = unsafe { *word };
    if old[0] <= 1 {
        return false;
    }
    let new = [old[0] - 1, old[1]];
    // SAFETY: as above.
    unsafe { *word = new };
    if ctx
        .l3_csum_replace(
            IP_CSUM_OFF,
            u64::from(u16::from_ne_bytes(old)),
            u64::from(u16::from_ne_bytes(new)),
            2,
        )
        .is_err()
    {
        return false;
    }
    true
}
