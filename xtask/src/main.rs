//! `cargo xtask <command>`: everything needed to go from a fresh clone to a
//! running demo or a full test run.
#![expect(
    clippy::print_stderr,
    reason = "xtask reports its own failures on stderr"
)]

mod build;
mod setup;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "proxy project automation", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build and tests need (apt packages, bpf-linker), idempotently.
    Setup,
    /// Build the eBPF object (target/ebpf/bpfel-unknown-none/release/proxy-ebpf).
    BuildEbpf,
    /// Build the eBPF object, then the userspace crates.
    Build {
        /// Build userspace in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, lint and run every test (unit, BPF_PROG_TEST_RUN, network namespaces).
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Set up, build, and show a ClusterIP Service balancing traffic in network namespaces.
    Demo,
    /// `cargo fmt --check` and `cargo clippy -D warnings` on every crate.
    Lint,
    /// Differential fuzzing: generated and mutated frames through the
    /// east-west programs and the reference model; every verdict and byte
    /// must agree.
    Fuzz {
        /// Frames to generate.
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// Seed of the generator (the same seed gives the same frames).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Run every benchmark side by side and write BENCHMARKS.md.
    Bench {
        /// Arguments for the bench itself, after `--` (`-- --help` lists
        /// them; `-- --only datapath` runs one part and writes nothing).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::BuildEbpf => build::ebpf(),
        Command::Build { release } => build::all(release),
        Command::Test {
            no_lint,
            cargo_args,
        } => build::test(!no_lint, &cargo_args),
        Command::Demo => build::demo(),
        Command::Lint => build::lint(),
        Command::Bench { args } => build::bench(&args),
        Command::Fuzz { packets, seed } => build::fuzz(packets, seed),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
