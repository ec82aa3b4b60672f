//! Types shared by the eBPF datapath (`proxy-ebpf`) and the agent (`proxy-agent`).
//!
//! Everything that crosses the kernel/user boundary lives here and nowhere else:
//! map names, keys, values, counter numbers. Every type is `#[repr(C)]` with its
//! padding spelled out as named fields, so there are no implicit holes the
//! verifier (or a reader of `bpftool map dump`) can trip over. Fields that hold
//! network-byte-order values end in `_be`.
//!
//! A change to any type in this crate changes the layout of pinned maps: bump
//! [`PIN_LAYOUT_VERSION`] so a new agent pins into a fresh directory instead of
//! silently reusing maps of the old shape (the layout test in this crate fails
//! until you do).
#![no_std]

pub mod counters;
pub mod hash;
pub mod maps;

pub use counters::{Counter, Verdict};

/// Version of the pinned map layout; pins live under `<bpffs root>/v<N>/`.
pub const PIN_LAYOUT_VERSION: u32 = 5;

/// IANA protocol numbers used by the datapath.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// Which traffic a [`ServiceKey`] matches.
pub mod scope {
    /// Traffic from inside the cluster (pods): ClusterIP frontends.
    pub const INTERNAL: u8 = 0;
    /// Traffic arriving from outside the node: NodePort, LoadBalancer, externalIPs.
    pub const EXTERNAL: u8 = 1;
}

/// Key of the `SERVICES` map: one frontend (address, port, protocol) in one scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network byte order.
    pub addr_be: u32,
    /// Frontend port, network byte order.
    pub port_be: u16,
    /// IP protocol number ([`proto`]).
    pub proto: u8,
    /// [`scope`] of the frontend.
    pub scope: u8,
}

/// Value of the `SERVICES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Identifier of the service port: key of its selection table in `SELECTION`
    /// and index of its counters in `SVC_STATS`. Never 0.
    pub svc_id: u32,
    /// `SVC_F_*` flags.
    pub flags: u32,
}

/// Service flag (external frontends): new flows to a backend on another node
/// go by direct server return (the client's address is kept, the service
/// address travels in an IPv4 option, the backend's node answers the client
/// itself). Without it they are SNATed to this node's address.
pub const SVC_F_DSR: u32 = 1;

/// Service flag (LoadBalancer frontends): only clients inside the Service's
/// `loadBalancerSourceRanges` (entries of `SOURCE_RANGES` for its svc id) may
/// connect; other packets are dropped and counted.
pub const SVC_F_SOURCE_RANGES: u32 = 2;

/// Data of a `SOURCE_RANGES` LPM trie key: the svc id (all 32 bits always
/// match) then the client address, so the key's prefix length is 32 plus
/// the CIDR's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    /// svc id, network byte order (the trie matches bytes most significant first).
    pub svc_id_be: u32,
    /// Client address (or CIDR base), network byte order.
    pub addr_be: u32,
}

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

/// Number of `u32` words in one [`SelBlock`].
pub const SEL_WORDS: usize = 16;

/// One 64-byte element of a selection table; a table is a contiguous region of
/// blocks in the `SELECTION` array, found through `SVC_TABLE[svc_id]`. Array
/// map values are stored in 8-byte multiples, so packing words into blocks
/// keeps the table as small as its content.
///
/// Layout of a selection table with `n` eligible backends, `d` draining ones
/// and a Maglev table of `m` entries (block numbers relative to the table's
/// first block):
/// - block 0: the header, words `SEL_HDR_*`;
/// - from block 1: backend ids, `u32` each, 16 per block: the `n` eligible
///   ones (index `i` is what the Maglev table stores), then the `d` draining
///   ones (kept only so their existing flows live on; never selected);
/// - from block `SEL_HDR_WEIGHTS_BLOCK`: the `n` weights, `u32` each (read by
///   the agent only);
/// - from block `SEL_HDR_TABLE_BLOCK`: the Maglev table, `u16` backend indices,
///   32 per block (two per word, the even index in the low half).
///
/// A new table is written into blocks no packet reads, then `SVC_TABLE` is
/// switched to it with one 4-byte store, so a packet sees either the old table
/// or the new one, never a mix. The old region is reused only after a
/// quarantine far longer than any program run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SelBlock {
    /// The words of this block.
    pub w: [u32; SEL_WORDS],
}

