//! Names and default sizes of the datapath's maps.
//!
//! The maps themselves are declared (as BTF maps, so `bpftool map dump` prints
//! typed fields) in `proxy-ebpf/src/maps.rs`; the agent loads, sizes and pins
//! them by these names under `<bpffs root>/v<PIN_LAYOUT_VERSION>/maps/<NAME>`.

/// Hash: [`crate::ServiceKey`] → [`crate::ServiceValue`]. Written by the agent.
pub const SERVICES: &str = "SERVICES";
/// Array of [`crate::SelBlock`]: every selection table, each in its own
/// contiguous region. Written by the agent into regions no packet reads yet.
pub const SELECTION: &str = "SELECTION";
/// Array: svc id → first block of its selection table in `SELECTION` (0 =
/// none). Written by the agent: one 4-byte store switches a service to a
/// complete new table.
pub const SVC_TABLE: &str = "SVC_TABLE";
/// Array: backend id → [`crate::Backend`]. Written by the agent.
pub const BACKENDS: &str = "BACKENDS";
/// LRU hash: [`crate::CtKey`] → [`crate::CtValue`]: established flows, UDP
/// flows and TCP flows picked up mid-stream. Written by the datapath.
pub const CONNTRACK: &str = "CONNTRACK";
/// LRU hash: [`crate::CtKey`] → [`crate::CtValue`]: TCP flows opened by a
/// SYN whose client has not completed the handshake, most in one entry
/// keyed by the client ([`crate::ct_dir::CLIENT`]). The client's next
/// packet moves the flow to `CONNTRACK`, so a flood of SYNs evicts only
/// other half-open flows, never an established one. Written by the datapath.
pub const CT_NEW: &str = "CT_NEW";
/// LRU hash: [`crate::FragKey`] → [`crate::FragValue`]: the ports of a
/// fragmented UDP datagram, from its first fragment, so its later
/// fragments (which carry none) take the same translation. Written by the
/// datapath.
pub const FRAGMENTS: &str = "FRAGMENTS";
/// Per-CPU array: [`crate::Counter`] → `u64`. Written by the datapath.
pub const STATS: &str = "STATS";
/// Per-CPU array: svc id → [`crate::SvcCounters`]. Written by the datapath.
pub const SVC_STATS: &str = "SVC_STATS";

/// Array of one [`crate::NodeConfig`]: this node's settings. Written by the agent.
pub const CONFIG: &str = "CONFIG";

/// LPM trie: [`crate::SourceRange`] (svc id + client CIDR) → `u32` (1).
/// `loadBalancerSourceRanges`. Written by the agent.
pub const SOURCE_RANGES: &str = "SOURCE_RANGES";

/// LRU hash: [`crate::AffinityKey`] → [`crate::AffinityValue`]: which
/// backend a client of a service port with session affinity sticks to.
/// Written by the datapath.
pub const AFFINITY: &str = "AFFINITY";
/// Array: backend id → [`crate::BackendConns`]. Written by the datapath
/// (atomically); the agent zeroes a newly used id.
pub const BACKEND_CONNS: &str = "BACKEND_CONNS";
/// Array: backend id → flows of a least-connections service the agent
/// collected before they closed. Written by the agent alone.
pub const BACKEND_REAPED: &str = "BACKEND_REAPED";

/// LRU hash: [`crate::SockKey`] → [`crate::SockValue`]: what socket-level
/// load balancing did for UDP sockets (an unconnected one's backend per
/// frontend; the frontend recvmsg shows; a connected one's cookie). Written
/// by the socket hooks; the agent removes entries of departed backends and
/// aborts the connected sockets they name.
pub const SOCK_NAT: &str = "SOCK_NAT";
/// Hash: socket cookie (u64) → [`crate::SockPeer`]: a connected socket's
/// frontend and backend (getpeername, recvmsg). Written by the socket hooks
/// alone: connect4 adds, sock_release removes when the socket goes.
pub const SOCK_PEER: &str = "SOCK_PEER";

/// Array: backend id → [`crate::NextHop`]: the route packets to that
/// backend take, remembered by the datapath. Written by the datapath.
pub const ROUTES: &str = "ROUTES";
/// Array of one `u32`: the generation `ROUTES` entries must carry to be
/// used. Written by the agent, bumped on every route, neighbour, address or
/// link change (0: remembering routes is off).
pub const ROUTE_GEN: &str = "ROUTE_GEN";

/// Hash: svc id → [`crate::SvcName`]. Written by the agent; never read by
/// the datapath (it names svc ids for inspection tools).
pub const SVC_NAMES: &str = "SVC_NAMES";

/// Every map the agent pins.
pub const PINNED: &[&str] = &[
    SERVICES,
    SELECTION,
    SVC_TABLE,
    BACKENDS,
    CONNTRACK,
    CT_NEW,
    FRAGMENTS,
    STATS,
    SVC_STATS,
    CONFIG,
    SOURCE_RANGES,
    AFFINITY,
    BACKEND_CONNS,
    BACKEND_REAPED,
    SVC_NAMES,
    SOCK_NAT,
    SOCK_PEER,
    ROUTES,
    ROUTE_GEN,
    SLOW_TC,
    SLOW_XDP,
];

