//! The `SERVICES` map (frontends) and the `SOURCE_RANGES` trie.

use crate::pod;

/// Which traffic a [`ServiceKey`] matches.
pub mod scope {
    /// Traffic from inside the cluster (pods): ClusterIP frontends.
    pub const INTERNAL: u8 = 0;
    /// Traffic arriving from outside the node: NodePort, LoadBalancer, externalIPs.
    pub const EXTERNAL: u8 = 1;
}

/// Key of the `SERVICES` map: one frontend (address, port, protocol) in one scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network byte order.
    pub addr_be: u32,
    /// Frontend port, network byte order.
    pub port_be: u16,
    /// IP protocol number ([`crate::proto`]).
    pub proto: u8,
    /// [`scope`] of the frontend.
    pub scope: u8,
}

/// Value of the `SERVICES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Identifier of the service port: key of its selection table in `SELECTION`
    /// and index of its counters in `SVC_STATS`. Never 0.
    pub svc_id: u32,
    /// `SVC_F_*` flags.
    pub flags: u32,
}

/// Service flag (external frontends): new flows to a backend on another node
/// go by direct server return (the client's address is kept, the service
/// address travels in an IPv4 option, the backend's node answers the client
/// itself). Without it they are SNATed to this node's address.
pub const SVC_F_DSR: u32 = 1;

/// Service flag (LoadBalancer frontends): only clients inside the Service's
/// `loadBalancerSourceRanges` (entries of `SOURCE_RANGES` for its svc id) may
/// connect; other packets are dropped and counted.
pub const SVC_F_SOURCE_RANGES: u32 = 2;

/// Data of a `SOURCE_RANGES` LPM trie key: the svc id (all 32 bits always
/// match) then the client address, so the key's prefix length is 32 plus
/// the CIDR's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    /// svc id, network byte order (the trie matches bytes most significant first).
    pub svc_id_be: u32,
    /// Client address (or CIDR base), network byte order.
    pub addr_be: u32,
}

pod!(ServiceKey, ServiceValue, SourceRange);

#[cfg(feature = "user")]
mod user {
    use core::net::{Ipv4Addr, SocketAddrV4};

    use super::{ServiceKey, SourceRange};
    use crate::net::{ip_be, ip_from_be, port_be, sock_from_be};

    impl ServiceKey {
        /// The key of frontend `addr` for protocol `proto` in `scope`.
        pub const fn new(addr: SocketAddrV4, proto: u8, scope: u8) -> Self {
            Self {
                addr_be: ip_be(*addr.ip()),
                port_be: port_be(addr.port()),
                proto,
                scope,
            }
        }

        /// The frontend address:port.
        pub const fn frontend(&self) -> SocketAddrV4 {
            sock_from_be(self.addr_be, self.port_be)
        }
    }

    impl SourceRange {
        /// The trie data for client CIDR `addr` of svc id `svc_id`.
        pub const fn new(svc_id: u32, addr: Ipv4Addr) -> Self {
            Self {
                svc_id_be: svc_id.to_be(),
                addr_be: ip_be(addr),
            }
        }

        /// The LPM key prefix length for a CIDR of `prefix` bits.
        pub const fn key_prefix_len(prefix: u8) -> u32 {
            32 + prefix as u32
        }

        /// The CIDR prefix length of an LPM key's prefix length.
        pub const fn cidr_prefix(key_prefix_len: u32) -> u8 {
            let p = key_prefix_len.saturating_sub(32);
            if p > 32 { 32 } else { p as u8 }
        }

        /// The svc id.
        pub const fn svc_id(&self) -> u32 {
            u32::from_be(self.svc_id_be)
        }

        /// The client address (CIDR base).
        pub const fn addr(&self) -> Ipv4Addr {
            ip_from_be(self.addr_be)
        }
    }
}
