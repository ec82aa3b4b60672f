//! The `proxy-agent` command line, run as separate processes (no root needed).
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a failed unwrap is a test failure"
)]

use std::{net::SocketAddrV4, process::Command};

use proxy_agent::maglev;
use proxy_tests::cluster::agent_binary;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(agent_binary().unwrap())
        .args(args)
        .output()
        .unwrap()
}

fn backend_args(n: u32) -> Vec<String> {
    (0..n)
        .flat_map(|i| {
            [
                "--backend".to_owned(),
                format!("10.{}.{}.7:8080", i / 250, i % 250),
            ]
        })
        .collect()
}

#[test]
fn maglev_tables_are_identical_across_processes_and_match_the_library() {
    let args = backend_args(100);
    let mut cmd: Vec<&str> = vec!["maglev", "--size", "16381", "-o", "json"];
    cmd.extend(args.iter().map(String::as_str));
    let first = agent(&cmd);
    let second = agent(&cmd);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(
        first.stdout, second.stdout,
        "two processes, byte-identical output"
    );

    let json: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(json["size"], 16381);
    let backends: Vec<(SocketAddrV4, u32)> = json["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b.as_str().unwrap().parse().unwrap(), 1))
        .collect();
    let table: Vec<u16> = json["table"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| u16::try_from(e.as_u64().unwrap()).unwrap())
        .collect();
    assert_eq!(table, maglev::build(&backends, 16381).unwrap());

    // Listing the backends in another order gives the same slot → backend mapping.
    let mut reversed = args
        .chunks(2)
        .rev()
        .flatten()
        .map(String::as_str)
        .collect::<Vec<_>>();
    let mut cmd: Vec<&str> = vec!["maglev", "--size", "16381", "-o", "json"];
    cmd.append(&mut reversed);
    let rev: serde_json::Value = serde_json::from_slice(&agent(&cmd).stdout).unwrap();
    let resolve = |v: &serde_json::Value| -> Vec<String> {
        let names = v["backends"].as_array().unwrap();
        v["table"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                names[usize::try_from(e.as_u64().unwrap()).unwrap()]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(resolve(&json), resolve(&rev));
}

#[test]
fn maglev_cli_rejects_bad_input_clearly() {
    for (args, needle) in [
        (
            vec!["maglev", "--size", "16384", "--backend", "10.0.0.1:80"],
            "16384: table size 16384 is not prime",
        ),
        (
            vec![
                "maglev",
                "--size",
                "2",
                "--backend",
                "10.0.0.1:80",
                "--backend",
                "10.0.0.2:80",
                "--backend",
                "10.0.0.3:80",
            ],
            "smaller than the 3 backends",
        ),
        (
            vec!["maglev", "--backend", "10.0.0.1"],
            "expected IPv4ADDR:PORT",
        ),
        (
            vec!["maglev", "--backend", "10.0.0.1:80=heavy"],
            "weight \"heavy\" is not a number",
        ),
        (
            vec!["maglev", "--backend", "10.0.0.1:80=20000"],
            "above the maximum",
        ),
    ] {
        let out = agent(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn maglev_cli_weights_and_default_size() {
    let out = agent(&[
        "maglev",
        "--backend",
        "10.0.0.1:80=1",
        "--backend",
        "10.0.0.2:80=3",
        "--backend",
        "10.0.0.3:80=0",
        "-o",
        "json",
    ]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["size"], 211,
        "smallest prime >= 100 x 2 eligible backends"
    );
    let table = json["table"].as_array().unwrap();
    let count = |i: u64| table.iter().filter(|e| e.as_u64() == Some(i)).count();
    assert_eq!(count(2), 0, "weight 0: no slots");
    assert!(
        (156..=160).contains(&count(1)),
        "3/4 of the slots: {}",
        count(1)
    );
}

#[test]
fn plan_prints_json_without_root_or_kernel() {
    let dir = std::env::temp_dir().join(format!("pxt-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("svc.yaml"),
        r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns, annotations: {ebpf-proxy.io/maglev-table-size: "1009"}}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}, annotations: {ebpf-proxy.io/endpoint-weights: "10.0.0.2=0"}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]
"#,
    )
    .unwrap();
    let out = agent(&["plan", "--manifests", &dir.to_string_lossy(), "-o", "json"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let svc = &json["services"][0];
    assert_eq!(svc["namespace"], "ns");
    assert_eq!(svc["port_name"], "http");
    assert_eq!(
        svc["internal_backends"],
        serde_json::json!(["10.0.0.1:8080"])
    );
    assert_eq!(
        svc["draining_backends"],
        serde_json::json!(["10.0.0.2:8080"])
    );
    assert_eq!(svc["algorithm"], "maglev");
    assert_eq!(svc["maglev_table_size"], 1009);
}

#[test]
fn an_exported_kubeconfig_does_not_conflict_with_manifests() {
    // An invalid flag value stops `run` right after argument parsing, before
    // anything touches the kernel: the error shows how far parsing got.
    let out = Command::new(agent_binary().unwrap())
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .args([
            "run",
            "--manifests",
            "/nonexistent/manifests",
            "--maglev-max-table-size",
            "4",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--maglev-max-table-size 4: must be a prime"),
        "{stderr}"
    );
    // Both given explicitly is still a usage error.
    let both = agent(&["run", "--manifests", "d", "--kubeconfig", "k"]);
    assert!(
        String::from_utf8_lossy(&both.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&both.stderr)
    );
}
