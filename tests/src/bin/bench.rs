//! `cargo xtask bench`: datapath cost through BPF_PROG_TEST_RUN, every path
//! side by side with the floors, written to BENCHMARKS.md.
#![expect(clippy::print_stderr, reason = "the runner reports failures on stderr")]

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use proxy_agent::{
    datapath::{BENCH_EMPTY, BenchSpec, Datapath, LoadOptions, MapSizes},
    model::Protocol,
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
    let mut dp = Datapath::load(&LoadOptions {
        sizes: MapSizes::default(),
        pin_root: None,
    })?;
    dp.load_bench_programs()?;

    let vip = sa([10, 96, 0, 10], 80);
    let backends: Vec<_> = (1..=10u8).map(|i| sa([10, 244, 2, i], 8080)).collect();
    fixture::program(
        &mut dp,
        vec![fixture::service("bench", vip, Protocol::Tcp, &backends)],
    )?;

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

    let spec = |program, frame, mode| BenchSpec {
        program,
        frame,
        mode,
        vary_off: VARY_PORT_OFF,
        vary_addr_off: VARY_ADDR_OFF,
        repeat: REPEAT,
    };
    let empty_alone = {
        let mut s = Vec::new();
        for _ in 0..ROUNDS {
            s.push(dp.test_run(BENCH_EMPTY, &syn, REPEAT)?.duration_ns as f64);
        }
        s.sort_by(f64::total_cmp);
        s[ROUNDS / 2]
    };
    let (floor, _) = measure(&mut dp, &spec(BENCH_EMPTY, &syn, bench_mode::SAME))?;
    let cases = [
        (
            "ClusterIP, established flow",
            "data segment of a tracked flow: lookup, conntrack hit, backend check, DNAT",
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
            "ClusterIP, new flow",
            "SYN from a new source each run: lookup, selection among 10, two conntrack inserts, DNAT",
            spec(programs::TC_POD_INGRESS, &syn, bench_mode::NEW_FLOW),
            Some(Counter::NewFlow),
        ),
    ];
    let mut rows = Vec::new();
    for (name, what, spec, expected) in cases {
        let (ns, moved) = measure(&mut dp, &spec)?;
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
         One service with 10 backends, random selection, default map sizes. Hot cache, one CPU.\n"
    )?;
    writeln!(md, "## Datapath cost per packet\n")?;
    writeln!(
        md,
        "| path | ns/run | ns over floor | × empty program | what runs |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---|")?;
    writeln!(
        md,
        "| empty program alone | {empty_alone:.1} | | 1.0 | `return TCX_NEXT` |"
    )?;
    writeln!(
        md,
        "| floor: wrapper → empty program | {floor:.1} | 0.0 | {:.1} | frame restore + tail call |",
        floor / empty_alone
    )?;
    for r in &rows {
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
    Ok(md)
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
