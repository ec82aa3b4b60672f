//! `/healthz`, `/livez` and `/readyz` over plain HTTP.
//!
//! - `/healthz` and `/livez` answer as kube-proxy's do (same JSON, same
//!   rules): unhealthy (503) when a change has waited longer than the
//!   health timeout (twice `--resync-seconds`, as kube-proxy uses twice its
//!   sync period) without a successful sync; `/healthz` is also 503 while
//!   this node is being deleted or is tainted
//!   `ToBeDeletedByClusterAutoscaler` (`nodeEligible: false`), so load
//!   balancers stop sending to it; `/livez` ignores the node. Each answer is
//!   counted in `kubeproxy_proxy_{healthz,livez}_total`.
//! - `/readyz`: 200 once the first full sync has been applied and the last
//!   apply succeeded and the source (API server) is reachable; 503 with the
//!   reason otherwise. While not ready the datapath keeps serving what it has.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::metrics::{Metrics, Probe};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// Shared health state.
#[derive(Debug, Default)]
pub struct Health {
    synced: AtomicBool,
    apply_ok: AtomicBool,
    source_ok: AtomicBool,
    source_detail: Mutex<String>,
    /// kube-proxy's health: the oldest change not yet synced, the last
    /// successful sync, whether this node may take traffic, the timeout.
    oldest_queued: Mutex<Option<SystemTime>>,
    last_updated: Mutex<Option<SystemTime>>,
    node_ineligible: AtomicBool,
    timeout_ms: AtomicU64,
}

