//! Translation: a pure function from the stored objects to the desired state,
//! with kube-proxy's semantics. Callable for the whole store ([`translate`])
//! or one Service at a time ([`translate_service`], for incremental updates).
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
//! - `ebpf-proxy.io/lb-algorithm` on a Service: `maglev` (default) or `random`;
//! - `ebpf-proxy.io/maglev-table-size` on a Service: a prime table size;
//! - `ebpf-proxy.io/endpoint-weights` on a Service or an EndpointSlice:
//!   `IP=WEIGHT,...`; weight 0 drains an endpoint (no new flows). A slice's
//!   weights override the Service's for its endpoints.

pub mod endpoints;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use self::endpoints::{Endpoint, Policies, categorize};
use crate::{
    maglev,
    model::{
        Algorithm, DesiredState, Frontend, FrontendKind, Protocol, ServicePlan, ServicePortName,
    },
    store::{Key, ObjectError, ObjectRef, Store, slice_service},
};

/// Label naming the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
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

/// An IPv4 CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.trim().split_once('/').unwrap_or((s.trim(), "32"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 CIDR (a.b.c.d/n)"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0..=32"))?;
        Ok(Self { addr, prefix })
    }
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
        let message = match slice_service(slice) {
            None => format!("no {LABEL_SERVICE_NAME} label; ignored"),
            Some(service)
                if !store
                    .services
                    .contains_key(&(namespace.clone(), service.to_owned())) =>
            {
                format!("belongs to Service {namespace}/{service}, which does not exist; ignored")
            }
            Some(_) => continue,
        };
        errors.push(ObjectError {
            origin: stored.origin.clone(),
            object: Some(object),
            message,
        });
    }
    errors
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
            object: Some(obj),
            message,
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

/// A frontend as two Service ports could collide on it.
pub type FrontendClaim = (bool, Ipv4Addr, u16, Protocol);

/// Which Service port owns each frontend: the first by name wins.
#[derive(Clone, Debug, Default)]
pub struct Claims {
    owners: BTreeMap<FrontendClaim, ServicePortName>,
    /// The same, by owner.
    owned: BTreeMap<ServicePortName, BTreeSet<FrontendClaim>>,
}

fn claim_of(f: &Frontend, protocol: Protocol) -> FrontendClaim {
    (f.kind.is_internal(), f.address, f.port, protocol)
}

impl Claims {
    /// Claims `plan`'s frontends, dropping (and reporting) those another
    /// Service port that sorts earlier already owns.
    pub fn claim(&mut self, plan: &mut ServicePlan) -> Vec<ObjectError> {
        let id = plan.id.clone();
        let mut errors = Vec::new();
        plan.frontends.retain(|f| {
            let key = claim_of(f, id.protocol);
            match self.owners.get(&key) {
                Some(owner) if *owner != id => {
                    errors.push(ObjectError {
                        origin: None,
                        object: Some(ObjectRef::new("Service", &id.namespace, &id.name)),
                        message: format!(
                            "{} {}:{}/{} is already used by {owner}; not programmed",
                            kind_name(f.kind),
                            f.address,
                            f.port,
                            id.protocol
                        ),
                    });
                    false
                }
                _ => {
                    self.owners.insert(key, id.clone());
                    self.owned.entry(id.clone()).or_default().insert(key);
                    true
                }
            }
        });
        errors
    }

    /// Owner of a frontend.
    pub fn owner(&self, key: &FrontendClaim) -> Option<&ServicePortName> {
        self.owners.get(key)
    }

    /// Releases every frontend `id` owns, returning them.
    pub fn release(&mut self, id: &ServicePortName) -> Vec<FrontendClaim> {
        let mine: Vec<FrontendClaim> = self
            .owned
            .remove(id)
            .unwrap_or_default()
            .into_iter()
            .collect();
        for k in &mine {
            self.owners.remove(k);
        }
        mine
    }

    /// Frontend keys of a plan (before claiming).
    pub fn keys_of(plan: &ServicePlan) -> Vec<FrontendClaim> {
        plan.frontends
            .iter()
            .map(|f| claim_of(f, plan.id.protocol))
            .collect()
    }
}

fn kind_name(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIP => "ClusterIP",
        FrontendKind::NodePort => "NodePort",
        FrontendKind::LoadBalancer => "LoadBalancer IP",
        FrontendKind::ExternalIP => "externalIP",
    }
}

