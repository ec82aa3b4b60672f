//! Programming 1k and 10k Services × 10 endpoints: the agent against
//! kube-proxy's rule sets loaded with iptables-restore (both backends) and
//! nft -f.

use std::{fmt::Write as _, time::Instant};

use anyhow::{Context as _, Result, bail};

use proxy_agent::{
    datapath::{Datapath, LoadOptions, MapSizes},
    model::Protocol,
};
use proxy_tests::fixture;

use crate::{Report, e2e, median, plot, rules, seconds, thousands};

/// Runs `program args` with `input` on stdin inside `ns`; returns seconds.
pub fn timed_restore(
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
pub struct Programming {
    pub services: u32,
    pub ours: f64,
    pub iptables: f64,
    pub iptables_legacy: f64,
    pub nft: f64,
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
pub fn section(report: &mut Report) -> Result<Vec<Programming>> {
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
