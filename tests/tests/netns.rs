//! Integration tests in network namespaces: the agent as a process in a node
//! namespace, real TCP and UDP servers in pod namespaces, real clients.
//!
//! Needs root (namespaces, BPF). Runs in CI, which is root.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a failed unwrap is a test failure"
)]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use proxy_tests::cluster::{
    Agent, Answer, Cluster, Ep, LongLived, NameServer, empty_manifest, eventually, manifest_dir,
    tally, tcp_connect_error, tcp_requests, udp_connected_error, udp_requests, web_manifest,
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const BACKEND_PORT: u16 = 8080;

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 10 + i)
}

/// Service `web` (80/TCP and 53/UDP → 8080) with the given endpoints, and
/// service `empty` with none.
fn manifests(endpoints: &[Ipv4Addr]) -> String {
    let eps: Vec<Ep> = endpoints.iter().map(|ip| Ep::ready(*ip)).collect();
    format!(
        "{}---\n{}",
        web_manifest(VIP, BACKEND_PORT, "", "", &eps),
        empty_manifest(EMPTY_VIP)
    )
}

/// A node with a client pod, `n` backend pods running name servers, the
/// `web` and `empty` Services, and the agent running with `log_filter`.
/// Fields drop in order: the agent stops before the pods go.
struct Web {
    agent: Agent,
    _servers: Vec<NameServer>,
    dir: std::path::PathBuf,
    cluster: Cluster,
}

fn web(n: u8) -> Web {
    web_with_log(n, "info")
}

fn web_with_log(n: u8, log_filter: &str) -> Web {
    let mut cluster = Cluster::new().unwrap();
    cluster.add_pod("client", CLIENT_IP).unwrap();
    let mut servers = Vec::new();
    for i in 1..=n {
        let role = format!("backend-{i}");
        let pod = cluster.add_pod(&role, backend_ip(i)).unwrap();
        servers.push(NameServer::start(pod, &role, BACKEND_PORT).unwrap());
    }
    let endpoints: Vec<Ipv4Addr> = (1..=n).map(backend_ip).collect();
    let dir = manifest_dir(&cluster, &[("web.yaml", &manifests(&endpoints))]).unwrap();
    let agent =
        Agent::start_with_log(&cluster.node, &dir, &cluster.pin_root(), &[], log_filter).unwrap();
    Web {
        agent,
        _servers: servers,
        dir,
        cluster,
    }
}

fn assert_all_ok(answers: &[anyhow::Result<Answer>], peer: SocketAddrV4, what: &str) {
    assert!(!answers.is_empty(), "{what}: no requests made");
    let failures: Vec<String> = answers
        .iter()
        .filter_map(|a| a.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        failures.is_empty(),
        "{what}: {} failed: {failures:?}",
        failures.len()
    );
    for a in answers.iter().flatten() {
        assert_eq!(a.peer, peer.into(), "{what}: client saw a foreign peer");
        assert!(
            a.client_seen.starts_with(&format!("{CLIENT_IP}:")),
            "{what}: backend saw {} instead of the client's own address",
            a.client_seen
        );
    }
}

/// Turns checksum offload off where it makes the kernel verify our rewrites:
/// node-side veths finish pods' partial checksums in software before
/// delivery, backends send full checksums, and every pod verifies what it
/// receives.
fn force_checksum_verification(cluster: &Cluster) {
    for (role, pod) in &cluster.pods {
        let tx = if role.starts_with("backend") {
            "off"
        } else {
            "on"
        };
        pod.ns
            .exec("ethtool", &["-K", "eth0", "rx", "off", "tx", tx])
            .unwrap();
        cluster
            .node
            .exec("ethtool", &["-K", &pod.host_if, "tx", "off"])
            .unwrap();
    }
}

