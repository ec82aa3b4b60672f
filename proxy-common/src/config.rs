//! The `CONFIG` array: this node's settings for the datapath.

use crate::pod;

/// This node's settings for the datapath: the single element of `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// Address external flows to remote backends are SNATed to, network byte order.
    pub snat_addr_be: u32,
    /// First port of the SNAT range (host byte order).
    pub snat_port_min: u16,
    /// Last port of the SNAT range (host byte order).
    pub snat_port_max: u16,
    /// `NODE_F_*` flags.
    pub flags: u32,
    /// Lowest and highest ClusterIP (host byte order; min > max: none). A
    /// pod's packet to a non-service port of an address in this range may
    /// be a hairpin reply; only those are looked up in conntrack.
    pub vip_min: u32,
    pub vip_max: u32,
    /// An address this node's NodePorts are keyed at (network byte order;
    /// 0: none). A DSR option naming another node's address is checked
    /// against the NodePort this key finds.
    pub nodeport_addr_be: u32,
    /// Network namespace cookie of this node's own namespace: with
    /// `NODE_F_SOCK_HOST_ONLY`, the socket hooks translate only sockets there.
    pub host_netns_cookie: u64,
}

/// Node flag: external traffic is served here: `tc_pod_ingress` looks up
/// replies of external flows (local backends, DSR) for packets that are not
/// addressed to a service.
pub const NODE_F_EXTERNAL: u32 = 1;

/// Node flag (`--socket-lb host-only`): the socket hooks translate only
/// sockets in this node's own network namespace; pods' sockets are left to
/// the packet path (service meshes whose sidecars must see Service addresses).
pub const NODE_F_SOCK_HOST_ONLY: u32 = 2;

pod!(NodeConfig);

#[cfg(feature = "user")]
mod user {
    use core::net::Ipv4Addr;

    use super::NodeConfig;
    use crate::net::{ip_be, ip_from_be};

    impl NodeConfig {
        /// The SNAT address, if set.
        pub const fn snat_addr(&self) -> Option<Ipv4Addr> {
            if self.snat_addr_be == 0 {
                None
            } else {
                Some(ip_from_be(self.snat_addr_be))
            }
        }

        /// Sets [`Self::snat_addr`].
        pub const fn set_snat_addr(&mut self, addr: Option<Ipv4Addr>) {
            self.snat_addr_be = match addr {
                Some(a) => ip_be(a),
                None => 0,
            };
        }

        /// Sets [`NodeConfig::nodeport_addr_be`].
        pub const fn set_nodeport_addr(&mut self, addr: Option<Ipv4Addr>) {
            self.nodeport_addr_be = match addr {
                Some(a) => ip_be(a),
                None => 0,
            };
        }

        /// Sets the ClusterIP range (`None`: no ClusterIP).
        pub const fn set_vip_range(&mut self, range: Option<(Ipv4Addr, Ipv4Addr)>) {
            (self.vip_min, self.vip_max) = match range {
                Some((lo, hi)) => (lo.to_bits(), hi.to_bits()),
                None => (u32::MAX, 0),
            };
        }
    }
}