impl Default for SelBlock {
    fn default() -> Self {
        Self { w: [0; SEL_WORDS] }
    }
}

/// Header word: number of backends eligible for new flows (`n`).
pub const SEL_HDR_COUNT: usize = 0;
/// Header word: the selection algorithm ([`algorithm`]).
pub const SEL_HDR_ALGORITHM: usize = 1;
/// Header word: Maglev table size `m` (prime), 0 without a table.
pub const SEL_HDR_TABLE_SIZE: usize = 2;
/// Header word: first block of the Maglev table.
pub const SEL_HDR_TABLE_BLOCK: usize = 3;
/// Header word: what the flow hash covers ([`hash_mode`]).
pub const SEL_HDR_HASH_MODE: usize = 4;
/// Header word: number of draining backends (`d`).
pub const SEL_HDR_DRAINING: usize = 5;
/// Header word: first block of the weights.
pub const SEL_HDR_WEIGHTS_BLOCK: usize = 6;
/// Header word: `SEL_F_*` flags.
pub const SEL_HDR_FLAGS: usize = 7;
/// Header word: `sessionAffinity: ClientIP` timeout in seconds (0: no affinity).
pub const SEL_HDR_AFFINITY_TIMEOUT: usize = 8;

/// Flag: with no backend, drop new flows instead of rejecting them (a Local
/// traffic policy on a node without local endpoints, while endpoints exist
/// elsewhere).
pub const SEL_F_DROP_WHEN_EMPTY: u32 = 1;

/// Maglev table entries per block.
pub const SEL_ENTRIES_PER_BLOCK: u32 = 2 * SEL_WORDS as u32;

/// Backend selection algorithms, stored in a selection table's header.
pub mod algorithm {
    /// Random: uniform over the backends, or proportional to their weights
    /// (a random slot of the weighted table) when weights differ.
    pub const RANDOM: u32 = 0;
    /// Maglev consistent hashing of the flow hash (the 5-tuple, or the
    /// source address alone for source hashing: `hash_mode`).
    pub const MAGLEV: u32 = 1;
    /// Round robin: each new flow the next backend (the next slot of the
    /// weighted table when weights differ).
    pub const ROUND_ROBIN: u32 = 2;
    /// Least connections: the backend with the fewest open flows (counted
    /// in `BACKEND_CONNS`), ties broken from a random start.
    pub const LEAST_CONN: u32 = 3;
}

/// How many eligible backends least-connections compares, and how many an
/// affinity entry is checked against (the first ones of the table).
pub const SEL_SCAN_MAX: u32 = 256;

/// Longest Service port description in `SVC_NAMES`.
pub const SVC_NAME_MAX: usize = 248;

/// Value of `SVC_NAMES`: what a svc id stands for, so tools reading the
/// pinned maps (`proxy-agent service`, `bpftool map dump`) can name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcName {
    /// Length of `text`.
    pub len: u32,
    /// `NAMESPACE/NAME:PORT/PROTOCOL`, plus ` external` for the table of a
    /// Service port's external frontends; UTF-8, zero padded.
    pub text: [u8; SVC_NAME_MAX],
    /// Explicit padding.
    pub _pad: u32,
}

impl Default for SvcName {
    fn default() -> Self {
        Self {
            len: 0,
            text: [0; SVC_NAME_MAX],
            _pad: 0,
        }
    }
}

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

/// What the flow hash covers, stored in a selection table's header.
pub mod hash_mode {
    /// The 5-tuple: every connection is placed on its own.
    pub const FIVE_TUPLE: u32 = 0;
    /// The source address only: a client sticks to one backend (session affinity).
    pub const SOURCE: u32 = 1;
}

/// Block of a selection table that holds backend `index`, and the word in it.
#[inline(always)]
pub const fn sel_backend_pos(index: u32) -> (u32, usize) {
    (
        1 + index / SEL_WORDS as u32,
        (index % SEL_WORDS as u32) as usize,
    )
}

