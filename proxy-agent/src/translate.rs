//! Translation: a pure function from the stored objects to the desired state,
//! with kube-proxy's semantics.
//!
//! - Services left alone: `type: ExternalName`, headless (`clusterIP: None`),
//!   and those labelled `service.kubernetes.io/service-proxy-name` (another
//!   proxy owns them).
//! - EndpointSlices are grouped by their `kubernetes.io/service-name` label;
//!   slices labelled `service.kubernetes.io/headless`, FQDN slices and (while
//!   the datapath is IPv4-only) IPv6 slices are ignored.
//! - A slice port matches a Service port by name (and protocol); its number is
//!   the backend port. An endpoint contributes `addresses[0]`; the same
//!   address:port in several slices counts once.
//! - Ready endpoints (`ready` unset counts as ready) are used; when none is
//!   ready, serving-and-terminating ones are (graceful termination).
//!
//! Annotations (documented in the README):
//! - `ebpf-proxy.io/lb-algorithm` on a Service: `maglev` (default) or `random`;
//! - `ebpf-proxy.io/maglev-table-size` on a Service: a prime table size;
//! - `ebpf-proxy.io/endpoint-weights` on a Service or an EndpointSlice:
//!   `IP=WEIGHT,...`; weight 0 drains an endpoint (no new flows). A slice's
//!   weights override the Service's for its endpoints.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    maglev,
    model::{
        Algorithm, DesiredState, Frontend, FrontendKind, Protocol, ServicePlan, ServicePortName,
    },
    store::{ObjectError, ObjectRef, Store},
};

/// Label naming the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label marking a Service handled by another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking EndpointSlices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
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
}

/// Result of translation: the desired state and every object problem found.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub desired: DesiredState,
    pub errors: Vec<ObjectError>,
}

/// Endpoints of one Service port, before the ready/terminating choice.
#[derive(Default)]
struct Candidates {
    ready: BTreeSet<SocketAddrV4>,
    serving_terminating: BTreeSet<SocketAddrV4>,
    /// Weights set by annotations.
    weights: BTreeMap<SocketAddrV4, u32>,
}

