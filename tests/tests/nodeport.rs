//! North-south integration tests on two nodes (see `proxy_tests::twonode`):
//! an outside client reaches Services through NodePorts, a LoadBalancer IP
//! and an externalIP, with each agent running XDP on its node's `ext0`.
//!
//! Needs root (namespaces, BPF). Runs in CI, which is root.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a failed unwrap is a test failure"
)]

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
};

use proxy_common::{Counter, DSR_OPT_LEN, DSR_OPT_TYPE};
use proxy_tests::{
    cluster::{
        Agent, Answer, LongLived, NameServer, http_get, manifest_dir, tcp_connect_error,
        tcp_requests, udp_connected_error, udp_requests,
    },
    flood,
    packet::{Frame, L4},
    twonode::{CLIENT_IP, EXTERNAL_IP, LB_IP, TwoNodes, node_ip},
};

const PORT: u16 = 8080;
const NP_WEB: u16 = 30080;
const NP_LB: u16 = 30081;
const NP_LOCAL: u16 = 30082;
const HC_PORT: u16 = 32000;
const NP_NONE: u16 = 30099;
const LOCAL_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 11);
const RANGED_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 12);
const FENCED_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 13);

/// Node objects, and three Services whose one endpoint (`backend` on node2) is:
/// `web` (NodePort), `lb` (LoadBalancer IP and externalIP), `local`
/// (LoadBalancer, externalTrafficPolicy Local, health check node port).
fn manifests(backend: Ipv4Addr) -> String {
    let mut out = String::new();
    for n in 1..=2u8 {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node{n}}}\nstatus:\n  addresses: [{{type: InternalIP, address: \"{}\"}}]\n---\n",
            node_ip(n)
        ));
    }
    // A NodePort whose Service has no endpoints at all.
    out.push_str(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: none, namespace: demo}}\nspec:\n  clusterIP: 10.96.0.19\n  type: NodePort\n  ports:\n  - {{name: tcp, port: 80, protocol: TCP, targetPort: {PORT}, nodePort: {NP_NONE}}}\n  - {{name: udp, port: 80, protocol: UDP, targetPort: {PORT}, nodePort: {NP_NONE}}}\n---\n"
    ));
    for (name, cluster_ip, spec) in [
        (
            "web",
            "10.96.0.10",
            format!(
                "type: NodePort\n  ports:\n  - {{name: tcp, port: 80, protocol: TCP, targetPort: {PORT}, nodePort: {NP_WEB}}}\n  - {{name: udp, port: 80, protocol: UDP, targetPort: {PORT}, nodePort: {NP_WEB}}}\n"
            ),
        ),
        (
            "lb",
            "10.96.0.11",
            format!(
                "type: LoadBalancer\n  externalIPs: [\"{EXTERNAL_IP}\"]\n  ports:\n  - {{name: tcp, port: 80, protocol: TCP, targetPort: {PORT}, nodePort: {NP_LB}}}\n  - {{name: udp, port: 80, protocol: UDP, targetPort: {PORT}, nodePort: {NP_LB}}}\n"
            ),
        ),
        (
            "local",
            "10.96.0.12",
            format!(
                "type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {HC_PORT}\n  ports:\n  - {{name: tcp, port: 80, protocol: TCP, targetPort: {PORT}, nodePort: {NP_LOCAL}}}\n"
            ),
        ),
        (
            "ranged",
            "10.96.0.13",
            format!(
                "type: LoadBalancer\n  loadBalancerSourceRanges: [\"{CLIENT_IP}/32\", 10.0.0.0/8]\n  ports:\n  - {{name: tcp, port: 80, protocol: TCP, targetPort: {PORT}}}\n"
            ),
        ),
        (
            "fenced",
            "10.96.0.14",
            format!(
                "type: LoadBalancer\n  loadBalancerSourceRanges: [10.0.0.0/8]\n  ports:\n  - {{name: tcp, port: 80, protocol: TCP, targetPort: {PORT}}}\n"
            ),
        ),
    ] {
        let lb_ip = match name {
            "lb" => Some(LB_IP),
            "local" => Some(LOCAL_LB_IP),
            "ranged" => Some(RANGED_LB_IP),
            "fenced" => Some(FENCED_LB_IP),
            _ => None,
        };
        let status = lb_ip
            .map(|ip| format!("status:\n  loadBalancer:\n    ingress: [{{ip: \"{ip}\"}}]\n"))
            .unwrap_or_default();
        out.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  clusterIP: {cluster_ip}\n  {spec}{status}---\n"
        ));
        out.push_str(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{name: tcp, port: {PORT}, protocol: TCP}}\n- {{name: udp, port: {PORT}, protocol: UDP}}\nendpoints:\n- addresses: [\"{backend}\"]\n  conditions: {{ready: true}}\n  nodeName: node2\n---\n"
        ));
    }
    out
}

