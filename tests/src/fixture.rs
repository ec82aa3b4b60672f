//! Loading the datapath for BPF_PROG_TEST_RUN fixtures and programming it with
//! the agent's own reconcile and datapath code.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context as _, Result, anyhow};
use proxy_agent::{
    datapath::{Datapath, LoadOptions, MapSizes},
    model::{
        DesiredState, Frontend, FrontendKind, NodePortMode, Protocol, ServicePlan, ServicePortName,
    },
    programmed::Programmed,
    reconcile::Reconciler,
};
use proxy_common::Counter;

/// `TCX_NEXT`: continue, untouched or translated.
pub const TCX_NEXT: i32 = -1;
/// `TCX_DROP`.
pub const TCX_DROP: i32 = 2;
/// `TC_ACT_REDIRECT`.
pub const TC_ACT_REDIRECT: i32 = 7;
/// `XDP_DROP`.
pub const XDP_DROP: i32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: i32 = 2;
/// `XDP_TX`.
pub const XDP_TX: i32 = 3;

/// Small maps for fixtures.
pub const SIZES: MapSizes = MapSizes {
    frontends: 1024,
    services: 1024,
    backends: 1024,
    conntrack: 16384,
    ct_new: 4096,
    selection_blocks: 65_536,
    source_ranges: 1024,
    sock_entries: 1024,
};

/// Loads an unpinned datapath with small maps.
pub fn load() -> Result<Datapath> {
    load_sized(SIZES)
}

/// Loads an unpinned datapath with maps of `sizes`.
pub fn load_sized(sizes: MapSizes) -> Result<Datapath> {
    crate::netns::require_root()?;
    Ok(Datapath::load(&LoadOptions {
        sizes,
        pin_root: None,
    })?)
}

/// A ClusterIP service port for fixtures: Maglev with the default table size.
pub fn service(
    name: &str,
    frontend: SocketAddrV4,
    protocol: Protocol,
    backends: &[SocketAddrV4],
) -> ServicePlan {
    let mut backends = backends.to_vec();
    backends.sort();
    ServicePlan::new(
        ServicePortName {
            namespace: "fixtures".into(),
            name: name.into(),
            port_name: String::new(),
            protocol,
        },
        vec![Frontend {
            kind: FrontendKind::ClusterIP,
            address: *frontend.ip(),
            port: frontend.port(),
        }],
        backends,
    )
}

/// Programs `services` into `dp` through reconcile, as the agent does.
pub fn program(dp: &mut Datapath, services: Vec<ServicePlan>) -> Result<Programmed> {
    program_with_mode(dp, services, NodePortMode::Snat)
}

/// As [`program`], with external frontends in `mode`.
pub fn program_with_mode(
    dp: &mut Datapath,
    services: Vec<ServicePlan>,
    mode: NodePortMode,
) -> Result<Programmed> {
    let mut services = services;
    services.sort_by(|a, b| a.id.cmp(&b.id));
    let mut reconciler = Reconciler::new(dp.read_programmed()?, dp.capacity()).with_mode(mode);
    let batch = reconciler.full(&DesiredState { services });
    if !batch.refused.is_empty() {
        return Err(anyhow!("refused: {:?}", batch.refused));
    }
    dp.apply(&batch.ops, batch.tables_not_before)
        .map_err(|(i, e)| anyhow!("op {i}: {e}"))?;
    Ok(reconciler.maps().clone())
}

/// A NodePort service port for fixtures: a ClusterIP `cluster_ip` and a
/// NodePort `node_port` on `node_addr`, both to `backends` (from outside
/// and from inside alike); `local` lists those on this node.
pub fn node_port(
    name: &str,
    cluster_ip: SocketAddrV4,
    node_port: SocketAddrV4,
    protocol: Protocol,
    backends: &[SocketAddrV4],
    local: &[SocketAddrV4],
) -> ServicePlan {
    let mut plan = service(name, cluster_ip, protocol, backends);
    plan.frontends.push(Frontend {
        kind: FrontendKind::NodePort,
        address: *node_port.ip(),
        port: node_port.port(),
    });
    plan.external_backends = plan.internal_backends.clone();
    plan.cluster_backends = plan.internal_backends.clone();
    plan.local_backends = local.to_vec();
    plan.local_backends.sort();
    plan
}

