//! Every client reaches every Service address: socket-level load balancing
//! for processes on the node (their connects and sends translated by the
//! cgroup hooks), and pods reaching this node's NodePorts, LoadBalancer IPs
//! and externalIPs through the packet path.
//!
//! The socket hooks attach to a cgroup each test creates (never the
//! machine's root cgroup), and the clients are `sockprobe` processes placed
//! in it. Needs root (namespaces, BPF, cgroups). Runs in CI, which is root.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a failed unwrap is a test failure"
)]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use proxy_agent::inspect;
use proxy_tests::{
    cluster::{
        Agent, Cluster, NameServer, empty_manifest, eventually, manifest_dir, tally, tcp_requests,
    },
    netns::TestCgroup,
};
use serde_json::Value;

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// This node's address (on its loopback), where NodePorts listen.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 20);
const NODE_PORT: u16 = 30080;
const PORT: u16 = 8080;

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 10 + i)
}

fn probe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sockprobe"))
}

/// The Node (its address where NodePorts listen), Service `web` (ClusterIP
/// `VIP`, TCP 80 and UDP 53, a NodePort, a LoadBalancer IP and an
/// externalIP, `externalTrafficPolicy: Local`) with `backends` (1 on this
/// node, the others on node-b), and Service `empty` without endpoints.
fn manifests(backends: &[u8]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|i| {
            let node = if *i == 1 { "node-a" } else { "node-b" };
            format!(
                "- addresses: [\"{}\"]\n  nodeName: {node}\n  conditions: {{ready: true}}\n",
                backend_ip(*i)
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node-a}}
status:
  addresses: [{{type: InternalIP, address: "{NODE_IP}"}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: {VIP}
  externalIPs: ["{EXTERNAL_IP}"]
  externalTrafficPolicy: Local
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: {PORT}, nodePort: {NODE_PORT}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: {PORT}, nodePort: {NODE_PORT}}}
status:
  loadBalancer:
    ingress: [{{ip: "{LB_IP}"}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: http, port: {PORT}, protocol: TCP}}
- {{name: dns, port: {PORT}, protocol: UDP}}
endpoints:
{endpoints}---
{}"#,
        empty_manifest(EMPTY_VIP)
    )
}

/// A node (its address on loopback) with a client pod and three backends,
/// and a cgroup for the processes the socket hooks serve.
struct Setup {
    agent: Option<Agent>,
    _servers: Vec<NameServer>,
    dir: PathBuf,
    cgroup: TestCgroup,
    cluster: Cluster,
}

fn setup(extra: &[&str]) -> Setup {
    let mut cluster = Cluster::new().unwrap();
    cluster
        .node
        .ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])
        .unwrap();
    // The node's and the load balancer's addresses are routed to the node,
    // as a pod's default route would (the node routes nothing further):
    // the client's requests, and the backends' answers to the node's own
    // processes (which come from the node's address).
    let to_node = [
        "route",
        "add",
        "192.168.0.0/16",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ];
    cluster
        .add_pod("client", CLIENT_IP)
        .unwrap()
        .ns
        .ip(&to_node)
        .unwrap();
    let mut servers = Vec::new();
    for i in 1..=3 {
        let role = format!("backend-{i}");
        let pod = cluster.add_pod(&role, backend_ip(i)).unwrap();
        pod.ns.ip(&to_node).unwrap();
        servers.push(NameServer::start(pod, &role, PORT).unwrap());
    }
    let cgroup = TestCgroup::new(&cluster.prefix).unwrap();
    let dir = manifest_dir(&cluster, &[("web.yaml", &manifests(&[1, 2, 3]))]).unwrap();
    let root = cgroup.path.to_string_lossy().into_owned();
    let mut args = vec!["--cgroup-root", root.as_str(), "--node-name", "node-a"];
    args.extend_from_slice(extra);
    let agent = Agent::start(&cluster.node, &dir, &cluster.pin_root(), &args).unwrap();
    Setup {
        agent: Some(agent),
        _servers: servers,
        dir,
        cgroup,
        cluster,
    }
}