/// Translates `store` into the desired datapath state.
pub fn translate(store: &Store, opts: &TranslateOptions) -> Translation {
    let mut out = Translation::default();
    let mut error = |object: ObjectRef, message: String| {
        out.errors.push(ObjectError {
            origin: store.origin_of(&object),
            object: Some(object),
            message,
        });
    };

    // Slices by (namespace, service name).
    let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for ((namespace, name), stored) in &store.slices {
        let slice = &stored.object;
        let labels = slice.metadata.labels.as_ref();
        if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
            continue;
        }
        let Some(service) = labels.and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
            error(
                ObjectRef::new("EndpointSlice", namespace, name),
                format!("no {LABEL_SERVICE_NAME} label; ignored"),
            );
            continue;
        };
        if !store
            .services
            .contains_key(&(namespace.clone(), service.clone()))
        {
            error(
                ObjectRef::new("EndpointSlice", namespace, name),
                format!("belongs to Service {namespace}/{service}, which does not exist; ignored"),
            );
            continue;
        }
        slices
            .entry((namespace.as_str(), service.as_str()))
            .or_default()
            .push(slice);
    }

    let mut plans = Vec::new();
    for ((namespace, name), stored) in &store.services {
        let object = ObjectRef::new("Service", namespace, name);
        let svc_slices = slices
            .get(&(namespace.as_str(), name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        match service_plans(&stored.object, namespace, name, svc_slices, opts) {
            Ok((mut p, problems)) => {
                plans.append(&mut p);
                for (obj, message) in problems {
                    error(obj.unwrap_or_else(|| object.clone()), message);
                }
            }
            Err(message) => error(object, message),
        }
    }

    // Two Service ports may not claim the same frontend: the first (by name) keeps it.
    plans.sort_by(|a, b| a.id.cmp(&b.id));
    let mut claimed: BTreeMap<(Ipv4Addr, u16, Protocol), ServicePortName> = BTreeMap::new();
    for plan in &mut plans {
        let id = plan.id.clone();
        plan.frontends
            .retain(|f| match claimed.get(&(f.address, f.port, id.protocol)) {
                Some(owner) => {
                    error(
                        ObjectRef::new("Service", &id.namespace, &id.name),
                        format!(
                            "{}:{}/{} is already used by {owner}; not programmed",
                            f.address, f.port, id.protocol
                        ),
                    );
                    false
                }
                None => {
                    claimed.insert((f.address, f.port, id.protocol), id.clone());
                    true
                }
            });
    }
    plans.retain(|p| !p.frontends.is_empty());
    out.desired.services = plans;
    out
}

/// Problems found in a Service or its slices that do not stop the rest of it.
type Problems = Vec<(Option<ObjectRef>, String)>;

/// The plans of one Service's ports. `Err` when the Service as a whole is unusable.
fn service_plans(
    svc: &Service,
    namespace: &str,
    name: &str,
    slices: &[&EndpointSlice],
    opts: &TranslateOptions,
) -> Result<(Vec<ServicePlan>, Problems), String> {
    let mut problems: Problems = Vec::new();
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        return Ok((vec![], problems));
    }
    let Some(spec) = &svc.spec else {
        return Err("no spec".into());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
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
    let mut addresses = Vec::new();
    for ip in cluster_ips {
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => addresses.push(v4),
            Ok(std::net::IpAddr::V6(_)) => {} // IPv4-only datapath
            Err(_) => return Err(format!("invalid clusterIP {ip:?}")),
        }
    }

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
                    "{ANNOTATION_ALGORITHM}: unknown algorithm {v:?} (maglev, random); using maglev"
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
        let Ok(number) = u16::try_from(port.port) else {
            problems.push((
                None,
                format!("port {port_name:?}: invalid port {}", port.port),
            ));
            continue;
        };
        if number == 0 {
            problems.push((None, format!("port {port_name:?}: invalid port 0")));
            continue;
        }
        if !seen_ports.insert((port_name.clone(), protocol)) {
            problems.push((
                None,
                format!("port name {port_name:?}/{protocol} is used twice; the first one is kept"),
            ));
            continue;
        }
        let candidates = endpoints_for(
            slices,
            namespace,
            &port_name,
            protocol,
            &service_weights,
            &mut problems,
        );
        let backends = if candidates.ready.is_empty() {
            candidates.serving_terminating
        } else {
            candidates.ready
        };
        let (eligible, draining): (Vec<_>, Vec<_>) = backends
            .iter()
            .partition(|b| candidates.weights.get(b).copied().unwrap_or(1) > 0);
        let backend_weights: BTreeMap<SocketAddrV4, u32> = eligible
            .iter()
            .filter_map(|b| {
                let w = candidates.weights.get(b).copied().unwrap_or(1);
                (w != 1).then_some((*b, w))
            })
            .collect();
        let weighted = backend_weights.values().any(|w| *w != 1);
        let needs_table = !eligible.is_empty() && (algorithm == Algorithm::Maglev || weighted);
        let maglev_table_size = needs_table.then(|| {
            table_size(
                requested_size,
                opts.maglev,
                eligible.len(),
                &port_name,
                &mut problems,
            )
        });
        let mut frontends: Vec<Frontend> = addresses
            .iter()
            .map(|&address| Frontend {
                kind: FrontendKind::ClusterIP,
                address,
                port: number,
            })
            .collect();
        frontends.sort();
        frontends.dedup();
        plans.push(ServicePlan {
            id: ServicePortName {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                port_name,
                protocol,
            },
            frontends,
            internal_backends: eligible,
            draining_backends: draining,
            backend_weights,
            algorithm,
            maglev_table_size,
            session_affinity_timeout_seconds: affinity,
        });
    }
    Ok((plans, problems))
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

