//! Hostile traffic in network namespaces: what a pod on the node can send
//! must not take over or exhaust the datapath. (From outside the cluster:
//! `nodeport.rs`.)
//!
//! Needs root (namespaces, BPF, raw sockets). Runs in CI, which is root.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a failed unwrap is a test failure"
)]

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use proxy_common::Counter;
use proxy_tests::{
    cluster::{
        Agent, Cluster, Ep, LongLived, NameServer, manifest_dir, tcp_requests, web_manifest,
    },
    flood,
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const ATTACKER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 8080;
/// `--ct-entries`: room for the long-lived flows and little else.
const CT_ENTRIES: u32 = 512;
const CT_NEW_ENTRIES: u32 = 256;
/// Long-lived connections: half used during the flood, half idle (pooled).
const CONNS: usize = 20;

fn counters(cluster: &Cluster) -> BTreeMap<Counter, u64> {
    proxy_agent::datapath::read_pinned_counters(&cluster.pin_root())
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn a_syn_flood_from_a_pod_evicts_no_established_flow() {
    let mut cluster = Cluster::new().unwrap();
    cluster.add_pod("client", CLIENT_IP).unwrap();
    cluster.add_pod("attacker", ATTACKER_IP).unwrap();
    let mut servers = Vec::new();
    let mut eps = Vec::new();
    for i in 1..=3u8 {
        let role = format!("backend-{i}");
        let ip = Ipv4Addr::new(10, 244, 1, 10 + i);
        let pod = cluster.add_pod(&role, ip).unwrap();
        servers.push(NameServer::start(pod, &role, PORT).unwrap());
        eps.push(Ep::ready(ip));
    }
    // Random selection: a flow that lost its entry would most likely land
    // on another backend, which the echo below would show.
    let manifest = web_manifest(VIP, PORT, "ebpf-proxy.io/lb-algorithm: random", "", &eps);
    let dir = manifest_dir(&cluster, &[("web.yaml", &manifest)]).unwrap();
    let ct = CT_ENTRIES.to_string();
    let ct_new = CT_NEW_ENTRIES.to_string();
    let mut agent = Agent::start(
        &cluster.node,
        &dir,
        &cluster.pin_root(),
        &["--ct-entries", &ct, "--ct-new-entries", &ct_new],
    )
    .unwrap();
    let client = &cluster.pod("client").unwrap().ns;
    let attacker = &cluster.pod("attacker").unwrap().ns;
    let vip = SocketAddrV4::new(VIP, 80);

    let mut conns: Vec<LongLived> = (0..CONNS)
        .map(|_| LongLived::open(client, vip).unwrap())
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.ping(&format!("before-{i}")).unwrap();
    }
    let before = counters(&cluster);

    // Ten times the table in SYNs from spoofed sources, in ten bursts; the
    // first half of the connections keeps talking in between.
    let burst = CT_ENTRIES;
    for round in 0..10 {
        // Each spoofed SYN retransmitted once, as a real stack would: seen
        // twice, a flow counts as used for the kernel's LRU, which then
        // keeps it over the idle connections.
        attacker
            .run(move || flood::syn_flood(vip, round * burst, burst, 2))
            .unwrap();
        for (i, c) in conns.iter_mut().take(CONNS / 2).enumerate() {
            c.ping(&format!("during-{round}-{i}")).unwrap();
        }
    }
    let after = counters(&cluster);

    let new_flows = after.get(&Counter::NewFlow).copied().unwrap_or(0)
        - before.get(&Counter::NewFlow).copied().unwrap_or(0);
    assert!(
        new_flows >= u64::from(10 * burst),
        "the flood reached the datapath: {new_flows} new flows for {} spoofed sources",
        10 * burst
    );

    // Every connection, idle ones included, still reaches its own backend.
    for (i, c) in conns.iter_mut().enumerate() {
        c.ping(&format!("after-{i}"))
            .unwrap_or_else(|e| panic!("connection {i} after the flood: {e}"));
    }
    // And new connections work once the flood stops.
    let fresh = tcp_requests(client, vip, 20).unwrap();
    let failed: Vec<String> = fresh
        .iter()
        .filter_map(|a| a.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        failed.is_empty(),
        "new connections after the flood: {failed:?}"
    );
    agent.stop();
    assert!(!agent.log().contains("ERROR"), "{}", agent.log());
    drop(servers);
}

/// A node with a client pod and Service `web` (one endpoint, no server),
/// its manifests written to the returned directory.
fn one_web() -> (Cluster, std::path::PathBuf) {
    let mut cluster = Cluster::new().unwrap();
    cluster.add_pod("client", CLIENT_IP).unwrap();
    let endpoint = Ep::ready(Ipv4Addr::new(10, 244, 1, 11));
    let manifest = web_manifest(VIP, PORT, "", "", &[endpoint]);
    let dir = manifest_dir(&cluster, &[("web.yaml", &manifest)]).unwrap();
    (cluster, dir)
}

/// Starts the agent and waits for its first sync.
fn synced_agent(cluster: &Cluster, dir: &std::path::Path) -> Agent {
    let mut agent = Agent::start(&cluster.node, dir, &cluster.pin_root(), &[]).unwrap();
    agent
        .wait_for_log("synced", std::time::Duration::from_secs(10))
        .unwrap();
    agent
}

#[test]
fn pins_are_private_and_inspection_only_reads() {
    use std::os::unix::fs::MetadataExt as _;
    let (cluster, dir) = one_web();
    let mut agent = synced_agent(&cluster, &dir);
    let layout = cluster
        .pin_root()
        .join(format!("v{}", proxy_common::PIN_LAYOUT_VERSION));
    for d in [layout.clone(), layout.join("maps"), layout.join("links")] {
        let meta = std::fs::metadata(&d).unwrap();
        assert_eq!(
            (meta.mode() & 0o777, meta.uid(), meta.gid()),
            (0o700, 0, 0),
            "{} is root's alone",
            d.display()
        );
    }
    // What inspection opens, the kernel lets it read and never write.
    let data =
        proxy_agent::datapath::open_pinned(&cluster.pin_root(), proxy_common::maps::CONNTRACK)
            .unwrap();
    let mut ct: aya::maps::HashMap<_, proxy_common::CtKey, proxy_common::CtValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap();
    assert!(ct.iter().all(|e| e.is_ok()), "readable");
    let written = ct.insert(
        proxy_common::CtKey::default(),
        proxy_common::CtValue::default(),
        0,
    );
    assert!(
        written.is_err(),
        "a read-only descriptor wrote: {written:?}"
    );
    agent.stop();
}

#[test]
fn moving_off_kube_proxy_removes_its_rules_and_nothing_else() {
    let (cluster, dir) = one_web();
    let node = &cluster.node;
    let bench = proxy_tests::cluster::binary("bench").unwrap();
    let agent_bin = proxy_tests::cluster::agent_binary().unwrap();
    let dump = |kind: &str| {
        let rules =
            proxy_tests::netns::sh(bench.to_str().unwrap(), &["--dump-rules", kind, "20"]).unwrap();
        let path = dir.join(format!("kube-proxy.{kind}"));
        std::fs::write(&path, rules).unwrap();
        path
    };
    let (ipt, nft) = (dump("iptables"), dump("nft"));
    // kube-proxy's rules as it left them, and some that are not its own.
    let load_kube_proxy = || {
        node.exec(
            "iptables-nft-restore",
            &["--noflush", ipt.to_str().unwrap()],
        )
        .unwrap();
        node.exec("nft", &["-f", nft.to_str().unwrap()]).unwrap();
    };
    load_kube_proxy();
    for rule in [
        vec!["-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"],
        vec!["-N", "KUBE-FIREWALL"],
        vec!["-A", "INPUT", "-j", "KUBE-FIREWALL"],
    ] {
        node.exec("iptables-nft", &rule).unwrap();
    }
    node.exec("nft", &["add", "table", "inet", "mine"]).unwrap();
    // Rules and tables, without iptables-save's timestamped comments.
    let state = || {
        let rules: String = node
            .exec("iptables-nft-save", &[])
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        (rules, node.exec("nft", &["list", "tables"]).unwrap())
    };
    let (before, tables_before) = state();
    assert!(before.contains(":KUBE-SERVICES") && tables_before.contains("kube-proxy"));
    let migrate = |extra: &[&str]| {
        let root = cluster.pin_root();
        let mut args = vec!["migrate-from-kube-proxy", "--bpffs", root.to_str().unwrap()];
        args.extend_from_slice(extra);
        node.exec(agent_bin.to_str().unwrap(), &args)
    };

    // Not before the agent serves the Services: no window without them.
    let refused = migrate(&[]).unwrap_err().to_string();
    assert!(refused.contains("start the agent first"), "{refused}");
    let mut agent = synced_agent(&cluster, &dir);

    let dry = migrate(&["--dry-run"]).unwrap();
    assert!(
        dry.contains("would remove") && dry.contains("KUBE-SERVICES"),
        "{dry}"
    );
    assert!(
        state() == (before.clone(), tables_before.clone()),
        "a dry run changed something"
    );

    let done = migrate(&[]).unwrap();
    assert!(done.contains("removed"), "{done}");
    let (after, tables_after) = state();
    let kube_proxy_left: Vec<&str> = after
        .lines()
        .filter(|l| l.contains("KUBE-") && !l.contains("KUBE-FIREWALL"))
        .collect();
    assert!(
        kube_proxy_left.is_empty(),
        "left behind: {kube_proxy_left:?}"
    );
    for kept in [
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        ":KUBE-FIREWALL",
        "-A INPUT -j KUBE-FIREWALL",
    ] {
        assert!(
            after.contains(kept),
            "{kept:?} is not kube-proxy's and stays:\n{after}"
        );
    }
    assert!(!tables_after.contains("kube-proxy"), "{tables_after}");
    assert!(tables_after.contains("table inet mine"), "{tables_after}");
    assert_eq!(migrate(&[]).unwrap().trim(), "no kube-proxy rules found");

    // Going back: the agent removed (`run --cleanup`, as kube-proxy's flag),
    // kube-proxy's rules load again.
    agent.stop();
    let removed = node
        .exec(
            agent_bin.to_str().unwrap(),
            &[
                "run",
                "--cleanup",
                "--bpffs",
                cluster.pin_root().to_str().unwrap(),
            ],
        )
        .unwrap();
    assert!(removed.contains("detached"), "{removed}");
    let layout = cluster
        .pin_root()
        .join(format!("v{}", proxy_common::PIN_LAYOUT_VERSION));
    assert!(!layout.exists(), "nothing of the agent's is left");
    load_kube_proxy();
    let (again, tables_again) = state();
    assert!(again.contains(":KUBE-SERVICES"), "{again}");
    assert!(tables_again.contains("kube-proxy"), "{tables_again}");
}
