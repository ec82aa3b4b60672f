//! ICMP errors about translated flows, translated back: a "fragmentation
//! needed" or "unreachable" about a packet we rewrote quotes the rewritten
//! packet, which the sender does not know. The quote (and where needed the
//! outer addresses) is rewritten to what the sender sent, so path MTU
//! discovery and unreachable errors work through a Service.
//!
//!   [eth][IPv4 outer][ICMP type code csum rest][IPv4 inner][L4 inner: ports ...]
//!
//! Only errors (destination unreachable, time exceeded, parameter problem)
//! quoting TCP or UDP are handled; the quote must hold the inner ports. The
//! inner L4 checksum is updated when it is inside the quote. Checksums: the
//! inner IPv4 and L4 ones by their own rules, the ICMP one for every quoted
//! 16-bit word that changed (it has no pseudo-header, so outer address
//! changes only touch the outer IPv4 checksum).

use proxy_common::{Counter, proto};

use crate::{
    csum::{halves, update16, update32},
    ctx::Ctx,
    hdr::{
        ETH_LEN, ICMP_DEST_UNREACH, ICMP_LEN, ICMP_PARAMETERPROB, ICMP_TIME_EXCEEDED, IP_CSUM_OFF,
        IP_DADDR_OFF, IP_FRAG_MASK, IP_LEN, IP_SADDR_OFF,
    },
    nat::Side,
    parse::ptr_at,
};

/// An ICMP error quoting a TCP or UDP packet. Addresses and ports are raw
/// network-order values.
#[derive(Clone, Copy)]
pub struct IcmpError {
    pub outer_saddr_be: u32,
    pub outer_daddr_be: u32,
    /// Offset of the ICMP header.
    icmp_off: usize,
    /// Offset of the quoted IPv4 header.
    inner_off: usize,
    /// Offset of the quoted L4 header.
    inner_l4_off: usize,
    /// The quoted packet's tuple, as the quoted packet has it.
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
}

/// Whether the packet is IPv4 ICMP addressed to `addr_be` (not 0): a
/// candidate for [`parse`], checked cheaply on the fast path.
#[inline(always)]
pub fn to_addr(ctx: &impl Ctx, addr_be: u32) -> bool {
    let (Some(eth_type), Some(proto), Some(daddr)) = (
        ptr_at::<[u8; 2]>(ctx, ETH_LEN - 2),
        ptr_at::<u8>(ctx, ETH_LEN + 9),
        ptr_at::<[u8; 4]>(ctx, IP_DADDR_OFF),
    ) else {
        return false;
    };
    // SAFETY: all bounds-checked against data_end.
    unsafe {
        addr_be != 0
            && *eth_type == [0x08, 0x00]
            && *proto == proto::ICMP
            && u32::from_ne_bytes(*daddr) == addr_be
    }
}

