//! Service lookup: which service port (if any) a packet is addressed to.

use aya_ebpf::btf_maps::lpm_trie::Key;
use proxy_common::{SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue, SourceRange};

use crate::{
    maps::{SERVICES, SOURCE_RANGES},
    parse::Packet,
};

/// The service port behind the frontend `pkt` is addressed to, in `scope`
/// (`proxy_common::scope`).
#[inline(always)]
pub fn service(pkt: &Packet, scope: u8) -> Option<ServiceValue> {
    by_key(&ServiceKey {
        addr_be: pkt.daddr_be,
        port_be: pkt.dport_be,
        proto: pkt.proto,
        scope,
    })
}

/// The service port behind a frontend key.
#[inline(always)]
pub fn by_key(key: &ServiceKey) -> Option<ServiceValue> {
    // SAFETY: the value is copied out at once.
    unsafe { SERVICES.get(*key) }.copied()
}

/// Whether `pkt`'s client may use a frontend of `svc`: always, unless the
/// frontend is restricted to source ranges and none holds the client.
#[inline(always)]
pub fn source_allowed(svc: &ServiceValue, pkt: &Packet) -> bool {
    if svc.flags & SVC_F_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        64,
        SourceRange {
            svc_id_be: svc.svc_id.to_be(),
            addr_be: pkt.saddr_be,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}
