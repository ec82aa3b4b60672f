//! Every map of the datapath, one line each on what it holds and who writes it.
//!
//! Sizes here are defaults only: the agent sets the real capacities at load time
//! (see `proxy-agent --help`). The agent pins all of these except the log ring.

use aya_ebpf::{
    bindings::BPF_F_INNER_MAP,
    btf_maps::{Array, HashMap, HashOfMaps, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use proxy_common::{
    Backend, Counter, CtKey, CtValue, SelBlock, ServiceKey, ServiceValue, SvcCounters,
};

/// Inner-map template of `SELECTION`: `BPF_F_INNER_MAP` lets every service's
/// table have its own length.
pub type SelectionTable = Array<SelBlock, 1, { BPF_F_INNER_MAP as usize }>;

/// Frontend (address, port, protocol, scope) → service port. Written by the agent.
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, 65_536> = HashMap::new();

/// svc id → that service port's selection table. Written by the agent, which
/// replaces a whole table with one update.
#[btf_map]
pub static SELECTION: HashOfMaps<u32, SelectionTable, 65_536> = HashOfMaps::new();

/// Backend id → endpoint address:port. Written by the agent.
#[btf_map]
pub static BACKENDS: Array<Backend, 262_144> = Array::new();

/// 5-tuple (per direction) → NAT target and flow state. Written by the datapath.
#[btf_map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue, 524_288> = LruHashMap::new();

/// Global per-CPU counters indexed by `proxy_common::Counter`. Written by the datapath.
#[btf_map]
pub static STATS: PerCpuArray<u64, { Counter::COUNT }> = PerCpuArray::new();

/// Per-CPU counters per svc id. Written by the datapath, reset by the agent on id reuse.
#[btf_map]
pub static SVC_STATS: PerCpuArray<SvcCounters, 65_536> = PerCpuArray::new();
