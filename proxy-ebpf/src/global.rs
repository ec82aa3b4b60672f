//! Parts of the datapath the verifier checks once, apart from their
//! callers: `#[no_mangle] pub extern "C"` functions, which keep global
//! linkage in the object's BTF. A static function is verified again along
//! every path that reaches it, with that path's knowledge; a global one is
//! verified once, knowing only its arguments' types, and its results come
//! back as unknown values, so the paths through it do not multiply with the
//! paths after it. Program load time (the agent's start, every restart) is
//! mostly verification, so the rarer steps of the fast paths (route
//! lookups, the DSR option) and the steps of the slow ones (backend
//! selection, recording and promoting flows, rejects) live here.
//!
//! The verifier allows 512 bytes of stack along a chain of calls, so no
//! function here calls another, and the slow paths are programs of their
//! own, reached by a tail call (`hand_over`), whose small frames call these
//! one after the other.
//!
//! Arguments are the hook's context pointer (its BTF type, `__sk_buff` or
//! `xdp_md`, tells the verifier what it is), plain values, and pointers to
//! structs of plain values on the caller's stack; pointers may be null as
//! far as the verifier knows, so every one is checked. A result comes back
//! as 0 with the out-value written, or 1 + the counter of the drop reason.

use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    programs::{TcContext, XdpContext},
};
use proxy_common::{Counter, CtValue, ServiceValue};

use crate::{
    conntrack::{self, Kind, Open, Opened, Peek},
    csum::{MAX_SAMPLE_WORDS, add_packet_words},
    ctx::Ctx,
    external::{self, Delivery},
    fib::{self, Flow, Route},
    maps::{SLOW_TC, SLOW_WORK, SLOW_XDP},
    parse::{Packet, Tuple},
    reject,
    select::{self, Choice},
    verdict::{Done, Path},
};

/// The result code of a null pointer argument (never passed: the callers
/// hand in their own stack).
const NULL_ARG: i32 = 1 + Counter::Internal as i32;

/// Writes a result for the caller: 0 with `out` written, or 1 + the drop
/// reason.
#[inline(always)]
fn encode<T>(result: Result<T, Counter>, out: *mut T) -> i32 {
    match result {
        Ok(value) => {
            // SAFETY: the caller checked `out` is not null.
            unsafe { *out = value };
            0
        }
        Err(reason) => 1 + reason as i32,
    }
}

/// Reads a result [`encode`] wrote into `value`.
#[inline(always)]
fn decode<T>(rc: i32, value: T) -> Result<T, Counter> {
    if rc == 0 {
        return Ok(value);
    }
    Err(u32::try_from(rc - 1)
        .ok()
        .and_then(Counter::from_index)
        .unwrap_or(Counter::Internal))
}

/// The parts of the datapath verified apart, for each hook.
pub trait Globals: Ctx {
    /// The route to a backend, looked up and remembered (`fib::fill`).
    fn route_fill(&self, backend_id: u32, flow: &Flow) -> Route;
    /// The route of `flow` (`fib::lookup`), for the fast paths.
    fn route(&self, flow: &Flow) -> Route;
    /// Inserts the DSR option naming `addr_be:port_be` (`dsr::insert`).
    fn dsr_insert(&self, addr_be: u32, port_be: u16) -> Result<(), Counter>;
    /// Sends a client's packet of a flow as `d` says (`external::deliver`),
    /// for the slow programs.
    fn deliver(&self, pkt: &Packet, d: &Delivery) -> Path;
    /// A packet with a DSR option for a flow not known here
    /// (`external::dsr_arrival`).
    fn dsr_arrival(&self, pkt: &Packet, addr_be: u32, port_be: u16) -> Path;
    /// An ICMP error to the SNAT address (`external::icmp_to_snat_client`).
    fn icmp_to_snat_client(&self) -> Path;
    /// Turns the packet into an ICMP port unreachable (`reject::reject`).
    fn reject(&self, pkt: &Packet) -> Result<(), Counter>;
    /// The 16-bit words of `len` bytes of the packet from `off`, summed
    /// (`csum::add_packet_words`; `None`: not inside the packet). Apart,
    /// so the loop's exits do not multiply the paths after it.
    fn sum_words(&self, off: usize, len: usize) -> Option<u32>;
    /// Hands the packet, untouched, to this hook's slow program in `slot`
    /// (`proxy_common::maps::slow`) by a tail call, which does not return
    /// (if it does, the slot is empty: counted `Internal`). With `parsed`,
    /// the packet as parsed and its frontend go along in `SlowWork`.
    fn hand_over(&self, slot: u32, parsed: Option<(&Packet, &ServiceValue)>) -> Path;
}

