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
    sync::mpsc,
};

use crate::{
    conntrack::{self, gc::Collector},
    datapath::{Datapath, LoadOptions},
    engine::Engine,
    health::{self, Health},
    healthcheck::HealthChecks,
    ifaces::{self, IfaceMatcher, LinkWatcher},
    kube_source::{self, Event, Kind},
    manifests,
    metrics::{MapFill, Metrics, SyncKind},
    model::{Cidr, NodePortMode},
    node::NodeSettings,
    programmed::Op,
    reconcile::{Batch, Reconciler},
    store::Dirty,
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

impl Agent {
    /// Attaches to matching interfaces that are new, forgets vanished ones.
    fn sync_interfaces(&mut self) {
        let (pods, exts) = match (ifaces::matching(&self.pods), ifaces::matching(&self.exts)) {
            (Ok(p), Ok(e)) => (p, e),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("listing interfaces: {e}");
                return;
            }
        };
        for (ifindex, name) in &pods {
            if exts.contains(&(*ifindex, name.clone())) {
                continue;
            }
            if let Err(e) = self.dp.attach_pod_interface(*ifindex, name) {
                tracing::error!("{e}");
            }
        }
        for (ifindex, name) in &exts {
            if let Err(e) = self.dp.attach_ext_interface(*ifindex, name) {
                tracing::error!("{e}");
            }
        }
        self.update_node_config(&exts);
        let mut keep = pods;
        keep.extend(exts);
        self.dp.prune_links(&keep);
    }

    /// Notes this node's external side (SNAT address: the flag, else the
    /// first address of an external interface) and writes `CONFIG`.
    fn update_node_config(&mut self, exts: &BTreeSet<(u32, String)>) {
        let first = exts
            .iter()
            .find_map(|(_, name)| ifaces::ipv4_addresses(name).ok()?.into_iter().next());
        self.node.set_external(!exts.is_empty(), first);
        self.write_config();
    }

    /// Writes `CONFIG` when it changed.
    fn write_config(&mut self) {
        let Some(change) = self.node.change() else {
            return;
        };
        match self.dp.set_config(&change.config) {
            Ok(()) => {
                if change.north_south {
                    tracing::info!(
                        snat_address = ?self.node.snat_address(),
                        snat_ports = ?self.node.snat_ports(),
                        mode = ?self.cfg.nodeport_mode,
                        external = self.node.external(),
                        "north-south settings"
                    );
                    if self.node.snat_address().is_none() && self.node.external() {
                        tracing::warn!(
                            "no SNAT address (no --snat-address, external interfaces have no IPv4 address): external flows to remote backends are dropped unless DSR applies"
                        );
                    }
                }
                self.node.written(change.config);
            }
            Err(e) => tracing::error!("writing CONFIG: {e}"),
        }
    }

    /// Runs a batch against the maps; on failure rebuilds the reconciler from
    /// what the maps really hold so the next sync repairs it.
    fn apply(&mut self, batch: Batch, started: Instant, kind: SyncKind, changes: usize) {
        let planned = started.elapsed();
        for (svc, why) in &batch.refused {
            tracing::error!(service = %svc, "not programmed: {why}");
        }
        let applying = Instant::now();
        let result = self.dp.apply(&batch.ops, batch.tables_not_before);
        let dp_ms = applying.elapsed().as_secs_f64() * 1e3;
        let ok = match result {
            Ok(()) => {
                self.reconciler.applied(Instant::now());
                true
            }
            Err((index, e)) => {
                tracing::error!(
                    op = ?batch.ops.get(index),
                    "applying failed after {index} of {} operations: {e}; will resync",
                    batch.ops.len()
                );
                self.rebuild_reconciler();
                false
            }
        };
        self.health.synced(ok);
        let frontends_changed = batch
            .ops
            .iter()
            .any(|o| matches!(o, Op::SetService(..) | Op::DelService(_)));
        if kind == SyncKind::Full || frontends_changed {
            self.node.set_cluster_ips(&self.reconciler.maps().services);
            self.write_config();
        }
        self.metrics.record_sync(
            kind,
            started.elapsed(),
            ok,
            batch.refused.len(),
            self.fill(),
        );
        if ok && (!batch.left.is_empty() || !batch.gone.is_empty()) {
            conntrack::gc::forget_flows(&self.dp, batch.left, batch.gone);
        }
        let maps = self.reconciler.maps();
        let (blocks, _) = self.reconciler.selection_usage();
        tracing::info!(
            kind = kind.name(),
            changed_service_ports = changes,
            frontends = maps.services.len(),
            backends = maps.backends.len(),
            selection_bytes = u64::from(blocks) * 64,
            operations = batch.ops.len(),
            plan_ms = planned.as_secs_f64() * 1e3,
            apply_ms = applying.elapsed().as_secs_f64() * 1e3,
            maps_ms = dp_ms,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "synced"
        );
    }

    /// Entries in use and capacity of the maps the agent writes.
    fn fill(&self) -> Vec<MapFill> {
        let cap = self.reconciler.capacity();
        let maps = self.reconciler.maps();
        let (blocks, block_cap) = self.reconciler.selection_usage();
        let ranges: usize = maps.ranges.values().map(BTreeSet::len).sum();
        let fill = |map, used: usize, capacity: u32| MapFill {
            map,
            used: used as u64,
            capacity: u64::from(capacity),
        };
        vec![
            fill("SERVICES", maps.services.len(), cap.frontends),
            fill(
                "SVC_TABLE",
                maps.tables.len(),
                cap.services.saturating_sub(1),
            ),
            fill(
                "BACKENDS",
                maps.backends.len(),
                cap.backends.saturating_sub(1),
            ),
            fill("SELECTION", blocks as usize, block_cap),
            fill("SOURCE_RANGES", ranges, cap.ranges),
        ]
    }

    /// Rebuilds the reconciler from what the maps really hold.
    fn rebuild_reconciler(&mut self) {
        match self.dp.read_programmed() {
            Ok(maps) => self.reconciler = self.reconciler.rebuild(maps),
            Err(e) => tracing::error!("reading the maps back: {e}"),
        }
    }

    fn log_errors(&self, errors: &[crate::store::ObjectError]) {
        for e in errors {
            tracing::warn!("{e}");
        }
    }

    /// Everything, from the store and the maps as they are now.
    fn full_sync(&mut self) {
        let started = Instant::now();
        let update = self.engine.update(&Dirty {
            all: true,
            ..Dirty::default()
        });
        let translated = started.elapsed();
        self.log_errors(&update.new_errors);
        // The first sync plans against the maps as read at load (nothing has
        // written them since); later ones re-read them to catch drift.
        if self.synced {
            self.rebuild_reconciler();
        }
        let read = started.elapsed();
        let desired = self.engine.desired();
        let batch = self.reconciler.full(&desired);
        tracing::debug!(
            translate_ms = translated.as_secs_f64() * 1e3,
            read_maps_ms = (read - translated).as_secs_f64() * 1e3,
            plan_ms = (started.elapsed() - read).as_secs_f64() * 1e3,
            "full sync planned"
        );
        let n = desired.services.len();
        self.health_checks.full(&desired);
        drop(desired);
        self.synced = true;
        self.apply(batch, started, SyncKind::Full, n);
        release_freed_memory();
    }

    /// Applies what a store change touched.
    fn store_changed(&mut self, dirty: Dirty) {
        if !self.synced || dirty.is_empty() {
            return;
        }
        let started = Instant::now();
        let update = self.engine.update(&dirty);
        let translated = started.elapsed();
        self.log_errors(&update.new_errors);
        if update.changes.is_empty() {
            return;
        }
        let n = update.changes.len();
        self.health_checks.changes(&update.changes);
        let batch = self.reconciler.changes(&update.changes);
        tracing::debug!(
            translate_us = translated.as_micros() as u64,
            reconcile_us = (started.elapsed() - translated).as_micros() as u64,
            "incremental update planned"
        );
        self.apply(batch, started, SyncKind::Incremental, n);
    }

    /// Re-reads the manifest directory.
    fn reload_manifests(&mut self, dir: &std::path::Path) {
        match manifests::load_dir(dir) {
            Ok((fresh, errors)) => {
                self.health.source(None);
                self.log_errors(&errors);
                let dirty = self.engine.store.sync_from(fresh);
                if self.synced {
                    self.store_changed(dirty);
                } else {
                    self.full_sync();
                }
            }
            Err(e) => {
                let msg = format!("cannot read {}: {e}", dir.display());
                tracing::error!("{msg}; keeping the datapath as it is");
                self.health.source(Some(msg));
            }
        }
    }

    /// Applies a batch of API events: the first full sync once every kind
    /// has been listed, incremental syncs after that.
    fn kube_events(&mut self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let mut dirty = Dirty::default();
        for e in events {
            self.watch_event(e, &mut dirty);
        }
        if !self.synced {
            if Kind::ALL.iter().all(|k| self.listed.contains(k)) {
                self.full_sync();
            }
        } else {
            self.store_changed(dirty);
        }
    }

    /// Applies one watch event to the store.
    fn watch_event(&mut self, event: Event, dirty: &mut Dirty) {
        let store = &mut self.engine.store;
        match event {
            Event::Apply(o) => dirty.merge(store.upsert(o, Some(API.to_owned()))),
            Event::Delete(o) => dirty.merge(store.remove(&o)),
            Event::ListStart(kind) => store.relist_start(kind),
            Event::ListItem(o) => store.relist_item(o),
            Event::ListDone(kind) => {
                dirty.merge(store.relist_done(kind, Some(API)));
                if self.listed.insert(kind) {
                    tracing::info!(kind = kind.name(), "initial list complete");
                } else {
                    tracing::info!(
                        kind = kind.name(),
                        "re-listed (resync from the store, not a flush)"
                    );
                }
            }
            Event::Error(kind, e) => {
                let repeat = self.last_source_error.as_ref().is_some_and(|(m, at)| {
                    *m == e && at.elapsed() < kube_source::ERROR_LOG_INTERVAL
                });
                if !repeat {
                    tracing::warn!(
                        kind = kind.name(),
                        "API server: {e}; retrying with backoff, the datapath keeps serving"
                    );
                    self.last_source_error = Some((e.clone(), Instant::now()));
                }
                self.health.source(Some(e));
                return;
            }
        }
        if !self.health.is_source_ok() {
            tracing::info!("API server reachable again");
            self.last_source_error = None;
        }
        self.health.source(None);
    }
}

