//! Packet parsing: Ethernet → IPv4 → TCP/UDP, with every bound checked.
//!
//! `Ok(None)` means "not a packet we could ever translate" (not IPv4, not
//! TCP/UDP): it goes on untouched. `Err(counter)` means the packet looked like
//! IPv4 TCP/UDP but is malformed or truncated, or is a fragment we cannot
//! place: it also goes on untouched (the kernel drops what is really
//! broken), and the reason is counted. Nothing in here writes to the packet.
//!
//! Fragmented UDP (Cilium's approach): the first fragment carries the UDP
//! header; its ports are remembered by (source, destination, protocol, IP
//! id) in `FRAGMENTS`, and a later fragment (no UDP header) is parsed with
//! them, so it finds the same flow and takes the same address translation
//! (`Packet::l4` false: no ports or L4 checksum to rewrite; the first
//! fragment's incremental L4 checksum update covers the whole datagram).
//! A later fragment seen before its first, and fragmented TCP, go on
//! untouched (`fragment`).

use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{Counter, proto};

use crate::{
    ctx::Ctx,
    hdr::{
        ETH_LEN, ETH_P_IP_BE, IP_FRAG_MASK, IP_FRAG_OFFSET_MASK, TCP_ACK, TCP_FLAGS_OFF, TCP_SYN,
    },
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
    /// The L4 header is in this packet (false for a later fragment, whose
    /// ports come from its first fragment).
    pub l4: bool,
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

/// Bounds every offset derived from `Packet::l4_off` (at most 14 + 60 =
/// 74) for the verifier, which may know nothing of a value read back from
/// memory: a `Packet` handed to a function verified apart lives on the
/// stack as plain bytes.
const L4_OFF_MASK: usize = 0x7f;

impl Packet {
    /// Offset of the L4 header from the start of the frame, bounded.
    #[inline(always)]
    pub fn l4_start(&self) -> usize {
        self.l4_off & L4_OFF_MASK
    }

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
            self.l4_start() + 16
        } else {
            self.l4_start() + 6
        }
    }

    /// Offset of the source port.
    #[inline(always)]
    pub fn sport_off(&self) -> usize {
        self.l4_start()
    }

    /// Offset of the destination port.
    #[inline(always)]
    pub fn dport_off(&self) -> usize {
        self.l4_start() + 2
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
    let (vihl, proto, tot_len, frags, id_be) = unsafe {
        (
            (*ip).vihl,
            (*ip).proto,
            u16::from_be_bytes((*ip).tot_len) as usize,
            u16::from_be_bytes((*ip).frags),
            u16::from_ne_bytes((*ip).id),
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
    let fragment = frags & IP_FRAG_MASK != 0;
    if fragment && proto != proto::UDP {
        return Err(Counter::Fragment);
    }
    let l4_off = ETH_LEN + ihl;
    if frags & IP_FRAG_OFFSET_MASK != 0 {
        return later_fragment(ctx, proto, id_be, l4_off, tot_len);
    }
    if tot_len < ihl + l4_min {
        return Err(Counter::MalformedL4);
    }
    ensure_linear(ctx, l4_off + l4_min, Counter::MalformedL4)?;

    // Pointers from before a pull are stale: read everything again.
    let (saddr_be, daddr_be) = addresses(ctx)?;
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
        // A first fragment holds part of the datagram its length covers.
        if len < UdpHdr::LEN || (!fragment && len > l4_len) {
            return Err(Counter::MalformedL4);
        }
        (sport, dport, 0)
    };
    if fragment {
        crate::frag::remember(saddr_be, daddr_be, id_be, proto, sport_be, dport_be);
    }
    Ok(Some(Packet {
        sport_be,
        dport_be,
        tcp_syn_only: tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        tcp_flags,
        l4: true,
        ..l3(saddr_be, daddr_be, proto, l4_off, tot_len)
    }))
}

/// The IPv4 part of a packet (no ports, no TCP flags, no L4 header yet).
#[inline(always)]
fn l3(saddr_be: u32, daddr_be: u32, proto: u8, l4_off: usize, tot_len: usize) -> Packet {
    Packet {
        saddr_be,
        daddr_be,
        sport_be: 0,
        dport_be: 0,
        proto,
        l4_off,
        l3_len: tot_len as u32,
        tcp_syn_only: false,
        tcp_flags: 0,
        l4: false,
    }
}

/// The IPv4 source and destination (raw network order).
#[inline(always)]
fn addresses(ctx: &impl Ctx) -> Result<(u32, u32), Counter> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN).ok_or(Counter::MalformedIp)?;
    // SAFETY: bounds-checked against data_end.
    Ok(unsafe {
        (
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
        )
    })
}

/// A later fragment of a UDP datagram (no UDP header): parsed with the
/// ports its first fragment carried, if that one was seen.
#[inline(always)]
fn later_fragment(
    ctx: &impl Ctx,
    proto: u8,
    id_be: u16,
    l4_off: usize,
    tot_len: usize,
) -> Result<Option<Packet>, Counter> {
    let (saddr_be, daddr_be) = addresses(ctx)?;
    let (sport_be, dport_be) =
        crate::frag::ports(saddr_be, daddr_be, id_be, proto).ok_or(Counter::Fragment)?;
    Ok(Some(Packet {
        sport_be,
        dport_be,
        ..l3(saddr_be, daddr_be, proto, l4_off, tot_len)
    }))
}