/// The topology, the backend pod on node2 serving on PORT, agents in `mode`.
/// Fields drop in order: agents stop before pods and namespaces go.
struct Setup {
    _agents: Vec<Agent>,
    _server: NameServer,
    _dir: PathBuf,
    net: TwoNodes,
}

fn setup(mode: &str) -> Setup {
    setup_with(mode, &[])
}

/// As `setup`, with more agent flags.
fn setup_with(mode: &str, extra: &[&str]) -> Setup {
    let mut net = TwoNodes::new().unwrap();
    let backend = net.add_pod(2, "backend", 10).unwrap();
    let server = NameServer::start(net.nodes[1].pod("backend").unwrap(), "backend", PORT).unwrap();
    let dir = manifest_dir(&net.nodes[0], &[("all.yaml", &manifests(backend))]).unwrap();
    let agents = (1..=2)
        .map(|n| {
            let mut args = vec!["--nodeport-mode", mode];
            args.extend_from_slice(extra);
            net.start_agent(n, &dir, &args).unwrap()
        })
        .collect();
    Setup {
        _agents: agents,
        _server: server,
        _dir: dir,
        net,
    }
}

/// Every request answered by the backend, from `frontend`; returns the
/// addresses the backend saw.
fn answered(
    answers: &[anyhow::Result<Answer>],
    frontend: SocketAddrV4,
    what: &str,
) -> Vec<Ipv4Addr> {
    assert!(!answers.is_empty(), "{what}: no requests");
    answers
        .iter()
        .map(|a| {
            assert!(a.is_ok(), "{what}: {a:?}");
            let a = a.as_ref().unwrap();
            assert_eq!(a.backend, "backend", "{what}");
            assert_eq!(a.peer, SocketAddr::V4(frontend), "{what}: answer's source");
            *a.client_seen.parse::<SocketAddrV4>().unwrap().ip()
        })
        .collect()
}

fn counters(setup: &Setup, node: usize) -> BTreeMap<Counter, u64> {
    proxy_agent::datapath::read_pinned_counters(&setup.net.nodes[node].pin_root())
        .unwrap()
        .into_iter()
        .collect()
}

fn seen_all(ips: &[Ipv4Addr], want: Ipv4Addr, what: &str) {
    assert!(
        ips.iter().all(|ip| *ip == want),
        "{what}: backend saw {ips:?}, expected {want}"
    );
}

#[test]
fn nodeport_dsr_keeps_the_client_address_and_bypasses_the_entry_node() {
    let s = setup("dsr");
    let client = &s.net.client;
    let np1 = SocketAddrV4::new(node_ip(1), NP_WEB);

    let tcp = tcp_requests(client, np1, 10).unwrap();
    seen_all(&answered(&tcp, np1, "tcp via node1"), CLIENT_IP, "tcp dsr");
    let udp = udp_requests(client, np1, 5).unwrap();
    seen_all(&answered(&udp, np1, "udp via node1"), CLIENT_IP, "udp dsr");

    // Node1 sent the client's packets on and never saw a reply; node2 learned
    // the flows from the option and answered the client itself.
    let n1 = counters(&s, 0);
    let n2 = counters(&s, 1);
    let get = |c: &BTreeMap<Counter, u64>, k| c.get(&k).copied().unwrap_or(0);
    assert!(get(&n1, Counter::Forwarded) >= 15, "node1: {n1:?}");
    for k in [
        Counter::SnatReply,
        Counter::ExternalReply,
        Counter::ForwardedByKernel,
    ] {
        assert_eq!(get(&n1, k), 0, "node1 {k:?}: {n1:?}");
    }
    assert!(get(&n2, Counter::DsrLearned) >= 15, "node2: {n2:?}");
    assert!(get(&n2, Counter::DsrReply) >= 15, "node2: {n2:?}");
}

#[test]
fn loadbalancer_and_external_ips_reach_the_service() {
    let s = setup("dsr");
    let client = &s.net.client;
    for (frontend, what) in [
        (
            SocketAddrV4::new(LB_IP, 80),
            "LoadBalancer IP via node1 (remote backend)",
        ),
        (
            SocketAddrV4::new(EXTERNAL_IP, 80),
            "externalIP via node2 (local backend)",
        ),
        (
            SocketAddrV4::new(node_ip(2), NP_LB),
            "NodePort on the backend's node",
        ),
    ] {
        let tcp = tcp_requests(client, frontend, 5).unwrap();
        seen_all(&answered(&tcp, frontend, what), CLIENT_IP, what);
        let udp = udp_requests(client, frontend, 3).unwrap();
        seen_all(&answered(&udp, frontend, what), CLIENT_IP, what);
    }
}