fn clusterip_balances(verify_checksums: bool) {
    let mut w = web(3);
    if verify_checksums {
        force_checksum_verification(&w.cluster);
    }
    let (cluster, agent) = (&w.cluster, &mut w.agent);
    let client = &cluster.pod("client").unwrap().ns;

    let tcp_vip = SocketAddrV4::new(VIP, 80);
    let tcp = tcp_requests(client, tcp_vip, 300).unwrap();
    assert_all_ok(&tcp, tcp_vip, "TCP");
    assert_eq!(tcp.len(), 300);
    let per_backend = tally(&tcp);
    assert_eq!(
        per_backend.len(),
        3,
        "TCP used every backend: {per_backend:?}"
    );

    let udp_vip = SocketAddrV4::new(VIP, 53);
    let udp = udp_requests(client, udp_vip, 300).unwrap();
    assert_all_ok(&udp, udp_vip, "UDP");
    assert_eq!(udp.len(), 300);
    let per_backend = tally(&udp);
    assert_eq!(
        per_backend.len(),
        3,
        "UDP used every backend: {per_backend:?}"
    );

    // No endpoints: refused at once, as kube-proxy's REJECT does.
    let (err, took) = tcp_connect_error(client, SocketAddrV4::new(EMPTY_VIP, 80)).unwrap();
    assert_eq!(err, Some(std::io::ErrorKind::ConnectionRefused));
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");
    let err = udp_connected_error(client, SocketAddrV4::new(EMPTY_VIP, 53)).unwrap();
    assert_eq!(err, Some(std::io::ErrorKind::ConnectionRefused));

    // The agent logged nothing alarming.
    agent.stop();
    let log = agent.log();
    assert!(!log.contains("ERROR"), "agent errors:\n{log}");
    assert!(!log.contains("packet dropped"), "datapath drops:\n{log}");
}

#[test]
fn clusterip_balances_tcp_and_udp() {
    clusterip_balances(false);
}

#[test]
fn clusterip_rewrites_pass_kernel_checksum_verification() {
    clusterip_balances(true);
}

#[test]
fn manifest_and_interface_changes_are_picked_up() {
    let mut w = web(3);
    let (cluster, agent, dir) = (&mut w.cluster, &mut w.agent, w.dir.clone());
    let vip = SocketAddrV4::new(VIP, 80);

    // A broken manifest next to the good one: reported by file and name, the
    // rest keeps working. Then backend-3 leaves the slice.
    std::fs::write(
        dir.join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: demo}\nspec: {ports: 7}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("web.yaml"),
        manifests(&[backend_ip(1), backend_ip(2)]),
    )
    .unwrap();
    agent
        .wait_for_log("backends=2", Duration::from_secs(10))
        .unwrap();
    assert!(
        agent
            .log()
            .contains("broken.yaml: Service demo/broken: invalid Service")
    );
    let client = &cluster.pod("client").unwrap().ns;
    let answers = tcp_requests(client, vip, 100).unwrap();
    assert_all_ok(&answers, vip, "after scale-down");
    let per_backend = tally(&answers);
    assert!(!per_backend.contains_key("backend-3"), "{per_backend:?}");
    assert_eq!(per_backend.len(), 2, "{per_backend:?}");

    // SIGHUP reloads too.
    let pid = i32::try_from(agent.process.child.id()).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    agent
        .wait_for_log("SIGHUP: reloading", Duration::from_secs(5))
        .unwrap();

    // A pod that appears after the agent started is picked up.
    let late_ip = Ipv4Addr::new(10, 244, 1, 3);
    cluster.add_pod("late-client", late_ip).unwrap();
    let late_if = cluster.pod("late-client").unwrap().host_if.clone();
    agent
        .wait_for_log(
            &format!("iface=\"{late_if}\" hook=\"egress\""),
            Duration::from_secs(10),
        )
        .unwrap();
    let late = &cluster.pod("late-client").unwrap().ns;
    let answers = tcp_requests(late, vip, 20).unwrap();
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    agent.stop();
}

