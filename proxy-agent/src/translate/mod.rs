//! Translation: a pure function from the stored objects to the desired state,
//! with kube-proxy's semantics. Callable for the whole store ([`translate`])
//! or one Service at a time ([`translate_service`], for incremental updates).
//! A Service is read once (`service.rs`), then each of its ports is built
//! (`port.rs`); frontend conflicts are settled by name (`claims.rs`).
//!
//! - Services left alone: `type: ExternalName`, headless (`clusterIP: None`),
//!   and those labelled `service.kubernetes.io/service-proxy-name` (another
//!   proxy owns them).
//! - EndpointSlices are grouped by their `kubernetes.io/service-name` label;
//!   slices labelled `service.kubernetes.io/headless`, FQDN slices and (while
//!   the datapath is IPv4-only) IPv6 slices are ignored.
//! - A slice port matches a Service port by name and protocol; its number is
//!   the backend port. An endpoint contributes `addresses[0]`; the same
//!   address:port in several slices counts once.
//! - Conditions: `ready` and `serving` unset count as true, `terminating`
//!   unset as false. Which endpoints serve which traffic: see [`endpoints`]
//!   (traffic policies, topology hints, terminating fallback).
//! - Frontends: ClusterIPs; NodePorts on this node's addresses (from its Node
//!   object; `0.0.0.0` when unknown); LoadBalancer ingress IPs except those
//!   with `ipMode: Proxy`; externalIPs. IPv6 ones are skipped.
//! - `sessionAffinity: ClientIP` with its timeout (default 10800 s),
//!   `loadBalancerSourceRanges` (trimmed, normalised), `healthCheckNodePort`
//!   under `externalTrafficPolicy: Local`.
//!
//! Annotations (documented in the README):
//! - `ebpf-proxy.io/lb-algorithm` on a Service: `maglev` (default), `random`,
//!   `round-robin`, `source-hash`, `least-connections` (IPVS's short names too);
//! - `ebpf-proxy.io/maglev-table-size` on a Service: a prime table size;
//! - `ebpf-proxy.io/endpoint-weights` on a Service or an EndpointSlice:
//!   `IP=WEIGHT,...`; weight 0 drains an endpoint (no new flows). A slice's
//!   weights override the Service's for its endpoints.

mod claims;
pub mod endpoints;
mod port;
mod service;
#[cfg(test)]
mod tests;

use std::{collections::BTreeSet, net::Ipv4Addr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

pub use self::claims::{Claims, FrontendClaim};
use self::{port::PortSpec, service::ServiceView};
use crate::{
    maglev,
    model::{Cidr, DesiredState, Protocol, ServicePlan},
    store::{ErrorKind, Key, LABEL_SERVICE_NAME, ObjectError, ObjectRef, Store, slice_service},
};

/// Label marking a Service handled by another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking EndpointSlices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Node label naming its zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Service annotation choosing the selection algorithm.
pub const ANNOTATION_ALGORITHM: &str = "ebpf-proxy.io/lb-algorithm";
/// Service annotation setting the Maglev table size.
pub const ANNOTATION_TABLE_SIZE: &str = "ebpf-proxy.io/maglev-table-size";
/// Service or EndpointSlice annotation setting endpoint weights.
pub const ANNOTATION_WEIGHTS: &str = "ebpf-proxy.io/endpoint-weights";
/// kube-proxy's default ClientIP affinity timeout.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Maglev table sizing policy (agent flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevOptions {
    /// Table size for Services without the annotation; `None`: from the backend count.
    pub default_size: Option<u32>,
    /// Largest table size allowed (default or annotation).
    pub max_size: u32,
}

impl Default for MaglevOptions {
    fn default() -> Self {
        Self {
            default_size: None,
            max_size: maglev::DEFAULT_MAX_TABLE_SIZE,
        }
    }
}

/// Node-specific inputs of translation.
#[derive(Clone, Debug, Default)]
pub struct TranslateOptions {
    pub node_name: String,
    pub maglev: MaglevOptions,
    /// `--nodeport-addresses`: NodePorts listen on the node addresses inside
    /// these CIDRs; empty: on all of the node's addresses.
    pub nodeport_cidrs: Vec<Cidr>,
}

/// What translation needs to know about this node, from its Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub name: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// IPv4 InternalIP and ExternalIP addresses: where NodePorts listen.
    pub addresses: Vec<Ipv4Addr>,
}

impl NodeContext {
    /// This node's context from the store (empty beyond the name when the
    /// Node object is unknown).
    pub fn from_store(store: &Store, node_name: &str) -> Self {
        let node = store.nodes.get(node_name).map(|n| &n.object);
        let zone = node
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get(LABEL_ZONE))
            .cloned();
        let mut addresses: Vec<Ipv4Addr> = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        addresses.sort();
        addresses.dedup();
        Self {
            name: node_name.to_owned(),
            zone,
            addresses,
        }
    }

    /// Where this node's NodePorts listen: its addresses inside `cidrs`
    /// (`--nodeport-addresses`; empty: all of them), or every address
    /// (`0.0.0.0`) while its Node object is unknown.
    pub fn nodeport_addresses(&self, cidrs: &[Cidr]) -> Vec<Ipv4Addr> {
        if self.addresses.is_empty() {
            return vec![Ipv4Addr::UNSPECIFIED];
        }
        self.addresses
            .iter()
            .copied()
            .filter(|a| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(*a)))
            .collect()
    }
}

