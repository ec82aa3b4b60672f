//! What socket-level load balancing did, per socket.
//!
//! The cgroup hooks translate a frontend into a backend where a socket names
//! its peer (connect, unconnected sendmsg), so no packet of the socket is
//! translated afterwards, and show the frontend where the socket reports
//! its peer (getpeername, recvmsg), so an application never sees a backend.
//!
//! - `SOCK_PEER` (hash keyed by the socket cookie): a connected socket's
//!   frontend and backend, from its connect until the socket is released
//!   (a hook removes it), so nothing is evicted however many connections
//!   come and go. (Socket storage would free itself, but creating it costs
//!   about 1 µs per socket against ~0.2 µs for a preallocated entry.)
//! - `SOCK_NAT` (LRU hash keyed by the socket cookie): UDP. An unconnected
//!   socket may send to several frontends: FORWARD entries (frontend →
//!   backend) keep its datagrams to a frontend going to one backend (as a
//!   conntrack flow would); REPLY entries (backend → frontend) are what
//!   recvmsg shows. A connected UDP socket gets a REPLY entry too: the
//!   agent finds there, by cookie, the sockets to abort when their backend
//!   leaves (sock_diag does not report socket storage for UDP).

use crate::pod;

/// Key of `SOCK_NAT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// FORWARD: the frontend address; REPLY: the backend address. Network byte order.
    pub addr_be: u32,
    /// Port counterpart of `addr_be`, network byte order.
    pub port_be: u16,
    /// [`crate::ct_dir`]: FORWARD or REPLY.
    pub dir: u8,
    /// Explicit padding.
    pub _pad: u8,
}

/// Value of `SOCK_NAT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockValue {
    /// FORWARD: the backend address; REPLY: the frontend address. Network byte order.
    pub addr_be: u32,
    /// Port counterpart of `addr_be`, network byte order.
    pub port_be: u16,
    /// Explicit padding.
    pub _pad: u16,
    /// The backend's id (FORWARD: still this backend, or chosen anew).
    pub backend_id: u32,
    /// The service port.
    pub svc_id: u32,
}

/// Value of `SOCK_PEER`: the frontend a connected socket named and the
/// backend it was given instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockPeer {
    /// The frontend, network byte order.
    pub frontend_addr_be: u32,
    /// The backend, network byte order.
    pub backend_addr_be: u32,
    /// The frontend's port, network byte order.
    pub frontend_port_be: u16,
    /// The backend's port, network byte order.
    pub backend_port_be: u16,
    /// The backend's id.
    pub backend_id: u32,
    /// The service port.
    pub svc_id: u32,
    /// Explicit padding.
    pub _pad: u32,
}

pod!(SockKey, SockValue, SockPeer);

#[cfg(feature = "user")]
mod user {
    use core::net::SocketAddrV4;

    use super::{SockKey, SockPeer, SockValue};
    use crate::net::{ip_be, port_be, sock_from_be};

    impl SockKey {
        /// The key of socket `cookie`'s entry for `addr` in direction `dir`.
        pub const fn new(cookie: u64, addr: SocketAddrV4, dir: u8) -> Self {
            Self {
                cookie,
                addr_be: ip_be(*addr.ip()),
                port_be: port_be(addr.port()),
                dir,
                _pad: 0,
            }
        }

        /// The address the key names.
        pub const fn addr(&self) -> SocketAddrV4 {
            sock_from_be(self.addr_be, self.port_be)
        }
    }

    impl SockValue {
        /// The address the entry translates to.
        pub const fn addr(&self) -> SocketAddrV4 {
            sock_from_be(self.addr_be, self.port_be)
        }
    }

    impl SockPeer {
        /// The backend the socket is connected to.
        pub const fn backend(&self) -> SocketAddrV4 {
            sock_from_be(self.backend_addr_be, self.backend_port_be)
        }

        /// The frontend the socket named.
        pub const fn frontend(&self) -> SocketAddrV4 {
            sock_from_be(self.frontend_addr_be, self.frontend_port_be)
        }
    }
}