/// Parses an ICMP error quoting TCP/UDP; `None` for anything else.
#[inline(always)]
pub fn parse(ctx: &impl Ctx) -> Option<IcmpError> {
    let ip = ptr_at::<[u8; IP_LEN]>(ctx, ETH_LEN)?;
    // SAFETY: bounds-checked against data_end.
    let ip = unsafe { *ip };
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < IP_LEN || ip[9] != proto::ICMP {
        return None;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & IP_FRAG_MASK != 0 {
        return None;
    }
    let icmp_off = ETH_LEN + ihl;
    let icmp = ptr_at::<[u8; ICMP_LEN]>(ctx, icmp_off)?;
    // SAFETY: bounds-checked against data_end.
    let kind = unsafe { (*icmp)[0] };
    if !matches!(
        kind,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    ) {
        return None;
    }
    let inner_off = icmp_off + ICMP_LEN;
    let inner = ptr_at::<[u8; IP_LEN]>(ctx, inner_off)?;
    // SAFETY: bounds-checked against data_end.
    let inner = unsafe { *inner };
    let inner_ihl = usize::from(inner[0] & 0x0f) * 4;
    if inner[0] >> 4 != 4 || inner_ihl < IP_LEN || !matches!(inner[9], proto::TCP | proto::UDP) {
        return None;
    }
    let inner_l4_off = inner_off + inner_ihl;
    let ports = ptr_at::<[u8; 4]>(ctx, inner_l4_off)?;
    // SAFETY: bounds-checked against data_end.
    let ports = unsafe { *ports };
    Some(IcmpError {
        outer_saddr_be: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        outer_daddr_be: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        icmp_off,
        inner_off,
        inner_l4_off,
        saddr_be: u32::from_ne_bytes([inner[12], inner[13], inner[14], inner[15]]),
        daddr_be: u32::from_ne_bytes([inner[16], inner[17], inner[18], inner[19]]),
        sport_be: u16::from_ne_bytes([ports[0], ports[1]]),
        dport_be: u16::from_ne_bytes([ports[2], ports[3]]),
        proto: inner[9],
    })
}

/// Reads the 16-bit word at `off` (raw).
#[inline(always)]
fn get16(ctx: &impl Ctx, off: usize) -> Option<u16> {
    let p = ptr_at::<[u8; 2]>(ctx, off)?;
    // SAFETY: bounds-checked against data_end.
    Some(u16::from_ne_bytes(unsafe { *p }))
}

/// Writes the 16-bit word at `off` (raw).
#[inline(always)]
fn put16(ctx: &impl Ctx, off: usize, value: u16) -> Result<(), Counter> {
    let p = ptr_at::<[u8; 2]>(ctx, off).ok_or(Counter::CsumFailed)?;
    // SAFETY: bounds-checked against data_end.
    unsafe { *p = value.to_ne_bytes() };
    Ok(())
}

// Everything here is computed and written directly (no checksum helpers):
// a helper call would invalidate the packet pointers between the steps.

/// Rewrites one side of the quoted packet to `addr_be:port_be`.
#[inline(always)]
pub fn rewrite_inner(
    ctx: &impl Ctx,
    e: &IcmpError,
    side: Side,
    addr_be: u32,
    port_be: u16,
) -> Result<(), Counter> {
    let (addr_off, port_off, old_addr, old_port) = match side {
        Side::Src => (e.inner_off + 12, e.inner_l4_off, e.saddr_be, e.sport_be),
        Side::Dst => (e.inner_off + 16, e.inner_l4_off + 2, e.daddr_be, e.dport_be),
    };
    let icmp_csum_off = e.icmp_off + 2;
    let ip_csum_off = e.inner_off + 10;
    // The inner L4 checksum (pseudo-header: addresses; header: ports), when quoted.
    let l4_csum_off = if e.proto == proto::TCP {
        e.inner_l4_off + 16
    } else {
        e.inner_l4_off + 6
    };
    let icmp_csum = get16(ctx, icmp_csum_off).ok_or(Counter::CsumFailed)?;
    let ip_csum = get16(ctx, ip_csum_off).ok_or(Counter::CsumFailed)?;
    let l4_csum = get16(ctx, l4_csum_off).filter(|c| !(e.proto == proto::UDP && *c == 0));

    let new_ip_csum = update32(ip_csum, old_addr, addr_be);
    let mut icmp = update32(icmp_csum, old_addr, addr_be);
    icmp = update16(icmp, ip_csum, new_ip_csum);
    icmp = update16(icmp, old_port, port_be);
    let new_l4_csum = l4_csum.map(|c| {
        let mut n = update16(update32(c, old_addr, addr_be), old_port, port_be);
        if e.proto == proto::UDP && n == 0 {
            n = 0xffff;
        }
        icmp = update16(icmp, c, n);
        n
    });

    let a = halves(addr_be);
    put16(ctx, addr_off, a[0])?;
    put16(ctx, addr_off + 2, a[1])?;
    put16(ctx, port_off, port_be)?;
    put16(ctx, ip_csum_off, new_ip_csum)?;
    if let Some(n) = new_l4_csum {
        put16(ctx, l4_csum_off, n)?;
    }
    put16(ctx, icmp_csum_off, icmp)
}

/// Rewrites the outer source or destination address.
#[inline(always)]
pub fn rewrite_outer(
    ctx: &impl Ctx,
    e: &IcmpError,
    side: Side,
    addr_be: u32,
) -> Result<(), Counter> {
    let (off, old) = match side {
        Side::Src => (IP_SADDR_OFF, e.outer_saddr_be),
        Side::Dst => (IP_DADDR_OFF, e.outer_daddr_be),
    };
    let csum = get16(ctx, IP_CSUM_OFF).ok_or(Counter::CsumFailed)?;
    let a = halves(addr_be);
    put16(ctx, off, a[0])?;
    put16(ctx, off + 2, a[1])?;
    put16(ctx, IP_CSUM_OFF, update32(csum, old, addr_be))
}
