//! `proxy-agent run`: the event loop tying sources, translation, reconcile and
//! the datapath together.
//!
//! Startup: load the datapath (adopting pinned maps and links: traffic keeps
//! flowing), then wait for the source's first complete view (manifests read,
//! or every watcher listed once) before the first full sync: an empty or
//! partial view never flushes what the maps hold. After that every change is
//! applied incrementally: the store reports the Services it touched, the
//! engine re-translates those, the reconciler diffs those, the datapath runs
//! the operations. A periodic full resync re-reads the maps to catch drift.
//!
//! Events: manifest changes (inotify, debounced; SIGHUP), Kubernetes watch
//! events (batched: whatever is queued is applied together), rtnetlink link
//! notifications (attach to new pod interfaces), SIGTERM/SIGINT (exit, leaving
//! programs attached and maps pinned).
//!
//! This file is the loop and its startup; what an event does is in
//! `inputs.rs` (sources and interfaces into the store, CONFIG and links) and
//! `sync.rs` (the store through translation and reconcile into the maps).

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

mod inputs;
mod sockets;
mod sync;

use crate::{
    conntrack::{self, gc::Collector},
    datapath::{Datapath, LoadOptions},
    engine::Engine,
    health::{self, Health},
    healthcheck::HealthChecks,
    host,
    ifaces::{IfaceMatcher, LinkWatcher},
    kube_source::{self, Kind},
    metrics::Metrics,
    model::{Cidr, NodePortMode, SocketLb},
    node::NodeSettings,
    reconcile::Reconciler,
    routes::RouteWatcher,
    translate::{MaglevOptions, TranslateOptions},
};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of manifests.
    Manifests(PathBuf),
    /// The Kubernetes API (in-cluster config, or this kubeconfig).
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub source: Source,
    pub node_name: String,
    pub pod_ifaces: Vec<String>,
    pub ext_ifaces: Vec<String>,
    pub load: LoadOptions,
    pub maglev: MaglevOptions,
    /// `--nodeport-addresses`.
    pub nodeport_cidrs: Vec<Cidr>,
    /// `--nodeport-mode`.
    pub nodeport_mode: NodePortMode,
    /// `--socket-lb`.
    pub socket_lb: SocketLb,
    /// `--cgroup-root`; `None`: the host's cgroup2 mount.
    pub cgroup_root: Option<PathBuf>,
    /// `--snat-address`; `None`: the first address of the first external interface.
    pub snat_address: Option<std::net::Ipv4Addr>,
    /// `--snat-port-range`, inclusive.
    pub snat_ports: (u16, u16),
    /// Conntrack idle timeouts.
    pub ct_timeouts: conntrack::Timeouts,
    /// How often conntrack is garbage-collected.
    pub ct_gc_interval: Duration,
    pub resync: Duration,
    pub healthz: Option<SocketAddr>,
    /// `--metrics-bind-address`.
    pub metrics: Option<SocketAddr>,
}

/// How long a burst of file events is allowed to settle before a reload.
const DEBOUNCE: Duration = Duration::from_millis(150);

struct Agent {
    cfg: RunConfig,
    dp: Datapath,
    reconciler: Reconciler,
    engine: Engine,
    pods: IfaceMatcher,
    exts: IfaceMatcher,
    /// What `CONFIG` is derived from.
    node: NodeSettings,
    /// Socket-level load balancing in effect.
    socket_lb: SocketLb,
    health: Arc<Health>,
    health_checks: HealthChecks,
    metrics: Arc<Metrics>,
    conntrack_gc: Collector,
    /// The first full sync has been applied.
    synced: bool,
    /// Kinds that have been listed completely at least once.
    listed: BTreeSet<Kind>,
    last_source_error: Option<(String, Instant)>,
}