#[test]
fn load_balancer_source_ranges_allow_and_deny() {
    let s = setup("snat");
    let client = &s.net.client;
    let ranged = SocketAddrV4::new(RANGED_LB_IP, 80);
    let tcp = tcp_requests(client, ranged, 3).unwrap();
    answered(&tcp, ranged, "client inside the source ranges");
    let fenced = SocketAddrV4::new(FENCED_LB_IP, 80);
    let denied = tcp_requests(client, fenced, 1).unwrap();
    assert!(
        denied[0].is_err(),
        "client outside the source ranges: {denied:?}"
    );
    let n1 = counters(&s, 0);
    assert!(
        n1.get(&Counter::SourceRangeDenied).copied().unwrap_or(0) >= 1,
        "{n1:?}"
    );
}

#[test]
fn external_traffic_policy_local_serves_only_where_endpoints_are() {
    let s = setup("snat");
    let client = &s.net.client;
    let on2 = SocketAddrV4::new(node_ip(2), NP_LOCAL);
    let tcp = tcp_requests(client, on2, 5).unwrap();
    seen_all(&answered(&tcp, on2, "Local via node2"), CLIENT_IP, "Local");

    let on1 = SocketAddrV4::new(node_ip(1), NP_LOCAL);
    let failed = tcp_requests(client, on1, 1).unwrap();
    assert!(
        failed[0].is_err(),
        "node1 has no local endpoint: {failed:?}"
    );
    let n1 = counters(&s, 0);
    assert!(
        n1.get(&Counter::NoLocalEndpoints).copied().unwrap_or(0) >= 1,
        "{n1:?}"
    );

    let (status, body) =
        http_get(client, SocketAddrV4::new(node_ip(1), HC_PORT), "/healthz").unwrap();
    assert_eq!(status, 503, "node1 health check: {body}");
    let (status, body) =
        http_get(client, SocketAddrV4::new(node_ip(2), HC_PORT), "/healthz").unwrap();
    assert_eq!(status, 200, "node2 health check: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["service"]["namespace"], "demo");
    assert_eq!(v["service"]["name"], "local");
    assert_eq!(v["localEndpoints"], 1);
}

#[test]
fn nodeport_snat_and_hybrid() {
    let s = setup("snat");
    let client = &s.net.client;
    let np1 = SocketAddrV4::new(node_ip(1), NP_WEB);
    let tcp = tcp_requests(client, np1, 10).unwrap();
    seen_all(&answered(&tcp, np1, "tcp snat"), node_ip(1), "tcp snat");
    let udp = udp_requests(client, np1, 5).unwrap();
    seen_all(&answered(&udp, np1, "udp snat"), node_ip(1), "udp snat");
    let n1 = counters(&s, 0);
    assert!(
        n1.get(&Counter::SnatReply).copied().unwrap_or(0) >= 15,
        "replies came back through node1: {n1:?}"
    );
    drop(s);

    let s = setup("hybrid");
    let client = &s.net.client;
    let tcp = tcp_requests(client, np1, 5).unwrap();
    seen_all(
        &answered(&tcp, np1, "tcp hybrid"),
        CLIENT_IP,
        "tcp hybrid (dsr)",
    );
    let udp = udp_requests(client, np1, 5).unwrap();
    seen_all(
        &answered(&udp, np1, "udp hybrid"),
        node_ip(1),
        "udp hybrid (snat)",
    );
}

/// A SYN from `client` to `backend` carrying a DSR option that names `frontend`.
fn forged(client: SocketAddrV4, backend: SocketAddrV4, frontend: SocketAddrV4) -> Frame {
    let mut option = vec![DSR_OPT_TYPE, DSR_OPT_LEN];
    option.extend_from_slice(&frontend.port().to_be_bytes());
    option.extend_from_slice(&frontend.ip().octets());
    Frame {
        ip_options: option,
        ..Frame::tcp_syn(client, backend)
    }
}

#[test]
fn a_forged_dsr_option_from_outside_is_refused_and_teaches_nothing() {
    let s = setup("dsr");
    let client = &s.net.client;
    let backend = SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 10), PORT);
    // The attacker reaches the pod network through node2 (a route the
    // client adds in its own namespace; the fabric would carry it).
    client
        .ip(&[
            "route",
            "add",
            "10.1.2.0/24",
            "via",
            &node_ip(2).to_string(),
        ])
        .unwrap();
    let from = |port| SocketAddrV4::new(CLIENT_IP, port);
    let frames = vec![
        // An address of the attacker's choosing.
        forged(
            from(40_101),
            backend,
            SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 443),
        ),
        // A real NodePort, but the packet goes to a port of the pod that
        // is no endpoint of its Service.
        forged(
            from(40_102),
            SocketAddrV4::new(*backend.ip(), 9999),
            SocketAddrV4::new(node_ip(1), NP_WEB),
        ),
        // A NodePort whose Service has no UDP port, on a UDP datagram.
        Frame {
            l4: L4::Udp { zero_csum: false },
            payload: b"query".to_vec(),
            ..forged(
                from(40_103),
                backend,
                SocketAddrV4::new(node_ip(1), NP_LOCAL),
            )
        },
    ];
    let sent = frames.len() as u64;
    client.run(move || flood::send_raw(frames)).unwrap();

    let n2 = counters(&s, 1);
    assert!(
        n2.get(&Counter::DsrRefused).copied().unwrap_or(0) >= sent,
        "node2 refused every forged option: {n2:?}"
    );
    assert_eq!(
        n2.get(&Counter::DsrLearned).copied().unwrap_or(0),
        0,
        "{n2:?}"
    );
    let flows = proxy_agent::datapath::read_pinned_conntrack(&s.net.nodes[1].pin_root()).unwrap();
    assert!(
        flows
            .iter()
            .all(|(k, _)| *k.dst().ip() != CLIENT_IP && *k.src().ip() != CLIENT_IP),
        "nothing learned about the attacker: {flows:?}"
    );

    // The real thing still works: the backend's replies carry the NodePort.
    let np1 = SocketAddrV4::new(node_ip(1), NP_WEB);
    let tcp = tcp_requests(client, np1, 5).unwrap();
    seen_all(&answered(&tcp, np1, "tcp via node1"), CLIENT_IP, "tcp dsr");
}

