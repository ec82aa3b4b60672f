//! Refusing a connection to a service without endpoints, as kube-proxy's
//! `REJECT` rule does: the packet is turned into an ICMP port-unreachable
//! quoting it, which the caller sends back out of the interface it came in
//! on. TCP clients see ECONNREFUSED at once, UDP clients get the error on
//! their socket.
//!
//!   in:  [eth][IPv4 + L4 + payload ...]
//!   out: [eth swapped][IPv4 frontend → client][ICMP 3/3][quote: first ≤ 80 bytes of the IPv4 packet]
//!
//! Checksum state: a packet from a local pod is usually `CHECKSUM_PARTIAL`,
//! with `csum_start` at its L4 header. That state survives the rewrite, so
//! whoever transmits the reply may still "finish" the L4 checksum inside our
//! quote (a device without checksum offload does, in `skb_checksum_help`),
//! which would invalidate the ICMP checksum. The quoted L4 checksum field is
//! therefore set to the fixed point F = ~(S + F) of that completion (S: the
//! quoted L4 bytes without the field): finishing it rewrites F with F, and the
//! ICMP checksum holds whether the skb is partial or not. Receivers match the
//! quote by addresses and ports; its checksum field carries no meaning.

use proxy_common::{Counter, proto};

use crate::{
    csum::{MAX_SAMPLE_WORDS, add_words, fixed_point, fold},
    global::Globals,
    hdr::{ETH_LEN, ICMP_DEST_UNREACH, ICMP_LEN, ICMP_PORT_UNREACH, IP_LEN},
    parse::{Packet, ptr_at},
};

const TTL: u8 = 64;
/// Where the quoted packet starts in the reply.
const QUOTE_OFF: usize = ETH_LEN + IP_LEN + ICMP_LEN;

/// Rewrites the packet into an ICMP port unreachable, to be sent back out of
/// the interface it came in on (`Done::bounce`).
#[inline(always)]
pub fn reject<C: Globals>(ctx: &C, pkt: &Packet) -> Result<(), Counter> {
    let macs = ptr_at::<[u8; 12]>(ctx, 0).ok_or(Counter::RejectFailed)?;
    let tos = ptr_at::<u8>(ctx, ETH_LEN + 1).ok_or(Counter::RejectFailed)?;
    // SAFETY: bounds-checked; copied before the resize invalidates the pointers.
    let (macs, tos) = unsafe { (*macs, *tos) };
    let ihl = pkt.l4_start() - ETH_LEN;

    let l3_len = (ctx.len() as usize).saturating_sub(ETH_LEN);
    let quote = if l3_len < MAX_SAMPLE_WORDS * 2 {
        l3_len
    } else {
        MAX_SAMPLE_WORDS * 2
    };
    ctx.truncate((ETH_LEN + quote) as u32)
        .map_err(|()| Counter::RejectFailed)?;
    ctx.grow_mac((IP_LEN + ICMP_LEN) as u32)
        .map_err(|()| Counter::RejectFailed)?;

    balance_quoted_l4_csum(ctx, pkt, ihl, quote)?;
    let icmp_sum = ctx
        .sum_words(QUOTE_OFF, quote)
        .ok_or(Counter::RejectFailed)?
        + u32::from(u16::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_PORT_UNREACH]));
    let icmp_csum = fold(icmp_sum).to_ne_bytes();

    let total = ((IP_LEN + ICMP_LEN + quote) as u16).to_be_bytes();
    let src = pkt.daddr_be.to_ne_bytes();
    let dst = pkt.saddr_be.to_ne_bytes();
    let mut ip: [u8; IP_LEN] = [
        0x45,
        tos,
        total[0],
        total[1],
        0,
        0,
        0,
        0,
        TTL,
        proto::ICMP,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
    ];
    let ip_csum = fold(add_words(0, &ip)).to_ne_bytes();
    ip[10] = ip_csum[0];
    ip[11] = ip_csum[1];

    let eth = ptr_at::<[u8; ETH_LEN]>(ctx, 0).ok_or(Counter::RejectFailed)?;
    let iph = ptr_at::<[u8; IP_LEN]>(ctx, ETH_LEN).ok_or(Counter::RejectFailed)?;
    let icmp = ptr_at::<[u8; ICMP_LEN]>(ctx, ETH_LEN + IP_LEN).ok_or(Counter::RejectFailed)?;
    // SAFETY: all three are bounds-checked against data_end after the resize.
    unsafe {
        *eth = [
            macs[6], macs[7], macs[8], macs[9], macs[10], macs[11], macs[0], macs[1], macs[2],
            macs[3], macs[4], macs[5], 0x08, 0x00,
        ];
        *iph = ip;
        *icmp = [
            ICMP_DEST_UNREACH,
            ICMP_PORT_UNREACH,
            icmp_csum[0],
            icmp_csum[1],
            0,
            0,
            0,
            0,
        ];
    }
    Ok(())
}

/// Sets the quoted L4 checksum field to the fixed point of a pending checksum
/// completion (see the module docs).
#[inline(always)]
fn balance_quoted_l4_csum<C: Globals>(
    ctx: &C,
    pkt: &Packet,
    ihl: usize,
    quote: usize,
) -> Result<(), Counter> {
    let field_in_l4 = pkt.l4_csum_off() - pkt.l4_start();
    if ihl + field_in_l4 + 2 > quote {
        return Ok(());
    }
    let l4 = QUOTE_OFF + ihl;
    let field = ptr_at::<[u8; 2]>(ctx, l4 + field_in_l4).ok_or(Counter::RejectFailed)?;
    // SAFETY: bounds-checked against data_end.
    let current = u16::from_ne_bytes(unsafe { *field });
    let with_field = ctx
        .sum_words(l4, quote - ihl)
        .ok_or(Counter::RejectFailed)?;
    let f = fixed_point(with_field, current);
    // SAFETY: as above.
    unsafe { *field = f.to_ne_bytes() };
    Ok(())
}
