//! Packet parsing: Ethernet → IPv4 → TCP/UDP, with every bound checked.
//!
//! `Ok(None)` means "not a packet we could ever translate" (not IPv4, not
//! TCP/UDP): it goes on untouched. `Err(counter)` means the packet looked like
//! IPv4 TCP/UDP but is malformed, truncated or a fragment: it also goes on
//! untouched (the kernel drops what is really broken), and the reason is
//! counted. Nothing in here writes to the packet.

use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{Counter, proto};

use crate::{
    ctx::Ctx,
    hdr::{ETH_LEN, ETH_P_IP_BE, IP_FRAG_MASK, TCP_ACK, TCP_FLAGS_OFF, TCP_SYN},
};

/// The fields of an IPv4 TCP/UDP packet the datapath works with.
/// Addresses and ports are raw network-byte-order values as they sit in the packet.
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// IPv4 total length.
    pub l3_len: u32,
    /// TCP with SYN set and ACK clear: the first packet of a connection attempt.
    pub tcp_syn_only: bool,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
}

/// The addresses, ports and protocol of a flow as its client sends it (raw
/// network-order values): what backend selection hashes and keys affinity by.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
}

impl Packet {
    /// The packet's tuple.
    #[inline(always)]
    pub fn tuple(&self) -> Tuple {
        Tuple {
            saddr_be: self.saddr_be,
            daddr_be: self.daddr_be,
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
        }
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == proto::TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }

    /// Offset of the source port.
    #[inline(always)]
    pub fn sport_off(&self) -> usize {
        self.l4_off
    }

    /// Offset of the destination port.
    #[inline(always)]
    pub fn dport_off(&self) -> usize {
        self.l4_off + 2
    }
}

/// Pointer to a `T` at `off` in the linear packet data, if it lies entirely inside.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Ctx, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Makes the first `need` bytes linear (directly accessible), pulling them in
/// only when they are not already. A packet shorter than `need` is `short`.
#[inline(always)]
fn ensure_linear(ctx: &impl Ctx, need: usize, short: Counter) -> Result<(), Counter> {
    if ctx.data() + need <= ctx.data_end() {
        return Ok(());
    }
    if (ctx.len() as usize) < need {
        return Err(short);
    }
    ctx.pull_data(need as u32).map_err(|()| Counter::PullFailed)
}

/// Parses an Ethernet frame carrying IPv4 TCP or UDP.
#[inline(always)]
pub fn parse(ctx: &impl Ctx) -> Result<Option<Packet>, Counter> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Ok(None);
    };
    // SAFETY: `eth` is bounds-checked against data_end.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return Ok(None);
    }
    ensure_linear(ctx, ETH_LEN + Ipv4Hdr::LEN, Counter::MalformedIp)?;
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN).ok_or(Counter::MalformedIp)?;
    // SAFETY: `ip` is bounds-checked against data_end.
    let (vihl, proto, tot_len, frags) = unsafe {
        (
            (*ip).vihl,
            (*ip).proto,
            u16::from_be_bytes((*ip).tot_len) as usize,
            u16::from_be_bytes((*ip).frags),
        )
    };
    let l4_min = match proto {
        proto::TCP => TcpHdr::LEN,
        proto::UDP => UdpHdr::LEN,
        _ => return Ok(None),
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Counter::MalformedIp);
    }
    if tot_len < ihl || tot_len + ETH_LEN > ctx.len() as usize {
        return Err(Counter::MalformedIp);
    }
    if frags & IP_FRAG_MASK != 0 {
        return Err(Counter::Fragment);
    }
    if tot_len < ihl + l4_min {
        return Err(Counter::MalformedL4);
    }
    let l4_off = ETH_LEN + ihl;
    ensure_linear(ctx, l4_off + l4_min, Counter::MalformedL4)?;

    // Pointers from before a pull are stale: read everything again.
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN).ok_or(Counter::MalformedIp)?;
    // SAFETY: bounds-checked above.
    let (saddr_be, daddr_be) = unsafe {
        (
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    let l4_len = tot_len - ihl;
    let (sport_be, dport_be, tcp_flags) = if proto == proto::TCP {
        let tcp = ptr_at::<TcpHdr>(ctx, l4_off).ok_or(Counter::MalformedL4)?;
        // SAFETY: bounds-checked against data_end.
        let (sport, dport, doff, flags) = unsafe {
            (
                u16::from_ne_bytes((*tcp).source),
                u16::from_ne_bytes((*tcp).dest),
                ((*tcp).doff() as usize) * 4,
                *tcp.cast::<u8>().add(TCP_FLAGS_OFF),
            )
        };
        if doff < TcpHdr::LEN || doff > l4_len {
            return Err(Counter::MalformedL4);
        }
        (sport, dport, flags)
    } else {
        let udp = ptr_at::<UdpHdr>(ctx, l4_off).ok_or(Counter::MalformedL4)?;
        // SAFETY: bounds-checked against data_end.
        let (sport, dport, len) = unsafe {
            (
                u16::from_ne_bytes((*udp).src),
                u16::from_ne_bytes((*udp).dst),
                u16::from_be_bytes((*udp).len) as usize,
            )
        };
        if len < UdpHdr::LEN || len > l4_len {
            return Err(Counter::MalformedL4);
        }
        (sport, dport, 0)
    };
    Ok(Some(Packet {
        saddr_be,
        daddr_be,
        sport_be,
        dport_be,
        proto,
        l4_off,
        l3_len: tot_len as u32,
        tcp_syn_only: tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        tcp_flags,
    }))
}