#[test]
fn maps_dump_with_typed_fields_in_bpftool() {
    let mut w = web(1);
    let (cluster, agent) = (&w.cluster, &mut w.agent);
    let maps = cluster
        .pin_root()
        .join(format!("v{}", proxy_common::PIN_LAYOUT_VERSION))
        .join("maps");
    let dump = |name: &str| {
        let path = maps.join(name);
        proxy_tests::netns::sh(
            "bpftool",
            &["-j", "map", "dump", "pinned", &path.to_string_lossy()],
        )
        .unwrap()
    };
    let services: serde_json::Value = serde_json::from_str(&dump("SERVICES")).unwrap();
    let entries = services.as_array().unwrap();
    assert_eq!(
        entries.len(),
        4,
        "two services with two ports each: {services}"
    );
    for e in entries {
        let key = &e["formatted"]["key"];
        let value = &e["formatted"]["value"];
        assert!(
            key.get("addr_be").is_some() && key.get("scope").is_some(),
            "{e}"
        );
        assert!(value.get("svc_id").is_some(), "{e}");
    }
    let backends: serde_json::Value = serde_json::from_str(&dump("BACKENDS")).unwrap();
    assert!(
        backends.to_string().contains("\"port_be\""),
        "typed backends"
    );
    agent.stop();
}

#[test]
fn agent_restart_adopts_maps_and_links_without_breaking_connections() {
    let mut w = web(3);
    let (cluster, first, dir) = (&w.cluster, &mut w.agent, w.dir.clone());
    let vip = SocketAddrV4::new(VIP, 80);
    let client = &cluster.pod("client").unwrap().ns;
    let mut conns: Vec<LongLived> = (0..6)
        .map(|_| LongLived::open(client, vip).unwrap())
        .collect();
    for c in &mut conns {
        c.ping("before").unwrap();
    }

    // New connections all the time, across the kill and the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let stream = {
        let stop = Arc::clone(&stop);
        client
            .spawn(move || {
                let (mut ok, mut failed) = (0usize, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match std::net::TcpStream::connect_timeout(&vip.into(), Duration::from_secs(2))
                    {
                        Ok(s) => {
                            let mut line = String::new();
                            match std::io::BufRead::read_line(
                                &mut std::io::BufReader::new(s),
                                &mut line,
                            ) {
                                Ok(n) if n > 0 => ok += 1,
                                other => failed.push(format!("read: {other:?}")),
                            }
                        }
                        Err(e) => failed.push(format!("connect: {e}")),
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                (ok, failed)
            })
            .unwrap()
    };
    std::thread::sleep(Duration::from_millis(200));

    // kill -9: no cleanup at all. Pinned links keep the programs attached and
    // pinned maps keep conntrack: traffic must not notice.
    first.process.child.kill().unwrap();
    first.process.child.wait().unwrap();
    for c in &mut conns {
        c.ping("agent-dead").unwrap();
    }
    let answers = tcp_requests(client, vip, 30).unwrap();
    assert_all_ok(&answers, vip, "new connections while no agent runs");

    // A new agent adopts the maps and links: nothing to change, programs swapped in place.
    let mut second = Agent::start(&cluster.node, &dir, &cluster.pin_root(), &[]).unwrap();
    let log = second.log();
    assert!(log.contains("existing state adopted"), "{log}");
    assert_eq!(second.count_in_log("adopted pinned link"), 8, "{log}");
    assert!(
        log.contains("operations=0"),
        "nothing to reprogram after adoption:\n{log}"
    );
    for c in &mut conns {
        c.ping("after-restart").unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = stream.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} new connections failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "only {ok} connections made during the restart");
    println!("{ok} new connections across kill -9 and restart, none failed");
    let answers = tcp_requests(client, vip, 60).unwrap();
    assert_all_ok(&answers, vip, "after restart");
    assert_eq!(tally(&answers).len(), 3);
    second.stop();
}

