//! Operability against a running agent in namespaces: the inspection
//! commands' output (JSON parsed, fields checked), the metrics endpoint
//! (scraped and parsed, counters moving with traffic), uninstall.
//!
//! Needs root (namespaces, BPF). Runs in CI, which is root.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a failed unwrap is a test failure"
)]

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::Command,
};

use proxy_tests::cluster::{
    Agent, Cluster, Ep, LongLived, NameServer, agent_binary, http_get, manifest_dir, tcp_requests,
    web_manifest,
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 10 + i)
}

/// `proxy-agent ARGS -o json --bpffs ROOT`, parsed.
fn cli_json(root: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(agent_binary().unwrap())
        .args(args)
        .args(["-o", "json", "--bpffs"])
        .arg(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Parses Prometheus text into (name{labels} → value).
fn scrape(cluster: &Cluster) -> BTreeMap<String, f64> {
    let (status, body) = http_get(
        &cluster.node,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249),
        "/metrics",
    )
    .unwrap();
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse::<f64>().unwrap())
        })
        .collect()
}

struct Setup {
    _agent: Agent,
    _servers: Vec<NameServer>,
    cluster: Cluster,
}

fn setup() -> Setup {
    let mut cluster = Cluster::new().unwrap();
    cluster.add_pod("client", CLIENT_IP).unwrap();
    let mut servers = Vec::new();
    for i in 1..=2 {
        let role = format!("backend-{i}");
        let pod = cluster.add_pod(&role, backend_ip(i)).unwrap();
        servers.push(NameServer::start(pod, &role, 8080).unwrap());
    }
    let eps = [Ep::ready(backend_ip(1)), Ep::ready(backend_ip(2))];
    let not_ready = [Ep {
        ip: backend_ip(1),
        ready: false,
        terminating: false,
    }];
    // Two broken Services for diagnose: a targetPort nothing listens on
    // (its slice carries that port), and no ready endpoint.
    let broken = |name: &str, vip: &str, port: u16, eps: &[Ep]| {
        web_manifest(vip.parse().unwrap(), port, "", "", eps)
            .replace("name: web\n", &format!("name: {name}\n"))
            .replace("name: web-abc12", &format!("name: {name}-abc12"))
            .replace(
                "kubernetes.io/service-name: web",
                &format!("kubernetes.io/service-name: {name}"),
            )
    };
    let dir = manifest_dir(
        &cluster,
        &[
            ("web.yaml", &web_manifest(VIP, 8080, "", "", &eps)),
            (
                "wrong-port.yaml",
                &broken("wrong-port", "10.96.0.20", 9999, &eps),
            ),
            (
                "not-ready.yaml",
                &broken("not-ready", "10.96.0.21", 8080, &not_ready),
            ),
        ],
    )
    .unwrap();
    let agent = Agent::start(
        &cluster.node,
        &dir,
        &cluster.pin_root(),
        &["--metrics-bind-address", "127.0.0.1:10249"],
    )
    .unwrap();
    Setup {
        _agent: agent,
        _servers: servers,
        cluster,
    }
}

