//! `cargo xtask bench`: datapath cost through BPF_PROG_TEST_RUN, every path
//! side by side with the floors, written to BENCHMARKS.md.
#![expect(clippy::print_stderr, reason = "the runner reports failures on stderr")]

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use proxy_agent::{
    datapath::{BENCH_EMPTY, BENCH_EMPTY_XDP, BenchSpec, Datapath, LoadOptions, MapSizes},
    maglev,
    model::{Algorithm, Protocol},
};
use proxy_common::{Counter, bench_mode, maps::programs};
use proxy_tests::{
    fixture::{self, sa},
    packet::{Frame, L4},
};

const REPEAT: u32 = 100_000;
const ROUNDS: usize = 5;

/// Source port and low half of the source address in a 14+20 byte header frame.
const VARY_PORT_OFF: u16 = 14 + 20;
const VARY_ADDR_OFF: u16 = 14 + 14;

struct Row {
    name: &'static str,
    what: &'static str,
    ns: f64,
    counter: Option<(Counter, u64)>,
}

fn counters(dp: &Datapath) -> Result<BTreeMap<Counter, u64>> {
    Ok(dp.counters()?.into_iter().collect())
}

/// Median kernel-measured ns/run over `ROUNDS` rounds of `REPEAT` runs, and
/// how much each counter moved per round (checked to prove the path ran).
fn measure(dp: &mut Datapath, spec: &BenchSpec<'_>) -> Result<(f64, BTreeMap<Counter, u64>)> {
    let mut samples = Vec::new();
    let before = counters(dp)?;
    for _ in 0..ROUNDS {
        samples.push(dp.bench(spec)?.duration_ns as f64);
    }
    let after = counters(dp)?;
    samples.sort_by(f64::total_cmp);
    let moved = after
        .iter()
        .filter_map(|(c, v)| {
            let d = v - before.get(c).copied().unwrap_or(0);
            (d > 0).then_some((*c, d / ROUNDS as u64))
        })
        .collect();
    Ok((samples[ROUNDS / 2], moved))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("{cpu}, {cores} cores, Linux {kernel}")
}

