//! Service semantics in network namespaces, checked the way Kubernetes' own
//! e2e tests check them: conntrack lifecycle, terminating and departed
//! backends, session affinity, scheduling algorithms, hairpin.
//!
//! Needs root (namespaces, BPF). Runs in CI, which is root.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a failed unwrap is a test failure"
)]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use proxy_common::{CtKey, CtValue, ct_dir, ct_state, proto};
use proxy_tests::cluster::{
    Agent, Cluster, Ep, LongLived, NameServer, eventually, manifest_dir, tally, tcp_requests,
    udp_requests, web_manifest,
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 8080;

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 10 + i)
}

fn ready(i: u8) -> Ep {
    Ep::ready(backend_ip(i))
}

/// An endpoint that is terminating but still serving.
fn terminating(i: u8) -> Ep {
    Ep {
        ip: backend_ip(i),
        ready: false,
        terminating: true,
    }
}

/// Service `web` with `annotations` and extra spec lines, and its endpoints.
fn manifests(annotations: &str, spec_extra: &str, eps: &[Ep]) -> String {
    web_manifest(VIP, PORT, annotations, spec_extra, eps)
}

/// A node with a client pod and `n` backends serving names, the agent
/// running with `extra` flags. Drops in order: agent, servers, cluster.
struct Node {
    _agent: Agent,
    _servers: Vec<NameServer>,
    dir: PathBuf,
    cluster: Cluster,
}

fn node(n: u8, manifest: &str, extra: &[&str]) -> Node {
    let mut cluster = Cluster::new().unwrap();
    cluster.add_pod("client", CLIENT_IP).unwrap();
    let mut servers = Vec::new();
    for i in 1..=n {
        let role = format!("backend-{i}");
        let pod = cluster.add_pod(&role, backend_ip(i)).unwrap();
        servers.push(NameServer::start(pod, &role, PORT).unwrap());
    }
    let dir = manifest_dir(&cluster, &[("web.yaml", manifest)]).unwrap();
    let agent = Agent::start(&cluster.node, &dir, &cluster.pin_root(), extra).unwrap();
    Node {
        _agent: agent,
        _servers: servers,
        dir,
        cluster,
    }
}

impl Node {
    fn client(&self) -> &proxy_tests::netns::Netns {
        &self.cluster.pod("client").unwrap().ns
    }

    fn rewrite(&self, manifest: &str) {
        std::fs::write(self.dir.join("web.yaml"), manifest).unwrap();
    }

    fn conntrack(&self) -> Vec<(CtKey, CtValue)> {
        proxy_agent::datapath::read_pinned_conntrack(&self.cluster.pin_root()).unwrap()
    }
}

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

#[test]
fn conntrack_timeouts_expire_idle_flows_by_state() {
    let n = node(
        2,
        &manifests("", "", &[ready(1), ready(2)]),
        &[
            "--conntrack-udp-timeout",
            "2s",
            "--conntrack-tcp-timeout-close",
            "2s",
            "--conntrack-gc-interval",
            "500ms",
        ],
    );
    let mut open = LongLived::open(n.client(), vip(80)).unwrap();
    let closed = tcp_requests(n.client(), vip(80), 3).unwrap();
    assert!(closed.iter().all(Result::is_ok), "{closed:?}");
    let udp = udp_requests(n.client(), vip(53), 3).unwrap();
    assert!(udp.iter().all(Result::is_ok), "{udp:?}");

    let count = |f: &dyn Fn(&CtKey, &CtValue) -> bool| {
        n.conntrack().iter().filter(|(k, v)| f(k, v)).count()
    };
    let udp_entries = |k: &CtKey, _: &CtValue| k.proto == proto::UDP;
    let closing = |k: &CtKey, v: &CtValue| {
        k.proto == proto::TCP && k.dir == ct_dir::FORWARD && v.state >= ct_state::CLOSING
    };
    let established = |k: &CtKey, v: &CtValue| {
        k.proto == proto::TCP && k.dir == ct_dir::FORWARD && v.state == ct_state::ESTABLISHED
    };
    assert_eq!(count(&udp_entries), 6, "3 UDP flows, two entries each");
    assert_eq!(count(&closing), 3, "the closed connections are closing");
    assert_eq!(count(&established), 1, "the open connection is established");

    eventually(
        Duration::from_secs(10),
        "idle UDP and closed TCP flows to expire",
        || Ok(count(&udp_entries) == 0 && count(&closing) == 0),
    )
    .unwrap();
    assert_eq!(count(&established), 1, "the open connection's flow stays");
    open.ping("still here").unwrap();
}

