//! Address/port rewrites with incremental checksum updates.
//!
//! Fields are written first (through bounds-checked pointers), then the kernel
//! helpers patch the IPv4 and L4 checksums. `bpf_l4_csum_replace` with
//! `BPF_F_PSEUDO_HDR` does the right thing for every skb checksum state: a full
//! checksum is updated, a `CHECKSUM_PARTIAL` pseudo-header seed is updated, and
//! `CHECKSUM_COMPLETE`'s `skb->csum` is kept in step. UDP's "no checksum" (0) is
//! left as is (`BPF_F_MARK_MANGLED_0`).

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use proxy_common::{Counter, proto};

use crate::{
    ctx::Ctx,
    hdr::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
    parse::{Packet, ptr_at},
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Destination address and port (DNAT: frontend → backend).
    Dst,
    /// Source address and port (reverse NAT: backend → frontend).
    Src,
}

/// Rewrites one side of `pkt` to `addr_be:port_be` and fixes the checksums.
#[inline(always)]
pub fn rewrite(
    ctx: &impl Ctx,
    pkt: &Packet,
    side: Side,
    addr_be: u32,
    port_be: u16,
) -> Result<(), Counter> {
    let (addr_off, port_off, old_addr, old_port) = match side {
        Side::Dst => (IP_DADDR_OFF, pkt.dport_off(), pkt.daddr_be, pkt.dport_be),
        Side::Src => (IP_SADDR_OFF, pkt.sport_off(), pkt.saddr_be, pkt.sport_be),
    };
    let addr = ptr_at::<[u8; 4]>(ctx, addr_off).ok_or(Counter::CsumFailed)?;
    // SAFETY: bounds-checked against data_end; the verifier made the skb
    // writable for direct packet access.
    unsafe { *addr = addr_be.to_ne_bytes() };
    if !pkt.l4 {
        // A later fragment: no ports, no L4 checksum (the first fragment's
        // update covers the datagram); only the IPv4 header changes.
        if old_addr != addr_be {
            ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(addr_be), 4)
                .map_err(|()| Counter::CsumFailed)?;
        }
        return Ok(());
    }
    let port = ptr_at::<[u8; 2]>(ctx, port_off).ok_or(Counter::CsumFailed)?;
    // SAFETY: as above.
    unsafe { *port = port_be.to_ne_bytes() };

    let mangled0 = if pkt.proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let l4_csum = pkt.l4_csum_off();
    if old_port != port_be {
        ctx.l4_csum_replace(
            l4_csum,
            u64::from(old_port),
            u64::from(port_be),
            mangled0 | 2,
        )
        .map_err(|()| Counter::CsumFailed)?;
    }
    if old_addr != addr_be {
        ctx.l4_csum_replace(
            l4_csum,
            u64::from(old_addr),
            u64::from(addr_be),
            u64::from(BPF_F_PSEUDO_HDR) | mangled0 | 4,
        )
        .map_err(|()| Counter::CsumFailed)?;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(addr_be), 4)
            .map_err(|()| Counter::CsumFailed)?;
    }
    Ok(())
}

/// Swaps the frame's MAC addresses: a packet sent back out of the interface
/// it came in on.
#[inline(always)]
pub fn swap_macs(ctx: &impl Ctx) -> Result<(), Counter> {
    let eth = ptr_at::<[u8; 12]>(ctx, 0).ok_or(Counter::CsumFailed)?;
    // SAFETY: bounds-checked against data_end.
    unsafe {
        let m = *eth;
        *eth = [
            m[6], m[7], m[8], m[9], m[10], m[11], m[0], m[1], m[2], m[3], m[4], m[5],
        ];
    }
    Ok(())
}
