//! The goals table that opens BENCHMARKS.md: each goal against what this
//! run measured.

use std::fmt::Write as _;

use anyhow::Result;

use crate::{
    control_plane::CpRun,
    datapath::{self, Scale, row_metrics},
    e2e,
    programming::Programming,
    seconds, thousands,
};

/// The goals, each against what this run measured.
pub fn section(
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
    // Socket LB against the floor round by round (round i of every mode ran
    // back to back): met only if every round clears it, not the median.
    let mut lowest: Option<(f64, String)> = None;
    for n in &sizes {
        let (Some(o), Some(f)) = (find(*n, Mode::OursSocket), find(*n, Mode::PodIp)) else {
            continue;
        };
        for (what, mine, floor) in [
            ("new connections", &o.short_rounds, &f.short_rounds),
            ("keep-alive", &o.keep_alive_rounds, &f.keep_alive_rounds),
        ] {
            for (i, (x, y)) in mine.iter().zip(floor).enumerate() {
                let r = x / y;
                if lowest.as_ref().is_none_or(|(w, _)| r < *w) {
                    lowest = Some((
                        r,
                        format!("{what} at {} Services, round {}", thousands(*n), i + 1),
                    ));
                }
            }
        }
    }
    if let Some((r, at)) = lowest {
        rows.push((
            "Socket LB at the floor: every round at least 0.97 of the pod-IP round run with it"
                .into(),
            format!("lowest {r:.3} ({at})"),
            verdict(r >= 0.97),
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
    // Per packet: the whole 95% interval of the median must clear the goal.
    if let Some(first) = scales.first() {
        for (row, goal, what) in [
            (
                datapath::XDP_ESTABLISHED,
                110.0,
                "XDP established flow (DSR) at most 110 ns over the floor (Katran: 117)",
            ),
            (
                datapath::NEW_FLOW_MAGLEV,
                600.0,
                "TC ClusterIP new flow, table has room, at most 600 ns over the floor (Katran: 643)",
            ),
            (
                datapath::XDP_NEW_DSR,
                500.0,
                "XDP new DSR flow, table has room, at most 500 ns over the floor (Katran: 643)",
            ),
        ] {
            if let Some(r) = first.row(row) {
                let s = r.summary();
                rows.push((
                    what.into(),
                    format!(
                        "median {:.0} ns, 95% CI {:.0}–{:.0} ns ({} rounds)",
                        s.median, s.lo, s.hi, s.n
                    ),
                    verdict(s.at_most(goal)),
                ));
            }
        }
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
