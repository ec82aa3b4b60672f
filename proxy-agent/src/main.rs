//! The `proxy-agent` command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use proxy_agent::{
    agent::{self, RunConfig},
    datapath::{LoadOptions, MapSizes},
    manifests,
    model::DesiredState,
    translate::{self, TranslateOptions},
};
use proxy_common::maps;

#[derive(Parser)]
#[command(
    name = "proxy-agent",
    version,
    about = "eBPF Kubernetes Service proxy (kube-proxy replacement)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Program the datapath from Service/EndpointSlice manifests and keep it in sync.
    Run(RunArgs),
    /// Print the desired state for a manifest directory without touching the kernel.
    Plan(PlanArgs),
}

#[derive(clap::Args)]
struct NodeArgs {
    /// Directory of Service and EndpointSlice manifests (*.yaml, *.yml, *.json).
    #[arg(long, value_name = "DIR")]
    manifests: PathBuf,
    /// This node's name [default: $NODE_NAME, else the hostname].
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Pod-facing interface(s) to attach to; globs such as 'veth*' allowed, repeatable.
    /// Matching interfaces that appear later are picked up.
    #[arg(long = "pod-iface", value_name = "IFACE")]
    pod_ifaces: Vec<String>,
    /// External interface(s) for north-south traffic (NodePort/LoadBalancer), repeatable.
    #[arg(long = "ext-iface", value_name = "IFACE")]
    ext_ifaces: Vec<String>,
    /// Pin root on bpffs; maps and links live in <DIR>/v<layout>/. A bpffs is mounted here if none is.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/proxy-agent")]
    bpffs: PathBuf,
    /// Capacity of the frontend map (service address:port:protocol entries).
    #[arg(long, default_value_t = maps::DEFAULT_MAX_FRONTENDS)]
    max_frontends: u32,
    /// Capacity for service ports (selection tables and per-service counters).
    #[arg(long, default_value_t = maps::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Capacity for distinct backends (endpoint address:port pairs).
    #[arg(long, default_value_t = maps::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Connection-tracking entries (two per flow); the table evicts least recently used flows.
    #[arg(long, default_value_t = maps::DEFAULT_CT_ENTRIES)]
    ct_entries: u32,
    /// Seconds between full resyncs (in addition to event-driven ones).
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Args)]
struct PlanArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
}

fn node_name(arg: Option<String>) -> String {
    arg.or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_default()
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn print_plan(desired: &DesiredState, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(desired)?),
        Output::Table => {
            println!(
                "{:<40} {:<8} {:<24} BACKENDS",
                "SERVICE", "PROTOCOL", "FRONTENDS"
            );
            for s in &desired.services {
                let mut name = format!("{}/{}", s.id.namespace, s.id.name);
                if !s.id.port_name.is_empty() {
                    name = format!("{name}:{}", s.id.port_name);
                }
                let frontends: Vec<String> = s
                    .frontends
                    .iter()
                    .map(|f| format!("{}:{}", f.address, f.port))
                    .collect();
                let backends: Vec<String> = s
                    .internal_backends
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                println!(
                    "{:<40} {:<8} {:<24} {}",
                    name,
                    s.id.protocol,
                    frontends.join(","),
                    if backends.is_empty() {
                        "<none: rejected>".to_owned()
                    } else {
                        backends.join(",")
                    }
                );
            }
        }
    }
    Ok(())
}

fn plan(args: PlanArgs) -> anyhow::Result<()> {
    let (store, mut errors) = manifests::load_dir(&args.node.manifests)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", args.node.manifests.display()))?;
    let t = translate::translate(
        &store,
        &TranslateOptions {
            node_name: node_name(args.node.node_name),
        },
    );
    errors.extend(t.errors);
    for e in &errors {
        tracing::warn!("{e}");
    }
    print_plan(&t.desired, args.output)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = RunConfig {
        manifests: args.node.manifests,
        node_name: node_name(args.node.node_name),
        pod_ifaces: args.pod_ifaces,
        ext_ifaces: args.ext_ifaces,
        load: LoadOptions {
            sizes: MapSizes {
                frontends: args.max_frontends,
                services: args.max_services,
                backends: args.max_backends,
                conntrack: args.ct_entries,
            },
            pin_root: Some(args.bpffs),
        },
        resync: Duration::from_secs(args.resync_seconds.max(1)),
    };
    tracing::info!(node = %cfg.node_name, manifests = %cfg.manifests.display(), "starting");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(agent::run(cfg))
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Plan(args) => plan(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