#[test]
fn udp_flows_move_on_when_their_backend_leaves() {
    let mut w = web(3);
    let client = &w.cluster.pod("client").unwrap().ns;
    let vip = SocketAddrV4::new(VIP, 53);
    let socket = client
        .run(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.connect(vip)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            Ok(s)
        })
        .unwrap();
    let ask = |s: &std::net::UdpSocket| -> std::io::Result<String> {
        s.send(b"hello")?;
        let mut buf = [0u8; 256];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned())
    };
    let first = ask(&socket).unwrap();
    assert_eq!(ask(&socket).unwrap(), first, "one flow, one backend");
    let gone: u8 = first.trim_start_matches("backend-").parse().unwrap();
    let gone_ip = backend_ip(gone);
    let has_flows_to = |ip: Ipv4Addr| {
        proxy_agent::datapath::read_pinned_conntrack(&w.cluster.pin_root())
            .unwrap()
            .iter()
            .any(|(k, v)| k.proto == 17 && (*v.nat().ip() == ip || *k.src().ip() == ip))
    };
    assert!(has_flows_to(gone_ip));

    // The flow's backend leaves the Service: its UDP conntrack entries go,
    // and the same socket's next datagram reaches a live backend.
    let rest: Vec<Ipv4Addr> = (1..=3).filter(|i| *i != gone).map(backend_ip).collect();
    std::fs::write(w.dir.join("web.yaml"), manifests(&rest)).unwrap();
    w.agent
        .wait_for_log("backends=2", Duration::from_secs(10))
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "the departed backend's UDP flows to go",
        || Ok(!has_flows_to(gone_ip)),
    )
    .unwrap();
    let next = ask(&socket).unwrap();
    assert_ne!(next, first);

    // Down to zero endpoints: conntrack forgets the flow and the client is refused.
    std::fs::write(w.dir.join("web.yaml"), manifests(&[])).unwrap();
    w.agent
        .wait_for_log("backends=0", Duration::from_secs(10))
        .unwrap();
    let last = backend_ip(next.trim_start_matches("backend-").parse().unwrap());
    eventually(Duration::from_secs(5), "the last UDP flows to go", || {
        Ok(!has_flows_to(last))
    })
    .unwrap();
    let err = ask(&socket).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    w.agent.stop();
}

#[test]
fn kernel_side_logs_reach_the_agent_log() {
    let mut w = web_with_log(1, "info,proxy_ebpf=debug");
    let (cluster, agent) = (&w.cluster, &mut w.agent);
    let client = &cluster.pod("client").unwrap().ns;
    let (err, _) = tcp_connect_error(client, SocketAddrV4::new(EMPTY_VIP, 80)).unwrap();
    assert_eq!(err, Some(std::io::ErrorKind::ConnectionRefused));
    agent
        .wait_for_log("has no endpoints: rejecting", Duration::from_secs(5))
        .unwrap();
    agent.stop();
}

#[test]
fn a_fragmented_udp_datagram_crosses_a_cluster_ip_both_ways() {
    let w = web(3);
    let client = &w.cluster.pod("client").unwrap().ns;
    let vip = SocketAddrV4::new(VIP, 53);
    // 3000 bytes over 1500-byte veths: three fragments each way, the later
    // ones without a UDP header.
    for _ in 0..5 {
        let (backend, echoed) = proxy_tests::cluster::udp_big(client, vip, 3000).unwrap();
        assert!(backend.starts_with("backend-"), "{backend}");
        assert_eq!(echoed, 3000, "the whole datagram arrived and came back");
    }
    let counters: std::collections::BTreeMap<_, _> =
        proxy_agent::datapath::read_pinned_counters(&w.cluster.pin_root())
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(
        counters.get(&proxy_common::Counter::Fragment).copied(),
        Some(0),
        "every fragment found its first"
    );
    // Five first fragments opened flows; the ten later ones followed them.
    let established = counters
        .get(&proxy_common::Counter::Established)
        .copied()
        .unwrap_or(0);
    assert!(established >= 10, "{counters:?}");
}