/// Result of translation: the desired state and every object problem found.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub desired: DesiredState,
    pub errors: Vec<ObjectError>,
}

/// One Service's translation: its ports' plans (before frontend conflicts are
/// resolved) and the problems found in it and its slices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTranslation {
    pub plans: Vec<ServicePlan>,
    pub errors: Vec<ObjectError>,
}

/// Problems found in a Service or its slices that do not stop the rest of it.
type Problems = Vec<(Option<ObjectRef>, String)>;

/// Translates the whole store.
pub fn translate(store: &Store, opts: &TranslateOptions) -> Translation {
    let node = NodeContext::from_store(store, &opts.node_name);
    let mut out = Translation {
        errors: slice_errors(store),
        ..Translation::default()
    };
    let mut plans = Vec::new();
    for key in store.services.keys() {
        let t = translate_service(store, key, &node, opts);
        plans.extend(t.plans);
        out.errors.extend(t.errors);
    }
    plans.sort_by(|a, b| a.id.cmp(&b.id));
    let mut claims = Claims::default();
    for plan in &mut plans {
        for mut e in claims.claim(plan) {
            e.origin = e.object.as_ref().and_then(|o| store.origin_of(o));
            out.errors.push(e);
        }
    }
    plans.retain(|p| !p.frontends.is_empty());
    out.desired.services = plans;
    out
}

/// Errors about slices that belong to no usable Service.
pub fn slice_errors(store: &Store) -> Vec<ObjectError> {
    let mut errors = Vec::new();
    for ((namespace, name), stored) in &store.slices {
        let slice = &stored.object;
        if is_headless_slice(slice) {
            continue;
        }
        let object = ObjectRef::new("EndpointSlice", namespace, name);
        let (kind, message) = match slice_service(slice) {
            None => (
                ErrorKind::Unlabelled,
                format!("no {LABEL_SERVICE_NAME} label; ignored"),
            ),
            Some(service)
                if !store
                    .services
                    .contains_key(&(namespace.clone(), service.to_owned())) =>
            {
                (ErrorKind::Orphaned, orphaned_message(namespace, service))
            }
            Some(_) => continue,
        };
        errors.push(ObjectError {
            origin: stored.origin.clone(),
            ..ObjectError::new(Some(object), kind, message)
        });
    }
    errors
}

/// Why a slice of a Service that does not exist is ignored.
pub fn orphaned_message(namespace: &str, service: &str) -> String {
    format!("belongs to Service {namespace}/{service}, which does not exist; ignored")
}

fn is_headless_slice(slice: &EndpointSlice) -> bool {
    slice
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_HEADLESS))
}

/// Translates one Service (absent: no plans).
pub fn translate_service(
    store: &Store,
    key: &Key,
    node: &NodeContext,
    opts: &TranslateOptions,
) -> ServiceTranslation {
    let Some(stored) = store.services.get(key) else {
        return ServiceTranslation::default();
    };
    let slices: Vec<&EndpointSlice> = store
        .slices_of(key)
        .filter(|s| !is_headless_slice(s))
        .collect();
    let object = ObjectRef::new("Service", &key.0, &key.1);
    let mut out = ServiceTranslation::default();
    let mut report = |obj: Option<ObjectRef>, message: String| {
        let obj = obj.unwrap_or_else(|| object.clone());
        out.errors.push(ObjectError {
            origin: store.origin_of(&obj),
            ..ObjectError::new(Some(obj), ErrorKind::Invalid, message)
        });
    };
    match service_plans(&stored.object, key, &slices, node, opts) {
        Ok((plans, problems)) => {
            out.plans = plans;
            for (obj, message) in problems {
                report(obj, message);
            }
        }
        Err(message) => report(None, message),
    }
    out
}

/// The plans of one Service's ports. `Err` when the Service as a whole is unusable.
fn service_plans(
    svc: &Service,
    key: &Key,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    opts: &TranslateOptions,
) -> Result<(Vec<ServicePlan>, Problems), String> {
    let mut problems: Problems = Vec::new();
    let Some(view) = ServiceView::read(svc, node, opts, &mut problems)? else {
        return Ok((Vec::new(), problems));
    };
    let mut seen_ports: BTreeSet<(String, Protocol)> = BTreeSet::new();
    let mut plans = Vec::new();
    for port in view.spec.ports.iter().flatten() {
        let Some(spec) = PortSpec::read(port, &mut problems) else {
            continue;
        };
        if !seen_ports.insert((spec.name.clone(), spec.protocol)) {
            problems.push((
                None,
                format!(
                    "port name {:?}/{} is used twice; the first one is kept",
                    spec.name, spec.protocol
                ),
            ));
            continue;
        }
        plans.push(port::plan(
            &view,
            (&key.0, &key.1),
            &spec,
            slices,
            node,
            opts,
            &mut problems,
        ));
    }
    Ok((plans, problems))
}
