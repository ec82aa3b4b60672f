//! What the parse and NAT code need of a hook, for both: TC (an skb) and XDP
//! (a bare frame). Packet access, checksum updates, growing the packet, and
//! the hook's actions (go on, drop, send by a route, bounce). One parser,
//! one rewriter and one [`crate::verdict::finish`] serve both.
//!
//! XDP has no checksum helpers: the incremental updates are done in place
//! (`csum::replace`). XDP frames arrive from a wire with complete checksums;
//! the TC side keeps the kernel helpers, which also keep `CHECKSUM_PARTIAL`
//! and `CHECKSUM_COMPLETE` skbs consistent.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_MARK_MANGLED_0,
        bpf_adj_room_mode::{BPF_ADJ_ROOM_MAC, BPF_ADJ_ROOM_NET},
        bpf_redir_neigh,
        tcx_action_base::{TCX_DROP, TCX_NEXT},
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::generated::{
        bpf_redirect, bpf_redirect_neigh, bpf_skb_adjust_room, bpf_skb_change_tail,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};

use crate::{
    csum,
    fib::{Route, Via},
    hdr::{ETH_LEN, IP_LEN},
};

/// A packet under one of our programs.
///
/// `data`/`data_end` are read from the context every time (volatile): a
/// packet pointer the compiler kept from before a helper call is invalid
/// afterwards, and one it spills as a 32-bit value (it knows the context
/// field is 32 bits) is refused by the verifier.
pub trait Ctx: EbpfContext {
    /// Whether this is an XDP frame (no skb yet).
    const XDP: bool;
    /// The hook's return value.
    type Action: Copy;
    /// The packet goes on (to the next program, up the stack).
    const NEXT: Self::Action;
    /// The packet is dropped.
    const DROP: Self::Action;
    /// Sends a packet prepared for `route` (`Via::Out`: MACs set, or
    /// `Via::NoNeigh`: the kernel resolves the next hop where the hook can);
    /// anything else goes on.
    fn send(&self, route: Route) -> Self::Action;
    /// Sends the packet back out of the interface it came in on.
    fn bounce(&self) -> Self::Action;
    /// The program's context pointer, for helpers.
    fn raw(&self) -> *mut c_void;
    /// Index of the interface the packet arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Inserts `len` bytes right after a 20-byte IPv4 header; the Ethernet
    /// and IPv4 headers keep their content (the caller fixes the IPv4 fields).
    fn grow_l3(&self, len: u32) -> Result<(), ()>;
    /// Inserts `len` bytes right after the Ethernet header, which keeps its
    /// content.
    fn grow_mac(&self, len: u32) -> Result<(), ()>;
    /// Cuts the packet to its first `len` bytes.
    fn truncate(&self, len: u32) -> Result<(), ()>;
    /// Start of the linear data.
    fn data(&self) -> usize;
    /// End of the linear data.
    fn data_end(&self) -> usize;
    /// Whole packet length.
    fn len(&self) -> u32;
    /// Makes the first `len` bytes linear.
    fn pull_data(&self, len: u32) -> Result<(), ()>;
    /// `bpf_l3_csum_replace`: `size` is 2 or 4.
    fn l3_csum_replace(&self, off: usize, from: u64, to: u64, size: u64) -> Result<(), ()>;
    /// `bpf_l4_csum_replace`: the low 4 bits of `flags` are the size (2 or 4),
    /// `BPF_F_MARK_MANGLED_0` leaves a 0 (UDP without checksum) alone.
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Result<(), ()>;
}

impl Ctx for TcContext {
    const XDP: bool = false;
    type Action = i32;
    const NEXT: i32 = TCX_NEXT;
    const DROP: i32 = TCX_DROP;
    #[inline(always)]
    fn send(&self, route: Route) -> i32 {
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
            Via::TooBig | Via::Kernel => TCX_NEXT,
        }
    }
    #[inline(always)]
    fn bounce(&self) -> i32 {
        // SAFETY: reading this program's own context, then a helper with
        // plain arguments.
        unsafe { bpf_redirect((*self.skb.skb).ifindex, 0) as i32 }
    }
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: reading this program's own context.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }
    #[inline(always)]
    fn grow_l3(&self, len: u32) -> Result<(), ()> {
        // SAFETY: this program's own context; the kernel validates the request.
        let rc = unsafe { bpf_skb_adjust_room(self.skb.skb, len as i32, BPF_ADJ_ROOM_NET, 0) };
        if rc == 0 { Ok(()) } else { Err(()) }
    }
    #[inline(always)]
    fn grow_mac(&self, len: u32) -> Result<(), ()> {
        // SAFETY: this program's own context; the kernel validates the request.
        let rc = unsafe { bpf_skb_adjust_room(self.skb.skb, len as i32, BPF_ADJ_ROOM_MAC, 0) };
        if rc == 0 { Ok(()) } else { Err(()) }
    }
    #[inline(always)]
    fn truncate(&self, len: u32) -> Result<(), ()> {
        // SAFETY: this program's own context; the kernel validates the length.
        let rc = unsafe { bpf_skb_change_tail(self.skb.skb, len, 0) };
        if rc == 0 { Ok(()) } else { Err(()) }
    }
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: reading this program's own context.
        unsafe { core::ptr::read_volatile(&raw const (*self.skb.skb).data) as usize }
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: reading this program's own context.
        unsafe { core::ptr::read_volatile(&raw const (*self.skb.skb).data_end) as usize }
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
    #[inline(always)]
    fn pull_data(&self, len: u32) -> Result<(), ()> {
        TcContext::pull_data(self, len).map(|_| ()).map_err(|_| ())
    }
    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, from: u64, to: u64, size: u64) -> Result<(), ()> {
        TcContext::l3_csum_replace(self, off, from, to, size).map_err(|_| ())
    }
    #[inline(always)]
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Result<(), ()> {
        TcContext::l4_csum_replace(self, off, from, to, flags).map_err(|_| ())
    }
}

