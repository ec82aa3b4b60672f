//! The Kubernetes source: kube-rs watchers on Services, EndpointSlices and this
//! node's Node, with kube-rs's default exponential backoff.
//!
//! The watchers' events go to the agent's own store, which is the reflector:
//! `Apply`/`Delete` change one object; a (re-)list (`Init`, `InitApply`…,
//! `InitDone`, also after 410 Gone or a dropped connection) is buffered and
//! applied as a diff against the store when complete, so a watch restart ends
//! in a resync of what changed, never in a wholesale flush.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc;

pub use crate::store::{Kind, Object};

/// What a watcher reports.
#[derive(Clone, Debug)]
pub enum Event {
    Apply(Object),
    Delete(Object),
    /// A (re-)list of this kind starts.
    ListStart(Kind),
    ListItem(Object),
    /// The (re-)list of this kind is complete.
    ListDone(Kind),
    /// The API server could not be reached or answered an error; the
    /// watcher retries with backoff.
    Error(Kind, String),
}

/// Builds a client: from `kubeconfig` when given, else in-cluster config (or
/// `$KUBECONFIG`/`~/.kube/config` as kube-rs infers).
pub async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context(
            "no in-cluster configuration and no kubeconfig found (use --kubeconfig or --manifests)",
        )?,
    };
    // The client's own retry of 429/503/504 (15 attempts, backoff up to
    // 1000 s) would hide an outage from the watchers for minutes; their own
    // backoff retries, and errors reach the agent (logs, readiness) at once.
    config.default_retry = false;
    Client::try_from(config).context("building the Kubernetes client")
}

fn forward<K, S>(
    kind: Kind,
    wrap: fn(Box<K>) -> Object,
    stream: S,
    tx: mpsc::Sender<Event>,
) -> tokio::task::JoinHandle<()>
where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(watcher::Event::Apply(o)) => Event::Apply(wrap(Box::new(o))),
                Ok(watcher::Event::Delete(o)) => Event::Delete(wrap(Box::new(o))),
                Ok(watcher::Event::Init) => Event::ListStart(kind),
                Ok(watcher::Event::InitApply(o)) => Event::ListItem(wrap(Box::new(o))),
                Ok(watcher::Event::InitDone) => Event::ListDone(kind),
                Err(e) => Event::Error(kind, e.to_string()),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    })
}

/// Drops what the agent never reads and what is often most of an object's
/// size (server-side-apply field ownership, kubectl's last-applied copy), so
/// the store holds tens of thousands of objects in less memory.
fn slim<K: Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Starts the three watchers; events arrive on the returned channel.
pub fn watch(
    client: Client,
    node_name: &str,
) -> (mpsc::Receiver<Event>, Vec<tokio::task::JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel(4096);
    // Bookmarks (on by default) keep resourceVersions fresh, so a reconnect
    // resumes instead of re-listing.
    let cfg = watcher::Config::default();
    let services = watcher(Api::<Service>::all(client.clone()), cfg.clone())
        .modify(slim)
        .default_backoff();
    let slices = watcher(Api::<EndpointSlice>::all(client.clone()), cfg.clone())
        .modify(slim)
        .default_backoff();
    let nodes = watcher(
        Api::<Node>::all(client),
        cfg.fields(&format!("metadata.name={node_name}")),
    )
    .modify(slim)
    .default_backoff();
    let handles = vec![
        forward(Kind::Service, Object::Service, services, tx.clone()),
        forward(Kind::Slice, Object::Slice, slices, tx.clone()),
        forward(Kind::Node, Object::Node, nodes, tx),
    ];
    (rx, handles)
}

/// How often an unchanged connection error is logged again.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};

    use super::*;

    #[test]
    fn slim_keeps_what_translation_reads() {
        let mut svc = Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                managed_fields: Some(vec![ManagedFieldsEntry {
                    manager: Some("kubectl".into()),
                    ..Default::default()
                }]),
                annotations: Some(BTreeMap::from([
                    (LAST_APPLIED.to_owned(), "{\"big\": true}".to_owned()),
                    ("ebpf-proxy.io/lb-algorithm".to_owned(), "random".to_owned()),
                ])),
                labels: Some(BTreeMap::from([("app".to_owned(), "web".to_owned())])),
                ..Default::default()
            },
            ..Default::default()
        };
        slim(&mut svc);
        assert_eq!(svc.metadata.managed_fields, None);
        assert_eq!(
            svc.metadata.annotations,
            Some(BTreeMap::from([(
                "ebpf-proxy.io/lb-algorithm".to_owned(),
                "random".to_owned()
            )]))
        );
        assert_eq!(svc.metadata.name.as_deref(), Some("web"));
        assert!(svc.metadata.labels.is_some());
    }
}