/// Default capacity of `SOCK_NAT` (two entries per unconnected UDP socket
/// and frontend, one per connected UDP socket) and of `SOCK_PEER` (one per
/// open connected socket the hooks translated).
pub const DEFAULT_SOCK_ENTRIES: u32 = 131_072;

/// Default capacity of `AFFINITY` (client, service port pairs).
pub const DEFAULT_AFFINITY_ENTRIES: u32 = 65_536;

/// Default capacity of `SOURCE_RANGES` (CIDRs over all Services).
pub const DEFAULT_SOURCE_RANGES: u32 = 16_384;

/// Default SNAT port range for external flows to remote backends: above
/// Linux's default ephemeral range (32768–60999), so it never collides with
/// the node's own connections.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61_000, 65_535);

/// Default capacity of `SERVICES` (frontends).
pub const DEFAULT_MAX_FRONTENDS: u32 = 65_536;
/// Default capacity of `SVC_TABLE` and `SVC_STATS` (service ports; id 0 unused).
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
/// Default capacity of `SELECTION` in 64-byte blocks (32 MiB): about 15,000
/// service ports of 10 backends at the default Maglev size. Block 0 is unused.
pub const DEFAULT_SELECTION_BLOCKS: u32 = 524_288;
/// Default capacity of `BACKENDS` (distinct endpoint address:port pairs; id 0 unused).
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
/// Default capacity of `CONNTRACK` (two entries per flow).
pub const DEFAULT_CT_ENTRIES: u32 = 524_288;
/// Default capacity of `FRAGMENTS` (fragmented datagrams in flight).
pub const DEFAULT_FRAG_ENTRIES: u32 = 8_192;
/// Default capacity of `CT_NEW` (one entry per half-open flow, two for a
/// SNAT or hairpin flow): handshakes
/// last a round trip, so this holds tens of thousands of new connections per
/// second with room to spare; a SYN flood only churns this table.
pub const DEFAULT_CT_NEW_ENTRIES: u32 = 65_536;

/// Slots of the slow programs in `SLOW_TC` and `SLOW_XDP` (program
/// arrays: what a tail call hands a packet that is no established flow's).
pub mod slow {
    /// An external frontend's: `tc_ext_slow` in `SLOW_TC`, `xdp_ext_slow`
    /// in `SLOW_XDP`.
    pub const EXT: u32 = 0;
    /// A pod's packet to a frontend: `tc_pod_slow` in `SLOW_TC`.
    pub const POD: u32 = 1;
}

/// Program arrays of the slow programs (TC, XDP). Written by the agent.
pub const SLOW_TC: &str = "SLOW_TC";
/// See [`SLOW_TC`].
pub const SLOW_XDP: &str = "SLOW_XDP";

/// Program names in the object file.
pub mod programs {
    /// TC ingress on pod-facing interfaces: frontend → backend DNAT, rejects.
    pub const TC_POD_INGRESS: &str = "tc_pod_ingress";
    /// TC egress on pod-facing interfaces: reverse NAT of replies to clients.
    pub const TC_POD_EGRESS: &str = "tc_pod_egress";
    /// XDP on external interfaces: NodePort, LoadBalancer and externalIP
    /// frontends, SNAT replies, DSR option learning.
    pub const XDP_EXT: &str = "xdp_ext";
    /// XDP that passes everything, for the peer of a veth running `xdp_ext`.
    pub const XDP_PASS: &str = "xdp_pass";
    /// The slow paths (tail-called, never attached): a pod's packet to a
    /// frontend that is no established flow's.
    pub const TC_POD_SLOW: &str = "tc_pod_slow";
    /// `tc_ext_ingress`'s slow path.
    pub const TC_EXT_SLOW: &str = "tc_ext_slow";
    /// `xdp_ext`'s slow path.
    pub const XDP_EXT_SLOW: &str = "xdp_ext_slow";
    /// TC ingress on external interfaces: the same as `xdp_ext`, for what XDP
    /// leaves to it (unresolved next hops) or where XDP cannot attach.
    pub const TC_EXT_INGRESS: &str = "tc_ext_ingress";
    /// cgroup connect4: a socket's connect to a frontend goes to a backend.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    /// cgroup sendmsg4: an unconnected UDP datagram to a frontend goes to a backend.
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    /// cgroup recvmsg4: a datagram from a backend shows the frontend as its source.
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    /// cgroup getpeername4: a socket's peer shows the frontend.
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    /// cgroup sock_release: a closed socket's entry leaves `SOCK_PEER`.
    pub const SOCK_RELEASE: &str = "sock_release";

    /// Every program the agent loads (the benchmark wrapper aside).
    pub const ALL: [&str; 13] = [
        TC_POD_INGRESS,
        TC_POD_EGRESS,
        TC_POD_SLOW,
        TC_EXT_INGRESS,
        TC_EXT_SLOW,
        XDP_EXT,
        XDP_EXT_SLOW,
        XDP_PASS,
        SOCK_CONNECT4,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_GETPEERNAME4,
        SOCK_RELEASE,
    ];

    /// The socket hooks, with the attach point each goes to (for link names).
    pub const SOCK_HOOKS: [(&str, &str); 5] = [
        (SOCK_CONNECT4, "connect4"),
        (SOCK_SENDMSG4, "sendmsg4"),
        (SOCK_RECVMSG4, "recvmsg4"),
        (SOCK_GETPEERNAME4, "getpeername4"),
        (SOCK_RELEASE, "sock_release"),
    ];
}
