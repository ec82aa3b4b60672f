//! Types shared by the eBPF datapath (`proxy-ebpf`) and the agent (`proxy-agent`).
//!
//! Everything that crosses the kernel/user boundary lives here and nowhere else:
//! map names, keys, values, counter numbers, one module per map family. Every
//! type is `#[repr(C)]` with its padding spelled out as named fields, so there
//! are no implicit holes the verifier (or a reader of `bpftool map dump`) can
//! trip over. Fields that hold network-byte-order values end in `_be`.
//!
//! With the `user` feature, the keys and values also get constructors and
//! accessors from `core::net` addresses: the only place userspace converts
//! byte order (the kernel works on the raw fields).
//!
//! A change to any type in this crate changes the layout of pinned maps: bump
//! [`PIN_LAYOUT_VERSION`] so a new agent pins into a fresh directory instead of
//! silently reusing maps of the old shape (the layout test in this crate fails
//! until you do).
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod affinity;
pub mod backend;
pub mod bench;
pub mod config;
pub mod conntrack;
pub mod counters;
pub mod hash;
pub mod maps;
pub mod names;
#[cfg(feature = "user")]
mod net;
pub mod route;
pub mod selection;
pub mod service;
pub mod sock;
pub mod stats;
pub mod wire;

pub use affinity::*;
pub use backend::*;
pub use bench::*;
pub use config::*;
pub use conntrack::*;
pub use counters::{Counter, Verdict};
pub use names::*;
pub use route::*;
pub use selection::*;
pub use service::*;
pub use sock::*;
pub use stats::*;
pub use wire::*;

/// Version of the pinned map layout; pins live under `<bpffs root>/v<N>/`.
pub const PIN_LAYOUT_VERSION: u32 = 10;

/// Marks shared types as plain old data for aya (userspace map access).
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: #[repr(C)] plain-old-data with explicit padding, valid
            // for any bit pattern.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use pod;

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    /// Layout fingerprint of every shared type. If this test fails you changed a
    /// pinned layout: bump `PIN_LAYOUT_VERSION` and update the expectation.
    #[test]
    fn layout_is_pinned_to_version() {
        let fingerprint = [
            size_of::<ServiceKey>(),
            offset_of!(ServiceKey, scope),
            size_of::<ServiceValue>(),
            size_of::<Backend>(),
            size_of::<SelBlock>(),
            size_of::<CtKey>(),
            offset_of!(CtKey, dir),
            size_of::<CtValue>(),
            offset_of!(CtValue, last_seen_ns),
            size_of::<SvcCounters>(),
            size_of::<NodeConfig>(),
            size_of::<AffinityValue>(),
            size_of::<BackendConns>(),
            Counter::CAPACITY,
            size_of::<SockKey>(),
            size_of::<SockValue>(),
            size_of::<SockPeer>(),
            size_of::<FragKey>(),
            size_of::<FragValue>(),
            size_of::<NextHop>(),
            maps::PINNED.len(),
        ];
        assert_eq!(PIN_LAYOUT_VERSION, 10);
        assert_eq!(
            fingerprint,
            [
                8, 7, 8, 8, 64, 16, 13, 40, 24, 32, 32, 16, 8, 64, 16, 16, 24, 12, 4, 28, 21
            ]
        );
    }
}
