//! Building test frames and checking them, with etherparse: a packet library
//! independent of the datapath's own parsing and checksum code.

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpNumber, Ipv4Header, Ipv4Options,
    SlicedPacket, TcpHeader, TransportSlice, UdpHeader, icmpv4::DestUnreachableHeader,
};

/// MAC of the client pod in fixtures.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// MAC of the node side of the client's veth in fixtures.
pub const NODE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xfe];

/// L4 protocol of a fixture frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP with the given flags.
    Tcp { syn: bool, ack: bool },
    /// UDP; `zero_csum` sends it without a checksum (0), as RFC 768 allows.
    Udp { zero_csum: bool },
}

/// A frame description: everything a fixture varies.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub ip_options: Vec<u8>,
    pub ttl: u8,
    pub ip_id: u16,
}

impl Frame {
    /// A TCP SYN from the client.
    pub fn tcp_syn(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            src,
            dst,
            l4: L4::Tcp {
                syn: true,
                ack: false,
            },
            payload: vec![],
            ip_options: vec![],
            ttl: 64,
            ip_id: 0x1234,
        }
    }

    /// A UDP datagram from the client.
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        Self {
            l4: L4::Udp { zero_csum: false },
            payload: payload.to_vec(),
            ..Self::tcp_syn(src, dst)
        }
    }

    /// The same frame with other endpoints (checksums are recomputed by `build`).
    pub fn with_endpoints(&self, src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self {
            src,
            dst,
            ..self.clone()
        }
    }

    fn ip_header(&self, proto: IpNumber, l4_len: usize) -> Ipv4Header {
        let mut ip = Ipv4Header::new(
            0,
            self.ttl,
            proto,
            self.src.ip().octets(),
            self.dst.ip().octets(),
        )
        .expect("valid IPv4 header");
        ip.identification = self.ip_id;
        ip.dont_fragment = true;
        ip.options = Ipv4Options::try_from(self.ip_options.as_slice()).expect("valid IPv4 options");
        ip.set_payload_len(l4_len).expect("payload fits");
        ip.header_checksum = ip.calc_header_checksum();
        ip
    }

    /// The wire bytes, every checksum correct.
    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let eth = Ethernet2Header {
            source: self.src_mac,
            destination: self.dst_mac,
            ether_type: EtherType::IPV4,
        };
        out.extend_from_slice(&eth.to_bytes());
        match self.l4 {
            L4::Tcp { syn, ack } => {
                let mut tcp = TcpHeader::new(self.src.port(), self.dst.port(), 1000, 64240);
                tcp.syn = syn;
                tcp.ack = ack;
                if ack {
                    tcp.acknowledgment_number = 5000;
                }
                let ip = self.ip_header(IpNumber::TCP, tcp.header_len() + self.payload.len());
                tcp.checksum = tcp
                    .calc_checksum_ipv4(&ip, &self.payload)
                    .expect("checksum");
                out.extend_from_slice(&ip.to_bytes());
                out.extend_from_slice(&tcp.to_bytes());
            }
            L4::Udp { zero_csum } => {
                let ip = self.ip_header(IpNumber::UDP, 8 + self.payload.len());
                let udp = if zero_csum {
                    UdpHeader::without_ipv4_checksum(
                        self.src.port(),
                        self.dst.port(),
                        self.payload.len(),
                    )
                    .expect("udp header")
                } else {
                    UdpHeader::with_ipv4_checksum(
                        self.src.port(),
                        self.dst.port(),
                        &ip,
                        &self.payload,
                    )
                    .expect("udp header")
                };
                out.extend_from_slice(&ip.to_bytes());
                out.extend_from_slice(&udp.to_bytes());
            }
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

/// RFC 1071 sum of big-endian 16-bit words, folded (not complemented).
fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// What the kernel writes when it completes a checksum over `region` whose
/// checksum field (at `field`) holds `value`.
fn completed_checksum(region: &[u8], field: usize, value: u16) -> u16 {
    let mut r = region.to_vec();
    r[field..field + 2].copy_from_slice(&value.to_be_bytes());
    match !ones_sum(&r) {
        0 => 0xffff,
        c => c,
    }
}

/// The one value F of the checksum field at `field` that a completion over
/// `region` leaves unchanged: F = ~(S + F) in ones' complement (S the sum
/// without the field), so 2F = ~S modulo 0xffff and F = ~S / 2 (2 is
/// invertible: 2 × 0x8000 = 1 mod 0xffff); 0 is written 0xffff, as the
/// completion writes it.
fn fixed_point(region: &[u8], field: usize) -> u16 {
    let mut r = region.to_vec();
    r[field..field + 2].copy_from_slice(&[0, 0]);
    let not_s = u32::from(!ones_sum(&r)) % 0xffff;
    match (not_s * 0x8000) % 0xffff {
        0 => 0xffff,
        f => f as u16,
    }
}

/// The ICMP port unreachable the datapath must answer `original` with, sent
/// from `from` (the frontend) back to the client: at most 80 bytes of the
/// original IPv4 packet quoted, the quoted L4 checksum field set to the value
/// a pending checksum completion leaves unchanged.
pub fn icmp_port_unreachable(original: &[u8], from: Ipv4Addr) -> Vec<u8> {
    let ip_in = &original[14..];
    let mut quote = ip_in[..ip_in.len().min(80)].to_vec();
    let ihl = usize::from(quote[0] & 0x0f) * 4;
    let field = match quote[9] {
        6 => 16,
        _ => 6,
    };
    if ihl + field + 2 <= quote.len() {
        let region = quote[ihl..].to_vec();
        let fixed = fixed_point(&region, field);
        assert_eq!(completed_checksum(&region, field, fixed), fixed);
        quote[ihl + field..ihl + field + 2].copy_from_slice(&fixed.to_be_bytes());
    }
    let quote = quote.as_slice();
    let client: [u8; 4] = ip_in[12..16].try_into().expect("4 bytes");
    let tos = ip_in[1];
    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        quote,
    );
    let mut ip = Ipv4Header::new(0, 64, IpNumber::ICMP, from.octets(), client).expect("header");
    // Like the kernel's own ICMP errors: no DF, id 0.
    ip.dont_fragment = false;
    ip.dscp = etherparse::IpDscp::try_new(tos >> 2).expect("dscp");
    ip.ecn = etherparse::IpEcn::try_new(tos & 3).expect("ecn");
    let macs = (
        original[0..6].try_into().expect("mac"),
        original[6..12].try_into().expect("mac"),
    );
    icmp_frame(macs, ip, &icmp, quote)
}

