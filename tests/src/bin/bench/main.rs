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

mod e2e;
mod plot;
mod rules;

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
    let moved = after
        .iter()
        .filter_map(|(c, v)| {
            let d = v - before.get(c).copied().unwrap_or(0);
            (d > 0).then_some((*c, d / ROUNDS as u64))
        })
        .collect();
    Ok((median(&mut samples), moved))
}

/// Median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
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

/// Where the plots go, relative to BENCHMARKS.md.
const PLOTS_DIR: &str = "docs/benchmarks";

/// BENCHMARKS.md and its plots.
#[derive(Default)]
struct Report {
    md: String,
    plots: Vec<plot::Plot>,
}

impl Report {
    /// Adds `plot` and links it from the Markdown at this point.
    fn plot(&mut self, plot: plot::Plot) -> Result<()> {
        writeln!(self.md, "\n![{}]({PLOTS_DIR}/{})\n", plot.title, plot.file)?;
        self.plots.push(plot);
        Ok(())
    }
}

fn run() -> Result<Report> {
    proxy_tests::netns::require_root()?;
    // For working on one part: BENCH_ONLY=datapath, maglev, programming,
    // control-plane or e2e.
    let started = Instant::now();
    let only = std::env::var("BENCH_ONLY").ok();
    let want = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let mut body = Report::default();
    let mut scales = Vec::new();
    if want("datapath") {
        // The XDP rows look up routes: the whole datapath section runs in a
        // namespace of its own (node1 of the fixtures).
        let ns = fixture::fixture_net()?;
        scales = ns.run(datapath_scales)?;
        datapath_section(&mut body, &scales)?;
    }
    if want("maglev") {
        maglev_section(&mut body.md)?;
    }
    let programming = if want("programming") {
        programming_section(&mut body)?
    } else {
        Vec::new()
    };
    let control_plane = if want("control-plane") {
        control_plane_section(&mut body.md)?
    } else {
        Vec::new()
    };
    let e2e = if want("e2e") {
        e2e_section(&mut body)?
    } else {
        Vec::new()
    };
    let mut report = Report::default();
    writeln!(report.md, "# Benchmarks\n")?;
    writeln!(report.md, "Machine: {}  ", machine())?;
    writeln!(
        report.md,
        "Command: `cargo xtask bench` (as root; this run took {:.0} minutes, about 5 of them nft loading 10k Services twice)  ",
        started.elapsed().as_secs_f64() / 60.0
    )?;
    writeln!(
        report.md,
        "Everything below comes from one run of that command on this machine; nothing is copied from elsewhere.\n"
    )?;
    goals_section(&mut report.md, &scales, &programming, &control_plane, &e2e)?;
    report.md.push_str(&body.md);
    report.plots = body.plots;
    Ok(report)
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

impl Scale {
    /// Keeps, row by row, the faster of this run and `other` (same rows).
    fn keep_faster(&mut self, other: &Scale) {
        let min = |a: &mut f64, b: f64| *a = a.min(b);
        min(&mut self.empty, other.empty);
        min(&mut self.floor, other.floor);
        min(&mut self.xdp_empty, other.xdp_empty);
        min(&mut self.xdp_floor, other.xdp_floor);
        for (a, b) in self.rows.iter_mut().zip(&other.rows) {
            min(&mut a.ns, b.ns);
        }
        for (a, b) in self.xdp_rows.iter_mut().zip(&other.xdp_rows) {
            min(&mut a.ns, b.ns);
        }
    }
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
    let established = data_segment(client, vip, 0x61);
    // Create the flow the established/reply rows use.
    dp.test_run(programs::TC_POD_INGRESS, &syn, 1)?;
    let chosen =
        proxy_tests::packet::dst_of(&dp.test_run(programs::TC_POD_INGRESS, &syn, 1)?.frame);
    let reply = data_segment(chosen, client, 0x62);
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
fn datapath_scales() -> Result<Vec<Scale>> {
    let mut scales = Vec::new();
    for total in SCALES {
        let started = Instant::now();
        // Best of two loads: on this shared VM a load now and then runs a
        // row 50% slower (placement, neighbours), which is not what grows
        // with the Services.
        let mut best = datapath_at(total)?;
        let again = datapath_at(total)?;
        best.keep_faster(&again);
        scales.push(best);
        eprintln!(
            "datapath at {total} Services: {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(scales)
}

/// The per-packet tables at the smallest scale, then every row against the
/// number of Services.
fn datapath_section(report: &mut Report, scales: &[Scale]) -> Result<()> {
    let first = scales.first().context("no datapath runs")?;
    let md = &mut report.md;
    writeln!(
        md,
        "Method: BPF_PROG_TEST_RUN, {REPEAT} runs per round, median of {ROUNDS} rounds, kernel-measured ns per run, \
         the better of two loads of the datapath. \
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
        md,
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
        md,
        "`return XDP_PASS`",
        first.xdp_empty,
        first.xdp_floor,
        &first.xdp_rows,
    )?;
    scaling_table(md, scales)?;
    let paths = row_metrics(first);
    report.plot(plot::Plot {
        file: "datapath-scaling.svg".into(),
        title: "ns per packet over the floor, by Services in the maps".into(),
        svg: plot::grouped_bars(
            "ns per packet over the floor, by Services in the maps (BPF_PROG_TEST_RUN)",
            "ns over floor (log)",
            &paths.iter().map(|(n, _)| short_path(n)).collect::<Vec<_>>(),
            &scales
                .iter()
                .map(|s| format!("{} Services", thousands(s.services)))
                .collect::<Vec<_>>(),
            &paths
                .iter()
                .map(|(_, f)| scales.iter().map(|s| f(s).max(1.0)).collect())
                .collect::<Vec<_>>(),
            plot::Scale::Log,
        ),
    })
}

/// A per-packet row's ns over its floor, read from any scale.
type OverFloor = Box<dyn Fn(&Scale) -> f64>;

/// Every per-packet row, TC then XDP, named and read from any scale.
fn row_metrics(first: &Scale) -> Vec<(String, OverFloor)> {
    let tc = first.rows.iter().enumerate().map(|(i, r)| {
        let f: OverFloor = Box::new(move |s: &Scale| (s.rows[i].ns - s.floor).max(0.0));
        (r.name.to_owned(), f)
    });
    let xdp = first.xdp_rows.iter().enumerate().map(|(i, r)| {
        let f: OverFloor = Box::new(move |s: &Scale| (s.xdp_rows[i].ns - s.xdp_floor).max(0.0));
        (format!("XDP: {}", r.name), f)
    });
    tc.chain(xdp).collect()
}

/// A row name short enough for a chart axis.
fn short_path(name: &str) -> String {
    name.replace("NodePort → remote backend, ", "NodePort ")
        .replace("ClusterIP, ", "")
        .replace(" (reverse NAT)", "")
        .replace("established flow", "established")
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
    for (name, over) in row_metrics(&scales[0]) {
        row(md, &name, scales.iter().map(&over).collect())?;
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

/// A TCP ACK from `src` to `dst` carrying 64 bytes of `fill`.
fn data_segment(src: SocketAddrV4, dst: SocketAddrV4, fill: u8) -> Vec<u8> {
    Frame {
        l4: L4::Tcp {
            syn: false,
            ack: true,
        },
        payload: vec![fill; 64],
        ..Frame::tcp_syn(src, dst)
    }
    .build()
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
    Ok(median(&mut s))
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
    let mut config = NodeConfig {
        snat_port_min: 61_000,
        snat_port_max: 65_535,
        flags: NODE_F_EXTERNAL,
        ..NodeConfig::default()
    };
    config.set_snat_addr(Some(fixture::NODE1.into()));
    dp.set_config(&config)?;
    let client = sa(fixture::CLIENT, 40000);
    let syn = Frame::tcp_syn(client, np).build();
    let ack = data_segment(client, np, 0x61);
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
fn control_plane_section(md: &mut String) -> Result<Vec<CpRun>> {
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
fn agent_for(
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
struct CpRun {
    services: usize,
    /// The pinned maps after the slice changes.
    maps: Vec<MapMemory>,
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
            cells.push(format!("{:.2} ms", median(&mut times)));
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
        let ours = proxy_common::sel_bytes(n, 0, m);
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
    // `bench --dump-rules iptables|nft N`: the exact rule sets compared against.
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, kind, n] = args.as_slice()
        && flag == "--dump-rules"
    {
        let svcs = rules::services(n.parse().unwrap_or(1), 10);
        match kind.as_str() {
            "iptables" => print!("{}", rules::iptables(&svcs)),
            "nft" => print!("{}", rules::nft(&svcs)),
            _ => {
                eprintln!("--dump-rules iptables|nft N");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    let out = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .map(PathBuf::from);
    // A partial run prints its part; BENCHMARKS.md keeps the whole report.
    let out = out.filter(|p| {
        let partial = std::env::var_os("BENCH_ONLY").is_some();
        if partial {
            eprintln!("BENCH_ONLY is set: {} left as it is", p.display());
        }
        !partial
    });
    match run().and_then(|report| {
        print!("{}", report.md);
        if let Some(path) = out {
            std::fs::write(&path, &report.md)
                .with_context(|| format!("writing {}", path.display()))?;
            let dir = path
                .parent()
                .map_or_else(|| PathBuf::from(PLOTS_DIR), |p| p.join(PLOTS_DIR));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for p in &report.plots {
                let file = dir.join(&p.file);
                std::fs::write(&file, &p.svg)
                    .with_context(|| format!("writing {}", file.display()))?;
            }
            println!(
                "\nwritten to {} and {} plots in {}",
                path.display(),
                report.plots.len(),
                dir.display()
            );
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

/// Sizes of the end-to-end runs (`BENCH_E2E_SIZES=100,1000` for a shorter run).
fn e2e_sizes() -> Vec<u32> {
    std::env::var("BENCH_E2E_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1000, 10_000])
}

/// Client pod → Service with 10 backends, every mode at every size.
fn e2e_section(report: &mut Report) -> Result<Vec<e2e::Run>> {
    use e2e::Mode;
    let mut runs = Vec::new();
    for n in e2e_sizes() {
        runs.extend(e2e::at(n)?);
    }
    let md = &mut report.md;
    writeln!(
        md,
        "\n## End to end: client pod → Service with 10 backends\n"
    )?;
    writeln!(
        md,
        "One node namespace, a client pod and {} backend pods joined to it by veth pairs (as in the \
         integration tests). Each backend echoes {}-byte requests (tokio, 2 worker threads for all \
         backends); the client is one tokio thread with {} connections in flight. **Short-lived**: \
         connect, request, response, close (the client closes first), so the rate is new connections \
         per second. **Keep-alive**: requests on {} long-lived connections. Each figure is the median of \
         {} rounds of {} ms after {} ms of warm-up (the range shows all rounds); failed attempts are counted. \
         All five beds of a size exist at once and the rounds interleave, so the VM's drifts fall on every \
         mode alike. *Programmed in*: rules loaded, or agent start → first full sync written (listing and \
         translation included). *Agent CPU*: the agent's CPU time while the size's rounds ran (all beds \
         take turns, so its own bed carried a fifth of that traffic), as a share of one core; mostly \
         conntrack garbage collection every 10 s. The Service under test sits \
         in the middle of N Services with 10 endpoints each (iptables walks its KUBE-SERVICES list linearly \
         for every new connection). **pod IP**: the client connects to the backends' addresses in turn, \
         nothing translates (the floor). **ours**: the agent watching a fake API server with the N Services. \
         **iptables** / **nftables**: kube-proxy's rule sets from the programming section with this \
         Service's endpoints, loaded into the node namespace. Client, servers and the node's packet \
         processing share the machine's two cores, so a cheaper datapath shows as more requests per second.\n",
        e2e::BACKENDS,
        e2e::MESSAGE,
        e2e::CLIENTS,
        e2e::CLIENTS,
        e2e::ROUNDS,
        e2e::ROUND.as_millis(),
        e2e::WARMUP.as_millis()
    )?;
    writeln!(
        md,
        "| Services | path | new connections/s | range | ÷ floor | errors | keep-alive requests/s | range | ÷ floor | errors | programmed in | agent CPU |"
    )?;
    writeln!(
        md,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for r in &runs {
        let floor = runs
            .iter()
            .find(|f| f.services == r.services && f.mode == Mode::PodIp)
            .context("floor run")?;
        let range = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::MAX, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            format!("{lo:.0}–{hi:.0}")
        };
        writeln!(
            md,
            "| {} | {} | {:.0} | {} | {:.2} | {} | {:.0} | {} | {:.2} | {} | {} | {} |",
            thousands(r.services),
            r.mode.label(),
            r.short.per_sec,
            range(&r.short_rounds),
            r.short.per_sec / floor.short.per_sec,
            r.short.errors,
            r.keep_alive.per_sec,
            range(&r.keep_alive_rounds),
            r.keep_alive.per_sec / floor.keep_alive.per_sec,
            r.keep_alive.errors,
            r.program_s
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "—".into()),
            r.agent_cpu
                .map(|c| format!("{:.1}%", c * 100.0))
                .unwrap_or_else(|| "—".into()),
        )?;
    }
    for r in runs.iter().filter(|r| !r.program_costs.is_empty()) {
        let costs: Vec<String> = r
            .program_costs
            .iter()
            .map(|(p, n, ns)| format!("`{p}` {ns:.0} ns/run over {n} runs"))
            .collect();
        writeln!(
            md,
            "\nOur programs under this traffic at {} Services (one more round of each kind with the kernel's \
             run-time statistics on): {}.",
            thousands(r.services),
            costs.join(", ")
        )?;
    }
    writeln!(
        md,
        "\nOurs against each (new connections/s ratio, keep-alive ratio):\n"
    )?;
    writeln!(
        md,
        "| Services | ÷ floor | ÷ iptables (nf_tables) | ÷ iptables (legacy) | ÷ nftables |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|")?;
    for n in e2e_sizes() {
        let get = |m: Mode| runs.iter().find(|r| r.services == n && r.mode == m);
        let Some(ours) = get(Mode::Ours) else {
            continue;
        };
        let mut line = format!("| {} |", thousands(n));
        for m in [Mode::PodIp, Mode::Iptables, Mode::IptablesLegacy, Mode::Nft] {
            if let Some(o) = get(m) {
                let _ = write!(
                    line,
                    " {:.2} / {:.2} |",
                    ours.short.per_sec / o.short.per_sec,
                    ours.keep_alive.per_sec / o.keep_alive.per_sec
                );
            }
        }
        writeln!(md, "{line}")?;
    }
    let sizes = e2e_sizes();
    let labels: Vec<String> = Mode::ALL.iter().map(|m| m.label().to_owned()).collect();
    for (file, title, axis, pick) in [
        (
            "e2e-connections.svg",
            "New connections per second, client pod → Service with 10 backends",
            "connections/s",
            (|r: &e2e::Run| r.short.per_sec) as fn(&e2e::Run) -> f64,
        ),
        (
            "e2e-keepalive.svg",
            "Requests per second on keep-alive connections",
            "requests/s",
            |r: &e2e::Run| r.keep_alive.per_sec,
        ),
    ] {
        let values: Vec<Vec<f64>> = sizes
            .iter()
            .map(|n| {
                Mode::ALL
                    .iter()
                    .map(|m| {
                        runs.iter()
                            .find(|r| r.services == *n && r.mode == *m)
                            .map_or(f64::NAN, pick)
                    })
                    .collect()
            })
            .collect();
        report.plot(plot::Plot {
            file: file.into(),
            title: title.into(),
            svg: plot::grouped_bars(
                title,
                axis,
                &sizes
                    .iter()
                    .map(|n| format!("{} Services", thousands(*n)))
                    .collect::<Vec<_>>(),
                &labels,
                &values,
                plot::Scale::Linear,
            ),
        })?;
    }
    Ok(runs)
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

/// Programming N Services × 10 endpoints, seconds (medians).
struct Programming {
    services: u32,
    ours: f64,
    iptables: f64,
    iptables_legacy: f64,
    nft: f64,
}

/// First line of `program --version`.
fn version(program: &str) -> String {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Programming N Services × 10 endpoints from nothing: ours (translation
/// results through reconcile, Maglev tables built, every map written) against
/// `iptables-restore` (both backends) and `nft -f` of kube-proxy's
/// equivalent rule sets, each in a fresh namespace.
fn programming_section(report: &mut Report) -> Result<Vec<Programming>> {
    let md = &mut report.md;
    writeln!(
        md,
        "\n## Programming Services: ours against iptables-restore and nft\n"
    )?;
    writeln!(
        md,
        "Time to program N Services × 10 endpoints from nothing, median of 3. **Ours**: the agent's reconcile and \
         datapath code in-process (`fixture::program`): plans, builds every Maglev table (M = 1009) and writes every \
         map. **iptables**: `iptables-restore` of kube-proxy's iptables rules (KUBE-SERVICES → per-Service chain → \
         per-endpoint chains with `statistic` probabilities, masquerade marks, DNAT, KUBE-POSTROUTING, KUBE-FORWARD) \
         into an empty namespace, with both backends: `iptables-restore` ({}) and `iptables-legacy-restore`. \
         **nftables**: `nft -f` of kube-proxy's nftables layout (a verdict map on address . protocol . port, \
         `numgen random` vmaps into per-endpoint chains; {}). nft runs once at 10k: it takes minutes, because every \
         Service chain's anonymous vmap is a new set and naming a new anonymous set scans the table's sets, so the \
         load grows with the square of the Services (0.8 s at 1k, 2.6 s at 2k). `cargo run --release -p proxy-tests \
         --bin bench -- --dump-rules iptables|nft N` prints the exact rules. Translation from Kubernetes objects is \
         not included for ours (the control-plane and end-to-end sections include it); rule generation is not \
         included for the others.\n",
        version("iptables-restore"),
        version("nft")
    )?;
    writeln!(
        md,
        "| Services × endpoints | ours | iptables-restore (nf_tables) | iptables-legacy-restore | nft -f | ÷ ours | ÷ ours | ÷ ours |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut results = Vec::new();
    for n in [1000u32, 10_000] {
        let svcs = rules::services(n, 10);
        let plans: Vec<_> = svcs
            .iter()
            .enumerate()
            .map(|(i, s)| fixture::service(&format!("svc-{i}"), s.vip, Protocol::Tcp, &s.endpoints))
            .collect();
        let mut ours = Vec::new();
        for _ in 0..3 {
            let mut dp = Datapath::load(&LoadOptions {
                sizes: MapSizes::default(),
                pin_root: None,
            })?;
            let started = Instant::now();
            fixture::program(&mut dp, plans.clone())?;
            ours.push(started.elapsed().as_secs_f64());
        }
        let mut theirs = Vec::new();
        for mode in [
            e2e::Mode::Iptables,
            e2e::Mode::IptablesLegacy,
            e2e::Mode::Nft,
        ] {
            let (program, args, rules) = mode.loader().context("a rules mode")?;
            let text = rules(&svcs);
            // nft takes minutes at 10k here: one run is enough to compare.
            let runs = if mode == e2e::Mode::Nft && n >= 10_000 {
                1
            } else {
                3
            };
            let mut times = Vec::new();
            for _ in 0..runs {
                let ns = proxy_tests::netns::Netns::new(&format!(
                    "{}-rules",
                    proxy_tests::netns::unique_prefix()
                ))?;
                times.push(timed_restore(&ns, program, args, &text)?);
            }
            theirs.push(median(&mut times));
        }
        let r = Programming {
            services: n,
            ours: median(&mut ours),
            iptables: theirs[0],
            iptables_legacy: theirs[1],
            nft: theirs[2],
        };
        writeln!(
            md,
            "| {} × 10 | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
            thousands(n),
            seconds(r.ours),
            seconds(r.iptables),
            seconds(r.iptables_legacy),
            seconds(r.nft),
            r.iptables / r.ours,
            r.iptables_legacy / r.ours,
            r.nft / r.ours
        )?;
        eprintln!(
            "programming {n}: ours {:.3}s iptables {:.3}s legacy {:.3}s nft {:.3}s",
            r.ours, r.iptables, r.iptables_legacy, r.nft
        );
        results.push(r);
    }
    writeln!(
        md,
        "\nA change to one Service is a different story: ours rewrites that Service's entries (sub-millisecond, \
         control-plane section); kube-proxy's iptables mode resubmits the changed chains with `iptables-restore \
         --noflush` and its nftables mode sends a transaction with the changed elements and chains.\n"
    )?;
    report.plot(plot::Plot {
        file: "programming.svg".into(),
        title: "Time to program N Services × 10 endpoints".into(),
        svg: plot::grouped_bars(
            "Time to program N Services × 10 endpoints from nothing",
            "seconds (log)",
            &results
                .iter()
                .map(|r| format!("{} Services", thousands(r.services)))
                .collect::<Vec<_>>(),
            &[
                "ours".into(),
                "iptables-restore (nf_tables)".into(),
                "iptables-legacy-restore".into(),
                "nft -f".into(),
            ],
            &results
                .iter()
                .map(|r| vec![r.ours, r.iptables, r.iptables_legacy, r.nft])
                .collect::<Vec<_>>(),
            plot::Scale::Log,
        ),
    })?;
    Ok(results)
}

/// 0.125 → "125 ms", 12.5 → "12.5 s".
fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

/// The goals, each against what this run measured.
fn goals_section(
    md: &mut String,
    scales: &[Scale],
    programming: &[Programming],
    control_plane: &[CpRun],
    e2e: &[e2e::Run],
) -> Result<()> {
    use e2e::Mode;
    let verdict = |met: bool| if met { "met" } else { "**not met**" };
    let mut rows: Vec<(String, String, &str)> = Vec::new();
    let find = |n: u32, m: Mode| e2e.iter().find(|r| r.services == n && r.mode == m);
    let sizes: Vec<u32> = {
        let mut v: Vec<u32> = e2e.iter().map(|r| r.services).collect();
        v.dedup();
        v
    };
    // Ours against another mode at every size, both metrics: the worst ratio.
    let worst = |other: Mode| -> Option<(f64, String)> {
        let mut worst: Option<(f64, String)> = None;
        for n in &sizes {
            let (Some(o), Some(x)) = (find(*n, Mode::Ours), find(*n, other)) else {
                continue;
            };
            for (what, ratio) in [
                ("new connections", o.short.per_sec / x.short.per_sec),
                ("keep-alive", o.keep_alive.per_sec / x.keep_alive.per_sec),
            ] {
                if worst.as_ref().is_none_or(|(w, _)| ratio < *w) {
                    worst = Some((ratio, format!("{what} at {} Services", thousands(*n))));
                }
            }
        }
        worst
    };
    if let Some((r, at)) = worst(Mode::PodIp) {
        rows.push((
            "End to end at least 0.9 of the direct-pod floor".into(),
            format!("lowest {r:.3} ({at})"),
            verdict(r >= 0.9),
        ));
    }
    for m in [Mode::Iptables, Mode::IptablesLegacy] {
        if let (Some(o), Some(x)) = (find(10_000, Mode::Ours), find(10_000, m)) {
            let r = o.short.per_sec / x.short.per_sec;
            rows.push((
                format!(
                    "At least 2× {} on new connections at 10k Services",
                    m.label()
                ),
                format!("{r:.2}×"),
                verdict(r >= 2.0),
            ));
        }
    }
    if let Some((r, at)) = worst(Mode::Nft) {
        rows.push((
            "At or above nftables everywhere (end to end)".into(),
            format!("lowest {r:.3} ({at})"),
            verdict(r >= 1.0),
        ));
    }
    if let Some(p) = programming.iter().find(|p| p.services == 10_000) {
        let slowest_other = p.iptables.min(p.iptables_legacy).min(p.nft);
        rows.push((
            "Programming 10k Services faster than iptables-restore and nft".into(),
            format!(
                "ours {}, iptables-restore {} / legacy {}, nft {}",
                seconds(p.ours),
                seconds(p.iptables),
                seconds(p.iptables_legacy),
                seconds(p.nft)
            ),
            verdict(p.ours < slowest_other),
        ));
    }
    if let Some(c) = control_plane.iter().find(|c| c.services == 10_000) {
        rows.push((
            "Cold sync of 10k Services under 2 s (agent start → maps written)".into(),
            format!("{:.2} s", c.wall_s),
            verdict(c.wall_s < 2.0),
        ));
        rows.push((
            "EndpointSlice change → map p99 under 10 ms".into(),
            format!("{:.2} ms", c.p99_ms),
            verdict(c.p99_ms < 10.0),
        ));
    }
    if let (Some(first), Some(last)) = (scales.first(), scales.last()) {
        let worst = row_metrics(first)
            .into_iter()
            .map(|(name, over)| (over(last) / over(first).max(1.0), name))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((g, name)) = worst {
            rows.push((
                format!(
                    "Per-packet cost flat from {} to {} Services (within 1.5×)",
                    thousands(first.services),
                    thousands(last.services)
                ),
                format!("largest growth {g:.2}× ({name})"),
                verdict(g <= 1.5),
            ));
        }
    }
    writeln!(md, "## Goals\n")?;
    writeln!(md, "| goal | this run | |")?;
    writeln!(md, "|---|---|---|")?;
    for (goal, got, v) in rows {
        writeln!(md, "| {goal} | {got} | {v} |")?;
    }
    writeln!(md)?;
    Ok(())
}
