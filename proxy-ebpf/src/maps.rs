//! Every map of the datapath, one line each on what it holds and who writes it.
//!
//! Sizes here are defaults only: the agent sets the real capacities at load time
//! (see `proxy-agent --help`). The agent pins all of these except the log ring.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
    macros::btf_map,
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, BackendConns, Counter, CtKey, CtValue, FragKey, FragValue,
    NextHop, NodeConfig, SelBlock, ServiceKey, ServiceValue, SockKey, SockPeer, SockValue,
    SourceRange, SvcCounters, SvcName,
};

/// Frontend (address, port, protocol, scope) → service port. Written by the agent.
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, 65_536> = HashMap::new();

/// Every selection table, each a contiguous region of blocks. Written by the
/// agent, only into regions no `SVC_TABLE` entry points at.
#[btf_map]
pub static SELECTION: Array<SelBlock, 524_288> = Array::new();

/// svc id → first block of its table in `SELECTION` (0: none). Written by the
/// agent after the table is complete: the switch is one 4-byte store.
#[btf_map]
pub static SVC_TABLE: Array<u32, 65_536> = Array::new();

/// Backend id → endpoint address:port. Written by the agent.
#[btf_map]
pub static BACKENDS: Array<Backend, 262_144> = Array::new();

/// 5-tuple (per direction) → NAT target and flow state: established TCP
/// flows, UDP flows. Written by the datapath.
#[btf_map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue, 524_288> = LruHashMap::new();

/// The same for TCP flows a SYN opened, until the client completes the
/// handshake (then they move to `CONNTRACK`): a SYN flood evicts only other
/// half-open flows. Written by the datapath.
#[btf_map]
pub static CT_NEW: LruHashMap<CtKey, CtValue, 65_536> = LruHashMap::new();

/// (source, destination, protocol, IP id) → the ports of a fragmented UDP
/// datagram's first fragment, for its later fragments. Written by the datapath.
#[btf_map]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue, 8_192> = LruHashMap::new();

/// Global per-CPU counters indexed by `proxy_common::Counter`. Written by the datapath.
#[btf_map]
pub static STATS: PerCpuArray<u64, { Counter::CAPACITY }> = PerCpuArray::new();

/// Per-CPU counters per svc id. Written by the datapath, reset by the agent on id reuse.
#[btf_map]
pub static SVC_STATS: PerCpuArray<SvcCounters, 65_536> = PerCpuArray::new();

/// This node's settings (one element): SNAT address and ports, `NODE_F_*`.
/// Written by the agent at start.
#[btf_map]
pub static CONFIG: Array<NodeConfig, 1> = Array::new();

/// `loadBalancerSourceRanges`: (svc id, client CIDR) → 1. Consulted for
/// frontends flagged `SVC_F_SOURCE_RANGES`. Written by the agent.
#[btf_map]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u32, 16_384> = LpmTrie::new();

/// Session affinity: (svc id, client) → backend and the client's last new
/// flow. Written by the datapath.
#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, 65_536> = LruHashMap::new();

/// Backend id → flows opened and closed (least-connections). Written by the
/// datapath with atomic adds; the agent zeroes a backend id it frees.
#[btf_map]
pub static BACKEND_CONNS: Array<BackendConns, 262_144> = Array::new();

/// Backend id → flows the agent collected before they closed. Written by the agent alone.
#[btf_map]
pub static BACKEND_REAPED: Array<u32, 262_144> = Array::new();

/// svc id → its Service port's name, for inspection tools (`proxy-agent
/// service`, `bpftool map dump`). Written by the agent; no program reads it.
/// Not preallocated: its memory follows the Services there are, not the
/// capacity (20 MiB preallocated at 65,536 names of 320 bytes).
#[btf_map]
pub static SVC_NAMES: HashMap<u32, SvcName, 65_536, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// Socket-level load balancing for UDP, per socket cookie: an unconnected
/// socket's backend per frontend (FORWARD), and the frontend recvmsg shows
/// for a backend (REPLY; connected sockets too, for the agent to find
/// them). Written by the socket hooks; the agent removes entries of
/// departed backends.
#[btf_map]
pub static SOCK_NAT: LruHashMap<SockKey, SockValue, 131_072> = LruHashMap::new();

/// Socket-level load balancing for connected sockets, by socket cookie: the
/// frontend and backend. Written by the socket hooks alone (connect4 adds,
/// sock_release removes).
#[btf_map]
pub static SOCK_PEER: HashMap<u64, SockPeer, 131_072> = HashMap::new();

/// Backend id → the route packets to that backend take (FIB result), valid
/// while its generation equals `ROUTE_GEN[0]`. Written by the datapath.
#[btf_map]
pub static ROUTES: Array<NextHop, 262_144> = Array::new();

/// The generation `ROUTES` entries must carry (0: none is used). Written by
/// the agent, bumped on every route, neighbour, address or link change.
#[btf_map]
pub static ROUTE_GEN: Array<u32, 1> = Array::new();

/// Scratch, one per CPU: the request of a FIB lookup (`fib::lookup`),
/// kept off the stack. Written and read by the datapath within one helper
/// call; not pinned.
#[btf_map]
pub static FIB_REQUEST: PerCpuArray<[u64; 8], 1> = PerCpuArray::new();

/// The TC slow programs, by `proxy_common::maps::slow` slot (`tc_ext_slow`,
/// `tc_pod_slow`): what a tail call hands a packet that is no established
/// flow's. Written by the agent at load.
#[btf_map]
pub static SLOW_TC: ProgramArray<2> = ProgramArray::new();

/// The XDP slow program (`xdp_ext_slow`, slot `slow::EXT`). Written by the
/// agent at load.
#[btf_map]
pub static SLOW_XDP: ProgramArray<2> = ProgramArray::new();

/// Scratch, one per CPU: the conntrack entries recording a flow builds
/// (`conntrack::CtWork`), kept off the stack. Written and read by the
/// datapath within one run; not pinned.
#[btf_map]
pub static CT_WORK: PerCpuArray<crate::conntrack::CtWork, 1> = PerCpuArray::new();

/// Scratch, one per CPU: what the slow programs' steps hand each other
/// (`global::SlowWork`), kept off the stack. Written and read by the
/// datapath within one run; not pinned.
#[btf_map]
pub static SLOW_WORK: PerCpuArray<crate::global::SlowWork, 1> = PerCpuArray::new();
