//! The `BACKENDS` array and least-connections' `BACKEND_CONNS` counts.

use crate::pod;

/// Backend flag: the endpoint runs on this node.
pub const BACKEND_F_LOCAL: u8 = 1;

/// A backend: one endpoint address:port. Value of the `BACKENDS` array,
/// indexed by backend id (id 0 is never used, so an all-zero slot means "free").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Endpoint IPv4 address, network byte order. 0 = free slot.
    pub addr_be: u32,
    /// Endpoint port, network byte order.
    pub port_be: u16,
    /// `BACKEND_F_*` flags.
    pub flags: u8,
    /// Explicit padding.
    pub _pad: u8,
}

impl Backend {
    /// Whether this slot holds a backend.
    #[inline(always)]
    pub const fn is_set(&self) -> bool {
        self.addr_be != 0
    }
}

/// Open-flow counts of a backend (value of `BACKEND_CONNS`, by backend id),
/// for least-connections. Active flows = `opened − closed − reaped[id]`
/// (`BACKEND_REAPED`, written by the agent alone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendConns {
    /// Flows opened (datapath, atomic).
    pub opened: u32,
    /// Flows that saw a FIN or RST (datapath, atomic).
    pub closed: u32,
}

pod!(Backend, BackendConns);

#[cfg(feature = "user")]
mod user {
    use core::net::SocketAddrV4;

    use super::{BACKEND_F_LOCAL, Backend};
    use crate::net::{ip_be, port_be, sock_from_be};

    impl Backend {
        /// The entry of endpoint `addr`, on this node or not.
        pub const fn new(addr: SocketAddrV4, local: bool) -> Self {
            Self {
                addr_be: ip_be(*addr.ip()),
                port_be: port_be(addr.port()),
                flags: if local { BACKEND_F_LOCAL } else { 0 },
                _pad: 0,
            }
        }

        /// The endpoint address:port.
        pub const fn addr(&self) -> SocketAddrV4 {
            sock_from_be(self.addr_be, self.port_be)
        }

        /// Whether the endpoint runs on this node.
        pub const fn is_local(&self) -> bool {
            self.flags & BACKEND_F_LOCAL != 0
        }
    }
}