/// Endpoints of the Service port `port_name`/`protocol` across `slices`.
fn endpoints_for(
    slices: &[&EndpointSlice],
    namespace: &str,
    port_name: &str,
    protocol: Protocol,
    service_weights: &BTreeMap<Ipv4Addr, u32>,
    problems: &mut Problems,
) -> Candidates {
    let mut out = Candidates::default();
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
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let backend = SocketAddrV4::new(ip, port);
            if let Some(w) = slice_weights.get(&ip).or_else(|| service_weights.get(&ip)) {
                out.weights.insert(backend, *w);
            }
            if ready {
                out.ready.insert(backend);
            } else if serving && terminating {
                out.serving_terminating.insert(backend);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::load_str;

    fn translate_yaml(yaml: &str) -> Translation {
        let mut store = Store::default();
        let mut errors = Vec::new();
        load_str(yaml, "t.yaml", &mut store, &mut errors);
        assert_eq!(errors, vec![], "fixture must load cleanly");
        translate(&store, &TranslateOptions::default())
    }

    fn backends(t: &Translation, port_name: &str) -> Vec<String> {
        t.desired
            .services
            .iter()
            .find(|s| s.id.port_name == port_name)
            .map(|s| s.internal_backends.iter().map(|b| b.to_string()).collect())
            .unwrap_or_default()
    }

    const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: dns, port: 53, protocol: UDP}
"#;

    /// Table of (case, slices yaml, port, expected backends).
    #[test]
    fn endpoint_selection_table() {
        let cases: &[(&str, &str, &str, &[&str])] = &[
            (
                "named port number comes from the slice; unset ready counts as ready",
                r#"
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.2]
- addresses: [10.0.0.1]
  conditions: {ready: true}
"#,
                "http",
                &["10.0.0.1:8080", "10.0.0.2:8080"],
            ),
            (
                "not-ready endpoints are left out",
                r#"
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: false}
- addresses: [10.0.0.2]
"#,
                "http",
                &["10.0.0.2:8080"],
            ),
            (
                "no ready endpoint: serving and terminating ones are used",
                r#"
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.0.0.2]
  conditions: {ready: false, serving: false, terminating: true}
"#,
                "http",
                &["10.0.0.1:8080"],
            ),
            (
                "only addresses[0] counts",
                r#"
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.1, 10.0.0.9]
"#,
                "http",
                &["10.0.0.1:8080"],
            ),
            (
                "protocol must match too",
                r#"
ports: [{name: dns, port: 5353, protocol: TCP}]
endpoints:
- addresses: [10.0.0.1]
"#,
                "dns",
                &[],
            ),
            (
                "udp port",
                r#"
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.0.0.1]
"#,
                "dns",
                &["10.0.0.1:5353"],
            ),
        ];
        for (case, slice, port, expected) in cases {
            let yaml = format!(
                "{SVC}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-a, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\n{slice}"
            );
            let t = translate_yaml(&yaml);
            assert_eq!(t.errors, vec![], "{case}");
            assert_eq!(backends(&t, port), *expected, "{case}");
        }
    }

    #[test]
    fn same_endpoint_in_two_slices_counts_once_and_ipv6_fqdn_ignored() {
        let slice = |name: &str, family: &str, addr: &str| {
            format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}\naddressType: {family}\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [\"{addr}\"]}}]\n"
            )
        };
        let yaml = format!(
            "{SVC}{}{}{}{}",
            slice("a", "IPv4", "10.0.0.1"),
            slice("b", "IPv4", "10.0.0.1"),
            slice("c", "IPv6", "fd00::1"),
            slice("d", "FQDN", "example.com"),
        );
        let t = translate_yaml(&yaml);
        assert_eq!(t.errors, vec![]);
        assert_eq!(backends(&t, "http"), ["10.0.0.1:8080"]);
    }

    #[test]
    fn services_left_alone() {
        for (case, spec_and_meta) in [
            (
                "headless",
                "metadata: {name: h, namespace: ns}\nspec: {clusterIP: None, ports: [{port: 80}]}",
            ),
            (
                "external name",
                "metadata: {name: e, namespace: ns}\nspec: {type: ExternalName, externalName: example.com}",
            ),
            (
                "other proxy",
                "metadata: {name: o, namespace: ns, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}",
            ),
        ] {
            let t = translate_yaml(&format!("apiVersion: v1\nkind: Service\n{spec_and_meta}\n"));
            assert_eq!(t.desired.services, vec![], "{case}");
            assert_eq!(t.errors, vec![], "{case}");
        }
    }

    #[test]
    fn selectorless_service_without_slices_has_no_backends() {
        let t = translate_yaml(SVC);
        assert_eq!(t.desired.services.len(), 2);
        assert!(
            t.desired
                .services
                .iter()
                .all(|s| s.internal_backends.is_empty())
        );
        let http = &t.desired.services[1];
        assert_eq!(http.id.port_name, "http");
        assert_eq!(
            http.frontends,
            vec![Frontend {
                kind: FrontendKind::ClusterIP,
                address: Ipv4Addr::new(10, 96, 0, 10),
                port: 80
            }]
        );
    }

    #[test]
    fn bad_objects_are_named_and_the_rest_is_kept() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: dup, namespace: ns}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: a, port: 80}, {name: a, port: 81}]