/// Shorthand for an address:port.
pub fn sa(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

pub fn counters(dp: &Datapath) -> Result<BTreeMap<Counter, u64>> {
    Ok(dp.counters()?.into_iter().collect())
}

/// Counters that changed between two snapshots.
pub fn moved(
    before: &BTreeMap<Counter, u64>,
    after: &BTreeMap<Counter, u64>,
) -> Vec<(Counter, u64)> {
    after
        .iter()
        .filter_map(|(c, v)| {
            let d = v - before.get(c).copied().unwrap_or(0);
            (d > 0).then_some((*c, d))
        })
        .collect()
}

/// What a fixture expects to come out.
pub enum Out {
    /// Exactly this frame.
    Frame(Vec<u8>),
    /// The input, unchanged.
    Untouched,
}

pub struct Case {
    pub name: &'static str,
    pub program: &'static str,
    pub input: Vec<u8>,
    pub out: Out,
    pub verdict: i32,
    /// The counter that must move by exactly one (and nothing else); `None`: nothing moves.
    pub counter: Option<Counter>,
}

/// Runs fixtures; every failure is collected and reported at the end.
pub fn run_cases(dp: &mut Datapath, cases: Vec<Case>) {
    run_cases_on(dp, cases, None);
}

/// As [`run_cases`], with XDP frames arriving on interface `ifindex`.
pub fn run_cases_on(dp: &mut Datapath, cases: Vec<Case>, ifindex: Option<u32>) {
    let mut failures = Vec::new();
    for case in cases {
        let Ok(before) = counters(dp) else {
            failures.push(format!("{}: cannot read counters", case.name));
            continue;
        };
        let result = match dp.test_run_on(case.program, &case.input, 1, ifindex) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: test run failed: {e}", case.name));
                continue;
            }
        };
        let after = counters(dp).unwrap_or_default();
        let mut problems = Vec::new();
        if result.verdict != case.verdict {
            problems.push(format!("verdict {} != {}", result.verdict, case.verdict));
        }
        let expected = match &case.out {
            Out::Frame(f) => f.clone(),
            Out::Untouched => case.input.clone(),
        };
        if result.frame != expected {
            problems.push(format!(
                "frame differs\n  got:  {:02x?}\n  want: {:02x?}",
                result.frame, expected
            ));
        }
        if matches!(case.out, Out::Frame(_))
            && let Err(e) = crate::packet::verify_checksums(&result.frame)
        {
            problems.push(format!("checksum: {e}"));
        }
        let want: Vec<(Counter, u64)> = case.counter.map(|c| (c, 1)).into_iter().collect();
        let got = moved(&before, &after);
        if got != want {
            problems.push(format!("counters moved {got:?}, expected {want:?}"));
        }
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", case.name, problems.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "fixtures failed:\n{}",
        failures.join("\n")
    );
}

/// Node1's address in [`fixture_net`].
pub const NODE1: [u8; 4] = [192, 168, 50, 1];
/// Node2's address in [`fixture_net`].
pub const NODE2: [u8; 4] = [192, 168, 50, 2];
/// An outside client's address in [`fixture_net`].
pub const CLIENT: [u8; 4] = [192, 168, 50, 100];
/// Node2's MAC on the shared segment.
pub const NODE2_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Node1's view of the network for XDP fixtures and benchmarks, in a
/// namespace of its own (the FIB lookups of the programs under test run
/// there): external interface `ext0` (192.168.50.1/24, MAC `NODE_MAC`) with
/// permanent neighbours for node2 (192.168.50.2) and the client
/// (192.168.50.100), node2's pod CIDR 10.1.2.0/24 routed via node2.
pub fn fixture_net() -> Result<crate::netns::Netns> {
    use crate::packet::{CLIENT_MAC, NODE_MAC};
    load()?; // fails early, with its message, without root or BPF
    crate::netns::sweep_stale();
    let ns = crate::netns::Netns::new(&format!("{}-xdpfix", crate::netns::unique_prefix()))?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    let node_mac = mac(NODE_MAC);
    ns.ip(&[
        "link", "add", "ext0", "address", &node_mac, "type", "veth", "peer", "name", "ext0p",
    ])?;
    ns.ip(&["link", "set", "ext0", "up"])?;
    ns.ip(&["link", "set", "ext0p", "up"])?;
    ns.ip(&["addr", "add", "192.168.50.1/24", "dev", "ext0"])?;
    for (ip, m) in [("192.168.50.2", NODE2_MAC), ("192.168.50.100", CLIENT_MAC)] {
        let m = mac(m);
        ns.ip(&[
            "neigh",
            "replace",
            ip,
            "lladdr",
            &m,
            "dev",
            "ext0",
            "nud",
            "permanent",
        ])?;
    }
    ns.ip(&[
        "route",
        "add",
        "10.1.2.0/24",
        "via",
        "192.168.50.2",
        "dev",
        "ext0",
    ])?;
    Ok(ns)
}

/// Index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0)
        .then_some(index)
        .with_context(|| format!("no interface {name}"))
}
