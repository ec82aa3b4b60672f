//! The control plane against the fake API server: cold sync, one
//! EndpointSlice change to the kernel map, and memory (BPF maps, agent RSS).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{debug, rules};

/// The control plane against the fake API server: cold sync, single-slice
/// change latency to the kernel map, agent memory.
pub fn section(md: &mut String, sizes: &[usize]) -> Result<Vec<CpRun>> {
    writeln!(md, "\n## Control plane\n")?;
    writeln!(
        md,
        "The agent (release build) watches a fake API server (tests/src/fake_api.rs, the real list/watch \
         protocol over HTTP/1.1 on loopback in the node namespace) holding N Services with one port and an \
         EndpointSlice of 10 ready endpoints each (all distinct: 10·N backends), plus the Node. \
         *Cold sync*: agent start → first full sync applied (listing, translation, Maglev tables, every map \
         write), from the agent's log and wall clock. *Slice change*: one EndpointSlice update written to the \
         API → the new backend visible in the kernel map (polled from another process), 200 changes.\n"
    )?;
    writeln!(
        md,
        "Each size runs {CP_RUNS} times (a fresh namespace, API server and agent each time); the row is the \
         run with the median start → synced time, and the range shows all runs: this 2-vCPU VM is noisy, \
         and the fake API server shares its cores with the agent while it serves the lists.\n"
    )?;
    writeln!(
        md,
        "| Services × endpoints | start → synced (wall) | range | full sync (agent) | slice change → map p50 | p99 | max | agent in-loop p99 | agent RSS | selection tables |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut medians = Vec::new();
    for &n in sizes {
        let mut runs = (0..CP_RUNS)
            .map(|_| control_plane_run(n))
            .collect::<Result<Vec<_>>>()?;
        runs.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
        let (lo, hi) = (runs[0].wall_s, runs[runs.len() - 1].wall_s);
        let r = &runs[runs.len() / 2];
        let row = format!(
            "| {n} × 10 | {:.2} s | {lo:.2}–{hi:.2} s | {:.0} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} MiB | {:.1} MiB |",
            r.wall_s,
            r.full_ms,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.in_loop_p99_ms,
            r.rss_mib,
            r.selection_mib,
        );
        writeln!(md, "{row}")?;
        eprintln!("control plane at {n}: {row}");
        medians.push(runs.swap_remove(runs.len() / 2));
    }
    writeln!(
        md,
        "\nGoals: 10k Services cold sync under 2 s; one EndpointSlice change to maps updated p99 under 10 ms."
    )?;
    if let Some(r) = medians.iter().find(|r| r.services == 10_000) {
        memory_table(md, r)?;
    }
    Ok(medians)
}

/// BPF map memory and agent RSS at 10k Services.
fn memory_table(md: &mut String, r: &CpRun) -> Result<()> {
    let total: u64 = r.maps.iter().map(|m| m.bytes).sum();
    writeln!(md, "\n## Memory at 10k Services × 10 endpoints\n")?;
    writeln!(
        md,
        "The median run above after its slice changes, with the agent's default map sizes. Kernel memory per \
         pinned map as the kernel accounts it (`bpftool map show`, `bytes_memlock`); maps other than `SVC_NAMES` preallocate, \
         so most of this is fixed by `--max-*` and `--ct-entries`, not by the number of Services. \
         Total BPF map memory **{:.1} MiB**; agent RSS **{:.0} MiB**.\n",
        total as f64 / 1048576.0,
        r.rss_mib
    )?;
    writeln!(md, "| map | type | max entries | memory |")?;
    writeln!(md, "|---|---|---:|---:|")?;
    for m in &r.maps {
        writeln!(
            md,
            "| {} | {} | {} | {:.2} MiB |",
            m.name,
            m.kind,
            m.max_entries,
            m.bytes as f64 / 1048576.0
        )?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn log_field(line: &str, field: &str) -> Option<f64> {
    line.split(&format!("{field}="))
        .nth(1)?
        .split_whitespace()
        .next()?
        .trim_matches('"')
        .parse()
        .ok()
}

/// Starts an agent in `cluster`'s node watching a fake API server that holds
/// `svcs` (Service `svc-<i>` in namespace `bench`, port 80 → 8080) and the
/// Node; returns once the agent runs (its first sync may still be going),
/// with the moment it was started.
pub fn agent_for(
    cluster: &proxy_tests::cluster::Cluster,
    svcs: &[rules::KubeSvc],
    extra: &[&str],
) -> Result<(
    proxy_tests::fake_api::FakeApi,
    proxy_tests::cluster::Agent,
    Instant,
)> {
    let api = proxy_tests::fake_api::FakeApi::start(&cluster.node)?;
    api.apply(
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}),
    )?;
    for (i, s) in svcs.iter().enumerate() {
        api.apply(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
            "spec": {"clusterIP": s.vip.ip().to_string(), "ports": [{"name": "http", "port": s.vip.port(), "protocol": "TCP", "targetPort": 8080}]},
        }))?;
        let eps: Vec<Ipv4Addr> = s.endpoints.iter().map(|e| *e.ip()).collect();
        api.apply(slice_json(i, &eps))?;
    }
    let kubeconfig = PathBuf::from("/run")
        .join(&cluster.prefix)
        .join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    let mut args = vec![
        "--resync-seconds",
        "3600",
        "--healthz-bind-address",
        "off",
        "--max-services",
        "65536",
        "--max-frontends",
        "65536",
        "--max-backends",
        "262144",
    ];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let agent = proxy_tests::cluster::Agent::start_kube(
        &cluster.node,
        &kubeconfig,
        "node-a",
        &cluster.pin_root(),
        &args,
    )?;
    Ok((api, agent, started))
}

