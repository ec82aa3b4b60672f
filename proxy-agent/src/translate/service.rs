//! Reading a Service once: everything its ports share (addresses, traffic
//! policies, affinity, source ranges, annotations), with each problem
//! reported and the rest kept.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use super::{
    ANNOTATION_ALGORITHM, ANNOTATION_TABLE_SIZE, ANNOTATION_WEIGHTS, DEFAULT_AFFINITY_TIMEOUT,
    LABEL_SERVICE_PROXY_NAME, MaglevOptions, NodeContext, Problems, TranslateOptions,
    endpoints::Policies,
};
use crate::{
    maglev,
    model::{Algorithm, Cidr},
};

/// What all ports of a proxied Service share.
#[derive(Clone, Debug)]
pub struct ServiceView<'a> {
    pub spec: &'a k8s_openapi::api::core::v1::ServiceSpec,
    /// IPv4 ClusterIPs.
    pub cluster_addresses: Vec<Ipv4Addr>,
    /// `type: NodePort` or `LoadBalancer`: its ports' NodePorts are served.
    pub node_ports: bool,
    /// Where NodePorts listen: this node's addresses within
    /// `--nodeport-addresses` (`0.0.0.0` when the Node is unknown).
    pub node_addresses: Vec<Ipv4Addr>,
    pub lb_ips: Vec<Ipv4Addr>,
    pub external_ips: Vec<Ipv4Addr>,
    pub policies: Policies,
    pub health_check_node_port: Option<u16>,
    pub source_ranges: Vec<Cidr>,
    pub algorithm: Algorithm,
    /// The `maglev-table-size` annotation, if it is a number.
    pub requested_size: Option<u32>,
    /// The Service's `endpoint-weights` annotation.
    pub weights: BTreeMap<Ipv4Addr, u32>,
    /// `sessionAffinity: ClientIP` timeout.
    pub affinity: Option<u32>,
}

/// Parses an IPv4 address; IPv6 is `Ok(None)` (skipped while IPv4-only).
fn parse_ipv4(text: &str) -> Result<Option<Ipv4Addr>, ()> {
    match text.trim().parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => Ok(Some(v4)),
        Ok(IpAddr::V6(_)) => Ok(None),
        Err(_) => Err(()),
    }
}

/// Parses a `loadBalancerSourceRanges` entry (`a.b.c.d/n`, host bits
/// cleared); IPv6 is `Ok(None)`.
fn parse_source_range(text: &str) -> Result<Option<Cidr>, ()> {
    let (addr, _) = text.split_once('/').ok_or(())?;
    match parse_ipv4(addr)? {
        None => Ok(None),
        Some(_) => text.parse().map(Some).map_err(|_| ()),
    }
}

/// The addresses of `texts` that are IPv4, each bad one reported as `what`.
fn ipv4_list<'s>(
    texts: impl IntoIterator<Item = &'s str>,
    what: &str,
    problems: &mut Problems,
) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for ip in texts {
        match parse_ipv4(ip) {
            Ok(Some(v4)) => out.push(v4),
            Ok(None) => {}
            Err(()) => problems.push((None, format!("invalid {what} {ip:?}; skipped"))),
        }
    }
    out
}

impl<'a> ServiceView<'a> {
    /// Reads `svc`: `Ok(None)` for a Service no proxy serves (other
    /// proxy's, ExternalName, headless), `Err` when it is unusable as a whole.
    pub fn read(
        svc: &'a Service,
        node: &NodeContext,
        opts: &TranslateOptions,
        problems: &mut Problems,
    ) -> Result<Option<Self>, String> {
        let labels = svc.metadata.labels.as_ref();
        if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
            return Ok(None);
        }
        let Some(spec) = &svc.spec else {
            return Err("no spec".into());
        };
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        if service_type == "ExternalName" {
            return Ok(None);
        }
        let cluster_ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            (_, Some(ip)) => vec![ip.as_str()],
            _ => vec![],
        };
        if cluster_ips.iter().any(|ip| ip.is_empty() || *ip == "None") {
            // Headless: DNS only, nothing for a proxy to do.
            return Ok(None);
        }
        let mut cluster_addresses = Vec::new();
        for ip in cluster_ips {
            match parse_ipv4(ip) {
                Ok(Some(v4)) => cluster_addresses.push(v4),
                Ok(None) => {}
                Err(()) => return Err(format!("invalid clusterIP {ip:?}")),
            }
        }
        let external_ips = ipv4_list(
            spec.external_ips.iter().flatten().map(String::as_str),
            "externalIP",
            problems,
        );
        let lb_ips = if service_type == "LoadBalancer" {
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref());
            // ipMode Proxy: the load balancer delivers to the node itself, so
            // the IP is not a frontend of this node.
            let ips = ingress
                .into_iter()
                .flatten()
                .filter(|e| e.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|e| e.ip.as_deref());
            ipv4_list(ips, "LoadBalancer ingress IP", problems)
        } else {
            Vec::new()
        };
        let node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
        let node_addresses = node.nodeport_addresses(&opts.nodeport_cidrs);
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
            match parse_source_range(range.trim()) {
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
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
        });
        Ok(Some(Self {
            spec,
            cluster_addresses,
            node_ports,
            node_addresses,
            lb_ips,
            external_ips,
            policies,
            health_check_node_port,
            source_ranges,
            algorithm: algorithm(&svc.metadata, problems),
            requested_size: requested_size(&svc.metadata, problems),
            weights: parse_weights(&svc.metadata).unwrap_or_else(|e| {
                problems.push((None, e));
                BTreeMap::new()
            }),
            affinity,
        }))
    }
}

fn annotation<'m>(meta: &'m ObjectMeta, key: &str) -> Option<&'m str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// The `lb-algorithm` annotation (Maglev when unset or unknown).
fn algorithm(meta: &ObjectMeta, problems: &mut Problems) -> Algorithm {
    match annotation(meta, ANNOTATION_ALGORITHM) {
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
    }
}

/// The `maglev-table-size` annotation, if it is a number (checked per port).
fn requested_size(meta: &ObjectMeta, problems: &mut Problems) -> Option<u32> {
    let v = annotation(meta, ANNOTATION_TABLE_SIZE)?;
    match v.trim().parse::<u32>() {
        Ok(n) => Some(n),
        Err(_) => {
            problems.push((
                None,
                format!("{ANNOTATION_TABLE_SIZE}: {v:?} is not a number; using the default size"),
            ));
            None
        }
    }
}

/// The table size of one Service port: the annotation if valid, else the
/// agent's default, else derived from the backend count.
pub fn table_size(
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
pub fn parse_weights(meta: &ObjectMeta) -> Result<BTreeMap<Ipv4Addr, u32>, String> {
    let Some(value) = annotation(meta, ANNOTATION_WEIGHTS) else {
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
