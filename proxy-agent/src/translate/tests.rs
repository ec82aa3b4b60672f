//! Translation tests: table-driven, from YAML as users write it.

use std::{collections::BTreeMap, net::SocketAddrV4};

use super::*;
use crate::{
    manifests::load_str,
    model::{Algorithm, Frontend, FrontendKind, TableRole},
};

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

#[test]
fn an_external_ip_on_another_services_cluster_ip_conflicts() {
    // Pods and the node reach an externalIP through the internal scope, the
    // ClusterIPs' own: the same address and port cannot be both.
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: ns}
spec: {clusterIP: 10.96.0.31, externalIPs: [10.96.0.30], ports: [{port: 80}]}
"#;
    let t = translate_yaml(yaml);
    let b = t
        .desired
        .services
        .iter()
        .find(|s| s.id.name == "b")
        .unwrap();
    assert!(
        b.frontends
            .iter()
            .all(|f| f.address != Ipv4Addr::new(10, 96, 0, 30)),
        "{:?}",
        b.frontends
    );
    assert!(
        t.errors
            .iter()
            .any(|e| e.to_string().contains("already used by ns/a")),
        "{:?}",
        t.errors
    );
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

/// Translates `yaml` for node `node-a` and returns the plans by port name.
fn plans_for_node(yaml: &str) -> (BTreeMap<String, ServicePlan>, Vec<String>) {
    let mut store = Store::default();
    let mut errors = Vec::new();
    load_str(yaml, "t.yaml", &mut store, &mut errors);
    assert_eq!(errors, vec![], "fixture must load cleanly");
    let t = translate(
        &store,
        &TranslateOptions {
            node_name: "node-a".into(),
            ..TranslateOptions::default()
        },
    );
    (
        t.desired
            .services
            .into_iter()
            .map(|p| (format!("{}/{}", p.id.name, p.id.port_name), p))
            .collect(),
        t.errors.iter().map(ToString::to_string).collect(),
    )
}

const NODE_A: &str = r#"apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
status:
  addresses:
  - {type: InternalIP, address: 192.168.1.10}
  - {type: ExternalIP, address: 203.0.113.10}
  - {type: Hostname, address: node-a}
  - {type: InternalIP, address: "fd00::10"}
---
"#;

/// A slice for Service `name` with endpoints (last octet, node, zone hint, ready).
fn slice_for(name: &str, endpoints: &[(u8, &str, Option<&str>, bool)]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(last, node, zone, ready)| {
            let hints = zone
                .map(|z| format!(", hints: {{forZones: [{{name: {z}}}]}}"))
                .unwrap_or_default();
            format!("- {{addresses: [10.0.0.{last}], nodeName: {node}, conditions: {{ready: {ready}}}{hints}}}\n")
        })
        .collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-x, namespace: ns, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints:\n{eps}"
    )
}

fn addrs(list: &[SocketAddrV4]) -> Vec<u8> {
    list.iter().map(|a| a.ip().octets()[3]).collect()
}

#[test]
fn frontends_of_every_kind() {
    let yaml = format!(
        r#"{NODE_A}apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: ns}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.7, "2001:db8::7", not-an-ip, 198.51.100.2]
  ports: [{{name: p, port: 80, nodePort: 30080}}]
status:
  loadBalancer:
    ingress:
    - {{ip: 198.51.100.1}}
    - {{ip: 198.51.100.2, ipMode: VIP}}
    - {{ip: 198.51.100.3, ipMode: Proxy}}
    - {{hostname: lb.example.com}}
{}"#,
        slice_for("lb", &[(1, "node-a", None, true)])
    );
    let (plans, errors) = plans_for_node(&yaml);
    let plan = &plans["lb/p"];
    let got: Vec<String> = plan
        .frontends
        .iter()
        .map(|f| format!("{:?} {}:{}", f.kind, f.address, f.port))
        .collect();
    assert_eq!(
        got,
        [
            "ClusterIP 10.96.0.10:80",
            "NodePort 192.168.1.10:30080",
            "NodePort 203.0.113.10:30080",
            "LoadBalancer 198.51.100.1:80",
            "LoadBalancer 198.51.100.2:80",
            // Both an ingress IP and an externalIP: listed with both kinds,
            // as kube-proxy's service info keeps both lists.
            "ExternalIP 198.51.100.2:80",
            "ExternalIP 198.51.100.7:80",
        ]
    );
    assert_eq!(addrs(&plan.external_backends), [1]);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("invalid externalIP \"not-an-ip\"")),
        "{errors:?}"
    );
}

