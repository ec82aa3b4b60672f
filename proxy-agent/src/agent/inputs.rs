//! What the agent's inputs do: interfaces (links attached, `CONFIG`
//! written), manifest reloads and Kubernetes watch events (into the store).

use std::{collections::BTreeSet, time::Instant};

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;

use super::{API, Agent};
use crate::{
    ifaces,
    kube_source::{self, Event, Kind},
    manifests,
    metrics::ChangeKind,
    store::{Dirty, Object},
};

/// The EndpointSlice annotation kube-proxy measures network programming
/// latency from (the endpoints controller sets it to when the change began).
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// kube-proxy's change counters: a Service or EndpointSlice event, with
/// the slice's trigger time in unix seconds.
fn change_of(o: &Object) -> Option<(ChangeKind, Option<f64>)> {
    match o {
        Object::Service(_) => Some((ChangeKind::Service, None)),
        Object::Slice(s) => {
            let trigger = s
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME))
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                .map(|t| t.as_nanosecond() as f64 / 1e9);
            Some((ChangeKind::EndpointSlice, trigger))
        }
        Object::Node(_) => None,
    }
}

impl Agent {
    /// A route, address, link or neighbour changed: the routes the datapath
    /// remembers for remote backends are looked up again.
    pub(super) fn routes_changed(&mut self) {
        if let Err(e) = self.dp.bump_route_generation() {
            tracing::warn!("invalidating remembered routes: {e}");
        }
    }

    /// Attaches to matching interfaces that are new, forgets vanished ones.
    pub(super) fn sync_interfaces(&mut self) {
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
    pub(super) fn write_config(&mut self) {
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

    /// Re-reads the manifest directory.
    pub(super) fn reload_manifests(&mut self, dir: &std::path::Path) {
        match manifests::load_dir(dir) {
            Ok((fresh, errors)) => {
                self.health.source(None);
                self.log_errors(&errors);
                let dirty = self.engine.store.sync_from(fresh);
                if !dirty.is_empty() {
                    self.health.queued();
                }
                self.update_node_eligibility();
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
    pub(super) fn kube_events(&mut self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let mut dirty = Dirty::default();
        for e in events {
            self.watch_event(e, &mut dirty);
        }
        self.update_node_eligibility();
        if !self.synced {
            if Kind::ALL.iter().all(|k| self.listed.contains(k)) {
                self.full_sync();
            }
        } else {
            self.store_changed(dirty);
        }
    }

    /// Whether this node may take traffic (its Node object, when known):
    /// not being deleted, not tainted `ToBeDeletedByClusterAutoscaler`.
    pub(super) fn update_node_eligibility(&self) {
        let Some(node) = self.engine.store.nodes.get(&self.cfg.node_name) else {
            return;
        };
        let node = &node.object;
        let deleting = node.metadata.deletion_timestamp.is_some();
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"));
        self.health.node_eligible(!deleting && !tainted);
    }

    /// Applies one watch event to the store.
    fn watch_event(&mut self, event: Event, dirty: &mut Dirty) {
        if let Event::Apply(o) | Event::Delete(o) = &event
            && let Some((kind, trigger)) = change_of(o)
        {
            self.metrics.record_change(kind, trigger);
            self.health.queued();
        }
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

/// Watches the manifest directory; every change sends a unit on the channel.
pub(super) fn watch_dir(
    dir: &std::path::Path,
) -> Result<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
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
