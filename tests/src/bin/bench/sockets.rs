//! The socket hooks per connection: a fresh TCP socket's non-blocking
//! `connect()` to a ClusterIP the hooks translate, to an address that is
//! no frontend, and without the hooks, by a process in a cgroup the bench
//! creates (the hooks attach there, never to the machine's root cgroup).

use std::{fmt::Write as _, net::SocketAddrV4};

use anyhow::{Context as _, Result, bail};
use proxy_agent::{
    datapath::{enable_run_stats, program_run_stats},
    model::Protocol,
};
use proxy_common::{Counter, maps::programs};
use proxy_tests::{
    fixture::{self, sa},
    netns::{Netns, TestCgroup, unique_prefix},
};

use crate::median;

/// Connections per round.
const CONNECTS: u64 = 100_000;
/// Measured rounds per row (the median is reported).
const ROUNDS: usize = 5;

/// One way a `connect()` goes.
pub struct SockRow {
    pub name: &'static str,
    pub what: &'static str,
    /// Wall time per call in the calling process, median over the rounds.
    pub wall_ns: f64,
    /// The lowest and highest round.
    pub range: (f64, f64),
    /// `sock_connect4`'s and `sock_release`'s own run time per call (the
    /// kernel's run-time statistics, one more round with them on); `None`
    /// without the hooks.
    pub hook_ns: Option<(f64, f64)>,
}

/// Every row: a ClusterIP with 10 backends (Maglev) on loopback addresses
/// where nothing listens (each connection is refused at once, in the
/// namespace), and the same connect to 127.0.0.1 without translation.
pub fn measure() -> Result<Vec<SockRow>> {
    let prefix = unique_prefix();
    let ns = Netns::new(&format!("{prefix}-sock"))?;
    let cgroup = TestCgroup::new(&prefix)?;
    let mut dp = fixture::load()?;
    let vip = sa([10, 96, 0, 10], 80);
    let backends: Vec<_> = (2..=11u8).map(|i| sa([127, 0, 0, i], 9)).collect();
    fixture::program(
        &mut dp,
        vec![fixture::service(
            "bench-sock",
            vip,
            Protocol::Tcp,
            &backends,
        )],
    )?;
    dp.attach_cgroup(&cgroup.path)?;
    let probe = proxy_tests::cluster::binary("sockprobe")?;
    let probe_s = probe.to_string_lossy().into_owned();
    let connects = CONNECTS.to_string();
    let run = |hooked: bool, target: SocketAddrV4| -> Result<f64> {
        let target = target.to_string();
        let args = ["connect-loop", target.as_str(), connects.as_str()];
        let out = if hooked {
            cgroup.exec(&ns, &probe, &args)?
        } else {
            ns.exec(&probe_s, &args)?
        };
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).with_context(|| format!("sockprobe said {out:?}"))?;
        if v["errors"].as_u64() != Some(0) {
            bail!("connect() to {target} failed: {v}");
        }
        v["ns_per_connect"]
            .as_f64()
            .with_context(|| format!("sockprobe said {v}"))
    };
    let other = sa([127, 0, 0, 1], 9);
    let cases = [
        (
            "connect() to a ClusterIP",
            "connect4: lookup, flow hash + Maglev (M=1009) among 10, `SOCK_PEER` insert, address rewritten; release: `SOCK_PEER` delete",
            true,
            vip,
            Some(Counter::SockTranslated),
        ),
        (
            "connect() to an address that is no frontend",
            "connect4: one lookup miss; release: one delete miss",
            true,
            other,
            None,
        ),
        (
            "connect() without the hooks (floor)",
            "the same process outside the hooks' cgroup",
            false,
            other,
            None,
        ),
    ];
    let mut rows = Vec::new();
    for (name, what, hooked, target, counter) in cases {
        let before = counter.map(|c| counter_of(&dp, c)).transpose()?;
        let mut walls = Vec::new();
        for _ in 0..ROUNDS {
            walls.push(run(hooked, target)?);
        }
        if let (Some(c), Some(before)) = (counter, before) {
            let moved = counter_of(&dp, c)? - before;
            if moved != ROUNDS as u64 * CONNECTS {
                bail!(
                    "{name}: counter {} moved {moved}, not once per call",
                    c.name()
                );
            }
        }
        let range = (
            walls.iter().copied().fold(f64::MAX, f64::min),
            walls.iter().copied().fold(0.0, f64::max),
        );
        let wall_ns = median(&mut walls);
        // One more round with the kernel's run-time statistics on (they add
        // two clock reads per run, so the measured rounds go without).
        let hooks = [programs::SOCK_CONNECT4, programs::SOCK_RELEASE];
        let stats = enable_run_stats()?;
        let before = hooks
            .iter()
            .map(|p| program_run_stats(p))
            .collect::<Result<Vec<_>, _>>()?;
        run(hooked, target)?;
        let mut per_run = Vec::new();
        for (p, (runs0, time0)) in hooks.iter().zip(before) {
            let (runs1, time1) = program_run_stats(p)?;
            let runs = runs1.saturating_sub(runs0);
            if hooked && runs < CONNECTS {
                bail!("{name}: {p} ran {runs} times for {CONNECTS} connections");
            }
            if !hooked && runs != 0 {
                bail!("{name}: {p} ran {runs} times outside its cgroup");
            }
            per_run.push((time1 - time0).as_nanos() as f64 / runs.max(1) as f64);
        }
        drop(stats);
        let hook_ns = hooked.then(|| (per_run[0], per_run[1]));
        eprintln!("sockets: {name}: {wall_ns:.0} ns per connection, hooks {hook_ns:?} ns");
        rows.push(SockRow {
            name,
            what,
            wall_ns,
            range,
            hook_ns,
        });
    }
    Ok(rows)
}

