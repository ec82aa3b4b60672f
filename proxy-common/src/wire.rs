//! On-the-wire formats the datapath reads and writes: IP protocol numbers
//! and the DSR option.

/// IANA protocol numbers used by the datapath.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// IPv4 option carrying the service address to the backend's node under DSR:
/// `[type, length, port (2, network order), address (4, network order)]`.
/// The type has the copy bit set (copied into fragments), class 0, number
/// 26, the value Cilium uses for the same purpose.
pub const DSR_OPT_TYPE: u8 = 0x9a;
/// Length of the DSR option in bytes (a multiple of 4: no padding needed).
pub const DSR_OPT_LEN: u8 = 8;
