//! The `AFFINITY` map: session affinity, a client's backend per service port.

use crate::pod;

/// Key of the `AFFINITY` map: a client of a service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    pub svc_id: u32,
    /// Client address, network byte order.
    pub client_be: u32,
}

/// Value of the `AFFINITY` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// The backend the client's flows go to.
    pub backend_id: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` of the client's last new flow.
    pub last_ns: u64,
}

pod!(AffinityKey, AffinityValue);

#[cfg(feature = "user")]
mod user {
    use core::net::Ipv4Addr;

    use super::AffinityKey;
    use crate::net::{ip_be, ip_from_be};

    impl AffinityKey {
        /// The key of `client` of service port `svc_id`.
        pub const fn new(svc_id: u32, client: Ipv4Addr) -> Self {
            Self {
                svc_id,
                client_be: ip_be(client),
            }
        }

        /// The client address.
        pub const fn client(&self) -> Ipv4Addr {
            ip_from_be(self.client_be)
        }
    }
}
