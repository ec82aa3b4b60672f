//! Fuzzing the agent's input side: random Services, EndpointSlices and
//! Nodes (valid shapes with random, often wrong, values: ports out of range,
//! unknown protocols, bad addresses, garbage annotations, missing fields,
//! wrong types) through manifest loading, full translation and incremental
//! translation. Nothing may panic, every error names its object, and a
//! valid neighbour keeps translating whatever its broken neighbours do.
//!
//! Pure userspace: no root needed.

use proxy_agent::{
    engine::Engine,
    manifests,
    store::{Dirty, Store},
    translate::{TranslateOptions, translate},
};
use proxy_tests::fuzz::Rng;
use serde_json::{Value, json};

const ROUNDS: u64 = 2_000;

fn pick<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len())]
}

/// A number that is sometimes valid, sometimes not.
fn port(rng: &mut Rng) -> Value {
    match rng.below(25) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(70_000),
        3 => json!("http"),
        4 => json!(null),
        _ => json!(1 + rng.below(65_535)),
    }
}

fn address(rng: &mut Rng) -> Value {
    match rng.below(25) {
        0 => json!("10.96.0.300"),
        1 => json!("fd00::1"),
        2 => json!(""),
        3 => json!("None"),
        4 => json!(42),
        _ => json!(format!("10.96.{}.{}", rng.below(4), rng.below(256))),
    }
}

fn protocol(rng: &mut Rng) -> Value {
    json!(pick(
        rng,
        &["TCP", "UDP", "TCP", "UDP", "TCP", "SCTP", "tcp", "ICMP", ""]
    ))
}

fn service(rng: &mut Rng, name: &str) -> Value {
    let ports: Vec<Value> = (0..rng.below(4))
        .map(|i| {
            json!({
                "name": pick(rng, &["http", "dns", "", "x"]).to_owned() + &i.to_string(),
                "port": port(rng),
                "protocol": protocol(rng),
                "targetPort": port(rng),
                "nodePort": port(rng),
            })
        })
        .collect();
    let mut annotations = serde_json::Map::new();
    for (key, values) in [
        (
            "ebpf-proxy.io/lb-algorithm",
            &["maglev", "random", "rr", "lc", "sh", "weird", ""][..],
        ),
        (
            "ebpf-proxy.io/maglev-table-size",
            &["1009", "4", "65537", "-3", "x", "1000000007"][..],
        ),
        (
            "ebpf-proxy.io/endpoint-weights",
            &["10.244.1.1=5", "x=y", "10.244.1.2=100000", ",,", ""][..],
        ),
    ] {
        if rng.chance(30) {
            annotations.insert(key.into(), json!(pick(rng, values)));
        }
    }
    let mut spec = json!({
        "type": pick(rng, &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "Bogus"]),
        "clusterIP": address(rng),
        "ports": ports,
        "externalIPs": [address(rng)],
        "loadBalancerSourceRanges": [pick(rng, &["10.0.0.0/8", "1.2.3.4", "x/33", "10.0.0.0/40"])],
        "sessionAffinity": pick(rng, &["None", "ClientIP", "Sticky"]),
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": port(rng)}},
        "externalTrafficPolicy": pick(rng, &["Cluster", "Local", "Other"]),
        "internalTrafficPolicy": pick(rng, &["Cluster", "Local", "Other"]),
        "healthCheckNodePort": port(rng),
        "selector": {"app": name},
    });
    if rng.chance(20) {
        spec["clusterIPs"] = json!([address(rng), address(rng)]);
    }
    if rng.chance(5) {
        spec["ports"] = json!("not a list");
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "fuzz", "annotations": annotations},
        "spec": spec,
        "status": {"loadBalancer": {"ingress": [{"ip": address(rng), "ipMode": pick(rng, &["VIP", "Proxy", "X"])}]}},
    })
}

fn condition(rng: &mut Rng) -> Value {
    [json!(true), json!(false), json!(null)][rng.below(3)].clone()
}