/// A full sync (and the list before it) allocates and frees a lot; glibc keeps
/// freed memory mapped unless asked to give it back.
fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Watches the manifest directory; every change sends a unit on the channel.
fn watch_dir(dir: &std::path::Path) -> Result<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    use notify::Watcher as _;
    let (tx, rx) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // A full channel already has a reload pending.
            let _ = tx.try_send(());
        }
    })
    .context("creating the directory watcher")?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok((watcher, rx))
}

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
    if let Some(addr) = cfg.healthz {
        let h = Arc::clone(&health);
        tokio::spawn(async move {
            if let Err(e) = health::serve(addr, h, None).await {
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
    let metrics = Metrics::new(dp.layout_dir().map(|d| {
        d.parent()
            .map_or_else(|| d.to_path_buf(), std::path::Path::to_path_buf)
    }));
    if let Some(addr) = cfg.metrics {
        let (m, h) = (Arc::clone(&metrics), Arc::clone(&health));
        tokio::spawn(async move {
            if let Err(e) = health::serve(addr, h, Some(m)).await {
                tracing::error!(%addr, "metrics endpoint: {e}");
            }
        });
    }
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
    let node = NodeSettings::new(cfg.snat_address, cfg.snat_ports);
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
        health,
        health_checks: HealthChecks::default(),
        metrics,
        conntrack_gc: Collector::default(),
        synced: false,
        listed: BTreeSet::new(),
        last_source_error: None,
    };
    agent.sync_interfaces();

    // Sources.
    let mut dir_events = None;
    let mut _dir_watcher = None;
    let mut kube_events = None;
    match agent.cfg.source.clone() {
        Source::Manifests(dir) => {
            agent.reload_manifests(&dir);
            let (w, rx) = watch_dir(&dir)?;
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