/// Block (relative to the table start) and word holding Maglev entry `slot`,
/// and the shift of its half.
#[inline(always)]
pub const fn sel_entry_pos(slot: u32) -> (u32, usize, u32) {
    let in_block = slot % SEL_ENTRIES_PER_BLOCK;
    (
        slot / SEL_ENTRIES_PER_BLOCK,
        (in_block / 2) as usize,
        (in_block % 2) * 16,
    )
}

/// Number of blocks a selection table needs.
pub const fn sel_blocks(backends: u32, draining: u32, table_size: u32) -> u32 {
    1 + (backends + draining).div_ceil(SEL_WORDS as u32)
        + backends.div_ceil(SEL_WORDS as u32)
        + table_size.div_ceil(SEL_ENTRIES_PER_BLOCK)
}

/// Direction of a connection-tracking entry.
pub mod ct_dir {
    /// Client → frontend, as the client sent it (before DNAT).
    pub const FORWARD: u8 = 0;
    /// Backend → client, as the backend sent it (before reverse NAT).
    pub const REPLY: u8 = 1;
}

/// TCP connection states of a conntrack entry (`CtValue::state`), each seen
/// in that entry's direction; a flow's state is the furthest of its two
/// entries. They pick the entry's idle timeout (the agent's garbage
/// collection), and only ever advance.
pub mod ct_state {
    /// UDP: no state.
    pub const NONE: u8 = 0;
    /// A SYN was seen, the handshake is not complete (half-open).
    pub const SYN_SENT: u8 = 1;
    /// Past the handshake.
    pub const ESTABLISHED: u8 = 2;
    /// A FIN was seen: closing.
    pub const CLOSING: u8 = 3;
    /// A RST was seen: closed.
    pub const CLOSED: u8 = 4;
}

/// Key of the `CONNTRACK` map: a 5-tuple as seen on the wire in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Source address, network byte order.
    pub saddr_be: u32,
    /// Destination address, network byte order.
    pub daddr_be: u32,
    /// Source port, network byte order.
    pub sport_be: u16,
    /// Destination port, network byte order.
    pub dport_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`ct_dir`].
    pub dir: u8,
    /// Explicit padding.
    pub _pad: u16,
}

/// Value of the `CONNTRACK` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// FORWARD: the backend address the flow is DNATed to.
    /// REPLY: the frontend address replies get as their source.
    pub nat_addr_be: u32,
    /// Port counterpart of `nat_addr_be`, network byte order.
    pub nat_port_be: u16,
    /// `CT_F_*` flags.
    pub flags: u8,
    /// [`ct_state`]: how far the TCP connection got (0 for UDP).
    pub state: u8,
    /// FORWARD: id of the chosen backend in `BACKENDS`.
    pub backend_id: u32,
    /// Service port the flow belongs to (0: learned from a DSR option).
    pub svc_id: u32,
    /// `bpf_ktime_get_coarse_ns` when the entry was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_coarse_ns` of the last packet, refreshed at most once per second.
    pub last_seen_ns: u64,
    /// `CT_F_SNAT` flows only. FORWARD: the node address the client's source
    /// becomes; REPLY: the client address the destination is restored to.
    pub peer_addr_be: u32,
    /// Port counterpart of `peer_addr_be`, network byte order.
    pub peer_port_be: u16,
    /// Explicit padding.
    pub _pad: u16,
}

/// Conntrack flag: the flow came from outside the node (NodePort,
/// LoadBalancer, externalIP). Its replies are translated where they leave
/// the backend pod (`tc_pod_ingress`), not where they reach a client pod.
pub const CT_F_EXTERNAL: u8 = 1;
/// Conntrack flag: the client's source is translated too (SNAT to this
/// node's address); replies come back through this node.
pub const CT_F_SNAT: u8 = 2;
/// Conntrack flag: direct server return. FORWARD (entry node): packets carry
/// the service address to the backend's node. REPLY (backend's node):
/// learned from that option; replies go straight to the client.
pub const CT_F_DSR: u8 = 4;
/// Conntrack flag (FORWARD): the backend is on another node; packets are
/// sent on with a FIB lookup.
pub const CT_F_REMOTE: u8 = 8;
/// Conntrack flag (FORWARD): the flow is counted in `BACKEND_CONNS` (its
/// service uses least-connections) and not yet seen closing.
pub const CT_F_COUNTED: u8 = 16;
/// Conntrack flag: hairpin, a pod reaching itself through its Service. The
/// source is translated to the frontend address (client port kept) so the
/// pod's reply comes back through the datapath; both directions are sent
/// straight back into the pod.
pub const CT_F_HAIRPIN: u8 = 32;

