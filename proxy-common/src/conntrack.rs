//! The `CONNTRACK` and `CT_NEW` maps: flows, one entry per direction, or
//! (a half-open flow in `CT_NEW`) one entry for both.

use crate::pod;

/// Direction of a connection-tracking entry.
pub mod ct_dir {
    /// Client → frontend, as the client sent it (before DNAT).
    pub const FORWARD: u8 = 0;
    /// Backend → client, as the backend sent it (before reverse NAT).
    pub const REPLY: u8 = 1;
    /// `CT_NEW` only: a half-open flow in one entry keyed by its client's
    /// address and port alone (`daddr_be`, `dport_be` zero), so the SYN
    /// records it with one insert and both the backend's SYN-ACK (addressed
    /// to the client) and the client's next packet find it. The value holds
    /// the backend in `nat_*` and the frontend in `peer_*`. A client port
    /// with two half-open flows at once (to different frontends) keeps the
    /// second one in FORWARD and REPLY entries.
    pub const CLIENT: u8 = 2;
}

/// TCP connection states of a conntrack entry (`CtValue::state`), each seen
/// in that entry's direction; a flow's state is the furthest of its two
/// entries. They pick the entry's idle timeout (the agent's garbage
/// collection), and only ever advance.
pub mod ct_state {
    /// UDP: no state.
    pub const NONE: u8 = 0;
    /// A SYN was seen, the handshake is not complete (half-open).
    pub const SYN_SENT: u8 = 1;
    /// Past the handshake.
    pub const ESTABLISHED: u8 = 2;
    /// A FIN was seen: closing.
    pub const CLOSING: u8 = 3;
    /// A RST was seen: closed.
    pub const CLOSED: u8 = 4;
}

/// Key of the `CONNTRACK` map: a 5-tuple as seen on the wire in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Source address, network byte order.
    pub saddr_be: u32,
    /// Destination address, network byte order.
    pub daddr_be: u32,
    /// Source port, network byte order.
    pub sport_be: u16,
    /// Destination port, network byte order.
    pub dport_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`ct_dir`].
    pub dir: u8,
    /// Explicit padding.
    pub _pad: u16,
}

/// Value of the `CONNTRACK` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// FORWARD: the backend address the flow is DNATed to.
    /// REPLY: the frontend address replies get as their source.
    pub nat_addr_be: u32,
    /// Port counterpart of `nat_addr_be`, network byte order.
    pub nat_port_be: u16,
    /// `CT_F_*` flags.
    pub flags: u8,
    /// [`ct_state`]: how far the TCP connection got (0 for UDP).
    pub state: u8,
    /// FORWARD: id of the chosen backend in `BACKENDS`.
    pub backend_id: u32,
    /// Service port the flow belongs to (0: learned from a DSR option).
    pub svc_id: u32,
    /// `bpf_ktime_get_coarse_ns` when the entry was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_coarse_ns` of the last packet, refreshed at most once per second.
    pub last_seen_ns: u64,
    /// `CT_F_SNAT` flows only. FORWARD: the node address the client's source
    /// becomes; REPLY: the client address the destination is restored to.
    pub peer_addr_be: u32,
    /// Port counterpart of `peer_addr_be`, network byte order.
    pub peer_port_be: u16,
    /// Explicit padding.
    pub _pad: u16,
}

