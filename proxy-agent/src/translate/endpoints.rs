//! Which endpoints a Service port uses, from this node's point of view:
//! kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go, v1.33).
//!
//! - Cluster endpoints (for `Cluster` traffic policies): the ready ones, or,
//!   when none is ready, the serving-and-terminating ones. Topology hints
//!   narrow them to this node's zone, but only when every ready endpoint
//!   carries hints and at least one hint names this zone (trafficDistribution
//!   `PreferClose` and `topology-mode: Auto` both work through these hints).
//! - Local endpoints (for `Local` policies): this node's ready ones, or, when
//!   none is ready, this node's serving-and-terminating ones.
//! - Internal traffic (ClusterIP) uses local endpoints under
//!   `internalTrafficPolicy: Local`, cluster endpoints otherwise; external
//!   traffic (NodePort, LoadBalancer, externalIPs) the same with
//!   `externalTrafficPolicy`, and nothing when the Service is not externally
//!   reachable. Traffic from inside the node (pods, host processes) to those
//!   external frontends uses the cluster endpoints whatever the policy, as
//!   kube-proxy short-circuits it to the Service's cluster chain.

use std::{collections::BTreeSet, net::SocketAddrV4};

/// One endpoint of a Service port, deduplicated across slices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddrV4,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node (`nodeName` matches).
    pub local: bool,
    /// `hints.forZones`.
    pub zones: BTreeSet<String>,
    /// Weight set by annotation, if any.
    pub weight: Option<u32>,
}

/// The traffic policies and reachability of a Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    pub internal_local: bool,
    pub external_local: bool,
    pub externally_reachable: bool,
}

/// Endpoints for each kind of traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized<'a> {
    pub internal: Vec<&'a Endpoint>,
    pub external: Vec<&'a Endpoint>,
    /// External frontends reached from inside the node (empty when the
    /// Service is not externally reachable).
    pub cluster: Vec<&'a Endpoint>,
    /// Some endpoint anywhere can take traffic (else: reject, not drop).
    pub has_any: bool,
}

/// Whether topology hints may narrow the cluster endpoints to `zone`.
fn can_use_topology(endpoints: &[Endpoint], zone: Option<&str>) -> bool {
    let mut for_zone = false;
    for ep in endpoints.iter().filter(|e| e.ready) {
        if ep.zones.is_empty() {
            return false;
        }
        if zone.is_some_and(|z| ep.zones.contains(z)) {
            for_zone = true;
        }
    }
    for_zone
}

