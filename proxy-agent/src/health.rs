//! `/healthz` and `/readyz` over plain HTTP, as kube-proxy serves them.
//!
//! - `/healthz`: 200 while the event loop runs and the datapath is loaded.
//! - `/readyz`: 200 once the first full sync has been applied and the last
//!   apply succeeded and the source (API server) is reachable; 503 with the
//!   reason otherwise. While not ready the datapath keeps serving what it has.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

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
    last_sync_unix: AtomicU64,
    source_detail: Mutex<String>,
}

impl Health {
    pub fn new() -> Arc<Self> {
        let h = Self::default();
        h.source_ok.store(true, Ordering::Relaxed);
        h.apply_ok.store(true, Ordering::Relaxed);
        Arc::new(h)
    }

    /// A sync was applied (`ok`) or failed.
    pub fn synced(&self, ok: bool) {
        self.synced.store(true, Ordering::Relaxed);
        self.apply_ok.store(ok, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_sync_unix.store(now, Ordering::Relaxed);
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

/// Serves `/healthz` and `/readyz` on `addr`, and `/metrics` when given
/// metrics, until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    if metrics.is_some() {
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    } else {
        tracing::info!(%addr, "serving /healthz and /readyz");
    }
    loop {
        let (mut conn, _) = listener.accept().await?;
        let health = Arc::clone(&health);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let reply = match (path, metrics) {
                ("/metrics", Some(m)) => {
                    let body = tokio::task::spawn_blocking(move || m.render())
                        .await
                        .unwrap_or_default();
                    response("200 OK", "text/plain; version=0.0.4; charset=utf-8", &body)
                }
                ("/healthz" | "/livez", _) => response("200 OK", TEXT, "ok\n"),
                ("/readyz", _) => match health.not_ready() {
                    None => response("200 OK", TEXT, "ready\n"),
                    Some(why) => response("503 Service Unavailable", TEXT, &format!("{why}\n")),
                },
                _ => response("404 Not Found", TEXT, "not found\n"),
            };
            let _ = conn.write_all(reply.as_bytes()).await;
        });
    }
}