/// A global function per hook around one generic body (`$body`, called
/// with the context and the arguments).
macro_rules! per_hook {
    ($($tc:ident, $xdp:ident: fn($($arg:ident: $ty:ty),*) => $body:ident;)*) => {
        $(
            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn $tc(raw: *mut __sk_buff, $($arg: $ty),*) -> i32 {
                if raw.is_null() {
                    return NULL_ARG;
                }
                $body(&TcContext::new(raw), $($arg),*)
            }

            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn $xdp(raw: *mut xdp_md, $($arg: $ty),*) -> i32 {
                if raw.is_null() {
                    return NULL_ARG;
                }
                $body(&XdpContext::new(raw), $($arg),*)
            }
        )*
    };
}

per_hook! {
    g_route_fill_tc, g_route_fill_xdp: fn(backend_id: u32, flow: *const Flow, out: *mut Route) => route_fill;
    g_route_tc, g_route_xdp: fn(flow: *const Flow, out: *mut Route) => route;
    g_dsr_insert_tc, g_dsr_insert_xdp: fn(addr_be: u32, port_be: u16) => dsr_insert;
    g_reject_tc, g_reject_xdp: fn(pkt: *const Packet) => reject;
    g_dsr_arrival_tc, g_dsr_arrival_xdp: fn(pkt: *const Packet, addr_be: u32, port_be: u16, out: *mut Done) => dsr_arrival;
    g_icmp_snat_tc, g_icmp_snat_xdp: fn(out: *mut Done) => icmp_snat;
    g_deliver_tc, g_deliver_xdp: fn(pkt: *const Packet, d: *const Delivery, out: *mut Done) => deliver;
    g_sum_tc, g_sum_xdp: fn(off: u32, len: u32) => sum_words;
}