#[test]
fn terminating_backend_keeps_its_connection_gone_backend_loses_it() {
    let all = [ready(1), ready(2), ready(3)];
    let n = node(3, &manifests("", "", &all), &[]);
    let mut open = LongLived::open(n.client(), vip(80)).unwrap();
    let held: u8 = open.backend.trim_start_matches("backend-").parse().unwrap();
    let others: Vec<Ep> = all
        .iter()
        .copied()
        .filter(|e| e.ip != backend_ip(held))
        .collect();

    // Terminating (still serving, no longer ready): new connections avoid
    // it, the open one continues.
    let mut terminating = others.clone();
    terminating.push(self::terminating(held));
    n.rewrite(&manifests("", "", &terminating));
    eventually(
        Duration::from_secs(10),
        "new connections to avoid the terminating backend",
        || {
            let answers = tcp_requests(n.client(), vip(80), 12)?;
            Ok(answers.iter().all(Result::is_ok) && !tally(&answers).contains_key(&open.backend))
        },
    )
    .unwrap();
    open.ping("while terminating").unwrap();

    // Gone from the slice: its flow ends, the client sees it at once
    // (a reset) instead of hanging on a pod that no longer exists.
    n.rewrite(&manifests("", "", &others));
    eventually(
        Duration::from_secs(10),
        "the departed backend's connection to end",
        || Ok(open.ping("after it left").is_err()),
    )
    .unwrap();
    let answers = tcp_requests(n.client(), vip(80), 6).unwrap();
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
}

#[test]
fn session_affinity_holds_across_connections_and_expires() {
    let n = node(
        3,
        &manifests(
            "ebpf-proxy.io/lb-algorithm: round-robin",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n",
            &[ready(1), ready(2), ready(3)],
        ),
        &[],
    );
    // As Kubernetes' e2e test: 15 consecutive connections, one backend.
    let answers = tcp_requests(n.client(), vip(80), 15).unwrap();
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    assert_eq!(tally(&answers).len(), 1, "affinity: {:?}", tally(&answers));
    let udp = udp_requests(n.client(), vip(53), 8).unwrap();
    assert_eq!(tally(&udp).len(), 1, "UDP too: {:?}", tally(&udp));
    // Idle longer than the timeout, each time: round robin places the
    // client afresh, so its connections spread.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(1300));
        let a = tcp_requests(n.client(), vip(80), 1).unwrap();
        seen.extend(tally(&a).into_keys());
    }
    assert!(
        seen.len() >= 2,
        "after the timeout the client moves: {seen:?}"
    );
}

#[test]
fn least_connections_prefers_the_idle_backend() {
    let n = node(
        2,
        &manifests(
            "ebpf-proxy.io/lb-algorithm: least-connections",
            "",
            &[ready(1), ready(2)],
        ),
        &[],
    );
    let mut a = LongLived::open(n.client(), vip(80)).unwrap();
    let b = LongLived::open(n.client(), vip(80)).unwrap();
    assert_ne!(a.backend, b.backend, "two open connections, one on each");
    let idle = b.backend.clone();
    drop(b); // closes: its backend is idle now
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..3 {
        let c = LongLived::open(n.client(), vip(80)).unwrap();
        assert_eq!(c.backend, idle, "connection {i} goes to the idle backend");
        drop(c);
        std::thread::sleep(Duration::from_millis(100));
    }
    a.ping("busy all along").unwrap();
}

#[test]
fn hairpin_a_pod_reaches_itself_through_its_service() {
    let n = node(1, &manifests("", "", &[ready(1)]), &[]);
    let pod = &n.cluster.pod("backend-1").unwrap().ns;
    let tcp = tcp_requests(pod, vip(80), 5).unwrap();
    assert!(tcp.iter().all(Result::is_ok), "{tcp:?}");
    assert_eq!(tally(&tcp).get("backend-1"), Some(&5));
    for a in tcp.iter().flatten() {
        // The pod sees its own connection coming from the frontend address.
        assert!(a.client_seen.starts_with(&format!("{VIP}:")), "{a:?}");
        assert_eq!(
            a.peer.to_string(),
            vip(80).to_string(),
            "answered from the frontend"
        );
    }
    let udp = udp_requests(pod, vip(53), 3).unwrap();
    assert!(udp.iter().all(Result::is_ok), "{udp:?}");
    let mut open = LongLived::open(pod, vip(80)).unwrap();
    open.ping("to myself").unwrap();
}
