//! Upgrading across a pin layout change: the previous release's agent
//! (layout 7, built from this repository's history) serves two nodes, long
//! lived connections run through a ClusterIP and a SNATed NodePort, and
//! node1's agent is replaced by this build (a later layout), which carries the
//! maps over and swaps its programs into the pinned links.
//!
//! Needs root (namespaces, BPF) and the layout-7 commit in the clone's
//! history. Runs in CI, which is root.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use proxy_tests::{
    cluster::{Agent, LongLived, NameServer, manifest_dir, tcp_requests},
    old_layout,
    twonode::{TwoNodes, node_ip},
};

const PORT: u16 = 8080;
const NODE_PORT: u16 = 30080;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Node objects; `web`, a ClusterIP with random selection over three pods
/// on node1 (a flow that lost its entry would likely change backend); `np`,
/// a NodePort whose one endpoint is on node2 (SNATed by node1).
fn manifests(web: &[Ipv4Addr], np: Ipv4Addr) -> String {
    let mut out = String::new();
    for n in 1..=2u8 {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node{n}}}\nstatus:\n  addresses: [{{type: InternalIP, address: \"{}\"}}]\n---\n",
            node_ip(n)
        ));
    }
    let endpoints = |ips: &[Ipv4Addr], node: &str| -> String {
        ips.iter()
            .map(|ip| {
                format!(
                    "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n"
                )
            })
            .collect()
    };
    out.push_str(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo, annotations: {{ebpf-proxy.io/lb-algorithm: random}}}}\nspec:\n  clusterIP: {VIP}\n  ports:\n  - {{name: tcp, port: 80, protocol: TCP, targetPort: {PORT}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-x1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: tcp, port: {PORT}, protocol: TCP}}\nendpoints:\n{}---\n",
        endpoints(web, "node1")
    ));
    out.push_str(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: demo}}\nspec:\n  clusterIP: 10.96.0.11\n  type: NodePort\n  ports:\n  - {{name: tcp, port: 80, protocol: TCP, targetPort: {PORT}, nodePort: {NODE_PORT}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: np-x1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: np}}\naddressType: IPv4\nports:\n- {{name: tcp, port: {PORT}, protocol: TCP}}\nendpoints:\n{}",
        endpoints(&[np], "node2")
    ));
    out
}

#[test]
fn an_upgrade_across_a_layout_change_keeps_every_connection() {
    let old_agent = old_layout::agent_of_layout_7().unwrap();
    let mut net = TwoNodes::new().unwrap();
    let client_ip = net.add_pod(1, "pod-client", 2).unwrap();
    let mut servers = Vec::new();
    let mut web = Vec::new();
    for host in 10..13u8 {
        let role = format!("web-{host}");
        web.push(net.add_pod(1, &role, host).unwrap());
        servers.push(NameServer::start(net.nodes[0].pod(&role).unwrap(), &role, PORT).unwrap());
    }
    let np_backend = net.add_pod(2, "np", 10).unwrap();
    servers.push(NameServer::start(net.nodes[1].pod("np").unwrap(), "np", PORT).unwrap());
    let dir = manifest_dir(&net.nodes[0], &[("all.yaml", &manifests(&web, np_backend))]).unwrap();
    let start = |n: u8, bin: Option<&std::path::Path>| {
        let node = &net.nodes[usize::from(n - 1)];
        let name = format!("node{n}");
        let args = [
            "--ext-iface",
            "ext0",
            "--node-name",
            &name,
            "--nodeport-mode",
            "snat",
        ];
        let mut agent = match bin {
            Some(bin) => Agent::start_binary(bin, &node.node, &dir, &node.pin_root(), &args),
            None => Agent::start(&node.node, &dir, &node.pin_root(), &args),
        }
        .unwrap();
        agent
            .wait_for_log("synced", Duration::from_secs(15))
            .unwrap();
        agent
    };
    let mut node1 = start(1, Some(&old_agent));
    let _node2 = start(2, Some(&old_agent));
    let pins = net.nodes[0].pin_root();
    assert!(pins.join("v7").is_dir(), "the old agent pins layout 7");

    let client = &net.nodes[0].pod("pod-client").unwrap().ns;
    let vip = SocketAddrV4::new(VIP, 80);
    let np = SocketAddrV4::new(node_ip(1), NODE_PORT);
    let mut conns: Vec<(&str, LongLived)> = Vec::new();
    for _ in 0..6 {
        conns.push(("clusterip", LongLived::open(client, vip).unwrap()));
    }
    for _ in 0..4 {
        conns.push(("nodeport", LongLived::open(&net.client, np).unwrap()));
    }
    let ping_all = |conns: &mut Vec<(&str, LongLived)>, when: &str| {
        for (i, (what, c)) in conns.iter_mut().enumerate() {
            c.ping(&format!("{when}-{i}"))
                .unwrap_or_else(|e| panic!("{what} connection {i} {when}: {e}"));
        }
    };
    ping_all(&mut conns, "before");

    // The upgrade: the old agent goes (its programs keep running from the
    // pins), this build starts on the same pins.
    node1.stop();
    ping_all(&mut conns, "between");
    let mut node1 = start(1, None);
    ping_all(&mut conns, "after-start");
    node1
        .wait_for_log("layout 7 carried over and removed", Duration::from_secs(10))
        .unwrap();
    ping_all(&mut conns, "after");
    assert!(!pins.join("v7").exists(), "the old layout's pins are gone");
    let layout = format!("v{}/links", proxy_common::PIN_LAYOUT_VERSION);
    assert!(pins.join(layout).read_dir().unwrap().count() > 0);

    // The flows live in the new maps, and new connections work.
    let flows = proxy_agent::datapath::read_pinned_conntrack(&pins).unwrap();
    assert!(
        flows.iter().any(|(k, _)| *k.src().ip() == client_ip),
        "the ClusterIP flows were carried over"
    );
    let fresh = tcp_requests(client, vip, 10).unwrap();
    assert!(fresh.iter().all(Result::is_ok), "{fresh:?}");
    let fresh = tcp_requests(&net.client, np, 5).unwrap();
    assert!(fresh.iter().all(Result::is_ok), "{fresh:?}");
    let log = node1.log();
    assert!(!log.contains("ERROR"), "{log}");
    drop(servers);
}