/// The sum as a non-negative result, -1 when the words are not all in the
/// packet.
#[inline(always)]
fn sum_words<C: Ctx>(ctx: &C, off: u32, len: u32) -> i32 {
    let (off, len) = (off as usize, len as usize);
    if off > 255 || len > MAX_SAMPLE_WORDS * 2 {
        return -1;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off > end {
        return -1;
    }
    // At most 40 words of at most 0xffff: the sum fits in 22 bits.
    add_packet_words(0, start + off, end, len) as i32
}

#[inline(always)]
fn deliver<C: Globals>(ctx: &C, pkt: *const Packet, d: *const Delivery, out: *mut Done) -> i32 {
    if pkt.is_null() || d.is_null() || out.is_null() {
        return NULL_ARG;
    }
    // SAFETY: non-null pointers to the caller's values.
    let (pkt, d) = unsafe { (&*pkt, &*d) };
    encode_path(external::deliver::<C, true>(ctx, pkt, &d.v, &d.how), out)
}

#[inline(always)]
fn dsr_arrival<C: Ctx>(
    _ctx: &C,
    pkt: *const Packet,
    addr_be: u32,
    port_be: u16,
    out: *mut Done,
) -> i32 {
    if pkt.is_null() || out.is_null() {
        return NULL_ARG;
    }
    // SAFETY: a non-null pointer to the caller's stack value.
    encode_path(
        external::dsr_arrival(unsafe { &*pkt }, addr_be, port_be),
        out,
    )
}

#[inline(always)]
fn icmp_snat<C: Ctx>(ctx: &C, out: *mut Done) -> i32 {
    if out.is_null() {
        return NULL_ARG;
    }
    encode_path(external::icmp_to_snat_client(ctx), out)
}

/// Writes a path's result for the caller, as [`encode`] does.
#[inline(always)]
fn encode_path(path: Path, out: *mut Done) -> i32 {
    match path {
        Ok(done) => encode(Ok(done), out),
        Err(done) => 1 + done.counter as i32,
    }
}

#[inline(always)]
fn route_fill<C: Ctx>(ctx: &C, backend_id: u32, flow: *const Flow, out: *mut Route) -> i32 {
    if flow.is_null() || out.is_null() {
        return NULL_ARG;
    }
    // SAFETY: a non-null pointer to the caller's stack value.
    encode(Ok(fib::fill(ctx, backend_id, unsafe { &*flow })), out)
}

#[inline(always)]
fn route<C: Ctx>(ctx: &C, flow: *const Flow, out: *mut Route) -> i32 {
    if flow.is_null() || out.is_null() {
        return NULL_ARG;
    }
    // SAFETY: a non-null pointer to the caller's stack value.
    encode(Ok(fib::lookup(ctx, unsafe { &*flow })), out)
}

#[inline(always)]
fn dsr_insert<C: Ctx>(ctx: &C, addr_be: u32, port_be: u16) -> i32 {
    let mut unit = ();
    encode(crate::dsr::insert(ctx, addr_be, port_be), &raw mut unit)
}

#[inline(always)]
fn reject<C: Globals>(ctx: &C, pkt: *const Packet) -> i32 {
    if pkt.is_null() {
        return NULL_ARG;
    }
    let mut unit = ();
    // SAFETY: a non-null pointer to the caller's stack value.
    encode(reject::reject(ctx, unsafe { &*pkt }), &raw mut unit)
}

/// Implements `Globals` for a hook from its global functions.
macro_rules! globals_for {
    ($ctx:ty: $jump:ident, $fill:ident, $route:ident, $insert:ident, $reject:ident, $dsr:ident, $icmp:ident, $deliver:ident, $sum:ident) => {
        impl Globals for $ctx {
            #[inline(always)]
            fn route_fill(&self, backend_id: u32, flow: &Flow) -> Route {
                let mut route = Route::NONE;
                decode(
                    $fill(self.raw().cast(), backend_id, flow, &raw mut route),
                    route,
                )
                .unwrap_or(Route::NONE)
            }
            #[inline(always)]
            fn route(&self, flow: &Flow) -> Route {
                let mut route = Route::NONE;
                decode($route(self.raw().cast(), flow, &raw mut route), route)
                    .unwrap_or(Route::NONE)
            }
            #[inline(always)]
            fn dsr_insert(&self, addr_be: u32, port_be: u16) -> Result<(), Counter> {
                decode($insert(self.raw().cast(), addr_be, port_be), ())
            }
            #[inline(always)]
            fn reject(&self, pkt: &Packet) -> Result<(), Counter> {
                decode($reject(self.raw().cast(), pkt), ())
            }
            #[inline(always)]
            fn deliver(&self, pkt: &Packet, d: &Delivery) -> Path {
                let mut done = Done::NOT_OURS;
                decode($deliver(self.raw().cast(), pkt, d, &raw mut done), done).map_err(Done::from)
            }
            #[inline(always)]
            fn dsr_arrival(&self, pkt: &Packet, addr_be: u32, port_be: u16) -> Path {
                let mut done = Done::NOT_OURS;
                decode(
                    $dsr(self.raw().cast(), pkt, addr_be, port_be, &raw mut done),
                    done,
                )
                .map_err(Done::from)
            }
            #[inline(always)]
            fn icmp_to_snat_client(&self) -> Path {
                let mut done = Done::NOT_OURS;
                decode($icmp(self.raw().cast(), &raw mut done), done).map_err(Done::from)
            }
            #[inline(always)]
            fn sum_words(&self, off: usize, len: usize) -> Option<u32> {
                let rc = $sum(self.raw().cast(), off as u32, len as u32);
                u32::try_from(rc).ok()
            }
            #[inline(always)]
            fn hand_over(&self, slot: u32, parsed: Option<(&Packet, &ServiceValue)>) -> Path {
                let w = work()?;
                w.handed = 0;
                if let Some((pkt, svc)) = parsed {
                    w.pkt = *pkt;
                    w.svc = *svc;
                    w.handed = 1;
                }
                // SAFETY: a tail call with this program's own context.
                unsafe { $jump.tail_call(self, slot) };
                Err(Counter::Internal.into())
            }
        }
    };
}

globals_for!(TcContext: SLOW_TC, g_route_fill_tc, g_route_tc, g_dsr_insert_tc, g_reject_tc, g_dsr_arrival_tc, g_icmp_snat_tc, g_deliver_tc, g_sum_tc);
globals_for!(XdpContext: SLOW_XDP, g_route_fill_xdp, g_route_xdp, g_dsr_insert_xdp, g_reject_xdp, g_dsr_arrival_xdp, g_icmp_snat_xdp, g_deliver_xdp, g_sum_xdp);

/// The slow programs' work area, one per CPU (`SLOW_WORK`): what their
/// steps hand each other, off their stack frames (the verifier allows 512
/// bytes along a chain of calls). Only TC and XDP programs use it, and
/// they do not interrupt each other on a CPU.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SlowWork {
    /// The packet the fast path handed over, as it parsed it, and the
    /// frontend it found ([`Globals::hand_over`]): the slow program does not
    /// parse it again. `handed` is 0 for an ICMP packet (not parsed).
    pub pkt: Packet,
    pub svc: ServiceValue,
    pub handed: u32,
    pub peek: Peek,
    pub choice: Choice,
    pub open: Open,
    pub opened: Opened,
    pub delivery: Delivery,
}