/// Origin of the objects the API server sends, for error messages.
const API: &str = "api";

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cfg: RunConfig) -> Result<()> {
    let pods = IfaceMatcher::new(&cfg.pod_ifaces).map_err(anyhow::Error::msg)?;
    if pods.is_empty() {
        tracing::warn!(
            "no --pod-iface given: services are programmed but no traffic is translated"
        );
    }
    let exts = IfaceMatcher::new(&cfg.ext_ifaces).map_err(anyhow::Error::msg)?;
    if cfg.snat_ports.0 == 0 || cfg.snat_ports.0 > cfg.snat_ports.1 {
        anyhow::bail!(
            "--snat-port-range {}-{}: expected FIRST-LAST with 0 < FIRST <= LAST",
            cfg.snat_ports.0,
            cfg.snat_ports.1
        );
    }
    let health = Health::new();
    // kube-proxy's health timeout is twice its sync period.
    health.set_timeout(cfg.resync * 2);
    let metrics = Metrics::new(cfg.load.pin_root.clone());
    if let Some(addr) = cfg.healthz {
        let (m, h) = (Arc::clone(&metrics), Arc::clone(&health));
        tokio::spawn(async move {
            if let Err(e) = health::serve(addr, h, m, false).await {
                tracing::error!(%addr, "health endpoint: {e}");
            }
        });
    }
    // Watch the API before loading the datapath: listing tens of thousands
    // of objects then overlaps program verification and map creation, and
    // the events that arrive meanwhile wait here in order.
    let mut kube_watch = match &cfg.source {
        Source::Kubernetes { kubeconfig } => {
            let client = kube_source::client(kubeconfig.as_ref()).await?;
            let watch = kube_source::watch(client, &cfg.node_name);
            tracing::info!(node = %cfg.node_name, "watching Services, EndpointSlices and this Node");
            Some(watch)
        }
        Source::Manifests(_) => None,
    };
    let load = cfg.load.clone();
    let mut loading = tokio::task::spawn_blocking(move || Datapath::load(&load));
    let mut early_events = Vec::new();
    let mut dp = loop {
        tokio::select! {
            loaded = &mut loading => {
                break loaded
                    .context("datapath load task")?
                    .context("loading the datapath")?;
            }
            Some(event) = async {
                match kube_watch.as_mut() {
                    Some((rx, _)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => early_events.push(event),
        }
    };
    if let Some(addr) = cfg.metrics {
        let (m, h) = (Arc::clone(&metrics), Arc::clone(&health));
        tokio::spawn(async move {
            if let Err(e) = health::serve(addr, h, m, true).await {
                tracing::error!(%addr, "metrics endpoint: {e}");
            }
        });
    }
    // An older layout's state is carried over before anything reads the maps.
    let migration = dp
        .migrate_start()
        .context("carrying an older pin layout over")?;
    let maps = dp.read_programmed().context("reading pinned maps")?;
    if let Some(dir) = dp.layout_dir() {
        tracing::info!(
            pins = %dir.display(),
            frontends = maps.services.len(),
            tables = maps.tables.len(),
            "datapath loaded; existing state adopted and serving"
        );
    }
    // The logger stays owned by the datapath; the event loop only polls its fd.
    let logger = dp.logger_mut().map(|l| l.as_raw_fd());
    let reconciler = Reconciler::new(maps, dp.capacity()).with_mode(cfg.nodeport_mode);
    let mut node = NodeSettings::new(cfg.snat_address, cfg.snat_ports);
    let socket_lb = sockets::start(&mut dp, cfg.socket_lb, cfg.cgroup_root.as_deref());
    node.set_socket_lb(socket_lb, host::netns_cookie().unwrap_or(0));
    let mut agent = Agent {
        engine: Engine::new(TranslateOptions {
            node_name: cfg.node_name.clone(),
            maglev: cfg.maglev,
            nodeport_cidrs: cfg.nodeport_cidrs.clone(),
        }),
        cfg,
        dp,
        reconciler,
        pods,
        exts,
        node,
        socket_lb,
        health,
        health_checks: HealthChecks::default(),
        metrics,
        conntrack_gc: Collector::default(),
        synced: false,
        listed: BTreeSet::new(),
        last_source_error: None,
    };
    agent.sync_interfaces();
    if let Some(m) = migration {
        // The links run our programs now: what the old ones recorded
        // meanwhile comes over too, then the old layout goes.
        if let Err(e) = agent.dp.migrate_finish(m) {
            tracing::error!("finishing the layout migration: {e}");
        }
    }

    // Sources.
    let mut dir_events = None;
    let mut _dir_watcher = None;
    let mut kube_events = None;
    match agent.cfg.source.clone() {
        Source::Manifests(dir) => {
            agent.reload_manifests(&dir);
            let (w, rx) = inputs::watch_dir(&dir)?;
            _dir_watcher = Some(w);
            dir_events = Some(rx);
        }
        Source::Kubernetes { .. } => {
            // The watch tasks run detached; the channel is what matters.
            if let Some((rx, _)) = kube_watch.take() {
                kube_events = Some(rx);
            }
            agent.kube_events(early_events);
        }
    }

    let mut links = LinkWatcher::new().context("subscribing to link notifications")?;
    let mut routes = RouteWatcher::new().context("subscribing to route notifications")?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(agent.cfg.resync);
    resync.tick().await;
    let mut ct_gc = tokio::time::interval(agent.cfg.ct_gc_interval);
    ct_gc.tick().await;
    let logs = match logger {
        // SAFETY: the descriptor belongs to the logger owned by `agent.dp`, which
        // outlives `logs` (declared earlier, dropped later).
        Some(fd) => Some(unsafe { AsyncFd::register(fd) }.context("polling kernel logs")?),
        None => None,
    };

    tracing::info!("running");
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM"); break; }
            _ = int.recv() => { tracing::info!("SIGINT"); break; }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading");
                if let Source::Manifests(dir) = agent.cfg.source.clone() {
                    agent.reload_manifests(&dir);
                } else if agent.synced {
                    agent.full_sync();
                }
            }
            Some(()) = async { match dir_events.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                tokio::time::sleep(DEBOUNCE).await;
                if let Some(rx) = dir_events.as_mut() { while rx.try_recv().is_ok() {} }
                if let Source::Manifests(dir) = agent.cfg.source.clone() {
                    agent.reload_manifests(&dir);
                }
            }
            Some(first) = async { match kube_events.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                // Apply everything already queued as one batch.
                let mut batch = vec![first];
                if let Some(rx) = kube_events.as_mut() {
                    while let Ok(e) = rx.try_recv() {
                        batch.push(e);
                    }
                }
                agent.kube_events(batch);
            }
            changed = links.changed() => {
                if let Err(e) = changed {
                    tracing::warn!("link notifications: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                agent.sync_interfaces();
            }
            stale = routes.changed() => {
                match stale {
                    Ok(false) => {}
                    Ok(true) => agent.routes_changed(),
                    Err(e) => {
                        tracing::warn!("route notifications: {e}");
                        agent.routes_changed();
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            _ = ct_gc.tick() => {
                agent.conntrack_gc.start(&agent.dp, agent.cfg.ct_timeouts, &agent.metrics);
            }
            _ = resync.tick() => {
                agent.sync_interfaces();
                match agent.cfg.source.clone() {
                    Source::Manifests(dir) => {
                        agent.reload_manifests(&dir);
                        agent.full_sync();
                    }
                    Source::Kubernetes { .. } if agent.synced => agent.full_sync(),
                    Source::Kubernetes { .. } => {}
                }
            }
            ready = async { match &logs { Some(l) => l.readable().await, None => std::future::pending().await } } => {
                if let Ok(mut guard) = ready {
                    if let Some(l) = agent.dp.logger_mut() { l.flush(); }
                    guard.clear_ready();
                }
            }
        }
    }
    tracing::info!(
        "stopping; programs stay attached and maps stay pinned, so traffic keeps flowing until a new agent takes over"
    );
    Ok(())
}
