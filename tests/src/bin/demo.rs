//! `cargo xtask demo`: a ClusterIP Service balanced by the eBPF datapath, in a
//! small cluster built from network namespaces, removed again on every exit
//! path (success, failure, Ctrl-C): from a pod (per packet, TC) and from a
//! process on the node itself (socket hooks, on a cgroup the demo creates).
#![expect(clippy::print_stderr, reason = "the demo reports failures on stderr")]

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use proxy_common::{Counter, ServiceKey};
use proxy_tests::{
    cluster::{
        Agent, Answer, Cluster, NameServer, manifest_dir, tally, tcp_connect_error, tcp_requests,
        udp_requests,
    },
    netns::{TestCgroup, cleanup_all, cleanup_on_interrupt, sh},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("backend-1", Ipv4Addr::new(10, 244, 1, 11)),
    ("backend-2", Ipv4Addr::new(10, 244, 1, 12)),
    ("backend-3", Ipv4Addr::new(10, 244, 1, 13)),
];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const REQUESTS: usize = 300;
/// The node's own address (on its loopback), inside the pods' route to it.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);

fn bar(n: usize, total: usize) -> String {
    let width = (n * 40).checked_div(total).unwrap_or(0);
    "█".repeat(width)
}

fn print_tally(answers: &[Result<Answer>]) {
    print_counts(&tally(answers), answers.len());
}

/// Answers per backend, out of `total`.
fn print_counts(counts: &BTreeMap<String, usize>, total: usize) {
    for (name, _) in BACKENDS {
        let n = counts.get(name).copied().unwrap_or(0);
        println!(
            "    {name:<10} {:<40} {n:>4} ({:>3}%)",
            bar(n, total),
            (n * 100).checked_div(total).unwrap_or(0)
        );
    }
}

/// Checks every answer and summarises what the client and backends saw.
fn check(answers: &[Result<Answer>], vip: SocketAddrV4) -> Result<()> {
    let failed: Vec<String> = answers
        .iter()
        .filter_map(|a| a.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} requests failed: {failed:?}",
            failed.len(),
            answers.len()
        );
    }
    for a in answers.iter().flatten() {
        if a.peer != vip.into() {
            bail!("a reply came from {} instead of {vip}", a.peer);
        }
        if !a.client_seen.starts_with(&format!("{CLIENT}:")) {
            bail!("a backend saw {} instead of the client", a.client_seen);
        }
    }
    Ok(())
}

/// Global datapath counters from the pinned STATS map, via bpftool.
fn counters(pins: &Path) -> Result<BTreeMap<&'static str, u64>> {
    let path = pins.join("maps/STATS");
    let json = sh(
        "bpftool",
        &["-j", "map", "dump", "pinned", &path.to_string_lossy()],
    )?;
    let entries: serde_json::Value = serde_json::from_str(&json)?;
    let mut out = BTreeMap::new();
    for e in entries.as_array().context("STATS dump is not a list")? {
        let index = e["formatted"]["key"].as_u64().context("key")?;
        let total: u64 = e["formatted"]["values"]
            .as_array()
            .context("values")?
            .iter()
            .filter_map(|v| v["value"].as_u64())
            .sum();
        if let Some(c) = Counter::ALL.get(usize::try_from(index)?)
            && total > 0
        {
            out.insert(c.name(), total);
        }
    }
    Ok(out)
}

