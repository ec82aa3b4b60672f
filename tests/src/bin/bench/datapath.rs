//! The datapath per packet: every TC and XDP path through BPF_PROG_TEST_RUN
//! against its empty-program floor, with the maps holding from a few to
//! 100,000 Services.
//!
//! Each round measures every row once, in an order that rotates from round
//! to round, each row right after its floor in the same mode (a new source
//! every run costs the wrapper more than the same frame does). Rounds run
//! on two loads of the datapath (its maps land on different memory), and
//! every round counts: rows are summarised by their median, a 95%
//! interval of the median and the whole range. New-flow rows start each
//! round with empty conntrack tables and run few enough flows to leave
//! room, or with the tables filled first (every insert evicts); the fill is
//! stated.

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

use crate::{Report, plot, stats::Summary, thousands};

/// Runs per round of a row that repeats one flow.
const REPEAT: u32 = 100_000;
/// Runs per round of a new-flow row with room: each adds one entry to
/// `CT_NEW` (65,536 by default), so a round ends under a third full.
const NEW_REPEAT: u32 = 20_000;
/// Loads of the datapath, and rounds on each.
const LOADS: usize = 2;
const ROUNDS: usize = 12;
/// The row the socket hooks are compared with.
pub const NEW_FLOW_MAGLEV: &str = "ClusterIP, new flow (Maglev), table has room";
/// Rows with goals of their own.
pub const XDP_ESTABLISHED: &str = "NodePort → remote backend, established (DSR)";
pub const XDP_NEW_DSR: &str = "NodePort → remote backend, new flow (DSR), table has room";

/// Source port and low half of the source address in a 14+20 byte header frame.
const VARY_PORT_OFF: u16 = 14 + 20;
const VARY_ADDR_OFF: u16 = 14 + 14;

/// What `CT_NEW`, where a SYN's flow goes, holds when a row's round
/// starts (the established rows' flows are in `CONNTRACK`, untouched).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tables {
    /// As the rows before left it.
    AsTheyAre,
    /// Emptied: a new-flow row's flows all find room.
    Room,
    /// Emptied, then filled past capacity with other flows: every insert
    /// evicts.
    Full,
}

/// One row to measure.
struct Case<'a> {
    name: &'static str,
    what: &'static str,
    spec: BenchSpec<'a>,
    /// The path counter that must move once per run (none: none moves).
    counter: Option<Counter>,
    tables: Tables,
}

/// One measured row.
pub struct Row {
    pub name: &'static str,
    what: &'static str,
    counter: Option<Counter>,
    /// ns over the floor, one per round.
    pub over: Vec<f64>,
    /// The floor of this row's mode, one per round.
    floor: Vec<f64>,
    /// The conntrack table new flows go to, and its fill after a round:
    /// (table, entries before the round, after, capacity).
    fill: Option<(&'static str, usize, usize, u32)>,
}

impl Row {
    pub fn summary(&self) -> Summary {
        Summary::of(&self.over)
    }
}

/// Services the per-packet rows measure (two ClusterIP, two NodePort).
const MEASURED: u32 = 4;

/// Every per-packet row with `services` Services in the maps.
pub struct Scale {
    pub services: u32,
    /// The empty program alone (TC, XDP), ns per run.
    empty: (f64, f64),
    pub rows: Vec<Row>,
    pub xdp_rows: Vec<Row>,
}

impl Scale {
    /// The TC new-flow (Maglev) row's median ns over its floor.
    pub fn new_flow_over_floor(&self) -> Option<f64> {
        self.row(NEW_FLOW_MAGLEV).map(|r| r.summary().median)
    }

