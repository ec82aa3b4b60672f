//! One Service port's plan: its endpoints from the slices, sorted by which
//! traffic may use them, its frontends and its selection settings.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::api::{core::v1::ServicePort, discovery::v1::EndpointSlice};

use super::{
    NodeContext, Problems, TranslateOptions,
    endpoints::{Endpoint, categorize},
    service::{ServiceView, parse_weights, table_size},
};
use crate::{
    model::{Frontend, FrontendKind, Protocol, ServicePlan, ServicePortName},
    store::ObjectRef,
};

/// A Service port's identity and number, checked.
pub struct PortSpec<'p> {
    pub port: &'p ServicePort,
    pub name: String,
    pub protocol: Protocol,
    pub number: u16,
}

impl<'p> PortSpec<'p> {
    /// Checks a port of the Service; `None` (reported) when it cannot be served.
    pub fn read(port: &'p ServicePort, problems: &mut Problems) -> Option<Self> {
        let name = port.name.clone().unwrap_or_default();
        let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
            problems.push((
                None,
                format!(
                    "port {name:?}: protocol {} is not supported; port skipped",
                    port.protocol.as_deref().unwrap_or_default()
                ),
            ));
            return None;
        };
        let Some(number) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
            problems.push((None, format!("port {name:?}: invalid port {}", port.port)));
            return None;
        };
        Some(Self {
            port,
            name,
            protocol,
            number,
        })
    }
}

/// The addresses that take new flows (weight above 0).
fn eligible(set: &[&Endpoint]) -> Vec<SocketAddrV4> {
    set.iter()
        .filter(|e| weight(e) > 0)
        .map(|e| e.addr)
        .collect()
}

fn weight(e: &Endpoint) -> u32 {
    e.weight.unwrap_or(1)
}

fn sorted(mut v: Vec<SocketAddrV4>) -> Vec<SocketAddrV4> {
    v.sort();
    v.dedup();
    v
}

/// The plan of one port of the Service `id` (namespace, name) seen through `view`.
pub fn plan(
    view: &ServiceView<'_>,
    (namespace, name): (&str, &str),
    port: &PortSpec<'_>,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    opts: &TranslateOptions,
    problems: &mut Problems,
) -> ServicePlan {
    let endpoints = collect_endpoints(
        slices,
        namespace,
        &port.name,
        port.protocol,
        &node.name,
        &view.weights,
        problems,
    );
    let cat = categorize(&endpoints, node.zone.as_deref(), view.policies);
    let internal = eligible(&cat.internal);
    let external = eligible(&cat.external);
    let cluster = eligible(&cat.cluster);
    let local_backends = sorted(
        endpoints
            .iter()
            .filter(|e| e.local)
            .map(|e| e.addr)
            .collect(),
    );
    let draining = sorted(
        cat.internal
            .iter()
            .chain(&cat.external)
            .chain(&cat.cluster)
            .filter(|e| weight(e) == 0)
            .map(|e| e.addr)
            .collect(),
    );
    let inactive = sorted(
        endpoints
            .iter()
            .map(|e| e.addr)
            .filter(|a| {
                !internal.contains(a)
                    && !external.contains(a)
                    && !cluster.contains(a)
                    && draining.binary_search(a).is_err()
            })
            .collect(),
    );
    let backend_weights: BTreeMap<SocketAddrV4, u32> = endpoints
        .iter()
        .filter(|e| weight(e) > 1)
        .filter(|e| {
            internal.contains(&e.addr) || external.contains(&e.addr) || cluster.contains(&e.addr)
        })
        .map(|e| (e.addr, weight(e)))
        .collect();
    let weighted = !backend_weights.is_empty();
    let needs_table = !internal.is_empty() && view.algorithm.needs_table(weighted);
    let maglev_table_size = needs_table.then(|| {
        table_size(
            view.requested_size,
            opts.maglev,
            internal.len(),
            &port.name,
            problems,
        )
    });
    let frontends = frontends(view, port);
    let reachable = frontends.iter().any(|f| !f.kind.is_internal());
    // A table of its own only for backends no earlier table has; problems
    // with the requested size were reported for the internal table.
    let own_size = |backends: &[SocketAddrV4], earlier: &[&[SocketAddrV4]]| {
        (reachable
            && !backends.is_empty()
            && !earlier.contains(&backends)
            && view.algorithm.needs_table(weighted))
        .then(|| {
            table_size(
                view.requested_size,
                opts.maglev,
                backends.len(),
                &port.name,
                &mut Vec::new(),
            )
        })
    };
    let external_maglev_table_size = own_size(&external, &[&internal]);
    let cluster_maglev_table_size = own_size(&cluster, &[&internal, &external]);
    ServicePlan {
        id: ServicePortName {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port_name: port.name.clone(),
            protocol: port.protocol,
        },
        frontends,
        internal_backends: internal,
        external_backends: external,
        session_affinity_timeout_seconds: view.affinity,
        source_ranges: view.source_ranges.clone(),
        health_check_node_port: view.health_check_node_port,
        has_endpoints: cat.has_any,
        draining_backends: draining,
        inactive_backends: inactive,
        backend_weights,
        algorithm: view.algorithm,
        maglev_table_size,
        external_maglev_table_size,
        cluster_backends: if reachable { cluster } else { Vec::new() },
        cluster_maglev_table_size,
        local_backends,
    }
}

/// Every frontend of one port: ClusterIPs, NodePorts, LoadBalancer IPs,
/// externalIPs; sorted, no duplicates.
fn frontends(view: &ServiceView<'_>, port: &PortSpec<'_>) -> Vec<Frontend> {
    let mut frontends: Vec<Frontend> = Vec::new();
    let mut add = |kind, addresses: &[Ipv4Addr], port: u16| {
        frontends.extend(addresses.iter().map(|&address| Frontend {
            kind,
            address,
            port,
        }));
    };
    add(
        FrontendKind::ClusterIP,
        &view.cluster_addresses,
        port.number,
    );
    if view.node_ports
        && let Some(np) = port
            .port
            .node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
    {
        add(FrontendKind::NodePort, &view.node_addresses, np);
    }
    add(FrontendKind::LoadBalancer, &view.lb_ips, port.number);
    add(FrontendKind::ExternalIP, &view.external_ips, port.number);
    frontends.sort();
    frontends.dedup();
    frontends
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