/// kube-proxy's health timeout: twice its default 30 s sync period.
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// A time as Go prints a `time.Time` (kube-proxy's `%q` of one), in UTC.
fn go_time(t: SystemTime) -> String {
    let ts = t
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| {
            k8s_openapi::jiff::Timestamp::new(d.as_secs() as i64, d.subsec_nanos() as i32).ok()
        })
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    let frac = format!("{:09}", ts.subsec_nanosecond());
    let frac = frac.trim_end_matches('0');
    let dot = if frac.is_empty() { "" } else { "." };
    format!("{}{dot}{frac} +0000 UTC", ts.strftime("%Y-%m-%d %H:%M:%S"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Health {
    pub fn new() -> Arc<Self> {
        let h = Self::default();
        h.source_ok.store(true, Ordering::Relaxed);
        h.apply_ok.store(true, Ordering::Relaxed);
        h.set_timeout(DEFAULT_HEALTH_TIMEOUT);
        Arc::new(h)
    }

    /// How long a change may wait for its sync before `/healthz` and
    /// `/livez` say unhealthy.
    pub fn set_timeout(&self, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// A sync was applied (`ok`) or failed.
    pub fn synced(&self, ok: bool) {
        self.synced.store(true, Ordering::Relaxed);
        self.apply_ok.store(ok, Ordering::Relaxed);
        if ok {
            *lock(&self.oldest_queued) = None;
            *lock(&self.last_updated) = Some(SystemTime::now());
        }
    }

    /// A change arrived that a sync must write (kube-proxy's `QueuedUpdate`).
    pub fn queued(&self) {
        lock(&self.oldest_queued).get_or_insert_with(SystemTime::now);
    }

    /// Whether this node may take traffic: not being deleted, not tainted
    /// `ToBeDeletedByClusterAutoscaler`.
    pub fn node_eligible(&self, eligible: bool) {
        self.node_ineligible.store(!eligible, Ordering::Relaxed);
    }

    /// kube-proxy's answer to `/healthz` (`with_node`) or `/livez`: the
    /// status and its JSON body.
    pub fn probe(&self, with_node: bool) -> (u16, String) {
        let now = SystemTime::now();
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        let waited =
            (*lock(&self.oldest_queued)).map(|q| now.duration_since(q).unwrap_or_default());
        let mut healthy = waited.is_none_or(|w| w < timeout);
        let eligible = !self.node_ineligible.load(Ordering::Relaxed);
        if with_node {
            healthy &= eligible;
        }
        // As kube-proxy: a healthy answer's lastUpdated is the current time.
        let last = if healthy {
            Some(now)
        } else {
            *lock(&self.last_updated)
        };
        let last = last.map_or_else(|| "0001-01-01 00:00:00 +0000 UTC".to_owned(), go_time);
        let body = if with_node {
            format!(
                "{{\"lastUpdated\": \"{last}\",\"currentTime\": \"{}\", \"nodeEligible\": {eligible}}}",
                go_time(now)
            )
        } else {
            format!(
                "{{\"lastUpdated\": \"{last}\",\"currentTime\": \"{}\"}}",
                go_time(now)
            )
        };
        (if healthy { 200 } else { 503 }, body)
    }

    /// The source is reachable (`None`) or not (`Some(reason)`).
    pub fn source(&self, problem: Option<String>) {
        self.source_ok.store(problem.is_none(), Ordering::Relaxed);
        if let Ok(mut d) = self.source_detail.lock() {
            *d = problem.unwrap_or_default();
        }
    }

    pub fn is_source_ok(&self) -> bool {
        self.source_ok.load(Ordering::Relaxed)
    }

    /// `None` when ready, else why not.
    pub fn not_ready(&self) -> Option<String> {
        if !self.synced.load(Ordering::Relaxed) {
            return Some(
                "waiting for the first full sync (the datapath serves its previous state)".into(),
            );
        }
        if !self.source_ok.load(Ordering::Relaxed) {
            let detail = self
                .source_detail
                .lock()
                .map(|d| d.clone())
                .unwrap_or_default();
            return Some(format!(
                "source unreachable, serving the last known state: {detail}"
            ));
        }
        if !self.apply_ok.load(Ordering::Relaxed) {
            return Some("the last apply to the maps failed; retrying".into());
        }
        None
    }
}

fn response(status: &str, kind: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

const TEXT: &str = "text/plain; charset=utf-8";

/// Serves `/healthz`, `/livez` and `/readyz` on `addr`, and `/metrics`
/// when `with_metrics`, until the task is dropped. Probe answers are
/// counted in `metrics` either way.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    with_metrics: bool,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    if with_metrics {
        tracing::info!(%addr, "serving /metrics, /healthz, /livez and /readyz");
    } else {
        tracing::info!(%addr, "serving /healthz, /livez and /readyz");
    }
    loop {
        let (mut conn, _) = listener.accept().await?;
        let health = Arc::clone(&health);
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let reply = match path {
                "/metrics" if with_metrics => {
                    let body = tokio::task::spawn_blocking(move || metrics.render())
                        .await
                        .unwrap_or_default();
                    response("200 OK", "text/plain; version=0.0.4; charset=utf-8", &body)
                }
                "/healthz" | "/livez" => {
                    let (probe, with_node) = if path == "/healthz" {
                        (Probe::Healthz, true)
                    } else {
                        (Probe::Livez, false)
                    };
                    let (code, body) = health.probe(with_node);
                    metrics.record_probe(probe, code);
                    let status = if code == 200 {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    };
                    response(status, "application/json", &body)
                }
                "/readyz" => match health.not_ready() {
                    None => response("200 OK", TEXT, "ready\n"),
                    Some(why) => response("503 Service Unavailable", TEXT, &format!("{why}\n")),
                },
                _ => response("404 Not Found", TEXT, "not found\n"),
            };
            let _ = conn.write_all(reply.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_waiting_past_the_timeout_is_unhealthy_until_synced() {
        let h = Health::new();
        h.set_timeout(Duration::from_millis(20));
        assert_eq!(h.probe(true).0, 200, "healthy while starting");
        h.queued();
        assert_eq!(h.probe(true).0, 200, "queued, not late yet");
        std::thread::sleep(Duration::from_millis(40));
        let (code, body) = h.probe(false);
        assert_eq!(code, 503, "{body}");
        assert!(body.starts_with("{\"lastUpdated\": \"0001-01-01"), "{body}");
        h.synced(false);
        assert_eq!(
            h.probe(false).0,
            503,
            "a failed sync leaves the change queued"
        );
        h.synced(true);
        assert_eq!(h.probe(false).0, 200);
        h.queued();
        h.queued();
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(h.probe(false).0, 503, "the oldest queued change counts");
    }

    #[test]
    fn an_ineligible_node_fails_healthz_only() {
        let h = Health::new();
        h.node_eligible(false);
        let (code, body) = h.probe(true);
        assert_eq!(code, 503);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["nodeEligible"], false);
        let (code, body) = h.probe(false);
        assert_eq!(code, 200);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(json.get("nodeEligible").is_none());
        assert_eq!(json["lastUpdated"], json["currentTime"], "healthy: now");
        h.node_eligible(true);
        assert_eq!(h.probe(true).0, 200);
    }

    #[test]
    fn times_print_as_go_prints_them() {
        let t = UNIX_EPOCH + Duration::new(1_764_769_200, 120_000_000);
        assert_eq!(go_time(t), "2025-12-03 13:40:00.12 +0000 UTC");
        assert_eq!(
            go_time(UNIX_EPOCH + Duration::from_secs(1)),
            "1970-01-01 00:00:01 +0000 UTC"
        );
    }
}
