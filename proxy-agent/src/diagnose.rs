//! `proxy-agent diagnose NS/NAME`: the Service troubleshooting checklist,
//! automated. Each check says pass, warn or fail, what it saw, and what to
//! do. Objects come from the same sources as the agent (a manifest directory
//! or the Kubernetes API); the datapath from the pinned maps; reachability
//! from this node.

use std::{
    collections::BTreeSet,
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::{
    inspect::Snapshot,
    model::{Protocol, ServicePlan},
    store::{Store, slice_service},
    translate::{self, TranslateOptions},
};

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One line of the checklist.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do about it (empty when it passed).
    pub hint: String,
}

fn check(check: &'static str, status: Status, detail: String, hint: &str) -> Check {
    Check {
        check,
        status,
        detail,
        hint: if status == Status::Pass {
            String::new()
        } else {
            hint.to_owned()
        },
    }
}

/// Runs the checklist for Service `namespace/name`. `snapshot` is the
/// datapath (None: the agent's pins could not be read); `reach` tries a TCP
/// connection to a backend.
pub fn diagnose(
    store: &Store,
    opts: &TranslateOptions,
    snapshot: Option<&Snapshot>,
    namespace: &str,
    name: &str,
    reach: &dyn Fn(SocketAddrV4) -> Result<(), String>,
) -> Vec<Check> {
    let mut out = Vec::new();
    let key = (namespace.to_owned(), name.to_owned());
    let Some(svc) = store.services.get(&key).map(|s| &s.object) else {
        out.push(check(
            "service exists",
            Status::Fail,
            format!("no Service {namespace}/{name}"),
            "check the namespace and name: kubectl get svc -A | grep NAME",
        ));
        return out;
    };
    let spec = svc.spec.clone().unwrap_or_default();
    let kind = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let proxied = kind != "ExternalName" && !headless;
    out.push(check(
        "service is proxied",
        if proxied { Status::Pass } else { Status::Warn },
        if proxied {
            format!("type {kind}, clusterIP {}", spec.cluster_ip.clone().unwrap_or_default())
        } else {
            format!("type {kind}{}: DNS only, no proxying", if headless { ", headless" } else { "" })
        },
        "headless and ExternalName Services are resolved by DNS, not proxied: test with the pod or external name",
    ));
    if !proxied {
        return out;
    }

    // Endpoints, from the slices labelled for the Service.
    let slices: Vec<_> = store
        .slices
        .values()
        .map(|s| &s.object)
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(namespace) && slice_service(s) == Some(name)
        })
        .collect();
    let endpoints: Vec<_> = slices.iter().flat_map(|s| s.endpoints.iter()).collect();
    out.push(check(
        "has endpoints",
        if endpoints.is_empty() { Status::Fail } else { Status::Pass },
        format!("{} endpoint(s) in {} EndpointSlice(s)", endpoints.len(), slices.len()),
        "the selector matches no pod: compare `kubectl get svc -o yaml` spec.selector with the pods' labels (kubectl get pods --show-labels)",
    ));
    let ready = endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .count();
    if !endpoints.is_empty() {
        out.push(check(
            "endpoints ready",
            if ready == 0 {
                Status::Fail
            } else if ready < endpoints.len() {
                Status::Warn
            } else {
                Status::Pass
            },
            format!("{ready} of {} ready", endpoints.len()),
            "pods are not ready: kubectl describe pod (readiness probe failures, crash loops)",
        ));
    }

    // Ports: named target ports must appear among the slices' port names.
    let slice_ports: BTreeSet<(String, u16)> = slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    for p in spec.ports.iter().flatten() {
        let pname = p.name.clone().unwrap_or_default();
        let target = match &p.target_port {
            Some(IntOrString::String(s)) => format!("named port {s:?}"),
            Some(IntOrString::Int(n)) => format!("port {n}"),
            None => format!("port {} (targetPort unset)", p.port),
        };
        let resolved: Vec<u16> = slice_ports
            .iter()
            .filter(|(n, _)| *n == pname)
            .map(|(_, port)| *port)
            .collect();
        out.push(check(
            "ports resolve",
            if resolved.is_empty() && !endpoints.is_empty() { Status::Fail } else { Status::Pass },
            format!(
                "service port {:?} {} → {target} → endpoint port(s) {resolved:?}",
                pname, p.port
            ),
            "the EndpointSlices carry no port of that name: with a named targetPort, the pods must declare a containerPort of that name",
        ));
    }

    // The datapath against what translation wants.
    let translation = translate::translate(store, opts);
    let plans: Vec<&ServicePlan> = translation
        .desired
        .services
        .iter()
        .filter(|p| p.id.namespace == namespace && p.id.name == name)
        .collect();
    match snapshot {
        None => out.push(check(
            "programmed",
            Status::Fail,
            "the agent's pinned maps cannot be read".into(),
            "is the agent running on this node (and --bpffs the same)? kubectl -n kube-system logs ds/ebpf-proxy",
        )),
        Some(snap) => {
            for plan in &plans {
                out.push(programmed(snap, plan));
            }
        }
    }

    // Reachability from this node, TCP ports.
    let mut tried = BTreeSet::new();
    for plan in plans.iter().filter(|p| p.id.protocol == Protocol::Tcp) {
        for b in &plan.internal_backends {
            if !tried.insert(*b) {
                continue;
            }
            let r = reach(*b);
            out.push(check(
                "backend reachable",
                if r.is_ok() { Status::Pass } else { Status::Fail },
                match &r {
                    Ok(()) => format!("{b} accepts connections"),
                    Err(e) => format!("{b}: {e}"),
                },
                "nothing listens there: check the Service's targetPort matches the port the container listens on (kubectl exec POD -- ss -ltn), and network policies",
            ));
        }
    }

    // What the datapath counted for it.
    if let Some(snap) = snapshot {
        let rejected: u64 = snap
            .maps
            .names
            .iter()
            .filter(|(_, n)| n.port.namespace == namespace && n.port.name == name)
            .filter_map(|(id, _)| snap.counters.get(id))
            .map(|c| c.rejected)
            .sum();
        out.push(check(
            "packets refused",
            if rejected == 0 {
                Status::Pass
            } else {
                Status::Warn
            },
            format!("{rejected} packet(s) refused for lack of endpoints"),
            "clients reached the Service while it had no ready endpoint (see the checks above)",
        ));
    }
    out
}