/// Parses an IPv4 address; IPv6 is `Ok(None)` (skipped while IPv4-only).
fn parse_ipv4(text: &str) -> Result<Option<Ipv4Addr>, ()> {
    match text.trim().parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => Ok(Some(v4)),
        Ok(IpAddr::V6(_)) => Ok(None),
        Err(_) => Err(()),
    }
}

/// Normalises an IPv4 CIDR (`10.1.2.3/8` → `10.0.0.0/8`); IPv6 is `Ok(None)`.
fn parse_cidr(text: &str) -> Result<Option<String>, ()> {
    let (addr, len) = text.split_once('/').ok_or(())?;
    let len: u8 = len.parse().map_err(|_| ())?;
    match parse_ipv4(addr)? {
        None => Ok(None),
        Some(_) if len > 32 => Err(()),
        Some(ip) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Ok(Some(format!(
                "{}/{len}",
                Ipv4Addr::from(u32::from(ip) & mask)
            )))
        }
    }
}

/// The plans of one Service's ports. `Err` when the Service as a whole is unusable.
fn service_plans(
    svc: &Service,
    key: &Key,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    opts: &TranslateOptions,
) -> Result<(Vec<ServicePlan>, Problems), String> {
    let (namespace, name) = (key.0.as_str(), key.1.as_str());
    let mut problems: Problems = Vec::new();
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        return Ok((vec![], problems));
    }
    let Some(spec) = &svc.spec else {
        return Err("no spec".into());
    };
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return Ok((vec![], problems));
    }
    let cluster_ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => vec![],
    };
    if cluster_ips.iter().any(|ip| ip.is_empty() || *ip == "None") {
        // Headless: DNS only, nothing for a proxy to do.
        return Ok((vec![], problems));
    }
    let mut cluster_addresses = Vec::new();
    for ip in cluster_ips {
        match parse_ipv4(ip) {
            Ok(Some(v4)) => cluster_addresses.push(v4),
            Ok(None) => {}
            Err(()) => return Err(format!("invalid clusterIP {ip:?}")),
        }
    }
    let mut external_ips = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        match parse_ipv4(ip) {
            Ok(Some(v4)) => external_ips.push(v4),
            Ok(None) => {}
            Err(()) => problems.push((None, format!("invalid externalIP {ip:?}; skipped"))),
        }
    }
    let mut lb_ips = Vec::new();
    if service_type == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for entry in ingress.into_iter().flatten() {
            // ipMode Proxy: the load balancer delivers to the node itself, so
            // the IP is not a frontend of this node.
            if entry.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(ip) = entry.ip.as_deref() else {
                continue;
            };
            match parse_ipv4(ip) {
                Ok(Some(v4)) => lb_ips.push(v4),
                Ok(None) => {}
                Err(()) => problems.push((
                    None,
                    format!("invalid LoadBalancer ingress IP {ip:?}; skipped"),
                )),
            }
        }
    }
    let node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
    let node_addresses = if node.addresses.is_empty() {
        vec![Ipv4Addr::UNSPECIFIED]
    } else if opts.nodeport_cidrs.is_empty() {
        node.addresses.clone()
    } else {
        node.addresses
            .iter()
            .copied()
            .filter(|a| opts.nodeport_cidrs.iter().any(|c| c.contains(*a)))
            .collect()
    };
    let policies = Policies {
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        externally_reachable: node_ports || !external_ips.is_empty() || !lb_ips.is_empty(),
    };
    let health_check_node_port = if service_type == "LoadBalancer" && policies.external_local {
        spec.health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
    } else {
        None
    };
    let mut source_ranges = Vec::new();
    for range in spec.load_balancer_source_ranges.iter().flatten() {
        match parse_cidr(range.trim()) {
            Ok(Some(cidr)) => source_ranges.push(cidr),
            Ok(None) => {}
            Err(()) => problems.push((
                None,
                format!("invalid loadBalancerSourceRanges entry {range:?}; skipped"),
            )),
        }
    }
    source_ranges.sort();
    source_ranges.dedup();

    let annotation = |key: &str| {
        svc.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    };
    let algorithm = match annotation(ANNOTATION_ALGORITHM) {
        None => Algorithm::default(),
        Some(v) => Algorithm::parse(v).unwrap_or_else(|| {
            problems.push((
                None,
                format!(
                    "{ANNOTATION_ALGORITHM}: unknown algorithm {v:?} (maglev, random, round-robin, source-hash, least-connections); using maglev"
                ),
            ));
            Algorithm::default()
        }),
    };
    let requested_size = match annotation(ANNOTATION_TABLE_SIZE) {
        None => None,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => {
                problems.push((
                    None,
                    format!(
                        "{ANNOTATION_TABLE_SIZE}: {v:?} is not a number; using the default size"
                    ),
                ));
                None
            }
        },
    };
    let service_weights = parse_weights(&svc.metadata).unwrap_or_else(|e| {
        problems.push((None, e));
        BTreeMap::new()
    });
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });

    let mut seen_ports: BTreeSet<(String, Protocol)> = BTreeSet::new();
    let mut plans = Vec::new();
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
            problems.push((
                None,
                format!(
                    "port {port_name:?}: protocol {} is not supported; port skipped",
                    port.protocol.as_deref().unwrap_or_default()
                ),
            ));
            continue;
        };
        let Some(number) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
            problems.push((
                None,
                format!("port {port_name:?}: invalid port {}", port.port),
            ));
            continue;
        };
        if !seen_ports.insert((port_name.clone(), protocol)) {
            problems.push((
                None,
                format!("port name {port_name:?}/{protocol} is used twice; the first one is kept"),
            ));
            continue;
        }
        let endpoints = collect_endpoints(
            slices,
            namespace,
            &port_name,
            protocol,
            &node.name,
            &service_weights,
            &mut problems,
        );
        let cat = categorize(&endpoints, node.zone.as_deref(), policies);
        let weight = |e: &Endpoint| e.weight.unwrap_or(1);
        let eligible = |set: &[&Endpoint]| -> Vec<SocketAddrV4> {
            set.iter()
                .filter(|e| weight(e) > 0)
                .map(|e| e.addr)
                .collect()
        };
        let internal = eligible(&cat.internal);
        let external = eligible(&cat.external);
        let mut local_backends: Vec<SocketAddrV4> = endpoints
            .iter()
            .filter(|e| e.local)
            .map(|e| e.addr)
            .collect();
        local_backends.sort();
        local_backends.dedup();
        let mut draining: Vec<SocketAddrV4> = cat
            .internal
            .iter()
            .chain(&cat.external)
            .filter(|e| weight(e) == 0)
            .map(|e| e.addr)
            .collect();
        draining.sort();
        draining.dedup();
        let mut inactive: Vec<SocketAddrV4> = endpoints
            .iter()
            .map(|e| e.addr)
            .filter(|a| {
                !internal.contains(a) && !external.contains(a) && draining.binary_search(a).is_err()
            })
            .collect();
        inactive.sort();
        inactive.dedup();
        let backend_weights: BTreeMap<SocketAddrV4, u32> = endpoints
            .iter()
            .filter(|e| weight(e) > 1)
            .filter(|e| internal.contains(&e.addr) || external.contains(&e.addr))
            .map(|e| (e.addr, weight(e)))
            .collect();
        let weighted = !backend_weights.is_empty();
        let needs_table = !internal.is_empty() && algorithm.needs_table(weighted);
        let maglev_table_size = needs_table.then(|| {
            table_size(
                requested_size,
                opts.maglev,
                internal.len(),
                &port_name,
                &mut problems,
            )
        });

        let mut frontends: Vec<Frontend> = Vec::new();
        let mut add = |kind, addresses: &[Ipv4Addr], port: u16| {
            frontends.extend(addresses.iter().map(|&address| Frontend {
                kind,
                address,
                port,
            }));
        };
        add(FrontendKind::ClusterIP, &cluster_addresses, number);
        if node_ports
            && let Some(np) = port
                .node_port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
        {
            add(FrontendKind::NodePort, &node_addresses, np);
        }
        add(FrontendKind::LoadBalancer, &lb_ips, number);
        add(FrontendKind::ExternalIP, &external_ips, number);
        frontends.sort();
        frontends.dedup();
        let separate_external =
            frontends.iter().any(|f| !f.kind.is_internal()) && external != internal;
        let external_maglev_table_size = (separate_external
            && !external.is_empty()
            && algorithm.needs_table(weighted))
        .then(|| {
            // Problems with the requested size were reported for the internal table.
            table_size(
                requested_size,
                opts.maglev,
                external.len(),
                &port_name,
                &mut Vec::new(),
            )
        });
        plans.push(ServicePlan {
            id: ServicePortName {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                port_name,
                protocol,
            },
            frontends,
            internal_backends: internal,
            external_backends: external,
            session_affinity_timeout_seconds: affinity,
            source_ranges: source_ranges.clone(),
            health_check_node_port,
            has_endpoints: cat.has_any,
            draining_backends: draining,
            inactive_backends: inactive,
            backend_weights,
            algorithm,
            maglev_table_size,
            external_maglev_table_size,
            local_backends,
        });
    }
    Ok((plans, problems))
}