/// Inserts `len` bytes after the first `N` of an XDP frame: the head grows
/// by `len` and those `N` bytes move to the new front.
#[inline(always)]
fn grow_after<const N: usize>(ctx: &XdpContext, len: u32) -> Result<(), ()> {
    let start = XdpContext::data(ctx);
    if start + N > XdpContext::data_end(ctx) {
        return Err(());
    }
    // SAFETY: bounds-checked above; copied before the head moves.
    let headers = unsafe { *(start as *const [u8; N]) };
    // SAFETY: this program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), -(len as i32)) } != 0 {
        return Err(());
    }
    let start = XdpContext::data(ctx);
    if start + N > XdpContext::data_end(ctx) {
        return Err(());
    }
    // SAFETY: bounds-checked against the new data_end.
    unsafe { *(start as *mut [u8; N]) = headers };
    Ok(())
}

/// Applies the change of one 16- or 32-bit value from `from` to `to` (raw,
/// as stored in the packet) to the checksum at `off`, in place.
#[inline(always)]
fn replace_in_place(
    ctx: &XdpContext,
    off: usize,
    from: u64,
    to: u64,
    size: u64,
    keep_zero: bool,
) -> Result<(), ()> {
    let start = ctx.data();
    if start + off + 2 > ctx.data_end() {
        return Err(());
    }
    let field = (start + off) as *mut [u8; 2];
    // SAFETY: bounds-checked against data_end above.
    let old = u16::from_ne_bytes(unsafe { *field });
    if keep_zero && old == 0 {
        return Ok(());
    }
    let mut new = csum::replace(old, from, to, size);
    if keep_zero && new == 0 {
        new = 0xffff;
    }
    // SAFETY: as above.
    unsafe { *field = new.to_ne_bytes() };
    Ok(())
}

impl Ctx for XdpContext {
    const XDP: bool = true;
    type Action = u32;
    const NEXT: u32 = XDP_PASS;
    const DROP: u32 = XDP_DROP;
    #[inline(always)]
    fn send(&self, route: Route) -> u32 {
        match route.via {
            Via::Out if route.ifindex == Ctx::ingress_ifindex(self) => XDP_TX,
            // SAFETY: helper with plain arguments.
            Via::Out => unsafe { bpf_redirect(route.ifindex, 0) as u32 },
            // XDP cannot resolve a neighbour: such packets are left to TC.
            Via::NoNeigh | Via::TooBig | Via::Kernel => XDP_PASS,
        }
    }
    #[inline(always)]
    fn bounce(&self) -> u32 {
        XDP_TX
    }
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: reading this program's own context.
        unsafe { (*self.ctx).ingress_ifindex }
    }
    #[inline(always)]
    fn grow_l3(&self, len: u32) -> Result<(), ()> {
        grow_after::<{ ETH_LEN + IP_LEN }>(self, len)
    }
    #[inline(always)]
    fn grow_mac(&self, len: u32) -> Result<(), ()> {
        grow_after::<ETH_LEN>(self, len)
    }
    #[inline(always)]
    fn truncate(&self, len: u32) -> Result<(), ()> {
        let delta = len as i32 - Ctx::len(self) as i32;
        // SAFETY: this program's own context; the kernel validates the delta.
        if unsafe { bpf_xdp_adjust_tail(self.as_ptr().cast(), delta) } == 0 {
            Ok(())
        } else {
            Err(())
        }
    }
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: reading this program's own context.
        unsafe { core::ptr::read_volatile(&raw const (*self.ctx).data) as usize }
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: reading this program's own context.
        unsafe { core::ptr::read_volatile(&raw const (*self.ctx).data_end) as usize }
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }
    #[inline(always)]
    fn pull_data(&self, _len: u32) -> Result<(), ()> {
        // An XDP frame is all linear (multi-buffer frames are not accepted).
        Err(())
    }
    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, from: u64, to: u64, size: u64) -> Result<(), ()> {
        replace_in_place(self, off, from, to, size, false)
    }
    #[inline(always)]
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Result<(), ()> {
        // BPF_F_PSEUDO_HDR changes nothing for a complete checksum.
        let keep_zero = flags & u64::from(BPF_F_MARK_MANGLED_0) != 0;
        replace_in_place(self, off, from, to, flags & 0xf, keep_zero)
    }
}
