//! The agent against a fake API server speaking the real list/watch protocol:
//! convergence on create/update/delete, watch restarts (dropped connections,
//! 410 Gone re-lists) that resync instead of flushing, and an unreachable API
//! server that leaves the datapath serving.
//!
//! Needs root (namespaces, BPF). Runs in CI, which is root.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a failed unwrap is a test failure"
)]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use proxy_agent::datapath::read_pinned;
use proxy_common::{ServiceKey, proto, scope};
use proxy_tests::{
    cluster::{
        Agent, Answer, Cluster, LongLived, NameServer, eventually, http_get, tally, tcp_requests,
    },
    fake_api::FakeApi,
};

const NODE: &str = "node-a";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const API_SVC: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const HEALTH: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256);

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 10 + i)
}

fn node_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}, labels: {{topology.kubernetes.io/zone: zone-a}}}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.168.1.10}}]}}\n"
    )
}

fn service_yaml(name: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, protocol: TCP}}]}}\n"
    )
}

fn slice_yaml(name: &str, service: &str, backends: &[u8]) -> String {
    let eps: String = backends
        .iter()
        .map(|i| {
            format!(
                "- {{addresses: [\"{}\"], nodeName: {NODE}, conditions: {{ready: true}}}}\n",
                backend_ip(*i)
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: demo, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{eps}"
    )
}

/// A node with a client and three backends, a fake API server in the node
/// namespace serving the `web` Service, and a kubeconfig for it.
struct Setup {
    _servers: Vec<NameServer>,
    api: FakeApi,
    kubeconfig: PathBuf,
    cluster: Cluster,
}

fn setup() -> Setup {
    let mut cluster = Cluster::new().unwrap();
    cluster.add_pod("client", CLIENT_IP).unwrap();
    let mut servers = Vec::new();
    for i in 1..=3 {
        let role = format!("backend-{i}");
        let pod = cluster.add_pod(&role, backend_ip(i)).unwrap();
        servers.push(NameServer::start(pod, &role, 8080).unwrap());
    }
    let api = FakeApi::start(&cluster.node).unwrap();
    api.apply_yaml(&node_yaml()).unwrap();
    api.apply_yaml(&service_yaml("web", WEB)).unwrap();
    api.apply_yaml(&slice_yaml("web-1", "web", &[1, 2, 3]))
        .unwrap();
    let kubeconfig = PathBuf::from("/run")
        .join(&cluster.prefix)
        .join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    Setup {
        _servers: servers,
        api,
        kubeconfig,
        cluster,
    }
}

/// The agent watching the fake API server, not waited for.
fn spawn_agent(s: &Setup) -> Agent {
    Agent::start_kube(
        &s.cluster.node,
        &s.kubeconfig,
        NODE,
        &s.cluster.pin_root(),
        &[],
    )
    .unwrap()
}

fn start_agent(s: &Setup) -> Agent {
    let mut agent = spawn_agent(s);
    agent
        .wait_for_log("kind=\"full\"", Duration::from_secs(20))
        .unwrap();
    agent
}

/// Backend addresses programmed for a ClusterIP frontend (port 80/TCP), if any.
fn programmed_backends(s: &Setup, vip: Ipv4Addr) -> Option<Vec<Ipv4Addr>> {
    let maps = read_pinned(&s.cluster.pin_root()).unwrap();
    let key = ServiceKey::new(SocketAddrV4::new(vip, 80), proto::TCP, scope::INTERNAL);
    let v = maps.services.get(&key)?;
    // Read while the agent may be writing: an entry gone between maps
    // reads as "not programmed (yet)", and the caller polls again.
    let t = maps.tables.get(&v.svc_id)?;
    t.backends
        .iter()
        .map(|id| maps.backends.get(id).map(|b| *b.addr().ip()))
        .collect()
}

fn ok_requests(s: &Setup, vip: Ipv4Addr, n: usize) -> Vec<Answer> {
    let client = &s.cluster.pod("client").unwrap().ns;
    let answers = tcp_requests(client, SocketAddrV4::new(vip, 80), n).unwrap();
    let failed: Vec<String> = answers
        .iter()
        .filter_map(|a| a.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    answers.into_iter().flatten().collect()
}

fn readyz(s: &Setup) -> u16 {
    http_get(&s.cluster.node, HEALTH, "/readyz").map_or(0, |(code, _)| code)
}

#[test]
fn watches_converge_on_create_update_delete() {
    let s = setup();
    let mut agent = start_agent(&s);
    assert_eq!(readyz(&s), 200);
    let answers: Vec<anyhow::Result<Answer>> =
        ok_requests(&s, WEB, 60).into_iter().map(Ok).collect();
    assert_eq!(tally(&answers).len(), 3);

    // Update: backend-3 leaves.
    let started = Instant::now();
    s.api
        .apply_yaml(&slice_yaml("web-1", "web", &[1, 2]))
        .unwrap();
    eventually(Duration::from_secs(5), "web to lose backend-3", || {
        Ok(programmed_backends(&s, WEB) == Some(vec![backend_ip(1), backend_ip(2)]))
    })
    .unwrap();
    println!("slice update converged in {:?}", started.elapsed());
    let answers = ok_requests(&s, WEB, 40);
    assert!(answers.iter().all(|a| a.backend != "backend-3"));

    // Create a Service and its slice.
    s.api.apply_yaml(&service_yaml("api", API_SVC)).unwrap();
    s.api.apply_yaml(&slice_yaml("api-1", "api", &[3])).unwrap();
    eventually(Duration::from_secs(5), "api to be programmed", || {
        Ok(programmed_backends(&s, API_SVC) == Some(vec![backend_ip(3)]))
    })
    .unwrap();
    assert!(
        ok_requests(&s, API_SVC, 10)
            .iter()
            .all(|a| a.backend == "backend-3")
    );

    // Bad objects are logged with their names; the rest keeps working.
    s.api
        .apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: demo}\nspec: {clusterIP: 10.96.0.40, ports: [{name: a, port: 80}, {name: a, port: 81}]}\n")
        .unwrap();
    s.api
        .apply_yaml(&slice_yaml("orphan-1", "nope", &[1]))
        .unwrap();
    s.api
        .apply_yaml("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: bad-1, namespace: demo, labels: {kubernetes.io/service-name: bad}}\naddressType: IPv4\nports: [{name: a, port: 8080}]\nendpoints: [{addresses: [not-an-ip]}, {addresses: [10.244.1.11]}]\n")
        .unwrap();
    agent
        .wait_for_log(
            "Service demo/bad: port name \"a\"/TCP is used twice",
            Duration::from_secs(5),
        )
        .unwrap();
    agent
        .wait_for_log(
            "EndpointSlice demo/orphan-1: belongs to Service demo/nope",
            Duration::from_secs(5),
        )
        .unwrap();
    agent
        .wait_for_log(
            "EndpointSlice demo/bad-1: invalid IPv4 endpoint address",
            Duration::from_secs(5),
        )
        .unwrap();
    ok_requests(&s, WEB, 10);
    ok_requests(&s, API_SVC, 10);

    // Delete.
    s.api.delete("Service", "demo", "api").unwrap();
    eventually(Duration::from_secs(5), "api to be removed", || {
        Ok(programmed_backends(&s, API_SVC).is_none())
    })
    .unwrap();
    assert_eq!(
        programmed_backends(&s, WEB),
        Some(vec![backend_ip(1), backend_ip(2)])
    );
    agent.stop();
    assert!(!agent.log().contains("ERROR"), "{}", agent.log());
}

#[test]
fn watch_restarts_resync_instead_of_flushing() {
    let s = setup();
    let mut agent = start_agent(&s);
    let client = &s.cluster.pod("client").unwrap().ns;
    let mut conn = LongLived::open(client, SocketAddrV4::new(WEB, 80)).unwrap();
    // The change removes a backend the connection does not use (a backend
    // that leaves takes its connections with it).
    let held: u8 = conn.backend.trim_start_matches("backend-").parse().unwrap();
    let kept: Vec<u8> = (1..=3)
        .filter(|i| *i != held)
        .take(1)
        .chain([held])
        .collect();
    let mut kept_ips: Vec<_> = kept.iter().map(|i| backend_ip(*i)).collect();
    kept_ips.sort();

    // Dropped connections: the watchers resume from their last
    // resourceVersion (kept fresh by bookmarks); a change made meanwhile arrives.
    s.api.drop_watches();
    s.api
        .apply_yaml(&slice_yaml("web-1", "web", &kept))
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the change after a dropped watch",
        || Ok(programmed_backends(&s, WEB).as_ref() == Some(&kept_ips)),
    )
    .unwrap();
    assert_eq!(
        agent.count_in_log("re-listed"),
        0,
        "a dropped watch resumes, no re-list:\n{}",
        agent.log()
    );
    conn.ping("after-drop").unwrap();

    // History compacted while disconnected: the watchers get 410 Gone and
    // re-list; the re-list is applied as a diff (only what changed), the
    // long-lived connection never notices.
    let syncs_before = agent
        .count_in_log("\"synced\"")
        .max(agent.count_in_log(" synced"));
    s.api.compact();
    s.api.apply_yaml(&service_yaml("api", API_SVC)).unwrap();
    s.api.apply_yaml(&slice_yaml("api-1", "api", &[3])).unwrap();
    s.api.compact();
    s.api.drop_watches();
    agent
        .wait_for_log("re-listed", Duration::from_secs(15))
        .unwrap();
    eventually(Duration::from_secs(10), "api after the re-list", || {
        Ok(programmed_backends(&s, API_SVC) == Some(vec![backend_ip(3)]))
    })
    .unwrap();
    conn.ping("after-relist").unwrap();
    assert_eq!(programmed_backends(&s, WEB), Some(kept_ips));
    // No sync after the re-list touched more than the new Service's entries.
    let log = agent.log();
    let flushes: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("re-listed"))
        .filter(|l| l.contains("synced") && l.contains("incremental"))
        .filter(|l| {
            l.split("operations=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n > 6)
        })
        .collect();
    assert!(
        flushes.is_empty(),
        "re-list caused large syncs: {flushes:?}"
    );
    assert!(agent.count_in_log(" synced") >= syncs_before);
    assert!(
        s.api
            .requests()
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")),
        "the watchers ask for bookmarks"
    );
    agent.stop();
}

#[test]
fn unreachable_api_server_leaves_the_datapath_serving() {
    let s = setup();
    let mut first = start_agent(&s);
    ok_requests(&s, WEB, 10);
    first.process.child.kill().unwrap();
    first.process.child.wait().unwrap();

    // The API is down when the next agent starts: it adopts the pinned state,
    // serves it, and says it is not ready.
    s.api.set_unavailable(true);
    let mut agent = spawn_agent(&s);
    agent
        .wait_for_log("retrying with backoff", Duration::from_secs(10))
        .unwrap();
    assert_eq!(readyz(&s), 503);
    let answers: Vec<anyhow::Result<Answer>> =
        ok_requests(&s, WEB, 30).into_iter().map(Ok).collect();
    assert_eq!(
        tally(&answers).len(),
        3,
        "the adopted state serves all backends"
    );

    // A change made during the outage arrives once the API is back.
    s.api
        .apply_yaml(&slice_yaml("web-1", "web", &[2, 3]))
        .unwrap();
    s.api.set_unavailable(false);
    eventually(
        Duration::from_secs(20),
        "the first sync after the outage",
        || Ok(programmed_backends(&s, WEB) == Some(vec![backend_ip(2), backend_ip(3)])),
    )
    .unwrap();
    eventually(Duration::from_secs(5), "ready", || Ok(readyz(&s) == 200)).unwrap();

    // The API goes away while running: traffic keeps flowing, not ready.
    s.api.set_unavailable(true);
    eventually(
        Duration::from_secs(20),
        "not ready during the outage",
        || Ok(readyz(&s) == 503),
    )
    .unwrap();
    let answers = ok_requests(&s, WEB, 20);
    assert!(answers.iter().all(|a| a.backend != "backend-1"));
    s.api.apply_yaml(&slice_yaml("web-1", "web", &[1])).unwrap();
    s.api.set_unavailable(false);
    eventually(Duration::from_secs(20), "reconverged", || {
        Ok(programmed_backends(&s, WEB) == Some(vec![backend_ip(1)]))
    })
    .unwrap();
    eventually(Duration::from_secs(5), "ready again", || {
        Ok(readyz(&s) == 200)
    })
    .unwrap();
    agent.stop();
}

/// kube-proxy's metrics as kube-proxy defines them (`pkg/proxy/metrics`,
/// v1.33+, where most gained `ip_family`): name, type, label names (without
/// `le`).
const KUBE_PROXY_METRICS: &[(&str, &str, &[&str])] = &[
    (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "counter",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "gauge",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "counter",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "gauge",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
        &["ip_family", "traffic_policy"],
    ),
    (
        "kubeproxy_conntrack_reconciler_deleted_entries_total",
        "counter",
        &["ip_family"],
    ),
    ("kubeproxy_proxy_healthz_total", "counter", &["code"]),
    ("kubeproxy_proxy_livez_total", "counter", &["code"]),
];

/// A scrape's families: type, and per sample (name with suffix, label
/// names without `le`, `le`, value).
type Sample = (String, Vec<String>, Option<String>, f64);

fn scrape(s: &Setup) -> (std::collections::BTreeMap<String, String>, Vec<Sample>) {
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);
    let (code, text) = http_get(&s.cluster.node, metrics, "/metrics").unwrap();
    assert_eq!(code, 200);
    let mut types = std::collections::BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (head, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = head.split_once('{').unwrap_or((head, "}"));
        let mut names = Vec::new();
        let mut le = None;
        for pair in labels
            .trim_end_matches('}')
            .split(',')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap();
            if k == "le" {
                le = Some(v.trim_matches('"').to_owned());
            } else {
                names.push(k.to_owned());
            }
        }
        samples.push((name.to_owned(), names, le, value.parse().unwrap()));
    }
    (types, samples)
}