/// The endpoints of Service port `port_name`/`protocol` across `slices`,
/// deduplicated by address:port (the first slice, by name, wins).
fn collect_endpoints(
    slices: &[&EndpointSlice],
    namespace: &str,
    port_name: &str,
    protocol: Protocol,
    node_name: &str,
    service_weights: &BTreeMap<Ipv4Addr, u32>,
    problems: &mut Problems,
) -> Vec<Endpoint> {
    let mut out: BTreeMap<SocketAddrV4, Endpoint> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue; // IPv6 (IPv4-only datapath) and FQDN slices
        }
        let slice_ref = || {
            ObjectRef::new(
                "EndpointSlice",
                namespace,
                slice.metadata.name.as_deref().unwrap_or_default(),
            )
        };
        let slice_weights = parse_weights(&slice.metadata).unwrap_or_else(|e| {
            problems.push((Some(slice_ref()), e));
            BTreeMap::new()
        });
        let port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name
                && Protocol::from_k8s(p.protocol.as_deref()) == Some(protocol)
        });
        let Some(port) = port.and_then(|p| p.port) else {
            continue;
        };
        let Some(port) = u16::try_from(port).ok().filter(|p| *p != 0) else {
            problems.push((Some(slice_ref()), format!("invalid port {port}")));
            continue;
        };
        for endpoint in &slice.endpoints {
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let Ok(ip) = address.parse::<Ipv4Addr>() else {
                problems.push((
                    Some(slice_ref()),
                    format!("invalid IPv4 endpoint address {address:?}; endpoint skipped"),
                ));
                continue;
            };
            let addr = SocketAddrV4::new(ip, port);
            if out.contains_key(&addr) {
                continue;
            }
            let conditions = endpoint.conditions.as_ref();
            let zones = endpoint
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect();
            out.insert(
                addr,
                Endpoint {
                    addr,
                    ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                    serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                    terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                    local: !node_name.is_empty()
                        && endpoint.node_name.as_deref() == Some(node_name),
                    zones,
                    weight: slice_weights
                        .get(&ip)
                        .or_else(|| service_weights.get(&ip))
                        .copied(),
                },
            );
        }
    }
    out.into_values().collect()
}

