//! `proxy-agent run`: the event loop tying sources, translation, reconcile and
//! the datapath together.
//!
//! Events: manifest directory changes (inotify, debounced) and SIGHUP reload and
//! reconcile; link notifications (rtnetlink) attach to new pod interfaces;
//! SIGTERM/SIGINT end the loop. A periodic resync repeats both, so nothing
//! depends on never missing an event.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use std::os::fd::AsRawFd as _;

use anyhow::{Context as _, Result};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    datapath::{Datapath, LoadOptions},
    ifaces::{self, IfaceMatcher, LinkWatcher},
    manifests,
    reconcile::{self, Programmed},
    translate::{self, MaglevOptions, TranslateOptions},
};

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub manifests: PathBuf,
    pub node_name: String,
    pub pod_ifaces: Vec<String>,
    pub ext_ifaces: Vec<String>,
    pub load: LoadOptions,
    pub maglev: MaglevOptions,
    pub resync: Duration,
}

/// How long a burst of file events is allowed to settle before a reload.
const DEBOUNCE: Duration = Duration::from_millis(150);

struct Agent {
    cfg: RunConfig,
    dp: Datapath,
    programmed: Programmed,
    pods: IfaceMatcher,
}

impl Agent {
    /// Attaches to matching interfaces that are new, forgets vanished ones.
    fn sync_interfaces(&mut self) {
        let matching = match ifaces::matching(&self.pods) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("listing interfaces: {e}");
                return;
            }
        };
        for (ifindex, name) in &matching {
            if let Err(e) = self.dp.attach_pod_interface(*ifindex, name) {
                tracing::error!("{e}");
            }
        }
        self.dp.prune_links(&matching);
    }

    /// Reads the manifests, translates, reconciles and applies.
    fn sync_services(&mut self) {
        let started = Instant::now();
        let (store, errors) = match manifests::load_dir(&self.cfg.manifests) {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(
                    dir = %self.cfg.manifests.display(),
                    "cannot read the manifest directory, keeping the datapath as it is: {e}"
                );
                return;
            }
        };
        for e in &errors {
            tracing::warn!("{e}");
        }
        let translation = translate::translate(
            &store,
            &TranslateOptions {
                node_name: self.cfg.node_name.clone(),
                maglev: self.cfg.maglev,
            },
        );
        for e in &translation.errors {
            tracing::warn!("{e}");
        }
        let plan = reconcile::plan(&translation.desired, &self.programmed, &self.dp.capacity());
        for (svc, why) in &plan.refused {
            tracing::error!(service = %svc, "not programmed: {why}");
        }
        match self.dp.apply(&plan.ops) {
            Ok(()) => self.programmed = plan.next,
            Err((index, e)) => {
                tracing::error!(
                    op = ?plan.ops.get(index),
                    "applying the plan failed after {index} of {} operations: {e}; will retry",
                    plan.ops.len()
                );
                match self.dp.read_programmed() {
                    Ok(p) => self.programmed = p,
                    Err(e) => tracing::error!("re-reading the maps: {e}"),
                }
            }
        }
        tracing::info!(
            service_ports = translation.desired.services.len(),
            frontends = self.programmed.services.len(),
            backends = self.programmed.backends.len(),
            selection_bytes = self
                .programmed
                .tables
                .values()
                .map(|t| t.bytes())
                .sum::<u64>(),
            operations = plan.ops.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "synced"
        );
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
    if !cfg.ext_ifaces.is_empty() {
        tracing::info!(
            ifaces = ?cfg.ext_ifaces,
            "--ext-iface: the north-south datapath (NodePort/LoadBalancer) is not implemented yet; ignored"
        );
    }
    let mut dp = Datapath::load(&cfg.load).context("loading the datapath")?;
    let programmed = dp.read_programmed().context("reading pinned maps")?;
    if let Some(dir) = dp.layout_dir() {
        tracing::info!(
            pins = %dir.display(),
            frontends = programmed.services.len(),
            tables = programmed.tables.len(),
            "datapath loaded; existing state adopted"
        );
    }
    // The logger stays owned by the datapath; the event loop only polls its fd.
    let logger = dp.logger_mut().map(|l| l.as_raw_fd());
    let mut agent = Agent {
        cfg,
        dp,
        programmed,
        pods,
    };
    agent.sync_services();
    agent.sync_interfaces();

    let (_watcher, mut dir_events) = watch_dir(&agent.cfg.manifests)?;
    let mut links = LinkWatcher::new().context("subscribing to link notifications")?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(agent.cfg.resync);
    resync.tick().await;
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
            _ = hup.recv() => { tracing::info!("SIGHUP: reloading"); agent.sync_services(); }
            Some(()) = dir_events.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while dir_events.try_recv().is_ok() {}
                agent.sync_services();
            }
            changed = links.changed() => {
                if let Err(e) = changed {
                    tracing::warn!("link notifications: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                agent.sync_interfaces();
            }
            _ = resync.tick() => {
                agent.sync_interfaces();
                agent.sync_services();
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