fn value(samples: &[Sample], name: &str, le: Option<&str>) -> f64 {
    samples
        .iter()
        .filter(|(n, _, l, _)| n == name && l.as_deref() == le)
        .map(|(_, _, _, v)| v)
        .sum()
}

#[test]
fn kube_proxys_metrics_and_health_answer_as_kube_proxys() {
    let s = setup();
    let mut agent = spawn_agent(&s);
    eventually(Duration::from_secs(10), "ready", || Ok(readyz(&s) == 200)).unwrap();

    // An EndpointSlice change the endpoints controller began 3 s ago.
    let began =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(3);
    let slice = slice_yaml("web-1", "web", &[1, 2]).replacen(
        "labels:",
        &format!(
            "annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{}\"}}, labels:",
            began.strftime("%Y-%m-%dT%H:%M:%SZ")
        ),
        1,
    );
    s.api.apply_yaml(&slice).unwrap();
    let programming = "kubeproxy_network_programming_duration_seconds";
    eventually(Duration::from_secs(10), "the change programmed", || {
        Ok(value(&scrape(&s).1, &format!("{programming}_count"), None) >= 1.0)
    })
    .unwrap();
    let (status, body) = http_get(&s.cluster.node, HEALTH, "/healthz").unwrap();
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["nodeEligible"], true, "{body}");
    assert!(
        json["lastUpdated"].is_string() && json["currentTime"].is_string(),
        "{body}"
    );

    // The node is being drained away: /healthz says so, /livez does not care.
    s.api
        .apply_yaml(&node_yaml().replace(
            "status:",
            "spec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}\nstatus:",
        ))
        .unwrap();
    eventually(Duration::from_secs(10), "/healthz 503", || {
        Ok(http_get(&s.cluster.node, HEALTH, "/healthz")?.0 == 503)
    })
    .unwrap();
    let (_, body) = http_get(&s.cluster.node, HEALTH, "/healthz").unwrap();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["nodeEligible"], false, "{body}");
    let (status, body) = http_get(&s.cluster.node, HEALTH, "/livez").unwrap();
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(json.get("nodeEligible").is_none(), "{body}");

    let (types, samples) = scrape(&s);
    for (name, kind, labels) in KUBE_PROXY_METRICS {
        assert_eq!(
            types.get(*name).map(String::as_str),
            Some(*kind),
            "{name}'s type"
        );
        let of_family: Vec<&Sample> = samples
            .iter()
            .filter(|(n, ..)| {
                n == name
                    || (*kind == "histogram"
                        && [
                            format!("{name}_bucket"),
                            format!("{name}_sum"),
                            format!("{name}_count"),
                        ]
                        .contains(n))
            })
            .collect();
        assert!(!of_family.is_empty(), "{name} has samples");
        for (n, names, ..) in of_family {
            assert_eq!(names, labels, "{n}'s labels");
        }
    }
    // kube-proxy's buckets: syncs 1 ms doubling to 16.384 s; network
    // programming 0, 0.25, 0.5, 1..59, 60..115 by 5, 120..300 by 30.
    let les = |name: &str| -> Vec<String> {
        samples
            .iter()
            .filter(|(n, ..)| *n == format!("{name}_bucket"))
            .filter_map(|(_, _, le, _)| le.clone())
            .collect()
    };
    let sync_les = les("kubeproxy_sync_proxy_rules_duration_seconds");
    assert_eq!(sync_les.len(), 16, "{sync_les:?}");
    assert_eq!(
        (sync_les[0].as_str(), sync_les[14].as_str()),
        ("0.001", "16.384")
    );
    let prog_les = les(programming);
    assert_eq!(prog_les.len(), 3 + 59 + 12 + 7 + 1, "{prog_les:?}");
    assert_eq!(&prog_les[..4], ["0", "0.25", "0.5", "1"]);
    assert_eq!(prog_les[prog_les.len() - 2], "300");
    // The latency counts from the trigger time, not from when the agent saw it.
    let sum = value(&samples, &format!("{programming}_sum"), None);
    assert!((3.0..60.0).contains(&sum), "programming latency sum {sum}");
    let changes = value(
        &samples,
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        None,
    );
    assert!(changes >= 1.0, "endpoint changes {changes}");
    // Two 200s and at least one 503 from /healthz so far.
    let text = http_get(
        &s.cluster.node,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249),
        "/metrics",
    )
    .unwrap()
    .1;
    for code in ["200", "503"] {
        assert!(
            text.contains(&format!("kubeproxy_proxy_healthz_total{{code=\"{code}\"}}")),
            "healthz {code} counted"
        );
    }
    assert!(text.contains("kubeproxy_proxy_livez_total{code=\"200\"} 1"));
    agent.stop();
}