impl Setup {
    /// Runs `sockprobe` in the node's namespace, inside the test cgroup.
    fn probe(&self, args: &[&str]) -> Vec<Value> {
        let out = self
            .cgroup
            .exec(&self.cluster.node, &probe(), args)
            .unwrap();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn pin_root(&self) -> PathBuf {
        self.cluster.pin_root()
    }

    fn counter(&self, name: &str) -> u64 {
        proxy_agent::datapath::read_pinned_counters(&self.pin_root())
            .unwrap()
            .into_iter()
            .find(|(c, _)| c.name() == name)
            .map_or(0, |(_, v)| v)
    }
}

fn backends(answers: &[Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for a in answers {
        assert!(a["backend"].is_string(), "failed: {a}");
        let b = a["backend"].as_str().unwrap();
        *out.entry(b.to_owned()).or_insert(0) += 1;
    }
    out
}

#[test]
fn host_processes_reach_services_through_the_socket_hooks() {
    let s = setup(&[]);
    let before = s.counter("sock_translated");

    // TCP to the ClusterIP: balanced, and the application only ever sees the
    // ClusterIP as its peer.
    let tcp = s.probe(&["tcp", &format!("{VIP}:80"), "60"]);
    let spread = backends(&tcp);
    assert_eq!(spread.len(), 3, "balanced over the backends: {spread:?}");
    for a in &tcp {
        assert_eq!(a["peer"], format!("{VIP}:80"), "getpeername: {a}");
    }
    assert!(
        s.counter("sock_translated") >= before + 60,
        "translated at connect, not per packet"
    );

    // What the hooks kept for those connections went with their sockets.
    eventually(Duration::from_secs(5), "SOCK_PEER to empty", || {
        Ok(proxy_agent::datapath::read_pinned_sock_peers(&s.pin_root())?.is_empty())
    })
    .unwrap();

    // UDP, unconnected: a new socket per datagram spreads; replies come
    // from the ClusterIP as recvfrom reports them.
    let udp = s.probe(&["udp", &format!("{VIP}:53"), "60"]);
    assert!(backends(&udp).len() >= 2, "{:?}", backends(&udp));
    for a in &udp {
        assert_eq!(a["from"], format!("{VIP}:53"), "recvfrom: {a}");
    }
    // One socket keeps its backend, as one conntrack flow would.
    let sticky = s.probe(&["udp-sticky", &format!("{VIP}:53"), "10"]);
    assert_eq!(backends(&sticky).len(), 1, "{sticky:?}");

    // This node's address on the NodePort, the LoadBalancer IP and the
    // externalIP: from the node, the cluster-wide endpoints, even under
    // externalTrafficPolicy Local (backends 2 and 3 are on node-b).
    for frontend in [
        SocketAddrV4::new(NODE_IP, NODE_PORT),
        SocketAddrV4::new(LB_IP, 80),
        SocketAddrV4::new(EXTERNAL_IP, 80),
    ] {
        let answers = s.probe(&["tcp", &frontend.to_string(), "30"]);
        let spread = backends(&answers);
        assert!(spread.len() >= 2, "{frontend}: {spread:?}");
        assert!(answers.iter().all(|a| a["peer"] == frontend.to_string()));
    }

    // No endpoints: refused at once, TCP and UDP.
    for (port, proto) in [(80, "tcp"), (53, "udp")] {
        let r = &s.probe(&["refused", &format!("{EMPTY_VIP}:{port}"), proto])[0];
        assert_eq!(r["error"], "ConnectionRefused", "{proto}: {r}");
        assert!(r["ms"].as_u64().unwrap() < 1000, "{proto}: {r}");
    }
    assert!(s.counter("sock_refused") >= 2);

    // The inspection commands say how the Service is served.
    let snapshot = inspect::Snapshot::read(&s.pin_root()).unwrap();
    let detail = inspect::service(&snapshot, "demo", "web");
    assert!(
        detail
            .iter()
            .any(|d| d.socket_level.is_some_and(|l| l.contains("host processes"))),
        "service get says socket-level"
    );
    let e = inspect::explain(
        &snapshot,
        &[],
        SocketAddrV4::new(CLIENT_IP, 40000),
        SocketAddrV4::new(VIP, 80),
        6,
        0,
    );
    assert!(e.socket_level.is_some(), "explain says socket-level");
}

#[test]
fn pods_reach_node_ports_load_balancer_ips_and_external_ips_per_packet() {
    let s = setup(&["--socket-lb", "off"]);
    let client = &s.cluster.pod("client").unwrap().ns;
    for frontend in [
        SocketAddrV4::new(NODE_IP, NODE_PORT),
        SocketAddrV4::new(LB_IP, 80),
        SocketAddrV4::new(EXTERNAL_IP, 80),
    ] {
        let answers = tcp_requests(client, frontend, 30).unwrap();
        assert!(
            answers.iter().all(Result::is_ok),
            "{frontend}: {:?}",
            answers.iter().find(|a| a.is_err())
        );
        let spread = tally(&answers);
        assert!(
            spread.len() >= 2,
            "{frontend}: cluster-wide endpoints from a pod even under externalTrafficPolicy Local: {spread:?}"
        );
        for a in answers.iter().flatten() {
            assert!(
                a.client_seen.starts_with(&format!("{CLIENT_IP}:")),
                "{frontend}: the backend sees the pod, not {}",
                a.client_seen
            );
        }
    }
    // With the hooks off, the node's own processes are not translated.
    assert!(proxy_agent::datapath::pinned_sock_hooks(&layout_dir(&s.pin_root())).is_empty());
}

fn layout_dir(pin_root: &Path) -> PathBuf {
    pin_root.join(format!("v{}", proxy_common::PIN_LAYOUT_VERSION))
}

#[test]
fn a_connected_udp_socket_whose_backend_leaves_is_told() {
    let s = setup(&[]);
    let mut p = s
        .cgroup
        .spawn(
            &s.cluster.node,
            &probe(),
            &["udp-connected", &format!("{VIP}:53"), "12"],
        )
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = p.child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((
                Instant::now(),
                serde_json::from_str::<Value>(&line).unwrap(),
            ));
        }
    });
    let (_, first) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let gone = first["backend"].as_str().unwrap().to_owned();
    assert_eq!(first["peer"], format!("{VIP}:53"));
    let index: u8 = gone.trim_start_matches("backend-").parse().unwrap();
    let rest: Vec<u8> = (1..=3).filter(|i| *i != index).collect();
    std::fs::write(s.dir.join("web.yaml"), manifests(&rest)).unwrap();
    let removed = Instant::now();
    // The backend's server still answers: only the agent can make the
    // socket stop talking to it. It is aborted (ECONNABORTED, reported by
    // the send or left pending) and disconnected within a few seconds.
    let mut told = None;
    while let Ok((at, line)) = rx.recv_timeout(Duration::from_secs(5)) {
        if at > removed && line.get("error").is_some() {
            told = Some((at - removed, line));
            break;
        }
        assert_eq!(
            line["backend"],
            gone.as_str(),
            "a connected socket moved: {line}"
        );
    }
    let (after, line) = told.expect("the socket kept talking to the departed backend");
    assert!(after < Duration::from_secs(5), "{after:?}: {line}");
    assert!(
        line["error"] == "ConnectionAborted" || line["pending"] == "ConnectionAborted",
        "{line}"
    );
}