#[test]
fn a_syn_flood_from_outside_evicts_no_established_flow() {
    // Small tables on both nodes: the entry node tracks the flows it sends
    // on, the backend's node the flows DSR options taught it.
    let s = setup_with("dsr", &["--ct-entries", "512", "--ct-new-entries", "256"]);
    let client = &s.net.client;
    let np1 = SocketAddrV4::new(node_ip(1), NP_WEB);
    let mut conns: Vec<LongLived> = (0..10)
        .map(|_| LongLived::open(client, np1).unwrap())
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.ping(&format!("before-{i}")).unwrap();
    }
    let before = counters(&s, 1);
    for round in 0..10u32 {
        client
            .run(move || flood::syn_flood(np1, round * 512, 512, 2))
            .unwrap();
    }
    let after = counters(&s, 1);
    let learned = after.get(&Counter::DsrLearned).copied().unwrap_or(0)
        - before.get(&Counter::DsrLearned).copied().unwrap_or(0);
    assert!(
        learned >= 5120,
        "the flood reached the backend's node through node1: {learned} learned"
    );
    // Idle through the flood, every connection still gets its answers from
    // the NodePort (node2 still knows each flow's frontend).
    for (i, c) in conns.iter_mut().enumerate() {
        c.ping(&format!("after-{i}"))
            .unwrap_or_else(|e| panic!("connection {i} after the flood: {e}"));
    }
    let tcp = tcp_requests(client, np1, 10).unwrap();
    seen_all(
        &answered(&tcp, np1, "after the flood"),
        CLIENT_IP,
        "tcp dsr",
    );
}

#[test]
fn a_nodeport_without_endpoints_is_refused_at_once() {
    let s = setup("dsr");
    let np = SocketAddrV4::new(node_ip(1), NP_NONE);
    let (kind, took) = tcp_connect_error(&s.net.client, np).unwrap();
    assert_eq!(kind, Some(std::io::ErrorKind::ConnectionRefused), "TCP");
    assert!(
        took < std::time::Duration::from_secs(1),
        "TCP refused in {took:?}"
    );
    let udp = udp_connected_error(&s.net.client, np).unwrap();
    assert_eq!(udp, Some(std::io::ErrorKind::ConnectionRefused), "UDP");
    let n1 = counters(&s, 0);
    assert!(
        n1.get(&Counter::NoEndpointsExternal).copied().unwrap_or(0) >= 2,
        "{n1:?}"
    );
}

#[test]
fn a_fragmented_udp_datagram_crosses_a_nodeport_both_ways() {
    let s = setup("snat");
    let np1 = SocketAddrV4::new(node_ip(1), NP_WEB);
    for _ in 0..3 {
        let (backend, echoed) = proxy_tests::cluster::udp_big(&s.net.client, np1, 3000).unwrap();
        assert_eq!(backend, "backend");
        assert_eq!(echoed, 3000, "the whole datagram arrived and came back");
    }
}