#[test]
fn nodeport_addresses_filter_local_backends_and_external_table() {
    let yaml = format!(
        "{NODE_A}apiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: ns}}\nspec: {{type: NodePort, clusterIP: 10.96.0.12, externalTrafficPolicy: Local, ports: [{{name: p, port: 80, nodePort: 30082}}]}}\n{}",
        slice_for(
            "np",
            &[
                (1, "node-a", None, true),
                (2, "node-b", None, true),
                (3, "node-b", None, true)
            ]
        )
    );
    let mut store = Store::default();
    let mut errors = Vec::new();
    load_str(&yaml, "t.yaml", &mut store, &mut errors);
    assert_eq!(errors, vec![]);
    let opts = |cidrs: &[&str]| TranslateOptions {
        node_name: "node-a".into(),
        nodeport_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        ..TranslateOptions::default()
    };
    let node_ports = |cidrs: &[&str]| -> Vec<String> {
        translate(&store, &opts(cidrs)).desired.services[0]
            .frontends
            .iter()
            .filter(|f| f.kind == FrontendKind::NodePort)
            .map(|f| f.address.to_string())
            .collect()
    };
    assert_eq!(node_ports(&[]), ["192.168.1.10", "203.0.113.10"]);
    assert_eq!(node_ports(&["192.168.0.0/16"]), ["192.168.1.10"]);
    assert_eq!(
        node_ports(&["203.0.113.10/32", "10.0.0.0/8"]),
        ["203.0.113.10"]
    );
    assert_eq!(node_ports(&["10.0.0.0/8"]), Vec::<String>::new());

    let plan = &translate(&store, &opts(&[])).desired.services[0];
    assert_eq!(
        addrs(&plan.local_backends),
        [1],
        "endpoints with this nodeName"
    );
    assert_eq!(addrs(&plan.internal_backends), [1, 2, 3]);
    assert_eq!(
        addrs(&plan.external_backends),
        [1],
        "Local: this node's only"
    );
    assert_eq!(plan.table_for(TableRole::External), TableRole::External);
    assert_eq!(
        addrs(&plan.cluster_backends),
        [1, 2, 3],
        "from inside, every endpoint"
    );
    assert_eq!(plan.table_for(TableRole::Cluster), TableRole::Internal);
    assert_eq!(plan.maglev_table_size, Some(307), "100 x 3, next prime");
    assert_eq!(
        plan.external_maglev_table_size,
        Some(101),
        "its own size: 100 x 1"
    );
}

#[test]
fn cidr_parsing() {
    let c: Cidr = "10.1.0.0/16".parse().unwrap();
    assert!(c.contains(Ipv4Addr::new(10, 1, 200, 3)));
    assert!(!c.contains(Ipv4Addr::new(10, 2, 0, 1)));
    let all: Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains(Ipv4Addr::new(203, 0, 113, 1)));
    let host: Cidr = "192.168.1.10".parse().unwrap();
    assert_eq!(host.prefix, 32);
    for bad in ["10.0.0.0/33", "nope/8", "10.0.0.0/x", "::1/128"] {
        assert!(bad.parse::<Cidr>().is_err(), "{bad}");
    }
}

#[test]
fn nodeport_without_node_object_listens_on_any_address() {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: ns}}\nspec: {{type: NodePort, clusterIP: 10.96.0.11, ports: [{{name: p, port: 80, nodePort: 30081}}]}}\n{}",
        slice_for("np", &[(1, "node-a", None, true)])
    );
    let (plans, _) = plans_for_node(&yaml);
    assert!(
        plans["np/p"]
            .frontends
            .iter()
            .any(|f| f.kind == FrontendKind::NodePort
                && f.address == Ipv4Addr::UNSPECIFIED
                && f.port == 30081)
    );
}