fn demo() -> Result<()> {
    println!("== proxy demo: a Kubernetes ClusterIP Service, load balanced in eBPF ==\n");
    let mut cluster = Cluster::new()?;
    println!("Cluster in network namespaces ({}-*):", cluster.prefix);
    cluster.add_pod("client", CLIENT)?;
    println!("    client     {CLIENT:<13} node side veth1");
    let mut servers = Vec::new();
    for (name, ip) in BACKENDS {
        let pod = cluster.add_pod(name, ip)?;
        servers.push(NameServer::start(pod, name, 8080)?);
        println!(
            "    {name:<10} {ip:<13} node side {}   TCP+UDP :8080 answer \"{name}\"",
            pod.host_if
        );
    }

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let web = std::fs::read_to_string(examples.join("web.yaml"))?;
    let empty = std::fs::read_to_string(examples.join("empty.yaml"))?;
    let dir = manifest_dir(&cluster, &[("web.yaml", &web), ("empty.yaml", &empty)])?;
    // The node's processes: an address of the node's own, and a cgroup for
    // the socket hooks (never the machine's root cgroup).
    cluster
        .node
        .ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
    let cgroup = TestCgroup::new(&cluster.prefix)?;
    let cgroup_root = cgroup.path.to_string_lossy().into_owned();
    println!(
        "\nStarting proxy-agent in the node namespace: --manifests (examples/demo) --pod-iface 'veth*' --cgroup-root {cgroup_root}"
    );
    let mut agent = Agent::start(
        &cluster.node,
        &dir,
        &cluster.pin_root(),
        &["--cgroup-root", &cgroup_root],
    )?;
    for line in agent
        .log()
        .lines()
        .filter(|l| l.contains("attached") || l.contains("synced") || l.contains("mounting"))
    {
        println!(
            "    agent| {}",
            line.split_once("Z ").map_or(line, |(_, l)| l.trim())
        );
    }

    let client = &cluster.pod("client")?.ns;
    let tcp_vip = SocketAddrV4::new(VIP, 80);
    println!("\n{REQUESTS} TCP connections from the client pod to demo/web {tcp_vip}:");
    let tcp = tcp_requests(client, tcp_vip, REQUESTS)?;
    check(&tcp, tcp_vip)?;
    print_tally(&tcp);

    let udp_vip = SocketAddrV4::new(VIP, 53);
    println!("\n{REQUESTS} UDP request/responses to demo/web {udp_vip} (a new flow each):");
    let udp = udp_requests(client, udp_vip, REQUESTS)?;
    check(&udp, udp_vip)?;
    print_tally(&udp);
    println!(
        "\n    every reply came from the ClusterIP (reverse NAT); every backend saw the client's own address {CLIENT}"
    );

    let pins = cluster
        .pin_root()
        .join(format!("v{}", proxy_common::PIN_LAYOUT_VERSION));
    let from_node = 30;
    println!(
        "\n{from_node} TCP connections to {tcp_vip} from a process on the node itself (host network), through the socket hooks:"
    );
    let before = counters(&pins)?
        .get("sock_translated")
        .copied()
        .unwrap_or(0);
    let probe = proxy_tests::cluster::binary("sockprobe")?;
    let out = cgroup.exec(
        &cluster.node,
        &probe,
        &["tcp", &tcp_vip.to_string(), &from_node.to_string()],
    )?;
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for line in out.lines() {
        let a: serde_json::Value = serde_json::from_str(line)?;
        let backend = a["backend"]
            .as_str()
            .with_context(|| format!("a connection from the node failed: {a}"))?;
        if a["peer"] != tcp_vip.to_string() {
            bail!("getpeername() showed {} instead of {tcp_vip}", a["peer"]);
        }
        *spread.entry(backend.to_owned()).or_default() += 1;
    }
    print_counts(&spread, from_node);
    let translated = counters(&pins)?
        .get("sock_translated")
        .copied()
        .unwrap_or(0)
        - before;
    println!(
        "\n    connect() picked the backend once per connection ({translated} translated at connect, none per packet); getpeername() still said {tcp_vip}"
    );

    println!(
        "\nScaling demo/web down: backend-3 leaves the EndpointSlice (file edited, agent notices)"
    );
    let scaled = web.replace(
        "- addresses: [\"10.244.1.13\"]\n  conditions: {ready: true}\n",
        "",
    );
    std::fs::write(dir.join("web.yaml"), scaled)?;
    agent.wait_for_log("backends=2", Duration::from_secs(10))?;
    let after = tcp_requests(client, tcp_vip, 100)?;
    check(&after, tcp_vip)?;
    print_tally(&after);

    let empty_vip = SocketAddrV4::new(EMPTY_VIP, 80);
    let (err, took) = tcp_connect_error(client, empty_vip)?;
    println!(
        "\ndemo/empty {empty_vip} has no endpoints: connect() -> {} after {:.1} ms (ICMP port unreachable from the datapath)",
        err.map_or("success?!".to_owned(), |k| format!("{k:?}")),
        took.as_secs_f64() * 1e3
    );
    if err != Some(std::io::ErrorKind::ConnectionRefused) {
        bail!("expected the connection to be refused");
    }

    println!("\nDatapath counters (per-CPU map STATS, summed):");
    for (name, value) in counters(&pins)? {
        println!("    {name:<22} {value}");
    }
    let services = pins.join("maps/SERVICES");
    println!(
        "\n$ bpftool -j map dump pinned {}   (fields typed through BTF; decoded on the right)",
        services.display()
    );
    let dump = sh(
        "bpftool",
        &["-j", "map", "dump", "pinned", &services.to_string_lossy()],
    )?;
    let entries: serde_json::Value = serde_json::from_str(&dump)?;
    for e in entries.as_array().context("SERVICES dump is not a list")? {
        let (key, value) = (&e["formatted"]["key"], &e["formatted"]["value"]);
        let frontend = ServiceKey {
            addr_be: u32::try_from(key["addr_be"].as_u64().unwrap_or_default())?,
            port_be: u16::try_from(key["port_be"].as_u64().unwrap_or_default())?,
            ..ServiceKey::default()
        }
        .frontend();
        let proto = match key["proto"].as_u64() {
            Some(6) => "TCP",
            Some(17) => "UDP",
            _ => "?",
        };
        println!(
            "    key {key}  value {value}   = {frontend}/{proto} -> svc {}",
            value["svc_id"]
        );
    }

    let started = Instant::now();
    agent.stop();
    drop(servers);
    drop(cgroup);
    drop(cluster);
    println!(
        "\nCleaned up namespaces, agent and pins in {:.0} ms. Done.",
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn main() -> ExitCode {
    cleanup_on_interrupt("the demo");
    let result = demo();
    cleanup_all();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