/// An Ethernet frame carrying an ICMP message: `ip` (payload length set
/// here, checksum computed), `icmp`, then `quote`.
fn icmp_frame(
    macs: ([u8; 6], [u8; 6]),
    mut ip: Ipv4Header,
    icmp: &Icmpv4Header,
    quote: &[u8],
) -> Vec<u8> {
    ip.set_payload_len(icmp.header_len() + quote.len())
        .expect("fits");
    ip.header_checksum = ip.calc_header_checksum();
    let eth = Ethernet2Header {
        source: macs.0,
        destination: macs.1,
        ether_type: EtherType::IPV4,
    };
    let mut out = Vec::new();
    out.extend_from_slice(&eth.to_bytes());
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(quote);
    out
}

/// An ICMP "fragmentation needed" (next-hop MTU `mtu`) from `from` to `to`,
/// quoting the first `quote_len` bytes of the IPv4 packet in `quoted` (an
/// Ethernet frame), as a router sends it; MACs `macs` (source, destination).
pub fn icmp_frag_needed(
    macs: ([u8; 6], [u8; 6]),
    from: Ipv4Addr,
    to: Ipv4Addr,
    mtu: u16,
    quoted: &[u8],
    quote_len: usize,
    ttl: u8,
) -> Vec<u8> {
    let ip_in = &quoted[14..];
    let quote = &ip_in[..quote_len.min(ip_in.len())];
    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: mtu,
        }),
        quote,
    );
    let mut ip =
        Ipv4Header::new(0, ttl, IpNumber::ICMP, from.octets(), to.octets()).expect("header");
    ip.dont_fragment = false;
    icmp_frame(macs, ip, &icmp, quote)
}

/// Verifies the IPv4 header checksum and the TCP/UDP/ICMP checksum of a frame
/// by recomputing them from scratch.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let sliced = SlicedPacket::from_ethernet(frame).map_err(|e| format!("unparseable: {e}"))?;
    let Some(etherparse::NetSlice::Ipv4(ipv4)) = &sliced.net else {
        return Err("not IPv4".into());
    };
    let ip = ipv4.header().to_header();
    let got = ipv4.header().header_checksum();
    let want = ip.calc_header_checksum();
    if got != want {
        return Err(format!("IPv4 checksum {got:#06x}, expected {want:#06x}"));
    }
    match &sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            let want = tcp
                .to_header()
                .calc_checksum_ipv4(&ip, tcp.payload())
                .map_err(|e| e.to_string())?;
            if tcp.checksum() != want {
                return Err(format!(
                    "TCP checksum {:#06x}, expected {want:#06x}",
                    tcp.checksum()
                ));
            }
        }
        Some(TransportSlice::Udp(udp)) => {
            if udp.checksum() != 0 {
                let want = udp
                    .to_header()
                    .calc_checksum_ipv4(&ip, udp.payload())
                    .map_err(|e| e.to_string())?;
                if udp.checksum() != want {
                    return Err(format!(
                        "UDP checksum {:#06x}, expected {want:#06x}",
                        udp.checksum()
                    ));
                }
            }
        }
        Some(TransportSlice::Icmpv4(icmp)) => {
            let header = icmp.header();
            let want =
                Icmpv4Header::with_checksum(header.icmp_type.clone(), icmp.payload()).checksum;
            if header.checksum != want {
                return Err(format!(
                    "ICMP checksum {:#06x}, expected {want:#06x}",
                    header.checksum
                ));
            }
        }
        other => return Err(format!("unexpected transport {other:?}")),
    }
    Ok(())
}

/// Sets the TCP flags byte of an IPv4 TCP frame (FIN 0x01, SYN 0x02, RST
/// 0x04, ACK 0x10) and recomputes its TCP checksum.
pub fn set_tcp_flags(frame: &mut [u8], flags: u8) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let l4 = 14 + ihl;
    frame[l4 + 13] = flags;
    frame[l4 + 16] = 0;
    frame[l4 + 17] = 0;
    let mut sum: u32 = 0;
    for w in [&frame[26..30], &frame[30..34]] {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    let tot = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let seg = &frame[l4..14 + tot];
    sum += 6 + u32::try_from(seg.len()).expect("short");
    sum += u32::from(ones_sum(seg));
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[l4 + 16..l4 + 18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Source address:port of an IPv4 TCP/UDP frame (panics on anything else).
pub fn src_of(frame: &[u8]) -> SocketAddrV4 {
    let ip = Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let l4 = 14 + ihl;
    SocketAddrV4::new(ip, u16::from_be_bytes([frame[l4], frame[l4 + 1]]))
}

/// Destination address:port of an IPv4 TCP/UDP frame (panics on anything else).
pub fn dst_of(frame: &[u8]) -> SocketAddrV4 {
    let ip = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let l4 = 14 + ihl;
    SocketAddrV4::new(ip, u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]))
}