/// The table size of one Service port: the annotation if valid, else the
/// agent's default, else derived from the backend count.
fn table_size(
    requested: Option<u32>,
    opts: MaglevOptions,
    backends: usize,
    port_name: &str,
    problems: &mut Problems,
) -> u32 {
    let mut candidates = Vec::new();
    if let Some(r) = requested {
        candidates.push((r, ANNOTATION_TABLE_SIZE));
    }
    if let Some(d) = opts.default_size {
        candidates.push((d, "--maglev-table-size"));
    }
    for (size, source) in candidates {
        match maglev::validate_size(size, opts.max_size, backends) {
            Ok(()) => return size,
            Err(e) => problems.push((
                None,
                format!(
                    "port {port_name:?}: {source}: {e}; using a size derived from the backend count"
                ),
            )),
        }
    }
    maglev::default_size(backends, opts.max_size)
}

/// Parses the endpoint-weights annotation of an object: `IP=WEIGHT,...`.
fn parse_weights(meta: &ObjectMeta) -> Result<BTreeMap<Ipv4Addr, u32>, String> {
    let Some(value) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_WEIGHTS))
    else {
        return Ok(BTreeMap::new());
    };
    let mut out = BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let parsed = item.split_once('=').and_then(|(ip, w)| {
            Some((
                ip.trim().parse::<Ipv4Addr>().ok()?,
                w.trim().parse::<u32>().ok()?,
            ))
        });
        match parsed {
            Some((_, w)) if w > maglev::MAX_WEIGHT => {
                return Err(format!(
                    "{ANNOTATION_WEIGHTS}: weight {w} is above {}; annotation ignored",
                    maglev::MAX_WEIGHT
                ));
            }
            Some((ip, w)) => {
                out.insert(ip, w);
            }
            None => {
                return Err(format!(
                    "{ANNOTATION_WEIGHTS}: {item:?} is not IP=WEIGHT; annotation ignored"
                ));
            }
        }
    }
    Ok(out)
}
