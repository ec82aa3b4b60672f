//! The `ROUTES` and `ROUTE_GEN` maps: where packets to a remote backend go,
//! remembered per backend so an established flow skips the FIB lookup.

use crate::pod;

/// Value of `ROUTES` (indexed by backend id): the result of a FIB lookup
/// for packets to that backend. Written by the datapath when it looks the
/// route up, valid while `generation` equals `ROUTE_GEN[0]` (which the agent bumps
/// on every route, neighbour, address or link change it hears of). A writer
/// clears `generation` first and sets it last, so a reader that checks it first
/// never uses a half-written entry (x86-64 keeps stores and loads in order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NextHop {
    /// `ROUTE_GEN[0]` when this was filled (0: never).
    pub generation: u32,
    /// The backend address it was looked up for, network byte order (a
    /// backend id reused for another address misses).
    pub daddr_be: u32,
    /// Output interface.
    pub ifindex: u32,
    /// The largest IPv4 total length this route took (a larger packet looks
    /// the route up again: the MTU may not allow it).
    pub max_len: u16,
    /// Explicit padding.
    pub _pad: u16,
    /// The frame's MACs: destination (the next hop), then source (the
    /// output interface).
    pub macs: [u8; 12],
}

pod!(NextHop);
