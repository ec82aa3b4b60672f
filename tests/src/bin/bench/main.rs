//! `cargo xtask bench`: every benchmark side by side on this machine, one
//! module per section, written to BENCHMARKS.md with plots.
#![expect(clippy::print_stderr, reason = "the runner reports failures on stderr")]

mod control_plane;
mod datapath;
mod e2e;
mod goals;
mod maglev;
mod plot;
mod programming;
mod rules;
mod sockets;
mod stats;

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{Context as _, Result};
use clap::{Parser, ValueEnum};
use proxy_tests::fixture;

/// A part of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    Datapath,
    Maglev,
    Programming,
    ControlPlane,
    E2e,
}

/// Every benchmark, side by side, into BENCHMARKS.md.
#[derive(Parser)]
#[command(name = "bench")]
struct Args {
    /// Write the report here (and its plots beside it, in docs/benchmarks/).
    /// A run of only some parts (--only) prints its part and writes nothing.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Run only these parts (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// Services in the maps for the per-packet rows (the first size is also
    /// the per-packet tables).
    #[arg(long, value_delimiter = ',', default_value = "0,1000,10000,100000")]
    datapath_scales: Vec<u32>,
    /// Services (× 10 endpoints) of the control-plane runs.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    cp_sizes: Vec<usize>,
    /// Services of the end-to-end runs.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    e2e_sizes: Vec<u32>,
    /// Print kube-proxy's rule set (iptables or nft) for N Services with 10
    /// endpoints each, as compared against, and exit.
    #[arg(long, value_names = ["iptables|nft", "N"], num_args = 2)]
    dump_rules: Option<Vec<String>>,
    /// Say more about what the control-plane runs see.
    #[arg(long)]
    debug: bool,
    /// Internal: be one end-to-end client round against these targets, in
    /// the namespace and cgroup this process was started in, and print
    /// "requests/s errors".
    #[arg(long, hide = true, value_delimiter = ',')]
    client: Vec<std::net::SocketAddrV4>,
    /// Internal, with --client: keep-alive connections.
    #[arg(long, hide = true)]
    keep_alive: bool,
}

/// `--debug`.
static DEBUG: AtomicBool = AtomicBool::new(false);

/// Whether `--debug` was given.
fn debug() -> bool {
    DEBUG.load(Ordering::Relaxed)
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

/// Median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
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

/// 0.125 → "125 ms", 12.5 → "12.5 s".
fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
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

fn run(args: &Args) -> Result<Report> {
    proxy_tests::netns::require_root()?;
    let started = Instant::now();
    let want = |part: Part| args.only.is_empty() || args.only.contains(&part);
    let mut body = Report::default();
    let mut scales = Vec::new();
    if want(Part::Datapath) {
        // The XDP rows look up routes: the whole datapath section runs in a
        // namespace of its own (node1 of the fixtures).
        let ns = fixture::fixture_net()?;
        let totals = args.datapath_scales.clone();
        scales = ns.run(move || datapath::scales(&totals))?;
        datapath::section(&mut body, &scales)?;
        let sock = sockets::measure()?;
        sockets::section(
            &mut body.md,
            &sock,
            scales
                .first()
                .and_then(datapath::Scale::new_flow_over_floor),
        )?;
    }
    if want(Part::Maglev) {
        maglev::section(&mut body.md)?;
    }
    let programming = if want(Part::Programming) {
        programming::section(&mut body)?
    } else {
        Vec::new()
    };
    let control_plane = if want(Part::ControlPlane) {
        control_plane::section(&mut body.md, &args.cp_sizes)?
    } else {
        Vec::new()
    };
    let e2e = if want(Part::E2e) {
        e2e::section(&mut body, &args.e2e_sizes)?
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
    goals::section(&mut report.md, &scales, &programming, &control_plane, &e2e)?;
    report.md.push_str(&body.md);
    report.plots = body.plots;
    Ok(report)
}

/// Writes the report to `path` and its plots beside it.
fn write(report: &Report, path: &std::path::Path) -> Result<()> {
    std::fs::write(path, &report.md).with_context(|| format!("writing {}", path.display()))?;
    let dir = path
        .parent()
        .map_or_else(|| PathBuf::from(PLOTS_DIR), |p| p.join(PLOTS_DIR));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for p in &report.plots {
        let file = dir.join(&p.file);
        std::fs::write(&file, &p.svg).with_context(|| format!("writing {}", file.display()))?;
    }
    println!(
        "\nwritten to {} and {} plots in {}",
        path.display(),
        report.plots.len(),
        dir.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    DEBUG.store(args.debug, Ordering::Relaxed);
    if !args.client.is_empty() {
        return match e2e::client_round(&args.client, args.keep_alive) {
            Ok(rate) => {
                println!("{} {}", rate.per_sec, rate.errors);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bench client: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some([kind, n]) = args.dump_rules.as_deref() {
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
    proxy_tests::netns::cleanup_on_interrupt("the bench");
    // A partial run prints its part; BENCHMARKS.md keeps the whole report.
    let out = args.out.clone().filter(|p| {
        let partial = !args.only.is_empty();
        if partial {
            eprintln!("--only is given: {} left as it is", p.display());
        }
        !partial
    });
    match run(&args).and_then(|report| {
        print!("{}", report.md);
        out.map_or(Ok(()), |path| write(&report, &path))
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
