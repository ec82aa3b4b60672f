//! `proxy-agent run`: the agent itself.

use std::{path::PathBuf, time::Duration};

use proxy_agent::{
    agent::{self, RunConfig, Source},
    conntrack,
    datapath::{LoadOptions, MapSizes},
    model::{NodePortMode, SocketLb},
};
use proxy_common::maps;

use super::{NodeArgs, PIN_ROOT, SourceArgs};

#[derive(clap::Args)]
pub struct RunArgs {
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
    #[arg(long, value_name = "DIR", default_value = PIN_ROOT)]
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
    /// Entries for TCP flows still in their handshake (two per flow), kept
    /// apart so a SYN flood never evicts an established flow.
    #[arg(long, default_value_t = maps::DEFAULT_CT_NEW_ENTRIES)]
    ct_new_entries: u32,
    /// Capacity for loadBalancerSourceRanges CIDRs, over all Services.
    #[arg(long, default_value_t = maps::DEFAULT_SOURCE_RANGES)]
    max_source_ranges: u32,
    /// Which sockets the cgroup hooks translate at connect time (the fast
    /// path: nothing is translated per packet afterwards): 'all' (pods and
    /// host processes), 'host-only' (the node's own network namespace: host
    /// processes and host-network pods; for service meshes whose sidecars
    /// must see Service addresses) or 'off' (per packet only; host
    /// processes then reach no Service).
    #[arg(long, value_enum, default_value = "all")]
    socket_lb: SocketLb,
    /// The cgroup v2 directory the socket hooks attach to; they see the
    /// sockets of its processes and their descendants [default: the host's
    /// cgroup2 mount; if none is mounted, one is mounted at
    /// /run/proxy-agent/cgroupv2].
    #[arg(long, value_name = "PATH")]
    cgroup_root: Option<PathBuf>,
    /// Entries for socket-level load balancing (two per socket given a backend).
    #[arg(long, default_value_t = maps::DEFAULT_SOCK_ENTRIES)]
    sock_entries: u32,
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
    /// As kube-proxy's: remove everything this agent installed under
    /// --bpffs (programs detached, maps released) and exit.
    #[arg(long)]
    cleanup: bool,
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

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.cleanup {
        return super::uninstall::uninstall(&args.bpffs);
    }
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
        socket_lb: args.socket_lb,
        cgroup_root: args.cgroup_root,
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
                ct_new: args.ct_new_entries,
                selection_blocks: args.selection_blocks,
                source_ranges: args.max_source_ranges,
                sock_entries: args.sock_entries,
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