#[test]
fn hooks_outlive_the_agent_and_uninstall_removes_them() {
    let mut s = setup(&[]);
    let cgroup = s.cgroup.path.to_string_lossy().into_owned();
    let attached = || -> usize {
        // One line per attached program, after a header.
        let out = proxy_tests::netns::sh("bpftool", &["cgroup", "show", &cgroup]).unwrap();
        out.lines().filter(|l| l.contains("sock_")).count()
    };
    assert_eq!(
        attached(),
        5,
        "connect4, sendmsg4, recvmsg4, getpeername4, sock_release"
    );
    // The agent tells the machine's root cgroup (where it attaches by
    // default) from any other, a container's cgroup namespace included.
    assert!(!proxy_agent::host::is_cgroup_root(&s.cgroup.path));
    assert!(proxy_agent::host::is_cgroup_root(
        s.cgroup.path.parent().unwrap()
    ));

    // kill -9: the hooks and their maps stay; processes are still served.
    let mut agent = s.agent.take().unwrap();
    // SAFETY: plain kill(2) of our own child.
    unsafe {
        libc::kill(
            i32::try_from(agent.process.child.id()).unwrap(),
            libc::SIGKILL,
        );
    }
    let _ = agent.process.child.wait();
    let down = s.probe(&["tcp", &format!("{VIP}:80"), "10"]);
    assert_eq!(backends(&down).values().sum::<usize>(), 10, "{down:?}");
    assert_eq!(attached(), 5);

    // A new agent adopts them (no second set) and keeps serving.
    let root = s.cgroup.path.to_string_lossy().into_owned();
    let mut again = Agent::start(
        &s.cluster.node,
        &s.dir,
        &s.pin_root(),
        &["--cgroup-root", &root],
    )
    .unwrap();
    again
        .wait_for_log("adopted pinned link", Duration::from_secs(5))
        .unwrap();
    assert_eq!(attached(), 5, "adopted, not attached twice");
    let up = s.probe(&["tcp", &format!("{VIP}:80"), "10"]);
    assert!(up.iter().all(|a| a["peer"] == format!("{VIP}:80")));
    again.stop();

    // uninstall detaches them: the node's processes no longer reach the ClusterIP.
    let bin = proxy_tests::cluster::agent_binary().unwrap();
    let pins = s.pin_root().to_string_lossy().into_owned();
    let out =
        proxy_tests::netns::sh(bin.to_str().unwrap(), &["uninstall", "--bpffs", &pins]).unwrap();
    assert!(out.contains("5 socket hooks detached"), "{out}");
    eventually(Duration::from_secs(5), "the hooks to go", || {
        Ok(attached() == 0)
    })
    .unwrap();
    let after = s.probe(&["tcp", &format!("{VIP}:80"), "1"]);
    assert!(after[0].get("error").is_some(), "{after:?}");
}
