//! The `proxy-agent` command line: one module per command, each with its
//! arguments and its printer; the arguments several commands share are here.

mod ct;
mod diagnose;
mod explain;
mod maglev;
mod migrate;
mod plan;
mod run;
mod service;
mod uninstall;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use proxy_agent::{
    maglev as maglev_tables,
    model::Cidr,
    translate::{MaglevOptions, TranslateOptions},
};

#[derive(Parser)]
#[command(
    name = "proxy-agent",
    version,
    about = "eBPF Kubernetes Service proxy (kube-proxy replacement)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Program the datapath from Service/EndpointSlice manifests and keep it in sync.
    Run(Box<run::RunArgs>),
    /// Print the desired state for a manifest directory without touching the kernel.
    Plan(plan::PlanArgs),
    /// Print a Maglev table: built from --backend arguments by the agent's own
    /// code, or the live table of a programmed --frontend.
    Maglev(maglev::MaglevArgs),
    /// Inspect the Services a running agent programmed (read-only, from its pinned maps).
    Service(service::ServiceCmd),
    /// Inspect connection tracking (read-only, from the pinned maps).
    Ct(ct::CtCmd),
    /// What the datapath does with a packet: the frontend it matches, the
    /// algorithm and Maglev slot, the backend, the tracked flow, the reply.
    Explain(explain::ExplainArgs),
    /// The Service troubleshooting checklist for NAMESPACE/NAME: endpoints,
    /// readiness, ports, the maps, reachability of each backend, refusals.
    Diagnose(diagnose::DiagnoseArgs),
    /// Detach every program and remove the pinned maps and links: the node
    /// stops translating Services (run after stopping the agent).
    Uninstall(uninstall::UninstallArgs),
    /// Once the agent serves this node's Services, remove kube-proxy's
    /// iptables chains (and the jumps to them) and its nftables tables.
    MigrateFromKubeProxy(migrate::MigrateArgs),
}

impl Cli {
    /// Runs the command.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run(args) => run::run(*args),
            Command::Plan(args) => plan::plan(args),
            Command::Maglev(args) => maglev::maglev(args),
            Command::Service(cmd) => service::service(cmd),
            Command::Ct(cmd) => ct::ct(cmd),
            Command::Explain(args) => explain::explain(args),
            Command::Diagnose(args) => diagnose::diagnose(args),
            Command::Uninstall(args) => uninstall::uninstall(&args.bpffs),
            Command::MigrateFromKubeProxy(args) => migrate::migrate(args),
        }
    }
}

/// Default pin root (`--bpffs`).
const PIN_ROOT: &str = "/sys/fs/bpf/proxy-agent";

#[derive(clap::Args)]
struct InspectArgs {
    /// Pin root of the agent to inspect.
    #[arg(long, value_name = "DIR", default_value = PIN_ROOT)]
    bpffs: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Splits `NAMESPACE/NAME`.
fn namespaced(name: &str) -> anyhow::Result<(&str, &str)> {
    name.split_once('/')
        .ok_or_else(|| anyhow::anyhow!("{name:?}: expected NAMESPACE/NAME"))
}

#[derive(clap::Args)]
struct NodeArgs {
    /// This node's name [default: $NODE_NAME, else the hostname].
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// NodePorts listen on the node's addresses inside these CIDRs
    /// (comma-separated, as kube-proxy's flag) [default: all of the Node's
    /// InternalIP and ExternalIP addresses].
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    nodeport_addresses: Vec<Cidr>,
    #[command(flatten)]
    maglev: MaglevSizeArgs,
}

impl NodeArgs {
    /// Translation options from these flags.
    fn translate_options(&self) -> anyhow::Result<TranslateOptions> {
        Ok(TranslateOptions {
            node_name: node_name(self.node_name.clone()),
            maglev: self.maglev.options()?,
            nodeport_cidrs: self.nodeport_addresses.clone(),
        })
    }
}

#[derive(clap::Args)]
struct MaglevSizeArgs {
    /// Maglev table size for Services without the ebpf-proxy.io/maglev-table-size
    /// annotation: a prime, or 'auto' for the smallest prime >= 100 x backends.
    #[arg(long, value_name = "PRIME|auto", default_value = "auto")]
    maglev_table_size: String,
    /// Largest Maglev table size (default or annotation); a prime.
    #[arg(long, value_name = "PRIME", default_value_t = maglev_tables::DEFAULT_MAX_TABLE_SIZE)]
    maglev_max_table_size: u32,
}

impl MaglevSizeArgs {
    fn options(&self) -> anyhow::Result<MaglevOptions> {
        let max = self.maglev_max_table_size;
        if !maglev_tables::is_prime(max) || max > maglev_tables::MAX_TABLE_SIZE {
            anyhow::bail!(
                "--maglev-max-table-size {max}: must be a prime no larger than {}",
                maglev_tables::MAX_TABLE_SIZE
            );
        }
        let default_size = match self.maglev_table_size.as_str() {
            "auto" => None,
            v => {
                let size: u32 = v.parse().map_err(|_| {
                    anyhow::anyhow!("--maglev-table-size {v:?}: not a number or 'auto'")
                })?;
                maglev_tables::validate_size(size, max, 1)
                    .map_err(|e| anyhow::anyhow!("--maglev-table-size {size}: {e}"))?;
                Some(size)
            }
        };
        Ok(MaglevOptions {
            default_size,
            max_size: max,
        })
    }
}

/// Where Services and EndpointSlices come from.
#[derive(clap::Args)]
struct SourceArgs {
    /// Read Services, EndpointSlices and Nodes from this directory of manifests
    /// (*.yaml, *.yml, *.json) instead of the Kubernetes API.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API [default: $KUBECONFIG or
    /// ~/.kube/config if present, else the in-cluster configuration].
    // No `env = "KUBECONFIG"`: an operator's exported KUBECONFIG would then
    // conflict with --manifests; kube-rs reads it anyway when this is unset.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
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
