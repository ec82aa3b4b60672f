//! The datapath per packet: every TC and XDP path through BPF_PROG_TEST_RUN
//! against its empty-program floor, with the maps holding from a few to
//! 100,000 Services.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use proxy_agent::{
    datapath::{BENCH_EMPTY, BENCH_EMPTY_XDP, BenchSpec, Datapath, LoadOptions, MapSizes},
    model::{Algorithm, Protocol},
};
use proxy_common::{Counter, bench_mode, maps::programs};
use proxy_tests::{
    fixture::{self, sa},
    packet::{Frame, L4},
};

use crate::{Report, median, plot, thousands};

const REPEAT: u32 = 100_000;
/// The row the socket hooks are compared with.
const NEW_FLOW_MAGLEV: &str = "ClusterIP, new flow (Maglev)";
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

/// Services the per-packet rows measure (two ClusterIP, two NodePort).
const MEASURED: u32 = 4;

/// One run of every per-packet row with `total` Services in the maps.
pub struct Scale {
    pub services: u32,
    empty: f64,
    floor: f64,
    rows: Vec<Row>,
    xdp_empty: f64,
    xdp_floor: f64,
    xdp_rows: Vec<Row>,
}

impl Scale {
    /// The TC new-flow (Maglev) row's ns over its floor.
    pub fn new_flow_over_floor(&self) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.name == NEW_FLOW_MAGLEV)
            .map(|r| (r.ns - self.floor).max(0.0))
    }

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
    // Create the flow the established/reply rows use, handshake completed
    // (the first data segment moves it from CT_NEW to CONNTRACK).
    dp.test_run(programs::TC_POD_INGRESS, &syn, 1)?;
    dp.test_run(programs::TC_POD_INGRESS, &established, 1)?;
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
            NEW_FLOW_MAGLEV,
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

/// Every row at each of `totals` Services in the maps (the measured ones
/// alone, then filled up to the total; run inside the fixture namespace).
pub fn scales(totals: &[u32]) -> Result<Vec<Scale>> {
    let mut scales = Vec::new();
    for &total in totals {
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
pub fn section(report: &mut Report, scales: &[Scale]) -> Result<()> {
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
pub type OverFloor = Box<dyn Fn(&Scale) -> f64>;

/// Every per-packet row, TC then XDP, named and read from any scale.
pub fn row_metrics(first: &Scale) -> Vec<(String, OverFloor)> {
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
    // The flows the established and reply rows use (the TCP one past its
    // handshake).
    dp.test_run_on(programs::XDP_EXT, &syn, 1, ext0)?;
    dp.test_run_on(programs::XDP_EXT, &ack, 1, ext0)?;
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
