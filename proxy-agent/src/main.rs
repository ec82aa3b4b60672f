//! The `proxy-agent` command line.

use std::{net::SocketAddrV4, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use proxy_agent::{
    agent::{self, RunConfig, Source},
    conntrack,
    datapath::{LoadOptions, MapSizes},
    inspect, maglev, manifests,
    model::{DesiredState, NodePortMode},
    reconcile,
    translate::{self, Cidr, MaglevOptions, TranslateOptions},
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
    Run(Box<RunArgs>),
    /// Print the desired state for a manifest directory without touching the kernel.
    Plan(PlanArgs),
    /// Print a Maglev table: built from --backend arguments by the agent's own
    /// code, or the live table of a programmed --frontend.
    Maglev(MaglevCmd),
    /// Inspect the Services a running agent programmed (read-only, from its pinned maps).
    Service(ServiceCmd),
    /// Inspect connection tracking (read-only, from the pinned maps).
    Ct(CtCmd),
    /// What the datapath does with a packet: the frontend it matches, the
    /// algorithm and Maglev slot, the backend, the tracked flow, the reply.
    Explain(ExplainArgs),
    /// The Service troubleshooting checklist for NAMESPACE/NAME: endpoints,
    /// readiness, ports, the maps, reachability of each backend, refusals.
    Diagnose(DiagnoseArgs),
    /// Detach every program and remove the pinned maps and links: the node
    /// stops translating Services (run after stopping the agent).
    Uninstall(UninstallArgs),
}

#[derive(clap::Args)]
struct InspectArgs {
    /// Pin root of the agent to inspect.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/proxy-agent")]
    bpffs: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
}

#[derive(clap::Args)]
struct ServiceCmd {
    #[command(subcommand)]
    action: ServiceAction,
}

#[derive(Subcommand)]
enum ServiceAction {
    /// Every programmed Service port: frontends, backends, algorithm, traffic.
    List(InspectArgs),
    /// One Service in detail: frontends, backends and their state, selection table.
    Get {
        /// NAMESPACE/NAME.
        name: String,
        #[command(flatten)]
        args: InspectArgs,
    },
}

#[derive(clap::Args)]
struct CtCmd {
    #[command(subcommand)]
    action: CtAction,
}

#[derive(Subcommand)]
enum CtAction {
    /// Conntrack entries, both directions of every flow.
    List {
        /// Only flows of this Service (NAMESPACE/NAME).
        #[arg(long, value_name = "NS/NAME")]
        service: Option<String>,
        /// Only entries with this address (or ADDR:PORT) on either side or as translation.
        #[arg(long, value_name = "ADDR[:PORT]")]
        address: Option<String>,
        /// Only this protocol.
        #[arg(long, value_name = "tcp|udp")]
        proto: Option<String>,
        #[command(flatten)]
        args: InspectArgs,
    },
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// Client address:port.
    #[arg(long, value_name = "IP:PORT")]
    src: SocketAddrV4,
    /// Destination address:port (a frontend, for something to explain).
    #[arg(long, value_name = "IP:PORT")]
    dst: SocketAddrV4,
    /// Protocol.
    #[arg(long, value_name = "tcp|udp", default_value = "tcp")]
    proto: String,
    #[command(flatten)]
    args: InspectArgs,
}

#[derive(clap::Args)]
struct DiagnoseArgs {
    /// NAMESPACE/NAME.
    name: String,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    args: InspectArgs,
}

#[derive(clap::Args)]
struct UninstallArgs {
    /// Pin root to remove.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/proxy-agent")]
    bpffs: PathBuf,
}

#[derive(clap::Args)]
struct MaglevCmd {
    /// Table size, a prime [default: the smallest prime >= 100 x backends].
    #[arg(long, value_name = "M")]
    size: Option<u32>,
    /// A backend, repeatable; weight 1 unless given, 0 drains it.
    #[arg(long = "backend", value_name = "ADDR:PORT[=WEIGHT]")]
    backends: Vec<String>,
    /// Show the live table of this programmed frontend instead.
    #[arg(long, value_name = "ADDR:PORT[/tcp|udp]", conflicts_with_all = ["backends", "size"])]
    frontend: Option<String>,
    /// Pin root of the agent whose table to show (with --frontend).
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/proxy-agent")]
    bpffs: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
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
    maglev: MaglevArgs,
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

/// Parses `FIRST-LAST`.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST"))?;
    let first: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: bad port {a:?}"))?;
    let last: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: bad port {b:?}"))?;
    if first == 0 || first > last {
        return Err(format!("{s:?}: expected 0 < FIRST <= LAST"));
    }
    Ok((first, last))
}

#[derive(clap::Args)]
struct MaglevArgs {
    /// Maglev table size for Services without the ebpf-proxy.io/maglev-table-size
    /// annotation: a prime, or 'auto' for the smallest prime >= 100 x backends.
    #[arg(long, value_name = "PRIME|auto", default_value = "auto")]
    maglev_table_size: String,
    /// Largest Maglev table size (default or annotation); a prime.
    #[arg(long, value_name = "PRIME", default_value_t = maglev::DEFAULT_MAX_TABLE_SIZE)]
    maglev_max_table_size: u32,
}

impl MaglevArgs {
    fn options(&self) -> anyhow::Result<MaglevOptions> {
        let max = self.maglev_max_table_size;
        if !maglev::is_prime(max) || max > maglev::MAX_TABLE_SIZE {
            anyhow::bail!(
                "--maglev-max-table-size {max}: must be a prime no larger than {}",
                maglev::MAX_TABLE_SIZE
            );
        }
        let default_size = match self.maglev_table_size.as_str() {
            "auto" => None,
            v => {
                let size: u32 = v.parse().map_err(|_| {
                    anyhow::anyhow!("--maglev-table-size {v:?}: not a number or 'auto'")
                })?;
                maglev::validate_size(size, max, 1)
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

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    node: NodeArgs,
    /// Pod-facing interface(s) to attach to; globs such as 'veth*' allowed, repeatable.
    /// Matching interfaces that appear later are picked up.
    #[arg(long = "pod-iface", value_name = "IFACE")]
    pod_ifaces: Vec<String>,
    /// External interface(s) for north-south traffic (NodePort, LoadBalancer,
    /// externalIPs): XDP, native where the driver supports it. Globs allowed, repeatable.
    #[arg(long = "ext-iface", value_name = "IFACE")]
    ext_ifaces: Vec<String>,
    /// How external traffic reaches a backend on another node: 'snat' (the
    /// backend sees this node's address; replies come back through it),
    /// 'dsr' (the backend sees the client; its node answers directly) or
    /// 'hybrid' (dsr for TCP, snat for UDP).
    #[arg(long, value_enum, default_value = "snat")]
    nodeport_mode: NodePortMode,
    /// Address external flows are SNATed to [default: the first IPv4 address
    /// of the first --ext-iface].
    #[arg(long, value_name = "IPV4")]
    snat_address: Option<std::net::Ipv4Addr>,
    /// Source ports for SNAT, FIRST-LAST; keep it outside the node's
    /// ephemeral range (net.ipv4.ip_local_port_range).
    #[arg(long, value_name = "FIRST-LAST", value_parser = parse_port_range, default_value = "61000-65535")]
    snat_port_range: (u16, u16),
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
    /// Capacity for loadBalancerSourceRanges CIDRs, over all Services.
    #[arg(long, default_value_t = maps::DEFAULT_SOURCE_RANGES)]
    max_source_ranges: u32,
    /// 64-byte blocks for selection tables (preallocated: 32 MiB by default, about
    /// 15,000 service ports of 10 backends at the default Maglev table size).
    #[arg(long, default_value_t = maps::DEFAULT_SELECTION_BLOCKS)]
    selection_blocks: u32,
    /// Idle timeout of established TCP flows (kube-proxy's flag).
    #[arg(long, value_name = "DURATION", value_parser = conntrack::parse_duration, default_value = "24h")]
    conntrack_tcp_timeout_established: Duration,
    /// Idle timeout of half-open TCP flows (SYN seen, handshake not complete).
    #[arg(long, value_name = "DURATION", value_parser = conntrack::parse_duration, default_value = "60s")]
    conntrack_tcp_timeout_syn: Duration,
    /// Idle timeout of TCP flows after a FIN or RST.
    #[arg(long, value_name = "DURATION", value_parser = conntrack::parse_duration, default_value = "10s")]
    conntrack_tcp_timeout_close: Duration,
    /// Idle timeout of UDP flows.
    #[arg(long, value_name = "DURATION", value_parser = conntrack::parse_duration, default_value = "60s")]
    conntrack_udp_timeout: Duration,
    /// How often idle flows are collected from the conntrack table.
    #[arg(long, value_name = "DURATION", value_parser = conntrack::parse_duration, default_value = "10s")]
    conntrack_gc_interval: Duration,
    /// Seconds between full resyncs (in addition to event-driven ones).
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Address for /healthz and /readyz, or 'off'.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,
    /// Address for Prometheus /metrics (and /healthz, /readyz), or 'off'.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Directory of Service, EndpointSlice and Node manifests (*.yaml, *.yml, *.json).
    #[arg(long, value_name = "DIR")]
    manifests: PathBuf,
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

fn print_plan(desired: &DesiredState, output: Output) -> anyhow::Result<()> {
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(desired)?);
        return Ok(());
    }
    println!(
        "{:<40} {:<8} {:<24} {:<14} BACKENDS",
        "SERVICE", "PROTOCOL", "FRONTENDS", "SELECTION"
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
            .map(|b| match s.weight(b) {
                1 => b.to_string(),
                w => format!("{b}={w}"),
            })
            .chain(s.draining_backends.iter().map(|b| format!("{b}=0")))
            .collect();
        let algorithm = s.algorithm.name();
        let selection = match s.maglev_table_size {
            Some(m) => format!("{algorithm}/{m}"),
            None => algorithm.to_owned(),
        };
        println!(
            "{:<40} {:<8} {:<24} {:<14} {}",
            name,
            s.id.protocol.to_string(),
            frontends.join(","),
            selection,
            if backends.is_empty() {
                "<none: rejected>".to_owned()
            } else {
                backends.join(",")
            }
        );
    }
    Ok(())
}

fn plan(args: PlanArgs) -> anyhow::Result<()> {
    let (store, mut errors) = manifests::load_dir(&args.manifests)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", args.manifests.display()))?;
    let t = translate::translate(&store, &args.node.translate_options()?);
    errors.extend(t.errors);
    for e in &errors {
        tracing::warn!("{e}");
    }
    print_plan(&t.desired, args.output)
}

fn parse_backend(arg: &str) -> anyhow::Result<(SocketAddrV4, u32)> {
    let (addr, weight) = match arg.split_once('=') {
        Some((a, w)) => (
            a,
            w.parse::<u32>()
                .map_err(|_| anyhow::anyhow!("--backend {arg}: weight {w:?} is not a number"))?,
        ),
        None => (arg, 1),
    };
    let addr = addr
        .parse::<SocketAddrV4>()
        .map_err(|_| anyhow::anyhow!("--backend {arg}: expected IPv4ADDR:PORT[=WEIGHT]"))?;
    Ok((addr, weight))
}

/// Parses `ADDR:PORT[/tcp|udp]` (TCP unless given).
fn parse_frontend(arg: &str) -> anyhow::Result<proxy_common::ServiceKey> {
    let (addr, proto) = match arg.rsplit_once('/') {
        Some((a, p)) => (
            a,
            match p.to_ascii_lowercase().as_str() {
                "tcp" => proxy_common::proto::TCP,
                "udp" => proxy_common::proto::UDP,
                _ => anyhow::bail!("--frontend {arg}: protocol must be tcp or udp"),
            },
        ),
        None => (arg, proxy_common::proto::TCP),
    };
    let addr: SocketAddrV4 = addr
        .parse()
        .map_err(|_| anyhow::anyhow!("--frontend {arg}: expected ADDR:PORT[/tcp|udp]"))?;
    Ok(proxy_common::ServiceKey {
        addr_be: reconcile::addr_be(*addr.ip()),
        port_be: reconcile::port_be(addr.port()),
        proto,
        scope: proxy_common::scope::INTERNAL,
    })
}

#[derive(serde::Serialize)]
struct MaglevOut {
    size: u32,
    backends: Vec<String>,
    table: Vec<u16>,
}

fn print_maglev(out: &MaglevOut, weights: &[u32], output: Output) -> anyhow::Result<()> {
    if let Output::Json = output {
        println!("{}", serde_json::to_string(out)?);
        return Ok(());
    }
    let n = u32::try_from(out.backends.len())?;
    println!(
        "Maglev table: {} slots for {} backends; {} bytes in the datapath (2-byte entries)",
        out.size,
        n,
        maglev::table_bytes(n, 0, out.size)
    );
    let mut slots = vec![0usize; out.backends.len()];
    for e in &out.table {
        slots[usize::from(*e)] += 1;
    }
    let total_weight: u32 = weights.iter().sum();
    println!(
        "{:<4} {:<22} {:>6} {:>7} {:>8} {:>8}",
        "IDX", "BACKEND", "WEIGHT", "SLOTS", "SHARE", "IDEAL"
    );
    for (i, b) in out.backends.iter().enumerate() {
        let share = 100.0 * slots[i] as f64 / f64::from(out.size.max(1));
        let ideal = 100.0 * f64::from(weights[i]) / f64::from(total_weight.max(1));
        println!(
            "{i:<4} {b:<22} {:>6} {:>7} {share:>7.2}% {ideal:>7.2}%",
            weights[i], slots[i]
        );
    }
    let head: Vec<String> = out.table.iter().take(32).map(ToString::to_string).collect();
    println!("slots 0..{}: {}", head.len(), head.join(" "));
    Ok(())
}

fn maglev_cmd(args: MaglevCmd) -> anyhow::Result<()> {
    if let Some(frontend) = &args.frontend {
        let key = parse_frontend(frontend)?;
        let programmed = proxy_agent::datapath::read_pinned(&args.bpffs).map_err(|e| {
            anyhow::anyhow!(
                "reading the pinned maps under {}: {e}",
                args.bpffs.display()
            )
        })?;
        // A ClusterIP, else an external frontend (NodePort, LoadBalancer, externalIP).
        let external = proxy_common::ServiceKey {
            scope: proxy_common::scope::EXTERNAL,
            ..key
        };
        let svc = programmed
            .services
            .get(&key)
            .or_else(|| programmed.services.get(&external))
            .ok_or_else(|| anyhow::anyhow!("{frontend} is not a programmed frontend"))?;
        let table = programmed.tables.get(&svc.svc_id).ok_or_else(|| {
            anyhow::anyhow!("{frontend}: svc {} has no selection table", svc.svc_id)
        })?;
        if table.table_size == 0 {
            anyhow::bail!(
                "{frontend}: this service has no Maglev table (random selection or no backends)"
            );
        }
        let backends = table
            .backends
            .iter()
            .map(|id| {
                programmed
                    .backends
                    .get(id)
                    .map(|b| reconcile::backend_sockaddr(b).to_string())
                    .unwrap_or_else(|| format!("<missing backend {id}>"))
            })
            .collect();
        let out = MaglevOut {
            size: table.table_size,
            backends,
            table: table.entries.clone(),
        };
        return print_maglev(&out, &table.weights, args.output);
    }
    if args.backends.is_empty() {
        anyhow::bail!("give --backend ADDR:PORT[=WEIGHT] (repeatable) or --frontend ADDR:PORT");
    }
    let backends = args
        .backends
        .iter()
        .map(|b| parse_backend(b))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let eligible = backends.iter().filter(|(_, w)| *w > 0).count();
    let size = match args.size {
        Some(size) => {
            maglev::validate_size(size, maglev::MAX_TABLE_SIZE, eligible)
                .map_err(|e| anyhow::anyhow!("--size {size}: {e}"))?;
            size
        }
        None => maglev::default_size(eligible, maglev::DEFAULT_MAX_TABLE_SIZE),
    };
    let table = maglev::build(&backends, size).map_err(|e| anyhow::anyhow!("{e}"))?;
    let out = MaglevOut {
        size,
        backends: backends.iter().map(|(b, _)| b.to_string()).collect(),
        table,
    };
    let weights: Vec<u32> = backends.iter().map(|(_, w)| *w).collect();
    print_maglev(&out, &weights, args.output)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let opts = args.node.translate_options()?;
    let bind = |flag: &str, value: &str| -> anyhow::Result<Option<std::net::SocketAddr>> {
        match value {
            "off" | "" => Ok(None),
            a => Ok(Some(a.parse().map_err(|_| {
                anyhow::anyhow!("{flag} {a:?}: expected ADDR:PORT or 'off'")
            })?)),
        }
    };
    let healthz = bind("--healthz-bind-address", &args.healthz_bind_address)?;
    let metrics = bind("--metrics-bind-address", &args.metrics_bind_address)?;
    let source = match args.source.manifests {
        Some(dir) => Source::Manifests(dir),
        None => Source::Kubernetes {
            kubeconfig: args.source.kubeconfig,
        },
    };
    let cfg = RunConfig {
        source,
        healthz,
        metrics,
        node_name: opts.node_name,
        pod_ifaces: args.pod_ifaces,
        ext_ifaces: args.ext_ifaces,
        nodeport_cidrs: opts.nodeport_cidrs,
        nodeport_mode: args.nodeport_mode,
        snat_address: args.snat_address,
        snat_ports: args.snat_port_range,
        ct_timeouts: conntrack::Timeouts {
            tcp_syn: args.conntrack_tcp_timeout_syn,
            tcp_established: args.conntrack_tcp_timeout_established,
            tcp_close: args.conntrack_tcp_timeout_close,
            udp: args.conntrack_udp_timeout,
        },
        ct_gc_interval: args.conntrack_gc_interval,
        load: LoadOptions {
            sizes: MapSizes {
                frontends: args.max_frontends,
                services: args.max_services,
                backends: args.max_backends,
                conntrack: args.ct_entries,
                selection_blocks: args.selection_blocks,
                source_ranges: args.max_source_ranges,
            },
            pin_root: Some(args.bpffs),
        },
        maglev: opts.maglev,
        resync: Duration::from_secs(args.resync_seconds.max(1)),
    };
    tracing::info!(node = %cfg.node_name, source = ?cfg.source, "starting");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(agent::run(cfg))
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn service_cmd(cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd.action {
        ServiceAction::List(args) => {
            let rows = inspect::services(&inspect::Snapshot::read(&args.bpffs)?);
            if let Output::Json = args.output {
                return print_json(&rows);
            }
            println!(
                "{:<36} {:<10} {:<8} {:<9} {:>8} {:<24} {:>10} {:>9}  FRONTENDS",
                "NAMESPACE/NAME",
                "PORT",
                "PROTOCOL",
                "TABLE",
                "BACKENDS",
                "ALGORITHM",
                "PACKETS",
                "NEW-CONNS"
            );
            for r in rows {
                println!(
                    "{:<36} {:<10} {:<8} {:<9} {:>8} {:<24} {:>10} {:>9}  {}",
                    format!("{}/{}", r.namespace, r.name),
                    if r.port.is_empty() { "-" } else { &r.port },
                    r.protocol,
                    r.table,
                    r.backends,
                    r.algorithm,
                    r.packets,
                    r.new_connections,
                    r.frontends.join(", ")
                );
            }
            Ok(())
        }
        ServiceAction::Get { name, args } => {
            let (ns, n) = name
                .split_once('/')
                .ok_or_else(|| anyhow::anyhow!("{name:?}: expected NAMESPACE/NAME"))?;
            let detail = inspect::service(&inspect::Snapshot::read(&args.bpffs)?, ns, n);
            if detail.is_empty() {
                anyhow::bail!(
                    "{name}: no programmed Service of that name (see `proxy-agent service list`)"
                );
            }
            if let Output::Json = args.output {
                return print_json(&detail);
            }
            for d in detail {
                let s = &d.summary;
                println!(
                    "{}/{} port {:?} {} (svc id {}, {} table)",
                    s.namespace, s.name, s.port, s.protocol, s.svc_id, s.table
                );
                println!("  frontends:  {}", s.frontends.join(", "));
                println!(
                    "  selection:  {}, hash {}, Maglev size {}, affinity {}s{}",
                    s.algorithm,
                    d.hash,
                    d.maglev_table_size,
                    d.affinity_timeout_seconds,
                    if d.drop_when_empty {
                        ", drops when empty"
                    } else {
                        ""
                    }
                );
                if !d.source_ranges.is_empty() {
                    println!("  source ranges: {}", d.source_ranges.join(", "));
                }
                println!(
                    "  traffic:    {} packets, {} bytes, {} new connections, {} rejected",
                    s.packets, s.bytes, s.new_connections, s.rejected
                );
                println!(
                    "  {:<24} {:>6} {:<9} {:>6} {:>7} {:>6}",
                    "BACKEND", "ID", "STATE", "LOCAL", "WEIGHT", "SLOTS"
                );
                for b in &d.backend_list {
                    println!(
                        "  {:<24} {:>6} {:<9} {:>6} {:>7} {:>5.1}%",
                        b.address, b.backend_id, b.state, b.local, b.weight, b.slot_share_percent
                    );
                }
            }
            Ok(())
        }
    }
}

fn parse_proto(p: &str) -> anyhow::Result<u8> {
    match p.to_ascii_lowercase().as_str() {
        "tcp" => Ok(proxy_common::proto::TCP),
        "udp" => Ok(proxy_common::proto::UDP),
        _ => anyhow::bail!("--proto {p:?}: tcp or udp"),
    }
}

fn diagnose_cmd(a: DiagnoseArgs) -> anyhow::Result<()> {
    use proxy_agent::diagnose::{self, Status};
    let (ns, name) = a
        .name
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("{:?}: expected NAMESPACE/NAME", a.name))?;
    let store = match &a.source.manifests {
        Some(dir) => {
            manifests::load_dir(dir)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", dir.display()))?
                .0
        }
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(diagnose::fetch(a.source.kubeconfig.as_ref(), ns, name))?,
    };
    let snapshot = inspect::Snapshot::read(&a.args.bpffs).ok();
    let checks = diagnose::diagnose(
        &store,
        &a.node.translate_options()?,
        snapshot.as_ref(),
        ns,
        name,
        &diagnose::tcp_reach,
    );
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if let Output::Json = a.args.output {
        print_json(&checks)?;
    } else {
        for c in &checks {
            let status = match c.status {
                Status::Pass => "PASS",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!("{status:<5} {:<20} {}", c.check, c.detail);
            if !c.hint.is_empty() {
                println!("      {:<20} → {}", "", c.hint);
            }
        }
    }
    if failed {
        anyhow::bail!("{}/{}: some checks failed", ns, name);
    }
    Ok(())
}

fn explain_cmd(a: ExplainArgs) -> anyhow::Result<()> {
    let proto = parse_proto(&a.proto)?;
    let snapshot = inspect::Snapshot::read(&a.args.bpffs)?;
    let entries = proxy_agent::datapath::read_pinned_conntrack(&a.args.bpffs)?;
    let e = inspect::explain(
        &snapshot,
        &entries,
        a.src,
        a.dst,
        proto,
        conntrack::monotonic_ns(),
    );
    if let Output::Json = a.args.output {
        return print_json(&e);
    }
    println!(
        "packet     {} -> {} {}",
        e.source, e.destination, e.protocol
    );
    let show = |label: &str, v: Option<String>| {
        if let Some(v) = v {
            println!("{label:<10} {v}");
        }
    };
    show("frontend", e.frontend.clone());
    show(
        "service",
        e.service
            .clone()
            .map(|n| format!("{n} (svc id {})", e.svc_id.unwrap_or(0))),
    );
    show("flags", (!e.flags.is_empty()).then(|| e.flags.join(", ")));
    show(
        "algorithm",
        e.algorithm
            .map(|a| format!("{a}, hash {}", e.hash.unwrap_or("-"))),
    );
    show(
        "slot",
        e.slot.map(|s| {
            format!(
                "{s} of {} (flow hash {:#010x})",
                e.table_size.unwrap_or(0),
                e.flow_hash.unwrap_or(0)
            )
        }),
    );
    show("new flow", e.new_flow_backend.clone());
    show(
        "tracked",
        e.conntrack.as_ref().map(|c| {
            format!(
                "to {} ({}, idle {}s)",
                c.translated_to, c.state, c.idle_seconds
            )
        }),
    );
    println!("{:<10} {}", "verdict", e.verdict);
    show("reply", e.reply.clone());
    Ok(())
}

fn ct_cmd(cmd: CtCmd) -> anyhow::Result<()> {
    let CtAction::List {
        service,
        address,
        proto,
        args,
    } = cmd.action;
    let protocol = proto.as_deref().map(parse_proto).transpose()?;
    let snapshot = inspect::Snapshot::read(&args.bpffs)?;
    let entries = proxy_agent::datapath::read_pinned_conntrack(&args.bpffs)?;
    let rows = inspect::conntrack(
        &snapshot,
        &entries,
        &inspect::CtFilter {
            service,
            address,
            protocol,
        },
        conntrack::monotonic_ns(),
    );
    if let Output::Json = args.output {
        return print_json(&rows);
    }
    println!(
        "{:<8} {:<4} {:<22} {:<22} {:<22} {:<12} {:>6}  {:<28} FLAGS",
        "DIR", "PROTO", "SOURCE", "DESTINATION", "TRANSLATED-TO", "STATE", "IDLE", "SERVICE"
    );
    for r in rows {
        println!(
            "{:<8} {:<4} {:<22} {:<22} {:<22} {:<12} {:>5}s  {:<28} {}",
            r.direction,
            r.protocol,
            r.source,
            r.destination,
            r.translated_to,
            r.state,
            r.idle_seconds,
            r.service,
            r.flags.join(",")
        );
    }
    Ok(())
}

/// Removes every pin under `root`: unpinning the links detaches the
/// programs; maps go when nothing holds them any more.
fn uninstall(root: &std::path::Path) -> anyhow::Result<()> {
    if !root.exists() {
        println!("{} does not exist: nothing to remove", root.display());
        return Ok(());
    }
    let links = std::fs::read_dir(root)?
        .flatten()
        .filter_map(|v| std::fs::read_dir(v.path().join("links")).ok())
        .flatten()
        .flatten()
        .count();
    std::fs::remove_dir_all(root)
        .map_err(|e| anyhow::anyhow!("removing {}: {e}", root.display()))?;
    println!(
        "removed {} ({links} program links detached, maps and conntrack released); Services are no longer translated on this node",
        root.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Plan(args) => plan(args),
        Command::Maglev(args) => maglev_cmd(args),
        Command::Service(cmd) => service_cmd(cmd),
        Command::Ct(cmd) => ct_cmd(cmd),
        Command::Explain(args) => explain_cmd(args),
        Command::Diagnose(args) => diagnose_cmd(args),
        Command::Uninstall(args) => uninstall(&args.bpffs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
