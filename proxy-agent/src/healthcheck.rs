//! Health check node ports, as kube-proxy serves them: for every LoadBalancer
//! Service with `externalTrafficPolicy: Local`, an HTTP server on its
//! `healthCheckNodePort` answers 200 when this node has a local endpoint and
//! 503 when it has none, so a cloud load balancer sends traffic only to nodes
//! that can serve it. The body is kube-proxy's:
//! `{"service":{"namespace":"ns","name":"svc"},"localEndpoints":N,"serviceProxyHealthy":true}`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    task::JoinHandle,
};

use crate::model::{DesiredState, ServicePlan, ServicePortName};

/// What one health check port reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub namespace: String,
    pub name: String,
    /// Local endpoints (distinct addresses) serving external traffic.
    pub local_endpoints: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: ServiceRef<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceRef<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// The HTTP status line and body for a report.
pub fn answer(report: &Report) -> (&'static str, String) {
    let body = serde_json::to_string(&Body {
        service: ServiceRef {
            namespace: &report.namespace,
            name: &report.name,
        },
        local_endpoints: report.local_endpoints,
        service_proxy_healthy: true,
    })
    .unwrap_or_default();
    let status = if report.local_endpoints > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    (status, body)
}

type Reports = Arc<Mutex<BTreeMap<u16, Report>>>;

/// The health check servers of this node, kept in step with the desired state.
#[derive(Default)]
pub struct HealthChecks {
    /// Per Service port with a health check port: the port and its local endpoints.
    ports: BTreeMap<ServicePortName, (u16, BTreeSet<Ipv4Addr>)>,
    reports: Reports,
    servers: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthChecks {
    /// Takes the whole desired state.
    pub fn full(&mut self, desired: &DesiredState) {
        self.ports = desired.services.iter().filter_map(entry).collect();
        self.refresh();
    }

    /// Takes the changes of some Service ports (`None`: removed).
    pub fn changes(&mut self, changes: &BTreeMap<ServicePortName, Option<ServicePlan>>) {
        for (name, plan) in changes {
            match plan.as_ref().and_then(entry) {
                Some((_, v)) => self.ports.insert(name.clone(), v),
                None => self.ports.remove(name),
            };
        }
        self.refresh();
    }

    /// The ports served and what they report.
    pub fn reports(&self) -> BTreeMap<u16, Report> {
        self.reports.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn refresh(&mut self) {
        let mut wanted: BTreeMap<u16, (Report, BTreeSet<Ipv4Addr>)> = BTreeMap::new();
        for (name, (port, local)) in &self.ports {
            let (report, addrs) = wanted.entry(*port).or_insert_with(|| {
                (
                    Report {
                        namespace: name.namespace.clone(),
                        name: name.name.clone(),
                        local_endpoints: 0,
                    },
                    BTreeSet::new(),
                )
            });
            addrs.extend(local);
            report.local_endpoints = addrs.len();
        }
        if let Ok(mut reports) = self.reports.lock() {
            *reports = wanted.iter().map(|(p, (r, _))| (*p, r.clone())).collect();
        }
        self.servers.retain(|port, task| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                tracing::info!(port, "health check port closed");
            }
            keep
        });
        for port in wanted.keys() {
            if !self.servers.contains_key(port) {
                let reports = Arc::clone(&self.reports);
                let port = *port;
                self.servers.insert(
                    port,
                    tokio::spawn(async move { serve(port, reports).await }),
                );
            }
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for task in self.servers.values() {
            task.abort();
        }
    }
}

/// A plan's health check port and its local endpoints serving external traffic.
fn entry(plan: &ServicePlan) -> Option<(ServicePortName, (u16, BTreeSet<Ipv4Addr>))> {
    let port = plan.health_check_node_port?;
    let local = plan
        .external_backends
        .iter()
        .filter(|b| plan.is_local(b))
        .map(|b| *b.ip())
        .collect();
    Some((plan.id.clone(), (port, local)))
}

async fn serve(port: u16, reports: Reports) {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, "health check port: {e}");
            return;
        }
    };
    tracing::info!(port, "serving a health check node port");
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let reports = Arc::clone(&reports);
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let report = reports
                .lock()
                .ok()
                .and_then(|r| r.get(&port).cloned())
                .unwrap_or_default();
            let (status, body) = answer(&report);
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_like_kube_proxy() {
        let mut r = Report {
            namespace: "web".into(),
            name: "front".into(),
            local_endpoints: 2,
        };
        let (status, body) = answer(&r);
        assert_eq!(status, "200 OK");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["service"]["namespace"], "web");
        assert_eq!(v["service"]["name"], "front");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["serviceProxyHealthy"], true);
        r.local_endpoints = 0;
        assert_eq!(answer(&r).0, "503 Service Unavailable");
    }
}