#[test]
fn traffic_policies_hints_and_reachability_table() {
    struct Case {
        name: &'static str,
        spec: &'static str,
        endpoints: &'static [(u8, &'static str, Option<&'static str>, bool)],
        internal: &'static [u8],
        external: &'static [u8],
        has_endpoints: bool,
        health_check: Option<u16>,
    }
    let cases = [
        Case {
            name: "ClusterIP: not externally reachable",
            spec: "{clusterIP: 10.96.1.1, ports: [{name: p, port: 80}]}",
            endpoints: &[(1, "node-a", None, true), (2, "node-b", None, true)],
            internal: &[1, 2],
            external: &[],
            has_endpoints: true,
            health_check: None,
        },
        Case {
            name: "externalTrafficPolicy Local keeps external traffic on this node, with health check",
            spec: "{type: LoadBalancer, clusterIP: 10.96.1.1, externalTrafficPolicy: Local, healthCheckNodePort: 32000, ports: [{name: p, port: 80, nodePort: 30001}]}",
            endpoints: &[(1, "node-a", None, true), (2, "node-b", None, true)],
            internal: &[1, 2],
            external: &[1],
            has_endpoints: true,
            health_check: Some(32000),
        },
        Case {
            name: "externalTrafficPolicy Local on a node without endpoints: none, but not a reject",
            spec: "{type: NodePort, clusterIP: 10.96.1.1, externalTrafficPolicy: Local, ports: [{name: p, port: 80, nodePort: 30001}]}",
            endpoints: &[(2, "node-b", None, true)],
            internal: &[2],
            external: &[],
            has_endpoints: true,
            health_check: None,
        },
        Case {
            name: "internalTrafficPolicy Local",
            spec: "{clusterIP: 10.96.1.1, internalTrafficPolicy: Local, ports: [{name: p, port: 80}]}",
            endpoints: &[(1, "node-a", None, true), (2, "node-b", None, true)],
            internal: &[1],
            external: &[],
            has_endpoints: true,
            health_check: None,
        },
        Case {
            name: "internalTrafficPolicy Local without local endpoints: drop",
            spec: "{clusterIP: 10.96.1.1, internalTrafficPolicy: Local, ports: [{name: p, port: 80}]}",
            endpoints: &[(2, "node-b", None, true)],
            internal: &[],
            external: &[],
            has_endpoints: true,
            health_check: None,
        },
        Case {
            name: "no ready endpoint anywhere: reject",
            spec: "{clusterIP: 10.96.1.1, ports: [{name: p, port: 80}]}",
            endpoints: &[(2, "node-b", None, false)],
            internal: &[],
            external: &[],
            has_endpoints: false,
            health_check: None,
        },
        Case {
            name: "topology hints for our zone narrow both traffic kinds",
            spec: "{type: NodePort, clusterIP: 10.96.1.1, ports: [{name: p, port: 80, nodePort: 30001}]}",
            endpoints: &[
                (1, "node-b", Some("zone-a"), true),
                (2, "node-c", Some("zone-b"), true),
            ],
            internal: &[1],
            external: &[1],
            has_endpoints: true,
            health_check: None,
        },
        Case {
            name: "trafficDistribution PreferClose works through the hints",
            spec: "{clusterIP: 10.96.1.1, trafficDistribution: PreferClose, ports: [{name: p, port: 80}]}",
            endpoints: &[
                (1, "node-b", Some("zone-b"), true),
                (2, "node-c", Some("zone-a"), true),
            ],
            internal: &[2],
            external: &[],
            has_endpoints: true,
            health_check: None,
        },
        Case {
            name: "hints ignored when one endpoint lacks them",
            spec: "{clusterIP: 10.96.1.1, ports: [{name: p, port: 80}]}",
            endpoints: &[
                (1, "node-b", Some("zone-a"), true),
                (2, "node-c", None, true),
            ],
            internal: &[1, 2],
            external: &[],
            has_endpoints: true,
            health_check: None,
        },
    ];
    for c in cases {
        let yaml = format!(
            "{NODE_A}apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\nspec: {}\n{}",
            c.spec,
            slice_for("s", c.endpoints)
        );
        let (plans, errors) = plans_for_node(&yaml);
        assert_eq!(errors, Vec::<String>::new(), "{}", c.name);
        let plan = &plans["s/p"];
        assert_eq!(
            addrs(&plan.internal_backends),
            c.internal,
            "{}: internal",
            c.name
        );
        assert_eq!(
            addrs(&plan.external_backends),
            c.external,
            "{}: external",
            c.name
        );
        assert_eq!(
            plan.has_endpoints, c.has_endpoints,
            "{}: has_endpoints",
            c.name
        );
        assert_eq!(
            plan.health_check_node_port, c.health_check,
            "{}: health check",
            c.name
        );
    }
}

#[test]
fn source_ranges_are_trimmed_normalised_and_validated() {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: ns}}\nspec: {{type: LoadBalancer, clusterIP: 10.96.0.12, loadBalancerSourceRanges: [' 10.1.2.3/8 ', '192.168.0.0/16', '10.0.0.0/8', '2001:db8::/32', 'bogus'], ports: [{{name: p, port: 80}}]}}\n{}",
        slice_for("lb", &[(1, "node-a", None, true)])
    );
    let (plans, errors) = plans_for_node(&yaml);
    let ranges: Vec<String> = plans["lb/p"]
        .source_ranges
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ranges, ["10.0.0.0/8", "192.168.0.0/16"]);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("invalid loadBalancerSourceRanges entry \"bogus\"")),
        "{errors:?}"
    );
}

#[test]
fn plan_json_has_the_documented_shape() {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: ns}}\nspec: {{clusterIP: 10.96.0.13, sessionAffinity: ClientIP, ports: [{{name: p, port: 80}}]}}\n{}",
        slice_for(
            "web",
            &[(2, "node-a", None, true), (1, "node-a", None, true)]
        )
    );
    let mut store = Store::default();
    let mut errors = Vec::new();
    load_str(&yaml, "t.yaml", &mut store, &mut errors);
    let t = translate(&store, &TranslateOptions::default());
    let json = serde_json::to_value(&t.desired).unwrap();
    let svc = &json["services"][0];
    for field in [
        "namespace",
        "name",
        "port_name",
        "protocol",
        "frontends",
        "internal_backends",
        "external_backends",
        "session_affinity_timeout_seconds",
        "source_ranges",
        "health_check_node_port",
    ] {
        assert!(svc.get(field).is_some(), "missing {field}: {svc}");
    }
    assert_eq!(svc["protocol"], "TCP");
    assert_eq!(
        svc["frontends"][0],
        serde_json::json!({"kind": "ClusterIP", "address": "10.96.0.13", "port": 80})
    );
    assert_eq!(
        svc["internal_backends"],
        serde_json::json!(["10.0.0.1:8080", "10.0.0.2:8080"])
    );
    assert_eq!(svc["session_affinity_timeout_seconds"], 10800);
    assert_eq!(svc["health_check_node_port"], serde_json::Value::Null);
}