fn counter_of(dp: &proxy_agent::datapath::Datapath, c: Counter) -> Result<u64> {
    Ok(dp
        .counters()?
        .into_iter()
        .find(|(k, _)| *k == c)
        .map_or(0, |(_, v)| v))
}

/// The table, with the TC path's new-flow row (`tc_new_flow`: ns over its
/// floor per packet) beside it for comparison.
pub fn section(md: &mut String, rows: &[SockRow], tc_new_flow: Option<f64>) -> Result<()> {
    writeln!(md, "\n## Socket hooks: cost per connect()\n")?;
    writeln!(
        md,
        "A process in a cgroup the bench creates opens {CONNECTS} TCP sockets per round, each a \
         non-blocking `connect()` (refused at once: nothing listens) and close; wall time per \
         connection, median of {ROUNDS} rounds; the hooks' own times come from one more round with \
         the kernel's run-time statistics on (over floor also holds the cgroup hook dispatch). \
         Socket-level load balancing pays this once per connection; the TC path pays its new-flow \
         cost on the first packet and its established and reply costs on every later one.\n"
    )?;
    let floor = rows
        .iter()
        .find(|r| r.hook_ns.is_none())
        .map(|r| r.wall_ns)
        .context("no floor row")?;
    writeln!(
        md,
        "| connection | ns (wall) | range | over floor | `sock_connect4` ns/run | `sock_release` ns/run | what runs |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---|")?;
    for r in rows {
        writeln!(
            md,
            "| {} | {:.0} | {:.0}–{:.0} | {:.0} | {} | {} | {} |",
            r.name,
            r.wall_ns,
            r.range.0,
            r.range.1,
            (r.wall_ns - floor).max(0.0),
            r.hook_ns
                .map_or_else(|| "—".into(), |(c, _)| format!("{c:.0}")),
            r.hook_ns
                .map_or_else(|| "—".into(), |(_, r)| format!("{r:.0}")),
            r.what
        )?;
    }
    if let Some(tc) = tc_new_flow {
        writeln!(
            md,
            "| *for comparison: TC, ClusterIP new flow (Maglev), per packet* | | | {tc:.0} | | | from the per-packet table |"
        )?;
    }
    Ok(())
}