---
apiVersion: v1
kind: Service
metadata: {name: badip, namespace: ns}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan, namespace: ns, labels: {kubernetes.io/service-name: nope}}
addressType: IPv4
endpoints: []
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dup-1, namespace: ns, labels: {kubernetes.io/service-name: dup}}
addressType: IPv4
ports: [{name: a, port: 8080}]
endpoints: [{addresses: [not-an-ip]}, {addresses: [10.0.0.7]}]
"#;
        let t = translate_yaml(yaml);
        let messages: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
        let has = |needle: &str| messages.iter().any(|m| m.contains(needle));
        assert!(
            has("Service ns/dup: port name \"a\"/TCP is used twice"),
            "{messages:?}"
        );
        assert!(has("Service ns/badip: invalid clusterIP"), "{messages:?}");
        assert!(
            has("EndpointSlice ns/orphan: belongs to Service ns/nope"),
            "{messages:?}"
        );
        assert!(
            has("EndpointSlice ns/dup-1: invalid IPv4 endpoint address"),
            "{messages:?}"
        );
        assert!(
            messages.iter().all(|m| m.starts_with("t.yaml: ")),
            "{messages:?}"
        );
        // The good part of ns/dup still works.
        assert_eq!(t.desired.services.len(), 1);
        assert_eq!(backends(&t, "a"), ["10.0.0.7:8080"]);
    }

    #[test]
    fn conflicting_frontends_first_by_name_wins() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: ns}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
