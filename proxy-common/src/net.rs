//! Byte order, in one place: the raw network-order values the datapath
//! stores (`_be` fields, compared as they sit in packets) from and to
//! `core::net` addresses. Every constructor and accessor of the shared types
//! goes through these.

use core::net::{Ipv4Addr, SocketAddrV4};

/// The raw value of an address as the datapath stores and compares it.
#[inline]
pub const fn ip_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The address a raw network-order value holds.
#[inline]
pub const fn ip_from_be(raw: u32) -> Ipv4Addr {
    let b = raw.to_ne_bytes();
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

/// The raw value of a port as the datapath stores it.
#[inline]
pub const fn port_be(port: u16) -> u16 {
    port.to_be()
}

/// The port a raw network-order value holds.
#[inline]
pub const fn port_from_be(raw: u16) -> u16 {
    u16::from_be(raw)
}

/// The address:port a raw pair holds.
#[inline]
pub const fn sock_from_be(addr_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip_from_be(addr_be), port_from_be(port_be))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_are_packet_bytes() {
        let ip = Ipv4Addr::new(10, 96, 0, 10);
        assert_eq!(ip_be(ip).to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(ip_from_be(ip_be(ip)), ip);
        assert_eq!(port_be(80).to_ne_bytes(), [0, 80]);
        assert_eq!(port_from_be(port_be(8080)), 8080);
        let sa = SocketAddrV4::new(ip, 53);
        assert_eq!(sock_from_be(ip_be(ip), port_be(53)), sa);
    }
}
