//! Header layouts the datapath reads and writes, each constant defined once:
//! lengths from network-types, offsets into an Ethernet + IPv4 frame, ICMP
//! types, TCP flags.

use network_types::{eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr};

/// Length of the Ethernet header.
pub const ETH_LEN: usize = EthHdr::LEN;
/// EtherType of IPv4, network byte order.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Length of an IPv4 header without options.
pub const IP_LEN: usize = Ipv4Hdr::LEN;
/// Offset of the IPv4 TTL (and, in the same 16-bit word, the protocol).
pub const IP_TTL_OFF: usize = ETH_LEN + 8;
/// Offset of the IPv4 header checksum.
pub const IP_CSUM_OFF: usize = ETH_LEN + 10;
/// Offset of the IPv4 source address.
pub const IP_SADDR_OFF: usize = ETH_LEN + 12;
/// Offset of the IPv4 destination address.
pub const IP_DADDR_OFF: usize = ETH_LEN + 16;
/// "More fragments" flag and fragment offset bits of the IPv4 `frags` field.
pub const IP_FRAG_MASK: u16 = 0x3fff;
/// IPv4 fragment offset bits: non-zero in every fragment but the first.
pub const IP_FRAG_OFFSET_MASK: u16 = 0x1fff;

/// Length of the ICMP header (type, code, checksum, 4 bytes of rest).
pub const ICMP_LEN: usize = Icmpv4Hdr::LEN;
/// ICMP destination unreachable.
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Its code "port unreachable".
pub const ICMP_PORT_UNREACH: u8 = 3;
/// ICMP time exceeded.
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMP parameter problem.
pub const ICMP_PARAMETERPROB: u8 = 12;

/// Offset of the flags byte in the TCP header.
pub const TCP_FLAGS_OFF: usize = 13;
/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;