/// Sorts endpoints for each kind of traffic, as kube-proxy does.
pub fn categorize<'a>(
    endpoints: &'a [Endpoint],
    zone: Option<&str>,
    p: Policies,
) -> Categorized<'a> {
    let uses_cluster = !p.internal_local || (p.externally_reachable && !p.external_local);
    let uses_local = p.internal_local || (p.externally_reachable && p.external_local);
    let mut has_any = false;

    let mut cluster = Vec::new();
    if uses_cluster || p.externally_reachable {
        let topology = can_use_topology(endpoints, zone);
        cluster = endpoints
            .iter()
            .filter(|e| e.ready && (!topology || zone.is_some_and(|z| e.zones.contains(z))))
            .collect();
        if cluster.is_empty() {
            cluster = endpoints
                .iter()
                .filter(|e| e.serving && e.terminating)
                .collect();
        }
        has_any = uses_cluster && !cluster.is_empty();
    }

    let mut local = Vec::new();
    if uses_local {
        let (mut local_ready, mut local_terminating) = (false, false);
        for e in endpoints {
            if e.ready {
                has_any = true;
                local_ready |= e.local;
            } else if e.serving && e.terminating {
                has_any = true;
                local_terminating |= e.local;
            }
        }
        if local_ready {
            local = endpoints.iter().filter(|e| e.local && e.ready).collect();
        } else if local_terminating {
            local = endpoints
                .iter()
                .filter(|e| e.local && e.serving && e.terminating)
                .collect();
        }
    }

    let internal = if p.internal_local {
        local.clone()
    } else {
        cluster.clone()
    };
    let external = match (p.externally_reachable, p.external_local) {
        (false, _) => Vec::new(),
        (true, true) => local,
        (true, false) => cluster.clone(),
    };
    if !p.externally_reachable {
        cluster.clear();
    }
    Categorized {
        internal,
        external,
        cluster,
        has_any,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(
        last: u8,
        ready: bool,
        serving: bool,
        terminating: bool,
        local: bool,
        zones: &[&str],
    ) -> Endpoint {
        Endpoint {
            addr: SocketAddrV4::new([10, 0, 0, last].into(), 80),
            ready,
            serving,
            terminating,
            local,
            zones: zones.iter().map(|z| (*z).to_owned()).collect(),
            weight: None,
        }
    }

    fn lasts(eps: &[&Endpoint]) -> Vec<u8> {
        eps.iter().map(|e| e.addr.ip().octets()[3]).collect()
    }

    struct Case {
        name: &'static str,
        endpoints: Vec<Endpoint>,
        zone: Option<&'static str>,
        policies: Policies,
        internal: Vec<u8>,
        external: Vec<u8>,
        /// What pods and the node get through the external frontends.
        cluster: Vec<u8>,
        has_any: bool,
    }

    const CLUSTER: Policies = Policies {
        internal_local: false,
        external_local: false,
        externally_reachable: true,
    };

    #[test]
    fn categorize_table() {
        let cases = vec![
            Case {
                name: "ready endpoints everywhere, cluster policies",
                endpoints: vec![
                    ep(1, true, true, false, true, &[]),
                    ep(2, true, true, false, false, &[]),
                ],
                zone: None,
                policies: CLUSTER,
                internal: vec![1, 2],
                external: vec![1, 2],
                cluster: vec![1, 2],
                has_any: true,
            },
            Case {
                name: "not reachable from outside: no external backends",
                endpoints: vec![ep(1, true, true, false, true, &[])],
                zone: None,
                policies: Policies {
                    externally_reachable: false,
                    ..CLUSTER
                },
                internal: vec![1],
                external: vec![],
                cluster: vec![],
                has_any: true,
            },
            Case {
                name: "terminating fallback when nothing is ready",
                endpoints: vec![
                    ep(1, false, true, true, false, &[]),
                    ep(2, false, false, true, false, &[]),
                    ep(3, false, false, false, false, &[]),
                ],
                zone: None,
                policies: CLUSTER,
                internal: vec![1],
                external: vec![1],
                cluster: vec![1],
                has_any: true,
            },
            Case {
                name: "terminating endpoints ignored while one is ready",
                endpoints: vec![
                    ep(1, false, true, true, false, &[]),
                    ep(2, true, true, false, false, &[]),
                ],
                zone: None,
                policies: CLUSTER,
                internal: vec![2],
                external: vec![2],
                cluster: vec![2],
                has_any: true,
            },
            Case {
                name: "externalTrafficPolicy Local: only this node's endpoints outside",
                endpoints: vec![
                    ep(1, true, true, false, true, &[]),
                    ep(2, true, true, false, false, &[]),
                ],
                zone: None,
                policies: Policies {
                    external_local: true,
                    ..CLUSTER
                },
                internal: vec![1, 2],
                external: vec![1],
                cluster: vec![1, 2],
                has_any: true,
            },
            Case {
                name: "externalTrafficPolicy Local without local endpoints: none (drop), but endpoints exist",
                endpoints: vec![ep(2, true, true, false, false, &[])],
                zone: None,
                policies: Policies {
                    external_local: true,
                    ..CLUSTER
                },
                internal: vec![2],
                external: vec![],
                cluster: vec![2],
                has_any: true,
            },
            Case {
                name: "internalTrafficPolicy Local",
                endpoints: vec![
                    ep(1, true, true, false, true, &[]),
                    ep(2, true, true, false, false, &[]),
                ],
                zone: None,
                policies: Policies {
                    internal_local: true,
                    ..CLUSTER
                },
                internal: vec![1],
                external: vec![1, 2],
                cluster: vec![1, 2],
                has_any: true,
            },
            Case {
                name: "internalTrafficPolicy Local, local endpoint only terminating",
                endpoints: vec![
                    ep(1, false, true, true, true, &[]),
                    ep(2, true, true, false, false, &[]),
                ],
                zone: None,
                policies: Policies {
                    internal_local: true,
                    externally_reachable: false,
                    ..CLUSTER
                },
                internal: vec![1],
                external: vec![],
                cluster: vec![],
                has_any: true,
            },
            Case {
                name: "no endpoints at all: reject",
                endpoints: vec![ep(1, false, false, false, true, &[])],
                zone: None,
                policies: Policies {
                    internal_local: true,
                    external_local: true,
                    externally_reachable: true,
                },
                internal: vec![],
                external: vec![],
                cluster: vec![],
                has_any: false,
            },
            Case {
                name: "both policies Local: from inside, the external frontends reach every endpoint",
                endpoints: vec![
                    ep(1, true, true, false, true, &[]),
                    ep(2, true, true, false, false, &[]),
                ],
                zone: None,
                policies: Policies {
                    internal_local: true,
                    external_local: true,
                    externally_reachable: true,
                },
                internal: vec![1],
                external: vec![1],
                cluster: vec![1, 2],
                has_any: true,
            },
            Case {
                name: "hints used: all ready endpoints hinted, some for our zone",
                endpoints: vec![
                    ep(1, true, true, false, false, &["a"]),
                    ep(2, true, true, false, false, &["b"]),
                    ep(3, true, true, false, false, &["a", "c"]),
                ],
                zone: Some("a"),
                policies: CLUSTER,
                internal: vec![1, 3],
                external: vec![1, 3],
                cluster: vec![1, 3],
                has_any: true,
            },
            Case {
                name: "hints ignored when one ready endpoint has none",
                endpoints: vec![
                    ep(1, true, true, false, false, &["a"]),
                    ep(2, true, true, false, false, &[]),
                ],
                zone: Some("a"),
                policies: CLUSTER,
                internal: vec![1, 2],
                external: vec![1, 2],
                cluster: vec![1, 2],
                has_any: true,
            },
            Case {
                name: "hints ignored when none is for our zone",
                endpoints: vec![
                    ep(1, true, true, false, false, &["b"]),
                    ep(2, true, true, false, false, &["c"]),
                ],
                zone: Some("a"),
                policies: CLUSTER,
                internal: vec![1, 2],
                external: vec![1, 2],
                cluster: vec![1, 2],
                has_any: true,
            },
            Case {
                name: "hints ignored when the node has no zone",
                endpoints: vec![ep(1, true, true, false, false, &["a"])],
                zone: None,
                policies: CLUSTER,
                internal: vec![1],
                external: vec![1],
                cluster: vec![1],
                has_any: true,
            },
            Case {
                name: "hints do not apply to Local policy",
                endpoints: vec![
                    ep(1, true, true, false, true, &["b"]),
                    ep(2, true, true, false, false, &["a"]),
                ],
                zone: Some("a"),
                policies: Policies {
                    internal_local: true,
                    ..CLUSTER
                },
                internal: vec![1],
                external: vec![2],
                cluster: vec![2],
                has_any: true,
            },
        ];
        for c in cases {
            let got = categorize(&c.endpoints, c.zone, c.policies);
            assert_eq!(lasts(&got.internal), c.internal, "{}: internal", c.name);
            assert_eq!(lasts(&got.external), c.external, "{}: external", c.name);
            assert_eq!(got.has_any, c.has_any, "{}: has_any", c.name);
            assert_eq!(lasts(&got.cluster), c.cluster, "{}: cluster", c.name);
        }
    }
}
