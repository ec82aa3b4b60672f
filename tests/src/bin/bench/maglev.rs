//! Maglev tables: build time, memory against Cilium's and Katran's,
//! disruption.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use anyhow::Result;
use proxy_agent::maglev;

use crate::median;

fn addresses(n: u32) -> Vec<(SocketAddrV4, u32)> {
    (0..n)
        .map(|i| (SocketAddrV4::new(Ipv4Addr::from(0x0af4_0000 + i), 8080), 1))
        .collect()
}

/// Userspace Maglev numbers: build time, memory, disruption.
pub fn section(md: &mut String) -> Result<()> {
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
