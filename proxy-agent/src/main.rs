//! The `proxy-agent` binary: parses the command line (see `cli/`) and runs it.

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // kube-client logs every failed request at ERROR; the agent reports API
    // outages itself (rate-limited, with what it does about them).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_client::client::builder=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    init_logging();
    match cli::Cli::parse().run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