    /// A row by name, TC or XDP.
    pub fn row(&self, name: &str) -> Option<&Row> {
        self.rows
            .iter()
            .chain(&self.xdp_rows)
            .find(|r| r.name == name)
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

/// The measured Services and the fillers, in one datapath.
fn load(total: u32) -> Result<(Datapath, u32)> {
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
    let mut plans = fillers(extra);
    plans.extend([
        fixture::service("bench", vip, Protocol::Tcp, &backends),
        random,
        fixture::node_port(
            "np",
            sa([10, 96, 5, 1], 80),
            NP,
            Protocol::Tcp,
            &ext_backends,
            &[],
        ),
        fixture::node_port(
            "np-udp",
            sa([10, 96, 5, 2], 53),
            NP_UDP,
            Protocol::Udp,
            &ext_backends,
            &[],
        ),
    ]);
    let services = u32::try_from(plans.len())?;
    fixture::program_with_mode(&mut dp, plans, proxy_agent::model::NodePortMode::Hybrid)?;
    use proxy_common::{NODE_F_EXTERNAL, NodeConfig};
    let mut config = NodeConfig {
        snat_port_min: 61_000,
        snat_port_max: 65_535,
        flags: NODE_F_EXTERNAL,
        ..NodeConfig::default()
    };
    config.set_snat_addr(Some(fixture::NODE1.into()));
    dp.set_config(&config)?;
    Ok((dp, services))
}

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const RANDOM_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 80);
const NP: SocketAddrV4 = SocketAddrV4::new(
    Ipv4Addr::new(
        fixture::NODE1[0],
        fixture::NODE1[1],
        fixture::NODE1[2],
        fixture::NODE1[3],
    ),
    30080,
);
const NP_UDP: SocketAddrV4 = SocketAddrV4::new(*NP.ip(), 30053);

/// The frames of every row, and the flows the established and reply rows
/// use (created here, handshakes completed).
struct Frames {
    syn: Vec<u8>,
    established: Vec<u8>,
    reply: Vec<u8>,
    other: Vec<u8>,
    syn_random: Vec<u8>,
    x_syn: Vec<u8>,
    x_ack: Vec<u8>,
    x_query: Vec<u8>,
    x_answer: Vec<u8>,
    x_other: Vec<u8>,
}

fn frames(dp: &mut Datapath, ext0: Option<u32>) -> Result<Frames> {
    let client = sa([10, 244, 1, 2], 40000);
    let syn = Frame::tcp_syn(client, VIP).build();
    let established = data_segment(client, VIP, 0x61);
    dp.test_run(programs::TC_POD_INGRESS, &syn, 1)?;
    dp.test_run(programs::TC_POD_INGRESS, &established, 1)?;
    let chosen = proxy_tests::packet::dst_of(
        &dp.test_run(programs::TC_POD_INGRESS, &established, 1)?
            .frame,
    );
    let reply = data_segment(chosen, client, 0x62);

    let x_client = sa(fixture::CLIENT, 40000);
    let x_syn = Frame::tcp_syn(x_client, NP).build();
    let x_ack = data_segment(x_client, NP, 0x61);
    let x_query = Frame::udp(x_client, NP_UDP, &[0x63; 64]).build();
    dp.test_run_on(programs::XDP_EXT, &x_syn, 1, ext0)?;
    dp.test_run_on(programs::XDP_EXT, &x_ack, 1, ext0)?;
    let out = dp.test_run_on(programs::XDP_EXT, &x_query, 1, ext0)?.frame;
    let snat = SocketAddrV4::new(
        Ipv4Addr::new(out[26], out[27], out[28], out[29]),
        u16::from_be_bytes([out[34], out[35]]),
    );
    let backend = proxy_tests::packet::dst_of(&out);
    let x_answer = Frame {
        src_mac: fixture::NODE2_MAC,
        dst_mac: proxy_tests::packet::NODE_MAC,
        ..Frame::udp(backend, snat, &[0x64; 64])
    }
    .build();
    Ok(Frames {
        syn,
        established,
        reply,
        other: Frame::tcp_syn(client, sa([10, 96, 0, 99], 80)).build(),
        syn_random: Frame::tcp_syn(client, RANDOM_VIP).build(),
        x_syn,
        x_ack,
        x_query,
        x_answer,
        x_other: Frame::tcp_syn(x_client, sa(fixture::NODE1, 22)).build(),
    })
}

/// The TC rows, then the XDP rows.
fn cases(f: &Frames, ext0: Option<u32>) -> (Vec<Case<'_>>, Vec<Case<'_>>) {
    let tc = |program, frame, mode| bench_spec(program, frame, mode, None);
    let xdp = |frame, mode| bench_spec(programs::XDP_EXT, frame, mode, ext0);
    let tc_rows = vec![
        Case {
            name: "ClusterIP, established flow",
            what: "data segment of a tracked flow: lookup, conntrack hit (same svc id), DNAT",
            spec: tc(programs::TC_POD_INGRESS, &f.established, bench_mode::SAME),
            counter: Some(Counter::Established),
            tables: Tables::AsTheyAre,
        },
        Case {
            name: "reply (reverse NAT)",
            what: "backend's segment delivered to the client: conntrack hit, SNAT",
            spec: tc(programs::TC_POD_EGRESS, &f.reply, bench_mode::SAME),
            counter: Some(Counter::ReplyNat),
            tables: Tables::AsTheyAre,
        },
        Case {
            name: "not a service",
            what: "TCP to an address that is no frontend: parse, one lookup miss",
            spec: tc(programs::TC_POD_INGRESS, &f.other, bench_mode::SAME),
            counter: None,
            tables: Tables::AsTheyAre,
        },
        Case {
            name: NEW_FLOW_MAGLEV,
            what: "SYN from a new source each run: lookup, tail call, flow hash + Maglev (M=1009) among 10, one CT_NEW insert, DNAT",
            spec: tc(programs::TC_POD_INGRESS, &f.syn, bench_mode::NEW_FLOW),
            counter: Some(Counter::NewFlow),
            tables: Tables::Room,
        },
        Case {
            name: "ClusterIP, new flow (random), table has room",
            what: "same, random backend instead of Maglev",
            spec: tc(
                programs::TC_POD_INGRESS,
                &f.syn_random,
                bench_mode::NEW_FLOW,
            ),
            counter: Some(Counter::NewFlow),
            tables: Tables::Room,
        },
        Case {
            name: "ClusterIP, new flow (Maglev), table full",
            what: "same as the first new-flow row, CT_NEW full: every insert evicts",
            spec: tc(programs::TC_POD_INGRESS, &f.syn, bench_mode::NEW_FLOW),
            counter: Some(Counter::NewFlow),
            tables: Tables::Full,
        },
    ];
    let xdp_rows = vec![
        Case {
            name: XDP_ESTABLISHED,
            what: "data segment of a tracked flow: lookup, conntrack hit, remembered route, DNAT, TTL, MACs, XDP_TX",
            spec: xdp(&f.x_ack, bench_mode::SAME),
            counter: Some(Counter::Forwarded),
            tables: Tables::AsTheyAre,
        },
        Case {
            name: "NodePort → remote backend, established (SNAT, UDP)",
            what: "datagram of a tracked flow: as above plus the source rewrite",
            spec: xdp(&f.x_query, bench_mode::SAME),
            counter: Some(Counter::Forwarded),
            tables: Tables::AsTheyAre,
        },
        Case {
            name: "SNAT reply → client",
            what: "backend's datagram to the SNAT address: conntrack hit, both sides rewritten, FIB lookup, XDP_TX",
            spec: xdp(&f.x_answer, bench_mode::SAME),
            counter: Some(Counter::SnatReply),
            tables: Tables::AsTheyAre,
        },
        Case {
            name: "not a service (XDP)",
            what: "TCP to the node's own port: parse, lookup miss, SNAT port-range check",
            spec: xdp(&f.x_other, bench_mode::SAME),
            counter: None,
            tables: Tables::AsTheyAre,
        },
        Case {
            name: XDP_NEW_DSR,
            what: "SYN from a new source each run: lookup, tail call, Maglev, remembered route, one CT_NEW insert, DNAT, DSR option (head grown by 8), XDP_TX",
            spec: xdp(&f.x_syn, bench_mode::NEW_FLOW),
            counter: Some(Counter::Forwarded),
            tables: Tables::Room,
        },
        Case {
            name: "NodePort → remote backend, new flow (DSR), table full",
            what: "same, CT_NEW full: every insert evicts",
            spec: xdp(&f.x_syn, bench_mode::NEW_FLOW),
            counter: Some(Counter::Forwarded),
            tables: Tables::Full,
        },
    ];
    (tc_rows, xdp_rows)
}

/// Counter values now.
fn counters(dp: &Datapath) -> Result<BTreeMap<Counter, u64>> {
    Ok(dp.counters()?.into_iter().collect())
}

/// Prepares the tables for a round of `case` (filling runs the case's own
/// program with new flows, so the fill is what it inserts).
fn prepare(dp: &mut Datapath, case: &Case<'_>) -> Result<()> {
    match case.tables {
        Tables::AsTheyAre => {}
        Tables::Room => {
            dp.clear_ct(proxy_common::maps::CT_NEW)?;
        }
        Tables::Full => {
            dp.clear_ct(proxy_common::maps::CT_NEW)?;
            let (_, capacity) = dp.ct_fill(proxy_common::maps::CT_NEW)?;
            dp.bench(&BenchSpec {
                repeat: capacity + capacity / 4,
                ..case.spec.clone()
            })?;
        }
    }
    Ok(())
}

/// The floor of `spec`: the wrapper and the empty program in the same mode.
fn floor_of<'a>(spec: &BenchSpec<'a>) -> BenchSpec<'a> {
    let empty = if spec.program == programs::XDP_EXT {
        BENCH_EMPTY_XDP
    } else {
        BENCH_EMPTY
    };
    BenchSpec {
        program: empty,
        ..spec.clone()
    }
}