fn slice(rng: &mut Rng, service: &str, i: usize) -> Value {
    let endpoints: Vec<Value> = (0..rng.below(5))
        .map(|_| {
            json!({
                "addresses": [pick(rng, &["10.244.1.10", "10.244.1.11", "fd00::5", "bad", "10.244.1.999"])],
                "conditions": {
                    "ready": condition(rng),
                    "serving": condition(rng),
                    "terminating": condition(rng),
                },
                "nodeName": pick(rng, &["node-a", "node-b", ""]),
                "zone": pick(rng, &["z1", "z2"]),
                "hints": {"forZones": [{"name": pick(rng, &["z1", "z2", ""])}]},
            })
        })
        .collect();
    let ports: Vec<Value> = (0..rng.below(3))
        .map(|j| {
            json!({
                "name": pick(rng, &["http", "dns", ""]).to_owned() + &j.to_string(),
                "port": port(rng),
                "protocol": protocol(rng),
            })
        })
        .collect();
    let mut labels = serde_json::Map::new();
    if rng.chance(90) {
        labels.insert("kubernetes.io/service-name".into(), json!(service));
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-{i}"), "namespace": "fuzz", "labels": labels},
        "addressType": pick(rng, &["IPv4", "IPv6", "FQDN", "Bogus"]),
        "ports": ports,
        "endpoints": endpoints,
    })
}

fn node(rng: &mut Rng) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": pick(rng, &["z1", "z2", ""])}},
        "status": {"addresses": [
            {"type": pick(rng, &["InternalIP", "ExternalIP", "Hostname"]), "address": address(rng)},
        ]},
    })
}

/// The Service every round also holds, valid, which must keep translating.
const GOOD: &str = "apiVersion: v1
kind: Service
metadata: {name: good, namespace: fuzz}
spec:
  clusterIP: 10.100.0.1
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: good-1, namespace: fuzz, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.9.9], conditions: {ready: true}}]
";

#[test]
fn random_objects_never_panic_and_every_error_names_its_object() {
    let mut rng = Rng::new(11);
    let opts = TranslateOptions {
        node_name: "node-a".into(),
        ..TranslateOptions::default()
    };
    // Errors, and plans of the random Services (not the good one).
    let (mut errors_seen, mut plans_seen) = (0usize, 0usize);
    for round in 0..ROUNDS {
        let mut docs = vec![node(&mut rng)];
        for s in 0..1 + rng.below(3) {
            let name = format!("svc-{s}");
            docs.push(service(&mut rng, &name));
            for i in 0..rng.below(3) {
                docs.push(slice(&mut rng, &name, i));
            }
        }
        let mut text = String::from(GOOD);
        for d in &docs {
            text.push_str("---\n");
            text.push_str(&serde_yaml::to_string(d).unwrap());
        }
        let mut store = Store::default();
        let mut errors = Vec::new();
        manifests::load_str(&text, "fuzz.yaml", &mut store, &mut errors);
        let full = translate(&store, &opts);
        let mut engine = Engine::new(opts.clone());
        engine.store = store;
        engine.update(&Dirty {
            all: true,
            ..Dirty::default()
        });
        errors.extend(full.errors.iter().cloned());
        for e in &errors {
            let named = e
                .object
                .as_ref()
                .is_some_and(|o| !o.kind.is_empty() && !o.name.is_empty());
            assert!(
                named,
                "round {round}: an error that names no object: {e:?}\n{text}"
            );
        }
        assert!(
            full.desired
                .services
                .iter()
                .any(|p| p.id.name == "good" && !p.internal_backends.is_empty()),
            "round {round}: the valid Service stopped translating:\n{text}"
        );
        errors_seen += errors.len();
        plans_seen += full
            .desired
            .services
            .iter()
            .filter(|p| p.id.name != "good")
            .count();
    }
    // The generator reaches both outcomes often.
    assert!(errors_seen > ROUNDS as usize, "{errors_seen} errors");
    assert!(plans_seen > ROUNDS as usize / 2, "{plans_seen} plans");
}