"#;
        let t = translate_yaml(yaml);
        assert_eq!(t.desired.services.len(), 1);
        assert_eq!(t.desired.services[0].id.name, "a");
        assert!(t.errors[0].to_string().contains("already used by ns/a"));
    }

    fn one_service(yaml: &str) -> (ServicePlan, Vec<String>) {
        let mut store = Store::default();
        let mut errors = Vec::new();
        load_str(yaml, "t.yaml", &mut store, &mut errors);
        assert_eq!(errors, vec![]);
        let t = translate(&store, &TranslateOptions::default());
        assert_eq!(t.desired.services.len(), 1, "{:?}", t.errors);
        (
            t.desired.services[0].clone(),
            t.errors.iter().map(ToString::to_string).collect(),
        )
    }

    fn annotated(annotations: &str, slice_annotations: &str, extra_spec: &str) -> String {
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns, annotations: {{{annotations}}}}}
spec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80}}]{extra_spec}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-a, namespace: ns, labels: {{kubernetes.io/service-name: web}}, annotations: {{{slice_annotations}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.0.0.1]}}, {{addresses: [10.0.0.2]}}, {{addresses: [10.0.0.3]}}]
"#
        )
    }

    #[test]
    fn selection_annotations_table() {
        struct Case {
            name: &'static str,
            service: &'static str,
            slice: &'static str,
            algorithm: Algorithm,
            size: Option<u32>,
            weights: &'static [(&'static str, u32)],
            draining: &'static [&'static str],
            error: Option<&'static str>,
        }
        let cases = [
            Case {
                name: "defaults: maglev, size from 3 backends",
                service: "",
                slice: "",
                algorithm: Algorithm::Maglev,
                size: Some(307),
                weights: &[],
                draining: &[],
                error: None,
            },
            Case {
                name: "explicit prime size",
                service: "ebpf-proxy.io/maglev-table-size: '16381'",
                slice: "",
                algorithm: Algorithm::Maglev,
                size: Some(16_381),
                weights: &[],
                draining: &[],
                error: None,
            },
            Case {
                name: "non-prime size is an error, default used",
                service: "ebpf-proxy.io/maglev-table-size: '16384'",
                slice: "",
                algorithm: Algorithm::Maglev,
                size: Some(307),
                weights: &[],
                draining: &[],
                error: Some("table size 16384 is not prime"),
            },
            Case {
                name: "size above the maximum is an error",
                service: "ebpf-proxy.io/maglev-table-size: '262147'",
                slice: "",
                algorithm: Algorithm::Maglev,
                size: Some(307),
                weights: &[],
                draining: &[],
                error: Some("outside 2..=131071"),
            },
            Case {
                name: "random without weights: no table",
                service: "ebpf-proxy.io/lb-algorithm: random",
                slice: "",
                algorithm: Algorithm::Random,
                size: None,
                weights: &[],
                draining: &[],
                error: None,
            },
            Case {
                name: "random with weights: a weighted table",
                service: "ebpf-proxy.io/lb-algorithm: random, ebpf-proxy.io/endpoint-weights: '10.0.0.1=4'",
                slice: "",
                algorithm: Algorithm::Random,
                size: Some(307),
                weights: &[("10.0.0.1:8080", 4)],
                draining: &[],
                error: None,
            },
            Case {
                name: "unknown algorithm is an error, maglev used",
                service: "ebpf-proxy.io/lb-algorithm: roundrobin",
                slice: "",
                algorithm: Algorithm::Maglev,
                size: Some(307),
                weights: &[],
                draining: &[],
                error: Some("unknown algorithm \"roundrobin\""),
            },
            Case {
                name: "service weights; weight 0 drains",
                service: "ebpf-proxy.io/endpoint-weights: '10.0.0.1=5, 10.0.0.2=0'",
                slice: "",
                algorithm: Algorithm::Maglev,
                size: Some(211),
                weights: &[("10.0.0.1:8080", 5)],
                draining: &["10.0.0.2:8080"],
                error: None,
            },
            Case {
                name: "slice weights override the service's",
                service: "ebpf-proxy.io/endpoint-weights: '10.0.0.1=5'",
                slice: "ebpf-proxy.io/endpoint-weights: '10.0.0.1=2'",
                algorithm: Algorithm::Maglev,
                size: Some(307),
                weights: &[("10.0.0.1:8080", 2)],
                draining: &[],
                error: None,
            },
            Case {
                name: "malformed weights are an error naming the slice",
                service: "",
                slice: "ebpf-proxy.io/endpoint-weights: '10.0.0.1:3'",
                algorithm: Algorithm::Maglev,
                size: Some(307),
                weights: &[],
                draining: &[],
                error: Some(
                    "EndpointSlice ns/web-a: ebpf-proxy.io/endpoint-weights: \"10.0.0.1:3\" is not IP=WEIGHT",
                ),
            },
        ];
        for c in cases {
            let (plan, errors) = one_service(&annotated(c.service, c.slice, ""));
            let case = c.name;
            assert_eq!(plan.algorithm, c.algorithm, "{case}");
            assert_eq!(plan.maglev_table_size, c.size, "{case}");
            let want: BTreeMap<SocketAddrV4, u32> = c
                .weights
                .iter()
                .map(|(b, w)| (b.parse().unwrap(), *w))
                .collect();
            assert_eq!(plan.backend_weights, want, "{case}");
            let want: Vec<SocketAddrV4> = c.draining.iter().map(|b| b.parse().unwrap()).collect();
            assert_eq!(plan.draining_backends, want, "{case}");
            match c.error {
                None => assert_eq!(errors, Vec::<String>::new(), "{case}"),
                Some(e) => assert!(errors.iter().any(|m| m.contains(e)), "{case}: {errors:?}"),
            }
        }
    }

    #[test]
    fn client_ip_affinity_sets_the_timeout() {
        let (plan, _) = one_service(&annotated("", "", ", sessionAffinity: ClientIP"));
        assert_eq!(
            plan.session_affinity_timeout_seconds,
            Some(DEFAULT_AFFINITY_TIMEOUT)
        );
        let (plan, _) = one_service(&annotated(
            "",
            "",
            ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
        ));
        assert_eq!(plan.session_affinity_timeout_seconds, Some(60));
        let (plan, _) = one_service(&annotated("", "", ""));
        assert_eq!(plan.session_affinity_timeout_seconds, None);
    }
}