/// Conntrack flag: the flow came from outside the node (NodePort,
/// LoadBalancer, externalIP). Its replies are translated where they leave
/// the backend pod (`tc_pod_ingress`), not where they reach a client pod.
pub const CT_F_EXTERNAL: u8 = 1;
/// Conntrack flag: the client's source is translated too (SNAT to this
/// node's address); replies come back through this node.
pub const CT_F_SNAT: u8 = 2;
/// Conntrack flag: direct server return. FORWARD (entry node): packets carry
/// the service address to the backend's node. REPLY (backend's node):
/// learned from that option; replies go straight to the client.
pub const CT_F_DSR: u8 = 4;
/// Conntrack flag (FORWARD): the backend is on another node; packets are
/// sent on with a FIB lookup.
pub const CT_F_REMOTE: u8 = 8;
/// Conntrack flag (FORWARD): the flow is counted in `BACKEND_CONNS` (its
/// service uses least-connections) and not yet seen closing.
pub const CT_F_COUNTED: u8 = 16;
/// Conntrack flag: hairpin, a pod reaching itself through its Service. The
/// source is translated to the frontend address (client port kept) so the
/// pod's reply comes back through the datapath; both directions are sent
/// straight back into the pod.
pub const CT_F_HAIRPIN: u8 = 32;
/// Conntrack flag (FORWARD, in `CT_NEW`): the flow is to be counted in
/// `BACKEND_CONNS` once its handshake completes (it becomes `CT_F_COUNTED`
/// then), so half-open flows a flood leaves behind never skew
/// least-connections.
pub const CT_F_COUNT_ON_PROMOTE: u8 = 64;

/// Key of the `FRAGMENTS` map: an IPv4 datagram in fragments, by its
/// source, destination, protocol and IP identification.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address, network byte order.
    pub saddr_be: u32,
    /// Destination address, network byte order.
    pub daddr_be: u32,
    /// IP identification, network byte order.
    pub id_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Explicit padding.
    pub _pad: u8,
}

/// Value of the `FRAGMENTS` map: the ports the datagram's first fragment
/// carried (the later ones carry none), network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue {
    pub sport_be: u16,
    pub dport_be: u16,
}

pod!(CtKey, CtValue, FragKey, FragValue);

#[cfg(feature = "user")]
mod user {
    use core::net::SocketAddrV4;

    use super::{CtKey, CtValue};
    use crate::net::{ip_be, port_be, sock_from_be};

    impl CtKey {
        /// The key of a packet `src` → `dst` of `proto`, as seen in direction `dir`.
        pub const fn new(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, dir: u8) -> Self {
            Self {
                saddr_be: ip_be(*src.ip()),
                daddr_be: ip_be(*dst.ip()),
                sport_be: port_be(src.port()),
                dport_be: port_be(dst.port()),
                proto,
                dir,
                _pad: 0,
            }
        }

        /// The key of a half-open flow of `client` ([`ct_dir::CLIENT`]).
        pub const fn client(client: SocketAddrV4, proto: u8) -> Self {
            Self {
                saddr_be: ip_be(*client.ip()),
                daddr_be: 0,
                sport_be: port_be(client.port()),
                dport_be: 0,
                proto,
                dir: super::ct_dir::CLIENT,
                _pad: 0,
            }
        }

        /// The packet's source address:port.
        pub const fn src(&self) -> SocketAddrV4 {
            sock_from_be(self.saddr_be, self.sport_be)
        }

        /// The packet's destination address:port.
        pub const fn dst(&self) -> SocketAddrV4 {
            sock_from_be(self.daddr_be, self.dport_be)
        }
    }

    impl CtValue {
        /// What the entry translates to: the backend (FORWARD) or the
        /// frontend restored as the source (REPLY).
        pub const fn nat(&self) -> SocketAddrV4 {
            sock_from_be(self.nat_addr_be, self.nat_port_be)
        }

        /// Sets [`Self::nat`].
        pub const fn set_nat(&mut self, addr: SocketAddrV4) {
            self.nat_addr_be = ip_be(*addr.ip());
            self.nat_port_be = port_be(addr.port());
        }

        /// The peer of a SNAT or hairpin flow (see the fields).
        pub const fn peer(&self) -> SocketAddrV4 {
            sock_from_be(self.peer_addr_be, self.peer_port_be)
        }

        /// Sets [`Self::peer`].
        pub const fn set_peer(&mut self, addr: SocketAddrV4) {
            self.peer_addr_be = ip_be(*addr.ip());
            self.peer_port_be = port_be(addr.port());
        }
    }
}