fn run() -> Result<String> {
    proxy_tests::netns::require_root()?;
    // For working on one part: BENCH_ONLY=control-plane, =datapath or =programming.
    if std::env::var("BENCH_ONLY").as_deref() == Ok("programming") {
        let mut md = String::new();
        programming_section(&mut md)?;
        return Ok(md);
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("control-plane") {
        let mut md = String::new();
        control_plane_section(&mut md)?;
        return Ok(md);
    }
    // The XDP rows look up routes: the whole datapath section runs in a
    // namespace of its own (node1 of the fixtures).
    let ns = fixture::fixture_net()?;
    let mut md = ns.run(datapath_section)?;
    if std::env::var("BENCH_ONLY").as_deref() == Ok("datapath") {
        return Ok(md);
    }
    maglev_section(&mut md)?;
    programming_section(&mut md)?;
    control_plane_section(&mut md)?;
    Ok(md)
}

/// Services in the maps for the scaling table: the measured ones alone, then
/// filled up to these totals.
const SCALES: [u32; 4] = [0, 1000, 10_000, 100_000];

/// Services the per-packet rows measure (two ClusterIP, two NodePort).
const MEASURED: u32 = 4;

/// One run of every per-packet row with `total` Services in the maps.
struct Scale {
    services: u32,
    empty: f64,
    floor: f64,
    rows: Vec<Row>,
    xdp_empty: f64,
    xdp_floor: f64,
    xdp_rows: Vec<Row>,
}

/// `n` more ClusterIP Services (random algorithm, 10 backends each, all
/// distinct) so lookups run against full maps.
fn fillers(n: u32) -> Vec<proxy_agent::model::ServicePlan> {
    (0..n)
        .map(|i| {
            let backends: Vec<SocketAddrV4> = (0..10)
                .map(|k| SocketAddrV4::new(Ipv4Addr::from(0x0a80_0000 + i * 10 + k), 8080))
                .collect();
            let mut plan = fixture::service(
                &format!("filler-{i}"),
                SocketAddrV4::new(Ipv4Addr::from(0x0a64_0000 + i), 80),
                Protocol::Tcp,
                &backends,
            );
            plan.algorithm = Algorithm::Random;
            plan.maglev_table_size = None;
            plan
        })
        .collect()
}

/// Every per-packet row with `total` Services programmed (run inside the
/// fixture namespace).
fn datapath_at(total: u32) -> Result<Scale> {
    let extra = total.saturating_sub(MEASURED);
    let defaults = MapSizes::default();
    let mut dp = Datapath::load(&LoadOptions {
        sizes: MapSizes {
            frontends: defaults.frontends.max(total * 2 + 64),
            services: defaults.services.max(total * 2 + 64),
            backends: defaults.backends.max(extra * 10 + 1024),
            selection_blocks: defaults.selection_blocks.max(extra * 2 + 65_536),
            ..defaults
        },
        pin_root: None,
    })?;
    dp.load_bench_programs()?;

    let vip = sa([10, 96, 0, 10], 80);
    let random_vip = sa([10, 96, 0, 11], 80);
    // Outside 10.244.0.0/16, the range new-flow rows vary the client address
    // over: a client with a backend's address is that pod (hairpin).
    let backends: Vec<_> = (1..=10u8).map(|i| sa([10, 245, 2, i], 8080)).collect();
    let mut random = fixture::service("bench-random", random_vip, Protocol::Tcp, &backends);
    random.algorithm = Algorithm::Random;
    random.maglev_table_size = None;
    let ext_backends: Vec<_> = (1..=10u8).map(|i| sa([10, 1, 2, i], 8080)).collect();
    let np = sa(fixture::NODE1, 30080);
    let np_udp = sa(fixture::NODE1, 30053);
    let mut plans = fillers(extra);
    plans.extend([
        fixture::service("bench", vip, Protocol::Tcp, &backends),
        random,
        fixture::node_port(
            "np",
            sa([10, 96, 5, 1], 80),
            np,
            Protocol::Tcp,
            &ext_backends,
            &[],
        ),
        fixture::node_port(
            "np-udp",
            sa([10, 96, 5, 2], 53),
            np_udp,
            Protocol::Udp,
            &ext_backends,
            &[],
        ),
    ]);
    let services = u32::try_from(plans.len())?;
    fixture::program_with_mode(&mut dp, plans, proxy_agent::model::NodePortMode::Hybrid)?;

    let client = sa([10, 244, 1, 2], 40000);
    let syn = Frame::tcp_syn(client, vip).build();
    let established = Frame {
        l4: L4::Tcp {
            syn: false,
            ack: true,
        },
        payload: vec![0x61; 64],
        ..Frame::tcp_syn(client, vip)
    }
    .build();
    // Create the flow the established/reply rows use.
    dp.test_run(programs::TC_POD_INGRESS, &syn, 1)?;
    let chosen =
        proxy_tests::packet::dst_of(&dp.test_run(programs::TC_POD_INGRESS, &syn, 1)?.frame);
    let reply = Frame {
        l4: L4::Tcp {
            syn: false,
            ack: true,
        },
        payload: vec![0x62; 64],
        ..Frame::tcp_syn(chosen, client)
    }
    .build();
    let other = Frame::tcp_syn(client, sa([10, 96, 0, 99], 80)).build();
    let syn_random = Frame::tcp_syn(client, random_vip).build();

    let spec = |program, frame, mode| bench_spec(program, frame, mode, None);
    let empty = alone(&mut dp, BENCH_EMPTY, &syn, None)?;
    let (floor, _) = measure(&mut dp, &spec(BENCH_EMPTY, &syn, bench_mode::SAME))?;
    let cases = [
        (
            "ClusterIP, established flow",
            "data segment of a tracked flow: lookup, conntrack hit (same svc id), DNAT",
            spec(programs::TC_POD_INGRESS, &established, bench_mode::SAME),
            Some(Counter::Established),
        ),
        (
            "reply (reverse NAT)",
            "backend's segment delivered to the client: conntrack hit, SNAT",
            spec(programs::TC_POD_EGRESS, &reply, bench_mode::SAME),
            Some(Counter::ReplyNat),
        ),
        (
            "not a service",
            "TCP to an address that is no frontend: parse, one lookup miss",
            spec(programs::TC_POD_INGRESS, &other, bench_mode::SAME),
            None,
        ),
        // Last: 500k new flows churn the conntrack LRU the other rows rely on.
        (
            "ClusterIP, new flow (Maglev)",
            "SYN from a new source each run: lookup, flow hash + Maglev table (M=1009) among 10, two conntrack inserts, DNAT",
            spec(programs::TC_POD_INGRESS, &syn, bench_mode::NEW_FLOW),
            Some(Counter::NewFlow),
        ),
        (
            "ClusterIP, new flow (random)",
            "same, random backend instead of Maglev",
            spec(programs::TC_POD_INGRESS, &syn_random, bench_mode::NEW_FLOW),
            Some(Counter::NewFlow),
        ),
    ];
    let rows = measure_rows(&mut dp, cases)?;
    let (xdp_empty, xdp_floor, xdp_rows) = xdp_rows(&mut dp, np, np_udp)?;
    Ok(Scale {
        services,
        empty,
        floor,
        rows,
        xdp_empty,
        xdp_floor,
        xdp_rows,
    })
}

/// The per-packet tables at the smallest scale, then every row against the
/// number of Services (run inside the fixture namespace).
fn datapath_section() -> Result<String> {
    let mut scales = Vec::new();
    for total in SCALES {
        let started = Instant::now();
        scales.push(datapath_at(total)?);
        eprintln!(
            "datapath at {total} Services: {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let first = &scales[0];

    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(md, "Machine: {}  ", machine())?;
    writeln!(md, "Command: `cargo xtask bench` (as root)  ")?;
    writeln!(
        md,
        "Method: BPF_PROG_TEST_RUN, {REPEAT} runs per round, median of {ROUNDS} rounds, kernel-measured ns per run. \
         A wrapper program restores the frame before each run (and gives it a new source for new flows) and \
         tail-calls the program under test; the wrapper's own cost (wrapper → empty program) is the floor \
         subtracted in the last column. Each row's path counter is checked to have moved once per run. \
         One service with 10 backends (Maglev, M = 1009, unless the row says random). Hot cache, one CPU.\n"
    )?;
    writeln!(md, "## Datapath cost per packet\n")?;
    writeln!(
        md,
        "Only the {} measured Services in the maps, default map sizes.\n",
        first.services
    )?;
    table(
        &mut md,
        "`return TCX_NEXT`",
        first.empty,
        first.floor,
        &first.rows,
    )?;
    writeln!(md, "\n## North-south: NodePort through XDP\n")?;
    writeln!(
        md,
        "`xdp_ext` as it runs on an external interface (FIB lookups against a test namespace with \
         node2 and the client as permanent neighbours). A NodePort with 10 backends on node2 (Maglev, \
         M = 1009): TCP by DSR, UDP by SNAT (`--nodeport-mode hybrid`). The XDP wrapper restores the \
         frame (shrinking the head back after a DSR option) and tail-calls `xdp_ext`; its floor is \
         the wrapper → `xdp_pass`.\n"
    )?;
    table(
        &mut md,
        "`return XDP_PASS`",
        first.xdp_empty,
        first.xdp_floor,
        &first.xdp_rows,
    )?;
    scaling_table(&mut md, &scales)?;
    Ok(md)
}

/// ns over floor of every row at every scale, and how flat it stays.
fn scaling_table(md: &mut String, scales: &[Scale]) -> Result<()> {
    writeln!(md, "\n## Cost as Services grow\n")?;
    writeln!(
        md,
        "The same rows with the maps filled: the measured Services plus ClusterIP Services with 10 \
         distinct backends each (random algorithm, so 100k of them fit the default selection map; \
         the measured Services keep Maglev), every map sized to hold them. ns over the floor of \
         each run; the last column is the largest value over the smallest.\n"
    )?;
    let mut header = String::from("| path |");
    let mut rule = String::from("|---|");
    for s in scales {
        let _ = write!(header, " {} Services |", thousands(s.services));
        rule.push_str("---:|");
    }
    writeln!(md, "{header} max ÷ min |\n{rule}---:|")?;
    let row = |md: &mut String, name: &str, values: Vec<f64>| -> Result<()> {
        let mut line = format!("| {name} |");
        for v in &values {
            let _ = write!(line, " {v:.0} |");
        }
        let max = values.iter().copied().fold(f64::MIN, f64::max);
        let min = values.iter().copied().fold(f64::MAX, f64::min).max(1.0);
        writeln!(md, "{line} {:.2} |", max / min)?;
        Ok(())
    };
    row(
        md,
        "floor (TC wrapper → empty), ns/run",
        scales.iter().map(|s| s.floor).collect(),
    )?;
    for (i, r) in scales[0].rows.iter().enumerate() {
        row(
            md,
            r.name,
            scales
                .iter()
                .map(|s| (s.rows[i].ns - s.floor).max(0.0))
                .collect(),
        )?;
    }
    for (i, r) in scales[0].xdp_rows.iter().enumerate() {
        row(
            md,
            &format!("XDP: {}", r.name),
            scales
                .iter()
                .map(|s| (s.xdp_rows[i].ns - s.xdp_floor).max(0.0))
                .collect(),
        )?;
    }
    Ok(())
}

/// 10000 → "10,000".
fn thousands(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One benchmark setup with the bench's repeat count and vary offsets.
fn bench_spec<'a>(
    program: &'static str,
    frame: &'a [u8],
    mode: u32,
    ifindex: Option<u32>,
) -> BenchSpec<'a> {
    BenchSpec {
        program,
        frame,
        mode,
        vary_off: VARY_PORT_OFF,
        vary_addr_off: VARY_ADDR_OFF,
        repeat: REPEAT,
        ifindex,
    }
}

/// Median ns/run of `program` run directly (no wrapper).
fn alone(
    dp: &mut Datapath,
    program: &'static str,
    frame: &[u8],
    ifindex: Option<u32>,
) -> Result<f64> {
    let mut s = Vec::new();
    for _ in 0..ROUNDS {
        s.push(dp.test_run_on(program, frame, REPEAT, ifindex)?.duration_ns as f64);
    }
    s.sort_by(f64::total_cmp);
    Ok(s[ROUNDS / 2])
}

/// Measures each case, checking its counter moved once per run (or none).
fn measure_rows<'a>(
    dp: &mut Datapath,
    cases: impl IntoIterator<Item = (&'static str, &'static str, BenchSpec<'a>, Option<Counter>)>,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (name, what, spec, expected) in cases {
        let (ns, moved) = measure(dp, &spec)?;
        match expected {
            Some(c) if moved.get(&c) != Some(&u64::from(REPEAT)) => {
                bail!("{name}: expected {c:?} to move {REPEAT} per round, counters moved {moved:?}")
            }
            None if !moved.is_empty() => bail!("{name}: no counter should move, got {moved:?}"),
            _ => {}
        }
        rows.push(Row {
            name,
            what,
            ns,
            counter: expected.map(|c| (c, u64::from(REPEAT))),
        });
    }
    Ok(rows)
}

/// The per-packet table: the empty program, the floor, then the rows.
fn table(
    md: &mut String,
    empty_what: &str,
    empty_alone: f64,
    floor: f64,
    rows: &[Row],
) -> Result<()> {
    writeln!(
        md,
        "| path | ns/run | ns over floor | × empty program | what runs |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---|")?;
    writeln!(
        md,
        "| empty program alone | {empty_alone:.1} | | 1.0 | {empty_what} |"
    )?;
    writeln!(
        md,
        "| floor: wrapper → empty program | {floor:.1} | 0.0 | {:.1} | frame restore + tail call |",
        floor / empty_alone
    )?;
    for r in rows {
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {}{} |",
            r.name,
            r.ns,
            (r.ns - floor).max(0.0),
            r.ns / empty_alone,
            r.what,
            r.counter
                .map(|(c, _)| format!(" (counter `{}`)", c.name()))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

/// The XDP rows against the NodePorts `np` (TCP) and `np_udp` (UDP) that
/// [`datapath_at`] programmed: (empty program alone, floor, rows).
fn xdp_rows(
    dp: &mut Datapath,
    np: SocketAddrV4,
    np_udp: SocketAddrV4,
) -> Result<(f64, f64, Vec<Row>)> {
    use proxy_common::{NODE_F_EXTERNAL, NodeConfig};
    let ext0 = Some(fixture::ifindex("ext0")?);
    dp.set_config(&NodeConfig {
        snat_addr_be: u32::from_ne_bytes(fixture::NODE1),
        snat_port_min: 61_000,
        snat_port_max: 65_535,
        flags: NODE_F_EXTERNAL,
        ..NodeConfig::default()
    })?;
    let client = sa(fixture::CLIENT, 40000);
    let syn = Frame::tcp_syn(client, np).build();
    let ack = Frame {
        l4: L4::Tcp {
            syn: false,
            ack: true,
        },
        payload: vec![0x61; 64],
        ..Frame::tcp_syn(client, np)
    }
    .build();
    let query = Frame::udp(client, np_udp, &[0x63; 64]).build();
    // The flows the established and reply rows use.
    dp.test_run_on(programs::XDP_EXT, &syn, 1, ext0)?;
    let out = dp.test_run_on(programs::XDP_EXT, &query, 1, ext0)?.frame;
    let snat = SocketAddrV4::new(
        Ipv4Addr::new(out[26], out[27], out[28], out[29]),
        u16::from_be_bytes([out[34], out[35]]),
    );
    let backend = proxy_tests::packet::dst_of(&out);
    let answer = Frame {
        src_mac: fixture::NODE2_MAC,
        dst_mac: proxy_tests::packet::NODE_MAC,
        ..Frame::udp(backend, snat, &[0x64; 64])
    }
    .build();
    let other = Frame::tcp_syn(client, sa(fixture::NODE1, 22)).build();

    let empty = alone(dp, BENCH_EMPTY_XDP, &syn, ext0)?;
    let (floor, _) = measure(
        dp,
        &bench_spec(BENCH_EMPTY_XDP, &syn, bench_mode::SAME, ext0),
    )?;
    let spec = |frame, mode| bench_spec(programs::XDP_EXT, frame, mode, ext0);
    let rows = measure_rows(
        dp,
        [
            (
                "NodePort → remote backend, established (DSR)",
                "data segment of a tracked flow: lookup, conntrack hit, FIB lookup, DNAT, TTL, MACs, XDP_TX",
                spec(&ack, bench_mode::SAME),
                Some(Counter::Forwarded),
            ),
            (
                "NodePort → remote backend, established (SNAT, UDP)",
                "datagram of a tracked flow: as above plus the source rewrite",
                spec(&query, bench_mode::SAME),
                Some(Counter::Forwarded),
            ),
            (
                "SNAT reply → client",
                "backend's datagram to the SNAT address: conntrack hit, both sides rewritten, FIB lookup, XDP_TX",
                spec(&answer, bench_mode::SAME),
                Some(Counter::SnatReply),
            ),
            (
                "not a service (XDP)",
                "TCP to the node's own port: parse, lookup miss, SNAT-address check",
                spec(&other, bench_mode::SAME),
                None,
            ),
            (
                "NodePort → remote backend, new flow (DSR)",
                "SYN from a new source each run: lookup, Maglev, FIB lookup, one conntrack insert, DNAT, DSR option (head grown by 8), XDP_TX",
                spec(&syn, bench_mode::NEW_FLOW),
                Some(Counter::Forwarded),
            ),
        ],
    )?;
    Ok((empty, floor, rows))
}

/// The control plane against the fake API server: cold sync, single-slice
/// change latency to the kernel map, agent memory.
fn control_plane_section(md: &mut String) -> Result<()> {
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
    for n in [1_000usize, 10_000] {
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
    }
    writeln!(
        md,
        "\nGoals: 10k Services cold sync under 2 s; one EndpointSlice change to maps updated p99 under 10 ms."
    )?;
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
struct CpRun {
    wall_s: f64,
    full_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    in_loop_p99_ms: f64,
    rss_mib: f64,
    selection_mib: f64,
}

fn control_plane_run(n: usize) -> Result<CpRun> {
    use proxy_agent::datapath::PinnedView;
    use proxy_tests::{
        cluster::{Agent, Cluster},
        fake_api::FakeApi,
    };

    let cluster = Cluster::new()?;
    let api = FakeApi::start(&cluster.node)?;
    api.apply(
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}),
    )?;
    let vip = |i: usize| Ipv4Addr::from(0x0a60_0001 + u32::try_from(i).unwrap_or(0));
    let endpoints = |i: usize| -> Vec<Ipv4Addr> {
        (0..10u32)
            .map(|j| Ipv4Addr::from(0x0a80_0000 + u32::try_from(i).unwrap_or(0) * 10 + j))
            .collect()
    };
    for i in 0..n {
        api.apply(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
            "spec": {"clusterIP": vip(i).to_string(), "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
        }))?;
        api.apply(slice_json(i, &endpoints(i)))?;
    }
    let kubeconfig = PathBuf::from("/run")
        .join(&cluster.prefix)
        .join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    let started = Instant::now();
    let mut agent = Agent::start_kube(
        &cluster.node,
        &kubeconfig,
        "node-a",
        &cluster.pin_root(),
        &[
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
            "--ct-entries",
            "65536",
        ],
    )?;
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
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!("full: {full_line}");
        for l in log.lines().take_while(|l| !l.contains("kind=\"full\"")) {
            eprintln!("startup: {l}");
        }
        for l in log.lines().filter(|l| l.contains("full sync planned")) {
            eprintln!("planned: {l}");
        }
    }

    let view = PinnedView::open(&cluster.pin_root())?;
    let key = proxy_common::ServiceKey {
        addr_be: u32::from_ne_bytes(vip(0).octets()),
        port_be: 80u16.to_be(),
        proto: 6,
        scope: 0,
    };
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
    if std::env::var_os("BENCH_DEBUG").is_some() {
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
    if std::env::var_os("BENCH_DEBUG").is_some() {
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
    agent.stop();
    Ok(CpRun {
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

fn addresses(n: u32) -> Vec<(SocketAddrV4, u32)> {
    (0..n)
        .map(|i| (SocketAddrV4::new(Ipv4Addr::from(0x0af4_0000 + i), 8080), 1))
        .collect()
}

/// Userspace Maglev numbers: build time, memory, disruption.
fn maglev_section(md: &mut String) -> Result<()> {
    writeln!(md, "\n## Maglev tables\n")?;
    writeln!(
        md,
        "Build time of one table (userspace, release build, median of 9 builds), equal weights:\n"
    )?;
    writeln!(md, "| backends N | M = 16381 | M = 65537 |")?;
    writeln!(md, "|---:|---:|---:|")?;
    for n in [10u32, 100, 1000] {
        let backends = addresses(n);
        let mut cells = Vec::new();
        for m in [16_381u32, 65_537] {
            let mut times = Vec::new();
            for _ in 0..9 {
                let t = Instant::now();
                let table = maglev::build(&backends, m)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(table);
            }
            times.sort_by(f64::total_cmp);
            cells.push(format!("{:.2} ms", times[4]));
        }
        writeln!(md, "| {n} | {} | {} |", cells[0], cells[1])?;
    }

    writeln!(
        md,
        "\nMemory per service port in the datapath (selection table: header, backend ids, weights, \
         2-byte Maglev entries, in 64-byte blocks) at the default size M = smallest prime ≥ 100·N, \
         against Cilium's fixed M = 16381 with 4-byte entries (64 KiB per frontend) and the table \
         Cilium would need for the same spread (M ≥ 100·N, 4-byte entries):\n"
    )?;
    writeln!(
        md,
        "| backends N | default M | ours | Cilium (M=16381) | ratio | Cilium at the same M | ratio | max share deviation |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for n in [10u32, 100, 1000] {
        let m = maglev::default_size(n as usize, maglev::DEFAULT_MAX_TABLE_SIZE);
        let ours = maglev::table_bytes(n, 0, m);
        let cilium = 16_381u64 * 4;
        let cilium_same = u64::from(m) * 4;
        let table = maglev::build(&addresses(n), m)?;
        let mut counts = vec![0usize; n as usize];
        for e in &table {
            counts[usize::from(*e)] += 1;
        }
        let ideal = f64::from(m) / f64::from(n);
        let worst = counts
            .iter()
            .map(|c| ((*c as f64 - ideal) / ideal).abs())
            .fold(0.0, f64::max);
        writeln!(
            md,
            "| {n} | {m} | {:.1} KiB | {:.1} KiB | {:.2} | {:.1} KiB | {:.2} | {:.2}% |",
            ours as f64 / 1024.0,
            cilium as f64 / 1024.0,
            ours as f64 / cilium as f64,
            cilium_same as f64 / 1024.0,
            ours as f64 / cilium_same as f64,
            worst * 100.0
        )?;
    }

    let m = 16_381;
    let all = addresses(100);
    let before = maglev::build(&all, m)?;
    let mut fewer = all.clone();
    fewer.remove(42);
    let after = maglev::build(&fewer, m)?;
    let changed = before
        .iter()
        .zip(&after)
        .filter(|(a, b)| all[usize::from(**a)].0 != fewer[usize::from(**b)].0)
        .count();
    writeln!(
        md,
        "\nDisruption: removing one of N = 100 backends at M = 16381 moves {changed} slots ({:.2}% of M; \
         the removed backend owned {:.2}%, the minimum possible). Adding it back restores the table exactly.",
        changed as f64 * 100.0 / f64::from(m),
        before.iter().filter(|e| **e == 42).count() as f64 * 100.0 / f64::from(m)
    )?;
    Ok(())
}

fn main() -> ExitCode {
    let out = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .map(PathBuf::from);
    match run().and_then(|md| {
        print!("{md}");
        if let Some(path) = out {
            std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
            println!("\nwritten to {}", path.display());
        }
        Ok(())
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// kube-proxy's iptables rules for `n` Services × `per` endpoints, as
/// `iptables-restore` input: KUBE-SERVICES → a chain per Service → a chain
/// per endpoint chosen with `statistic --probability` 1/(remaining).
fn iptables_rules(n: u32, per: u32) -> String {
    let mut r = String::with_capacity(n as usize * per as usize * 160);
    r.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    for i in 0..n {
        let _ = writeln!(r, ":KUBE-SVC-{i:08X} - [0:0]");
        for k in 0..per {
            let _ = writeln!(r, ":KUBE-SEP-{i:08X}-{k} - [0:0]");
        }
    }
    r.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    r.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    r.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    for i in 0..n {
        let vip = Ipv4Addr::from(0x0a60_0000 + i);
        let _ = writeln!(
            r,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"ns/svc-{i}:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-{i:08X}"
        );
        for k in 0..per {
            let left = per - k;
            if left > 1 {
                let _ = writeln!(
                    r,
                    "-A KUBE-SVC-{i:08X} -m statistic --mode random --probability {:.10} -j KUBE-SEP-{i:08X}-{k}",
                    1.0 / f64::from(left)
                );
            } else {
                let _ = writeln!(r, "-A KUBE-SVC-{i:08X} -j KUBE-SEP-{i:08X}-{k}");
            }
            let ep = Ipv4Addr::from(0x0af4_0000 + i * per + k);
            let _ = writeln!(r, "-A KUBE-SEP-{i:08X}-{k} -s {ep}/32 -j KUBE-MARK-MASQ");
            let _ = writeln!(
                r,
                "-A KUBE-SEP-{i:08X}-{k} -p tcp -m tcp -j DNAT --to-destination {ep}:8080"
            );
        }
    }
    r.push_str("COMMIT\n");
    r
}

/// kube-proxy's nftables rules for the same: a verdict map from
/// (address, protocol, port) to a chain per Service, `numgen random mod`
/// into a chain per endpoint.
fn nft_rules(n: u32, per: u32) -> String {
    let mut r = String::with_capacity(n as usize * per as usize * 120);
    r.push_str("table ip kube-proxy {\n");
    r.push_str(
        " map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; elements = {\n",
    );
    for i in 0..n {
        let vip = Ipv4Addr::from(0x0a60_0000 + i);
        let sep = if i + 1 < n { "," } else { "" };
        let _ = writeln!(r, "  {vip} . tcp . 80 : goto service-{i:08X}{sep}");
    }
    r.push_str(" } }\n");
    r.push_str(" chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }\n");
    r.push_str(
        " chain nat-output { type nat hook output priority -100; policy accept; jump services; }\n",
    );
    r.push_str(" chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }\n");
    for i in 0..n {
        let _ = write!(
            r,
            " chain service-{i:08X} {{ numgen random mod {per} vmap {{ "
        );
        for k in 0..per {
            let sep = if k + 1 < per { ", " } else { "" };
            let _ = write!(r, "{k} : goto endpoint-{i:08X}-{k}{sep}");
        }
        r.push_str(" }; }\n");
        for k in 0..per {
            let ep = Ipv4Addr::from(0x0af4_0000 + i * per + k);
            let _ = writeln!(
                r,
                " chain endpoint-{i:08X}-{k} {{ ip saddr {ep} meta mark set 0x4000; meta l4proto tcp dnat to {ep}:8080; }}"
            );
        }
    }
    r.push_str("}\n");
    r
}

/// Runs `program args` with `input` on stdin inside `ns`; returns seconds.
fn timed_restore(
    ns: &proxy_tests::netns::Netns,
    program: &str,
    args: &[&str],
    input: &str,
) -> Result<f64> {
    use std::io::Write as _;
    let started = Instant::now();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, program])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Programming N Services × 10 endpoints from nothing: ours (translation
/// results through reconcile, Maglev tables built, every map written) against
/// `iptables-restore` and `nft -f` of kube-proxy's equivalent rule sets, each
/// in a fresh namespace.
fn programming_section(md: &mut String) -> Result<()> {
    let iptables_version = std::process::Command::new("iptables-restore")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let nft_version = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    writeln!(
        md,
        "\n## Programming Services: ours against iptables-restore and nft\n"
    )?;
    writeln!(
        md,
        "Time to program N Services × 10 endpoints from nothing, median of 3. **Ours**: the agent's reconcile and \
         datapath code in-process (`fixture::program`): plans, builds every Maglev table (M = 1009) and writes every \
         map. **iptables**: `iptables-restore` of kube-proxy's iptables rules (KUBE-SERVICES → per-Service chain → \
         per-endpoint chains with `statistic` probabilities, masquerade marks, DNAT) into an empty namespace ({iptables_version}). \
         **nftables**: `nft -f` of kube-proxy's nftables layout (a verdict map on address . protocol . port, \
         `numgen random` into per-endpoint chains; {nft_version}, one run at 10k: it takes minutes). Translation from Kubernetes objects is not included for ours \
         (the control-plane section has it); rule generation is not included for the others.\n"
    )?;
    writeln!(
        md,
        "| Services × endpoints | ours | iptables-restore | nft -f | iptables ÷ ours | nft ÷ ours |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
    for n in [1000u32, 10_000] {
        let mut ours = Vec::new();
        let mut ipt = Vec::new();
        let mut nft = Vec::new();
        let ipt_rules = iptables_rules(n, 10);
        let nft_text = nft_rules(n, 10);
        let plans: Vec<_> = (0..n)
            .map(|i| {
                let backends: Vec<SocketAddrV4> = (0..10)
                    .map(|k| SocketAddrV4::new(Ipv4Addr::from(0x0af4_0000 + i * 10 + k), 8080))
                    .collect();
                fixture::service(
                    &format!("svc-{i}"),
                    SocketAddrV4::new(Ipv4Addr::from(0x0a60_0000 + i), 80),
                    Protocol::Tcp,
                    &backends,
                )
            })
            .collect();
        for run in 0..3 {
            let mut dp = Datapath::load(&LoadOptions {
                sizes: MapSizes::default(),
                pin_root: None,
            })?;
            let started = Instant::now();
            fixture::program(&mut dp, plans.clone())?;
            ours.push(started.elapsed().as_secs_f64());
            drop(dp);
            let ns = proxy_tests::netns::Netns::new(&format!(
                "{}-rules",
                proxy_tests::netns::unique_prefix()
            ))?;
            ipt.push(timed_restore(&ns, "iptables-restore", &["-w"], &ipt_rules)?);
            // nft takes minutes at 10k here: one run is enough to compare.
            if run == 0 || n < 10_000 {
                nft.push(timed_restore(&ns, "nft", &["-f", "-"], &nft_text)?);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (o, i, f) = (median(&mut ours), median(&mut ipt), median(&mut nft));
        writeln!(
            md,
            "| {n} × 10 | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} | {:.1} |",
            o * 1e3,
            i * 1e3,
            f * 1e3,
            i / o,
            f / o
        )?;
        eprintln!("programming {n}: ours {o:.3}s iptables {i:.3}s nft {f:.3}s");
    }
    writeln!(
        md,
        "\nGoal: programming 10k Services faster than both. A change to one Service is a different story: ours \
         rewrites that Service's entries (sub-millisecond, control-plane section), iptables-restore and nft \
         usually resubmit much more.\n"
    )?;
    Ok(())
}
