//! Fragmented UDP datagrams: the first fragment's ports, kept for the
//! later fragments, which carry none (see `parse`).

use proxy_common::{FragKey, FragValue};

use crate::maps::FRAGMENTS;

#[inline(always)]
fn key(saddr_be: u32, daddr_be: u32, id_be: u16, proto: u8) -> FragKey {
    FragKey {
        saddr_be,
        daddr_be,
        id_be,
        proto,
        _pad: 0,
    }
}

/// Remembers the ports of a datagram's first fragment (best effort: a
/// later fragment that finds nothing goes on untouched).
#[inline(always)]
pub fn remember(saddr_be: u32, daddr_be: u32, id_be: u16, proto: u8, sport_be: u16, dport_be: u16) {
    let value = FragValue { sport_be, dport_be };
    let _ = FRAGMENTS.insert(key(saddr_be, daddr_be, id_be, proto), value, 0);
}

/// The ports a later fragment's datagram carried in its first fragment.
#[inline(always)]
pub fn ports(saddr_be: u32, daddr_be: u32, id_be: u16, proto: u8) -> Option<(u16, u16)> {
    // SAFETY: the value is copied out at once.
    unsafe { FRAGMENTS.get(key(saddr_be, daddr_be, id_be, proto)) }
        .map(|v| (v.sport_be, v.dport_be))
}