/// Measures `cases` for `ROUNDS` rounds on this load, adding to `rows`.
fn measure(dp: &mut Datapath, cases: &[Case<'_>], rows: &mut Vec<Row>) -> Result<()> {
    if rows.is_empty() {
        rows.extend(cases.iter().map(|c| Row {
            name: c.name,
            what: c.what,
            counter: c.counter,
            over: Vec::new(),
            floor: Vec::new(),
            fill: None,
        }));
    }
    for round in 0..ROUNDS {
        for k in 0..cases.len() {
            let i = (k + round) % cases.len();
            let case = &cases[i];
            prepare(dp, case)?;
            let before_fill = match case.tables {
                Tables::AsTheyAre => None,
                _ => Some(dp.ct_fill(proxy_common::maps::CT_NEW)?.0),
            };
            let floor = dp.bench(&floor_of(&case.spec))?.duration_ns as f64;
            let before = counters(dp)?;
            let ns = dp.bench(&case.spec)?.duration_ns as f64;
            let after = counters(dp)?;
            check_counter(case, &before, &after)?;
            let row = &mut rows[i];
            row.over.push((ns - floor).max(0.0));
            row.floor.push(floor);
            if let Some(b) = before_fill
                && row.fill.is_none()
            {
                let (entries, capacity) = dp.ct_fill(proxy_common::maps::CT_NEW)?;
                row.fill = Some((proxy_common::maps::CT_NEW, b, entries, capacity));
            }
        }
    }
    Ok(())
}

/// Checks that the case's path counter moved once per run (and nothing
/// else did, for rows without one).
fn check_counter(
    case: &Case<'_>,
    before: &BTreeMap<Counter, u64>,
    after: &BTreeMap<Counter, u64>,
) -> Result<()> {
    let moved: BTreeMap<Counter, u64> = after
        .iter()
        .filter_map(|(c, v)| {
            let d = v - before.get(c).copied().unwrap_or(0);
            (d > 0).then_some((*c, d))
        })
        .collect();
    let runs = u64::from(case.spec.repeat);
    match case.counter {
        Some(c) if moved.get(&c) != Some(&runs) => bail!(
            "{}: expected {c:?} to move {runs} times, counters moved {moved:?}",
            case.name
        ),
        None if !moved.is_empty() => bail!("{}: no counter should move, got {moved:?}", case.name),
        _ => Ok(()),
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
    for _ in 0..5 {
        s.push(dp.test_run_on(program, frame, REPEAT, ifindex)?.duration_ns as f64);
    }
    Ok(Summary::of(&s).median)
}

/// Every row with `total` Services programmed, over `LOADS` loads (run
/// inside the fixture namespace).
fn datapath_at(total: u32) -> Result<Scale> {
    let ext0 = Some(fixture::ifindex("ext0")?);
    let (mut rows, mut xdp_rows) = (Vec::new(), Vec::new());
    let mut services = 0;
    let mut empty = (0.0, 0.0);
    for _ in 0..LOADS {
        let (mut dp, n) = load(total)?;
        services = n;
        let f = frames(&mut dp, ext0)?;
        empty = (
            alone(&mut dp, BENCH_EMPTY, &f.syn, None)?,
            alone(&mut dp, BENCH_EMPTY_XDP, &f.x_syn, ext0)?,
        );
        let (tc, xdp) = cases(&f, ext0);
        measure(&mut dp, &tc, &mut rows)?;
        measure(&mut dp, &xdp, &mut xdp_rows)?;
    }
    Ok(Scale {
        services,
        empty,
        rows,
        xdp_rows,
    })
}

/// Every row at each of `totals` Services in the maps (the measured ones
/// alone, then filled up to the total; run inside the fixture namespace).
pub fn scales(totals: &[u32]) -> Result<Vec<Scale>> {
    let mut scales = Vec::new();
    for &total in totals {
        let started = Instant::now();
        scales.push(datapath_at(total)?);
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
        "Method: BPF_PROG_TEST_RUN, kernel-measured ns per run. A wrapper program restores the frame before \
         each run (and gives it a new source for new flows) and tail-calls the program under test; right \
         before each measurement the wrapper runs the empty program in the same mode (the floor), and the \
         row is its difference. {LOADS} loads of the datapath × {ROUNDS} rounds, every row once per round \
         in an order that rotates: {} samples per row, summarised as the median, a 95% confidence interval \
         of the median (distribution-free: order statistics) and the whole range. A goal is met only when its \
         interval clears it. Rows that repeat one flow run {} times per round; new-flow rows {} times, from \
         empty tables (\"table has room\"), or after filling `CT_NEW` past its capacity (\"table full\": every \
         insert evicts); the fill column says what the table held. Each row's path counter is checked to have \
         moved once per run. One service with 10 backends (Maglev, M = 1009, unless the row says random). Hot \
         cache, one CPU.\n",
        LOADS * ROUNDS,
        thousands(REPEAT),
        thousands(NEW_REPEAT),
    )?;
    writeln!(md, "## Datapath cost per packet\n")?;
    writeln!(
        md,
        "Only the {} measured Services in the maps, default map sizes.\n",
        first.services
    )?;
    table(md, "`return TCX_NEXT`", first.empty.0, &first.rows)?;
    writeln!(md, "\n## North-south: NodePort through XDP\n")?;
    writeln!(
        md,
        "`xdp_ext` as it runs on an external interface (FIB lookups against a test namespace with \
         node2 and the client as permanent neighbours). A NodePort with 10 backends on node2 (Maglev, \
         M = 1009): TCP by DSR, UDP by SNAT (`--nodeport-mode hybrid`). The XDP wrapper restores the \
         frame (shrinking the head back after a DSR option) and tail-calls `xdp_ext`; its floor is \
         the wrapper → `xdp_pass`.\n"
    )?;
    table(md, "`return XDP_PASS`", first.empty.1, &first.xdp_rows)?;
    scaling_table(md, scales)?;
    let paths = row_metrics(first);
    report.plot(plot::Plot {
        file: "datapath-scaling.svg".into(),
        title: "ns per packet over the floor, by Services in the maps".into(),
        svg: plot::grouped_bars(
            "ns per packet over the floor (median), by Services in the maps (BPF_PROG_TEST_RUN)",
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

/// A per-packet row's median ns over its floor, read from any scale.
pub type OverFloor = Box<dyn Fn(&Scale) -> f64>;

/// Every per-packet row, TC then XDP, named and read from any scale.
pub fn row_metrics(first: &Scale) -> Vec<(String, OverFloor)> {
    let tc = first.rows.iter().enumerate().map(|(i, r)| {
        let f: OverFloor = Box::new(move |s: &Scale| s.rows[i].summary().median);
        (r.name.to_owned(), f)
    });
    let xdp = first.xdp_rows.iter().enumerate().map(|(i, r)| {
        let f: OverFloor = Box::new(move |s: &Scale| s.xdp_rows[i].summary().median);
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
        .replace(", table has room", "")
        .replace(", table full", " (full)")
}

/// ns over floor of every row at every scale, and how flat it stays.
fn scaling_table(md: &mut String, scales: &[Scale]) -> Result<()> {
    writeln!(md, "\n## Cost as Services grow\n")?;
    writeln!(
        md,
        "The same rows with the maps filled: the measured Services plus ClusterIP Services with 10 \
         distinct backends each (random algorithm, so 100k of them fit the default selection map; \
         the measured Services keep Maglev), every map sized to hold them. Median ns over the floor; \
         the last column is the largest median over the smallest.\n"
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
        "floor (TC wrapper → empty, same frame), ns/run",
        scales
            .iter()
            .map(|s| Summary::of(&s.rows[0].floor).median)
            .collect(),
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
        repeat: if mode == bench_mode::NEW_FLOW {
            NEW_REPEAT
        } else {
            REPEAT
        },
        ifindex,
    }
}

/// The per-packet table: the empty program, then the rows with their floors.
fn table(md: &mut String, empty_what: &str, empty_alone: f64, rows: &[Row]) -> Result<()> {
    writeln!(
        md,
        "| path | ns over floor: median (95% CI) | range | floor, ns/run | table fill | what runs |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---|---|")?;
    writeln!(
        md,
        "| empty program alone (no wrapper) | | | {empty_alone:.1} | | {empty_what} |"
    )?;
    for r in rows {
        let s = r.summary();
        let fill = r
            .fill
            .map(|(table, before, after, capacity)| {
                format!(
                    "`{table}` {} → {} of {} ({:.0}%)",
                    thousands(u32::try_from(before).unwrap_or(u32::MAX)),
                    thousands(u32::try_from(after).unwrap_or(u32::MAX)),
                    thousands(capacity),
                    100.0 * after as f64 / f64::from(capacity.max(1))
                )
            })
            .unwrap_or_default();
        writeln!(
            md,
            "| {} | {} | {} | {:.1} | {} | {}{} |",
            r.name,
            s.show(0),
            s.range(0),
            Summary::of(&r.floor).median,
            fill,
            r.what,
            r.counter
                .map(|c| format!(" (counter `{}`)", c.name()))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}