#[test]
fn inspection_commands_show_the_live_datapath() {
    let s = setup();
    let root = s.cluster.pin_root();
    let client = &s.cluster.pod("client").unwrap().ns;
    let answers = tcp_requests(client, SocketAddrV4::new(VIP, 80), 4).unwrap();
    assert!(answers.iter().all(Result::is_ok));
    let conn = LongLived::open(client, SocketAddrV4::new(VIP, 80)).unwrap();

    let list = cli_json(&root, &["service", "list"]);
    let rows = list.as_array().unwrap();
    let http = rows
        .iter()
        .find(|r| r["name"] == "web" && r["port"] == "http")
        .unwrap();
    assert_eq!(http["namespace"], "demo");
    assert_eq!(http["protocol"], "TCP");
    assert_eq!(http["backends"], 2);
    assert_eq!(http["algorithm"], "maglev");
    assert_eq!(http["frontends"][0], "10.96.0.10:80/TCP (cluster)");
    assert!(http["new_connections"].as_u64().unwrap() >= 5, "{http}");
    assert!(
        rows.iter()
            .any(|r| r["port"] == "dns" && r["protocol"] == "UDP")
    );

    let get = cli_json(&root, &["service", "get", "demo/web"]);
    let tables = get.as_array().unwrap();
    assert_eq!(tables.len(), 2, "one table per port");
    let backends = tables[0]["backend_list"].as_array().unwrap();
    let addrs: Vec<&str> = backends
        .iter()
        .map(|b| b["address"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, ["10.244.1.11:8080", "10.244.1.12:8080"]);
    assert!(backends.iter().all(|b| b["state"] == "eligible"));
    let share: f64 = backends
        .iter()
        .map(|b| b["slot_share_percent"].as_f64().unwrap())
        .sum();
    assert!(
        (share - 100.0).abs() < 0.1,
        "slot shares sum to 100%: {share}"
    );

    // ct list names the backend the long-lived connection really reached.
    let held = match conn.backend.as_str() {
        "backend-1" => "10.244.1.11:8080",
        _ => "10.244.1.12:8080",
    };
    let ct = cli_json(
        &root,
        &["ct", "list", "--service", "demo/web", "--proto", "tcp"],
    );
    let established: Vec<&serde_json::Value> = ct
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["direction"] == "forward" && e["state"] == "established")
        .collect();
    assert_eq!(established.len(), 1, "{ct}");
    assert_eq!(established[0]["translated_to"], held);
    assert_eq!(established[0]["destination"], "10.96.0.10:80");
    // explain computes, with the kernel's hash, the backend that
    // connection really reached, and finds its tracked flow.
    let SocketAddr::V4(src) = conn.local else {
        panic!("IPv4")
    };
    let ex = cli_json(
        &root,
        &[
            "explain",
            "--src",
            &src.to_string(),
            "--dst",
            "10.96.0.10:80",
            "--proto",
            "tcp",
        ],
    );
    assert_eq!(ex["service"], "demo/web");
    assert_eq!(ex["frontend"], "10.96.0.10:80/TCP (cluster)");
    assert_eq!(ex["algorithm"], "maglev");
    assert_eq!(ex["new_flow_backend"], held, "{ex}");
    assert_eq!(ex["conntrack"]["translated_to"], held, "{ex}");
    assert!(ex["slot"].as_u64().unwrap() < ex["table_size"].as_u64().unwrap());
    assert_eq!(
        ex["reply"],
        format!("replies from {held} get the source 10.96.0.10:80")
    );
    let none = cli_json(
        &root,
        &[
            "explain",
            "--src",
            &src.to_string(),
            "--dst",
            "10.96.0.99:80",
        ],
    );
    assert!(none["frontend"].is_null());
    let unknown = Command::new(agent_binary().unwrap())
        .args(["service", "get", "demo/nope", "--bpffs"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no programmed Service"));
}

#[test]
fn metrics_are_scraped_and_move_with_traffic() {
    let s = setup();
    let client = &s.cluster.pod("client").unwrap().ns;
    let packets = r#"ebpf_proxy_service_packets_total{namespace="demo",service="web",port="http",protocol="TCP",scope="all"}"#;
    let new_conns = r#"ebpf_proxy_service_new_connections_total{namespace="demo",service="web",port="http",protocol="TCP",scope="all"}"#;
    let before = scrape(&s.cluster);
    assert_eq!(before[new_conns], 0.0);
    assert_eq!(
        before[r#"ebpf_proxy_map_entries{map="SERVICES"}"#], 6.0,
        "3 Services x 2 ports"
    );
    assert!(before[r#"ebpf_proxy_sync_duration_seconds_count{kind="full"}"#] >= 1.0);
    assert!(before.contains_key(r#"ebpf_proxy_datapath_drops_total{reason="no_local_endpoints"}"#));
    tcp_requests(client, SocketAddrV4::new(VIP, 80), 5).unwrap();
    let after = scrape(&s.cluster);
    assert_eq!(after[new_conns], 5.0);
    assert!(
        after[packets] >= 15.0,
        "handshake, request, close: {}",
        after[packets]
    );
    assert!(
        after[r#"ebpf_proxy_datapath_packets_total{path="new_flow",verdict="handled"}"#] >= 5.0
    );
    let (status, _) = http_get(
        &s.cluster.node,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249),
        "/readyz",
    )
    .unwrap();
    assert_eq!(status, 200);
}

#[test]
fn uninstall_removes_programs_and_pins() {
    let mut s = setup();
    s._agent.stop();
    let root = s.cluster.pin_root();
    assert!(root.exists());
    let out = Command::new(agent_binary().unwrap())
        .args(["uninstall", "--bpffs"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!root.exists());
    let attached = s.cluster.node.exec("bpftool", &["net", "show"]).unwrap();
    assert!(
        !attached.contains("tc_pod"),
        "programs still attached: {attached}"
    );
}

/// `proxy-agent diagnose NS/NAME -o json` run on the node: (exit ok, checks).
fn diagnose(s: &Setup, name: &str) -> (bool, Vec<serde_json::Value>) {
    let dir = std::path::PathBuf::from("/run")
        .join(&s.cluster.prefix)
        .join("manifests");
    let bin = agent_binary().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &s.cluster.node.name])
        .arg(bin)
        .args(["diagnose", name, "-o", "json", "--manifests"])
        .arg(&dir)
        .arg("--bpffs")
        .arg(s.cluster.pin_root())
        .output()
        .unwrap();
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (out.status.success(), checks.as_array().unwrap().clone())
}

fn status_of<'a>(checks: &'a [serde_json::Value], check: &str) -> Vec<&'a serde_json::Value> {
    checks.iter().filter(|c| c["check"] == check).collect()
}

#[test]
fn diagnose_walks_the_checklist() {
    let s = setup();
    // The node connects to backends from an address of its own, as a real node does.
    s.cluster
        .node
        .ip(&["addr", "add", "10.244.0.1/32", "dev", "lo"])
        .unwrap();
    let (ok, checks) = diagnose(&s, "demo/web");
    assert!(ok, "{checks:#?}");
    assert!(checks.iter().all(|c| c["status"] == "pass"), "{checks:#?}");
    assert_eq!(status_of(&checks, "backend reachable").len(), 2);
    assert_eq!(status_of(&checks, "programmed").len(), 2, "one per port");

    let (ok, checks) = diagnose(&s, "demo/wrong-port");
    assert!(!ok);
    let reach = status_of(&checks, "backend reachable");
    assert!(
        !reach.is_empty() && reach.iter().all(|c| c["status"] == "fail"),
        "{checks:#?}"
    );
    assert!(reach[0]["hint"].as_str().unwrap().contains("targetPort"));
    assert!(
        status_of(&checks, "programmed")
            .iter()
            .all(|c| c["status"] == "pass")
    );

    let (ok, checks) = diagnose(&s, "demo/not-ready");
    assert!(!ok);
    let ready = status_of(&checks, "endpoints ready");
    assert_eq!(ready[0]["status"], "fail", "{checks:#?}");
    assert_eq!(ready[0]["detail"], "0 of 1 ready");
    assert!(ready[0]["hint"].as_str().unwrap().contains("readiness"));

    let (ok, checks) = diagnose(&s, "demo/missing");
    assert!(!ok);
    assert_eq!(checks[0]["check"], "service exists");
}
