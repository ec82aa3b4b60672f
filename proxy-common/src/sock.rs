//! The `SOCK_NAT` map: what socket-level load balancing did, per socket.
//!
//! The cgroup hooks translate a frontend into a backend where a socket names
//! its peer (connect, unconnected sendmsg), so no packet of the socket is
//! translated afterwards. Two kinds of entries, keyed by the socket cookie:
//! - FORWARD (frontend → backend): an unconnected UDP socket's backend for a
//!   frontend, so its datagrams to that frontend keep going to one backend
//!   (as a conntrack flow would);
//! - REPLY (backend → frontend): what getpeername and recvmsg show instead
//!   of the backend, so an application never sees a backend address.

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

pod!(SockKey, SockValue);

#[cfg(feature = "user")]
mod user {
    use core::net::SocketAddrV4;

    use super::{SockKey, SockValue};
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
}
