//! Service lookup: which service port (if any) a packet is addressed to.

use proxy_common::{ServiceKey, ServiceValue};

use crate::{maps::SERVICES, parse::Packet};

/// The service port behind the frontend `pkt` is addressed to, in `scope`
/// (`proxy_common::scope`).
#[inline(always)]
pub fn service(pkt: &Packet, scope: u8) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr_be: pkt.daddr_be,
        port_be: pkt.dport_be,
        proto: pkt.proto,
        scope,
    };
    // SAFETY: the value is copied out at once.
    unsafe { SERVICES.get(key) }.copied()
}
