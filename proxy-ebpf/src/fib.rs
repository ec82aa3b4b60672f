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

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{bindings::bpf_fib_lookup, helpers::generated::bpf_fib_lookup as fib_lookup};

use crate::{
    ctx::Ctx,
    hdr::{ETH_LEN, IP_CSUM_OFF, IP_TTL_OFF},
    parse::ptr_at,
};

const AF_INET: u8 = 2;
const RET_SUCCESS: i64 = 0;
const RET_NO_NEIGH: i64 = 7;
const RET_FRAG_NEEDED: i64 = 8;

/// A lookup request on an 8-byte boundary (stack accesses must be aligned).
#[repr(C, align(8))]
union Request {
    p: bpf_fib_lookup,
    w: [u64; 8],
}

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
/// kernel rewrites them anyway if the packet ends up forwarded by it).
#[inline(always)]
pub fn lookup(ctx: &impl Ctx, flow: &Flow) -> Route {
    let mut req = Request { w: [0; 8] };
    let p = &raw mut req.p;
    // SAFETY: `p` points at our own 8-byte aligned request. Volatile stores
    // of each field: the compiler may not merge them into wider stores at
    // unaligned stack offsets, which the verifier refuses.
    unsafe {
        let mut i = 0;
        while i < 8 {
            write_volatile(&raw mut req.w[i], 0);
            i += 1;
        }
        write_volatile(&raw mut (*p).family, AF_INET);
        write_volatile(&raw mut (*p).l4_protocol, flow.proto);
        write_volatile(&raw mut (*p).__bindgen_anon_1.tot_len, flow.tot_len);
        write_volatile(&raw mut (*p).ifindex, ctx.ingress_ifindex());
        write_volatile(&raw mut (*p).__bindgen_anon_2.tos, flow.tos);
        write_volatile(&raw mut (*p).__bindgen_anon_3.ipv4_src, flow.saddr_be);
        write_volatile(&raw mut (*p).__bindgen_anon_4.ipv4_dst, flow.daddr_be);
    }
    // SAFETY: `p` is a valid, writable lookup request of the size given.
    let rc = unsafe { fib_lookup(ctx.raw(), p, size_of::<bpf_fib_lookup>() as i32, 0) };
    match rc {
        RET_SUCCESS => {
            let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
                return Route::to(Via::Kernel);
            };
            // Byte by byte: the MACs sit at 2-byte offsets on the stack, and
            // the verifier refuses wider unaligned stack reads.
            let mut macs = [0u8; 12];
            let mut i = 0;
            while i < 6 {
                // SAFETY: in-bounds reads of the lookup result.
                unsafe {
                    macs[i] = read_volatile(&raw const (*p).dmac[i]);
                    macs[6 + i] = read_volatile(&raw const (*p).smac[i]);
                }
                i += 1;
            }
            // SAFETY: bounds-checked against data_end.
            unsafe { *eth = macs };
            Route {
                via: Via::Out,
                // SAFETY: reading our own request back.
                ifindex: unsafe { read_volatile(&raw const (*p).ifindex) },
                nh_be: 0,
            }
        }
        // SAFETY: reading our own request back; the kernel wrote the next
        // hop into ipv4_dst.
        RET_NO_NEIGH => unsafe {
            Route {
                via: Via::NoNeigh,
                ifindex: read_volatile(&raw const (*p).ifindex),
                nh_be: read_volatile(&raw const (*p).__bindgen_anon_4.ipv4_dst),
            }
        },
        RET_FRAG_NEEDED => Route::to(Via::TooBig),
        _ => Route::to(Via::Kernel),
    }
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