/// Whether the maps hold the plan: every frontend present, pointing at a
/// table with exactly the backends translation wants.
fn programmed(snap: &Snapshot, plan: &ServicePlan) -> Check {
    let label = format!(
        "{} port {:?}/{}",
        plan.id.name, plan.id.port_name, plan.id.protocol
    );
    let units = crate::reconcile::units(plan, crate::model::NodePortMode::Snat);
    let mut problems = Vec::new();
    let mut frontends = 0;
    for unit in &units {
        let want: BTreeSet<SocketAddrV4> = unit.backends.iter().copied().collect();
        for k in unit.keys.keys() {
            frontends += 1;
            let Some(v) = snap.maps.services.get(k) else {
                problems.push(format!("frontend {} is missing", k.frontend()));
                continue;
            };
            let Some(t) = snap.maps.tables.get(&v.svc_id) else {
                problems.push(format!("svc {} has no table", v.svc_id));
                continue;
            };
            let have: BTreeSet<SocketAddrV4> = t
                .backends
                .iter()
                .filter_map(|id| snap.maps.backends.get(id))
                .map(proxy_common::Backend::addr)
                .collect();
            if have != want {
                problems.push(format!(
                    "{} ({} table): backends {have:?}, wanted {want:?}",
                    k.frontend(),
                    unit.name.role.label()
                ));
            }
        }
    }
    check(
        "programmed",
        if problems.is_empty() {
            Status::Pass
        } else {
            Status::Fail
        },
        if problems.is_empty() {
            format!(
                "{label}: {frontends} frontend(s), {} backend(s) as desired",
                plan.internal_backends.len()
            )
        } else {
            format!("{label}: {}", problems.join("; "))
        },
        "the maps differ from the objects: look for errors about this Service in the agent's log; a resync (SIGHUP) retries",
    )
}

/// Tries a TCP connection (1 s).
pub fn tcp_reach(addr: SocketAddrV4) -> Result<(), String> {
    TcpStream::connect_timeout(&addr.into(), Duration::from_secs(1))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The Service and its EndpointSlices from the Kubernetes API, as a store.
pub async fn fetch(
    kubeconfig: Option<&std::path::PathBuf>,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Store> {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use kube::api::{Api, ListParams};
    let client = crate::kube_source::client(kubeconfig).await?;
    let mut store = Store::default();
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    if let Some(svc) = services.get_opt(name).await? {
        store.upsert_service(svc, None);
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client, namespace);
    let selector = format!("{}={name}", crate::store::LABEL_SERVICE_NAME);
    for slice in slices
        .list(&ListParams::default().labels(&selector))
        .await?
    {
        store.upsert_slice(slice, None);
    }
    Ok(store)
}
