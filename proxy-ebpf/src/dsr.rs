//! Direct server return: the service address travels to the backend's node
//! in an IPv4 option ([`proxy_common::DSR_OPT_TYPE`]), right after a plain
//! 20-byte IPv4 header:
//!
//!   in:  [eth][IPv4, IHL 5][L4 ...]                    client → backend (DNATed)
//!   out: [eth][IPv4, IHL 7][0x9a 8 port addr][L4 ...]  same, 8 bytes longer
//!
//! The packet stays addressed to the backend, so it is routed like any pod
//! traffic (no tunnel device, no outer header); the backend's node reads the
//! option, remembers the flow and lets the packet through (receivers ignore
//! options they do not know). The L4 checksum does not cover IPv4 options:
//! only the IPv4 header checksum is recomputed.

use proxy_common::{Counter, DSR_OPT_LEN, DSR_OPT_TYPE};

use crate::{
    csum::{add_words, fold},
    ctx::Ctx,
    hdr::{ETH_LEN, IP_LEN},
    parse::{Packet, ptr_at},
};

/// Whether the DSR option fits: the packet has no IPv4 options of its own.
#[inline(always)]
pub fn fits(pkt: &Packet) -> bool {
    pkt.l4_off == ETH_LEN + IP_LEN
}

/// Inserts the option carrying `svc_addr_be:svc_port_be` after the IPv4
/// header of a packet without options ([`fits`]).
#[inline(always)]
pub fn insert(ctx: &impl Ctx, svc_addr_be: u32, svc_port_be: u16) -> Result<(), Counter> {
    let ip = ptr_at::<[u8; IP_LEN]>(ctx, ETH_LEN).ok_or(Counter::DsrNoRoom)?;
    // SAFETY: bounds-checked; copied before the packet grows.
    let mut ip = unsafe { *ip };
    if ip[0] != 0x45 {
        return Err(Counter::DsrNoRoom);
    }
    ctx.grow_l3(u32::from(DSR_OPT_LEN))
        .map_err(|()| Counter::AdjustFailed)?;
    let port = svc_port_be.to_ne_bytes();
    let addr = svc_addr_be.to_ne_bytes();
    let opt: [u8; DSR_OPT_LEN as usize] = [
        DSR_OPT_TYPE,
        DSR_OPT_LEN,
        port[0],
        port[1],
        addr[0],
        addr[1],
        addr[2],
        addr[3],
    ];
    ip[0] = 0x40 | ((IP_LEN as u8 + DSR_OPT_LEN) / 4);
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]).wrapping_add(u16::from(DSR_OPT_LEN));
    [ip[2], ip[3]] = tot_len.to_be_bytes();
    [ip[10], ip[11]] = [0, 0];
    [ip[10], ip[11]] = fold(add_words(add_words(0, &ip), &opt)).to_ne_bytes();

    let out_ip = ptr_at::<[u8; IP_LEN]>(ctx, ETH_LEN).ok_or(Counter::AdjustFailed)?;
    let out_opt =
        ptr_at::<[u8; DSR_OPT_LEN as usize]>(ctx, ETH_LEN + IP_LEN).ok_or(Counter::AdjustFailed)?;
    // SAFETY: both bounds-checked against the new data_end.
    unsafe {
        *out_ip = ip;
        *out_opt = opt;
    }
    Ok(())
}

/// The service address:port a packet's DSR option carries, if it has one
/// (first option after the IPv4 header, where `insert` puts it).
#[inline(always)]
pub fn option(ctx: &impl Ctx, pkt: &Packet) -> Option<(u32, u16)> {
    if pkt.l4_off < ETH_LEN + IP_LEN + DSR_OPT_LEN as usize {
        return None;
    }
    let opt = ptr_at::<[u8; DSR_OPT_LEN as usize]>(ctx, ETH_LEN + IP_LEN)?;
    // SAFETY: bounds-checked against data_end.
    let o = unsafe { *opt };
    (o[0] == DSR_OPT_TYPE && o[1] == DSR_OPT_LEN).then(|| {
        (
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u16::from_ne_bytes([o[2], o[3]]),
        )
    })
}