fn slice_json(i: usize, endpoints: &[Ipv4Addr]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|ip| serde_json::json!({
            "addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": "node-a"
        })).collect::<Vec<_>>(),
    })
}

/// Runs per control-plane size.
const CP_RUNS: usize = 3;

/// One control-plane run's numbers.
pub struct CpRun {
    pub services: usize,
    /// The pinned maps after the slice changes.
    maps: Vec<MapMemory>,
    pub wall_s: f64,
    full_ms: f64,
    p50_ms: f64,
    pub p99_ms: f64,
    max_ms: f64,
    in_loop_p99_ms: f64,
    rss_mib: f64,
    selection_mib: f64,
}

fn control_plane_run(n: usize) -> Result<CpRun> {
    use proxy_agent::datapath::PinnedView;
    use proxy_tests::cluster::Cluster;

    let cluster = Cluster::new()?;
    let svcs = rules::services(u32::try_from(n)?, 10);
    let vip = |i: usize| *svcs[i].vip.ip();
    let endpoints =
        |i: usize| -> Vec<Ipv4Addr> { svcs[i].endpoints.iter().map(|e| *e.ip()).collect() };
    let (api, mut agent, started) = agent_for(&cluster, &svcs, &[])?;
    agent.wait_for_log("kind=\"full\"", std::time::Duration::from_secs(120))?;
    let wall = started.elapsed();
    let log = agent.log();
    let full_line = log
        .lines()
        .find(|l| l.contains("kind=\"full\""))
        .unwrap_or_default()
        .to_owned();
    let full_ms = log_field(&full_line, "elapsed_ms").unwrap_or(f64::NAN);
    let selection = log_field(&full_line, "selection_bytes").unwrap_or(0.0);
    let rss = vm_rss_kib(agent.process.child.id());
    if debug() {
        eprintln!("full: {full_line}");
        for l in log.lines().take_while(|l| !l.contains("kind=\"full\"")) {
            eprintln!("startup: {l}");
        }
        for l in log.lines().filter(|l| l.contains("full sync planned")) {
            eprintln!("planned: {l}");
        }
    }

    let view = PinnedView::open(&cluster.pin_root())?;
    let key = proxy_common::ServiceKey::new(
        SocketAddrV4::new(vip(0), 80),
        proxy_common::proto::TCP,
        proxy_common::scope::INTERNAL,
    );
    let mut latencies = Vec::new();
    for k in 0..200u32 {
        let mut eps = endpoints(0);
        let fresh = Ipv4Addr::from(0x0ac8_0000 + k);
        eps[9] = fresh;
        let t0 = Instant::now();
        api.apply(slice_json(0, &eps))?;
        let want = SocketAddrV4::new(fresh, 8080);
        loop {
            if let Some((_, addrs)) = view.table_for(&key)?
                && addrs.contains(&want)
            {
                break;
            }
            if t0.elapsed() > std::time::Duration::from_secs(10) {
                bail!("slice change {k} never reached the map");
            }
            // Not a spin: on a 2-core machine a spinning poller would take a
            // core from the agent and the API server it measures.
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    if debug() {
        let slowest: Vec<(usize, f64)> = {
            let mut v: Vec<(usize, f64)> = latencies.iter().copied().enumerate().collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            v.into_iter().take(3).collect()
        };
        eprintln!("slowest changes (index, ms): {slowest:?}");
    }
    latencies.sort_by(f64::total_cmp);
    let log = agent.log();
    let incremental: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("kind=\"incremental\""))
        .collect();
    let mut in_loop: Vec<f64> = incremental
        .iter()
        .filter_map(|l| log_field(l, "elapsed_ms"))
        .collect();
    if debug() {
        let mut slow: Vec<&&str> = incremental.iter().collect();
        slow.sort_by(|a, b| {
            log_field(b, "elapsed_ms")
                .unwrap_or(0.0)
                .total_cmp(&log_field(a, "elapsed_ms").unwrap_or(0.0))
        });
        for l in slow.iter().take(5) {
            eprintln!("slow: {l}");
        }
        let lines: Vec<&str> = log.lines().collect();
        let after = lines
            .iter()
            .position(|l| l.contains("kind=\"full\""))
            .unwrap_or(0);
        for l in lines.iter().skip(after).take(14) {
            eprintln!("after full: {l}");
        }
    }
    in_loop.sort_by(f64::total_cmp);
    let maps = bpf_maps(&cluster.pin_root())?;
    agent.stop();
    Ok(CpRun {
        services: n,
        maps,
        wall_s: wall.as_secs_f64(),
        full_ms,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        in_loop_p99_ms: percentile(&in_loop, 0.99),
        rss_mib: rss as f64 / 1024.0,
        selection_mib: selection / (1024.0 * 1024.0),
    })
}

/// One pinned BPF map as the kernel accounts it.
struct MapMemory {
    name: String,
    kind: String,
    max_entries: u64,
    bytes: u64,
}

/// Every map pinned under `pin_root`, with the memory the kernel charges
/// for it (`bpftool map show`'s `bytes_memlock`, the map's own accounting).
fn bpf_maps(pin_root: &std::path::Path) -> Result<Vec<MapMemory>> {
    let dir = pin_root
        .join(format!("v{}", proxy_common::PIN_LAYOUT_VERSION))
        .join("maps");
    let mut maps = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let out = proxy_tests::netns::sh(
            "bpftool",
            &["-j", "map", "show", "pinned", &path.to_string_lossy()],
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("bpftool on {}", path.display()))?;
        maps.push(MapMemory {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            kind: v["type"].as_str().unwrap_or("?").to_owned(),
            max_entries: v["max_entries"].as_u64().unwrap_or(0),
            bytes: v["bytes_memlock"].as_u64().unwrap_or(0),
        });
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.bytes));
    Ok(maps)
}
