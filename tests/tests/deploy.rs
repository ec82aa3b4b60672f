//! The manifests in deploy/ are valid Kubernetes objects, grant no more
//! than the agent needs, and pass only flags the agent knows.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a failed unwrap is a test failure"
)]

use std::{path::Path, process::Command};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use proxy_tests::cluster::agent_binary;
use serde::de::DeserializeOwned;

fn docs(file: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(file),
    )
    .unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn typed<T: DeserializeOwned>(v: &serde_yaml::Value) -> T {
    serde_yaml::from_value(v.clone()).unwrap()
}

#[test]
fn deploy_manifests_are_valid_and_least_privilege() {
    let rbac = docs("rbac.yaml");
    assert_eq!(rbac.len(), 3);
    let sa: ServiceAccount = typed(&rbac[0]);
    assert_eq!(sa.metadata.name.as_deref(), Some("ebpf-proxy"));
    let role: ClusterRole = typed(&rbac[1]);
    let binding: ClusterRoleBinding = typed(&rbac[2]);
    assert_eq!(binding.role_ref.name, "ebpf-proxy");
    let rules = role.rules.unwrap();
    let mut granted = Vec::new();
    for r in &rules {
        assert_eq!(r.verbs, ["get", "list", "watch"], "read-only");
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                granted.push(format!("{g}/{res}"));
            }
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        ["/nodes", "/services", "discovery.k8s.io/endpointslices"]
    );

    let ds: DaemonSet = typed(&docs("daemonset.yaml")[0]);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("ebpf-proxy"));
    let c = &pod.containers[0];
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let env = c.env.as_ref().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let mounts: Vec<&str> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/sys"));
    // Socket-level load balancing: the host's cgroup hierarchy, mounted
    // where the ConfigMap's --cgroup-root says; the pods' namespaces (hostPID).
    assert!(mounts.contains(&"/host/cgroup"));
    assert_eq!(pod.host_pid, Some(true));
    assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());

    // Every flag of the ConfigMap is one `proxy-agent run` accepts.
    let cm: ConfigMap = typed(&docs("configmap.yaml")[0]);
    let flags = cm.data.unwrap()["flags"].clone();
    let help = Command::new(agent_binary().unwrap())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let mut checked = 0;
    for line in flags
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let flag = line.split('=').next().unwrap();
        assert!(
            help.contains(flag),
            "{flag} is not a flag of proxy-agent run"
        );
        checked += 1;
    }
    assert!(checked >= 5);
    assert!(flags.contains("--cgroup-root=/host/cgroup"), "{flags}");
}