/// IPv4 option carrying the service address to the backend's node under DSR:
/// `[type, length, port (2, network order), address (4, network order)]`.
/// The type has the copy bit set (copied into fragments), class 0, number
/// 26, the value Cilium uses for the same purpose.
pub const DSR_OPT_TYPE: u8 = 0x9a;
/// Length of the DSR option in bytes (a multiple of 4: no padding needed).
pub const DSR_OPT_LEN: u8 = 8;

/// This node's settings for the datapath: the single element of `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// Address external flows to remote backends are SNATed to, network byte order.
    pub snat_addr_be: u32,
    /// First port of the SNAT range (host byte order).
    pub snat_port_min: u16,
    /// Last port of the SNAT range (host byte order).
    pub snat_port_max: u16,
    /// `NODE_F_*` flags.
    pub flags: u32,
    /// Lowest and highest ClusterIP (host byte order; min > max: none). A
    /// pod's packet to a non-service port of an address in this range may
    /// be a hairpin reply; only those are looked up in conntrack.
    pub vip_min: u32,
    pub vip_max: u32,
}

/// Node flag: external traffic is served here: `tc_pod_ingress` looks up
/// replies of external flows (local backends, DSR) for packets that are not
/// addressed to a service.
pub const NODE_F_EXTERNAL: u32 = 1;

/// Per-service counters: value of the per-CPU `SVC_STATS` array, indexed by svc id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcCounters {
    /// Packets sent to the service (both directions of its flows).
    pub packets: u64,
    /// Bytes of those packets (L3 length).
    pub bytes: u64,
    /// Flows that selected a backend.
    pub new_flows: u64,
    /// Packets refused because the service had no ready endpoint.
    pub rejected: u64,
}

/// Largest frame the benchmark wrapper restores (a power of two).
pub const BENCH_FRAME_MAX: usize = 256;

/// How the benchmark wrapper prepares each run.
pub mod bench_mode {
    /// The same frame every run: after the first, an established flow.
    pub const SAME: u32 = 0;
    /// A new source port and address every run: every run a new flow.
    pub const NEW_FLOW: u32 = 1;
}

/// The benchmark wrapper's template (value of `BENCH_FRAME`; never used on
/// real traffic).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchFrame {
    /// Frame length in bytes.
    pub len: u32,
    /// A `bench_mode` value.
    pub mode: u32,
    /// Offset of the source port (NEW_FLOW mode).
    pub vary_off: u16,
    /// Offset of the low two bytes of the source address (NEW_FLOW mode).
    pub vary_addr_off: u16,
    /// Explicit padding.
    pub _pad: u32,
    /// The frame.
    pub data: [u8; BENCH_FRAME_MAX],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain-old-data with explicit padding,
    // valid for any bit pattern.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SelBlock {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SvcCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BenchFrame {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SourceRange {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendConns {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SvcName {}
}

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
            Counter::COUNT,
        ];
        assert_eq!(PIN_LAYOUT_VERSION, 5);
        assert_eq!(
            fingerprint,
            [8, 7, 8, 8, 64, 16, 13, 40, 24, 32, 20, 16, 8, 28]
        );
    }

    #[test]
    fn selection_positions() {
        assert_eq!(sel_backend_pos(0), (1, 0));
        assert_eq!(sel_backend_pos(15), (1, 15));
        assert_eq!(sel_backend_pos(16), (2, 0));
        assert_eq!(sel_entry_pos(0), (0, 0, 0));
        assert_eq!(sel_entry_pos(1), (0, 0, 16));
        assert_eq!(sel_entry_pos(31), (0, 15, 16));
        assert_eq!(sel_entry_pos(32), (1, 0, 0));
        assert_eq!(sel_blocks(0, 0, 0), 1);
        assert_eq!(sel_blocks(1, 0, 0), 3);
        assert_eq!(sel_blocks(16, 1, 0), 1 + 2 + 1);
        assert_eq!(sel_blocks(10, 0, 1009), 1 + 1 + 1 + 32);
    }
}