/// This CPU's `SlowWork`.
#[inline(always)]
pub fn work() -> Result<&'static mut SlowWork, Counter> {
    let w = SLOW_WORK.get_ptr_mut(0).ok_or(Counter::Internal)?;
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    Ok(unsafe { &mut *w })
}

/// The result code of "nothing found" (a selection without endpoints, no
/// half-open flow).
const NONE: i32 = -1;

/// Backend selection (`select::select`): 0 with the choice written, `NONE`
/// when the Service has no usable endpoint, or 1 + the drop reason.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn g_select(svc_id: u32, t: *const Tuple, now: u64, out: *mut Choice) -> i32 {
    if t.is_null() || out.is_null() {
        return NULL_ARG;
    }
    // SAFETY: a non-null pointer to the caller's stack value.
    match select::select(svc_id, unsafe { &*t }, now) {
        Ok(Some(choice)) => encode(Ok(choice), out),
        Ok(None) => NONE,
        Err(reason) => 1 + reason as i32,
    }
}

/// Calls [`g_select`]: `false` when the Service has no usable endpoint.
#[inline(always)]
pub fn choose(svc_id: u32, t: &Tuple, now: u64, out: &mut Choice) -> Result<bool, Counter> {
    match g_select(svc_id, t, now, out) {
        NONE => Ok(false),
        rc => decode(rc, true),
    }
}

/// The half-open flow a client's packet belongs to (`conntrack::peek`): 0
/// with it written, or `NONE`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn g_ct_peek(pkt: *const Packet, svc_id: u32, out: *mut Peek) -> i32 {
    if pkt.is_null() || out.is_null() {
        return NULL_ARG;
    }
    // SAFETY: a non-null pointer to the caller's stack value.
    match conntrack::peek(unsafe { &*pkt }, svc_id) {
        Some(peek) => encode(Ok(peek), out),
        None => NONE,
    }
}

/// Calls [`g_ct_peek`]: whether there is one (written to `out`).
#[inline(always)]
pub fn peek(pkt: &Packet, svc_id: u32, out: &mut Peek) -> bool {
    g_ct_peek(pkt, svc_id, out) == 0
}

/// A half-open flow's packet on its way (`conntrack::follow`): 0 with the
/// flow's FORWARD value written, or 1 + the drop reason.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn g_ct_follow(pkt: *const Packet, now: u64, out: *mut CtValue) -> i32 {
    if pkt.is_null() || out.is_null() {
        return NULL_ARG;
    }
    // SAFETY: a non-null pointer to the caller's stack value.
    encode(conntrack::follow(unsafe { &*pkt }, now), out)
}

/// Calls [`g_ct_follow`].
#[inline(always)]
pub fn follow(pkt: &Packet, now: u64) -> Result<CtValue, Counter> {
    let mut v = conntrack::ZERO;
    decode(g_ct_follow(pkt, now, &raw mut v), v)
}

/// Records a new flow (`conntrack::open`), one function per kind: 0 with
/// how it went written, or 1 + the drop reason.
macro_rules! opens {
    ($($name:ident: $kind:path;)*) => {
        $(
            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn $name(pkt: *const Packet, o: *const Open, out: *mut Opened) -> i32 {
                if pkt.is_null() || o.is_null() || out.is_null() {
                    return NULL_ARG;
                }
                // SAFETY: non-null pointers to the caller's stack values.
                let (pkt, o) = unsafe { (&*pkt, &*o) };
                if o.kind != $kind {
                    return NULL_ARG;
                }
                encode(conntrack::open(pkt, o), out)
            }
        )*
    };
}

opens! {
    g_ct_open_plain: Kind::Plain;
    g_ct_open_snat: Kind::Snat;
    g_ct_open_hairpin: Kind::Hairpin;
}

/// Calls the `g_ct_open_*` of `o`'s kind (how it went written to `out`).
#[inline(always)]
pub fn open(pkt: &Packet, o: &Open, out: &mut Opened) -> Result<(), Counter> {
    let rc = match o.kind {
        Kind::Plain => g_ct_open_plain(pkt, o, out),
        Kind::Snat => g_ct_open_snat(pkt, o, out),
        Kind::Hairpin => g_ct_open_hairpin(pkt, o, out),
    };
    decode(rc, ())
}
