//! Conntrack passes off the event loop, on blocking threads: garbage
//! collection of idle flows (one pass at a time), and ending the flows of
//! departed backends after a sync.

use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use super::{Timeouts, departed, expired, monotonic_ns};
use crate::{datapath::Datapath, metrics::Metrics};

/// Runs garbage collection passes, one at a time.
#[derive(Debug, Default)]
pub struct Collector {
    /// A pass is running.
    running: Arc<AtomicBool>,
}

impl Collector {
    /// Starts a pass unless one is running: flows idle longer than their
    /// state's timeout go. Says so when the table is nearly full (the LRU
    /// then evicts the least recently used).
    pub fn start(&self, dp: &Datapath, timeouts: Timeouts, metrics: &Arc<Metrics>) {
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let running = Arc::clone(&self.running);
        let metrics = Arc::clone(metrics);
        let ct = match dp.conntrack_handle() {
            Ok(ct) => ct,
            Err(e) => {
                tracing::warn!("conntrack gc: {e}");
                running.store(false, Ordering::Release);
                return;
            }
        };
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = ct.entries().and_then(|entries| {
                let idle = expired(&entries, monotonic_ns(), &timeouts);
                let removed = ct.remove_idle(&entries, &idle)?;
                Ok((entries.len(), removed, ct.capacity()?))
            });
            match result {
                Ok((scanned, removed, capacity)) => {
                    metrics.record_conntrack((scanned - removed) as u64, u64::from(capacity));
                    tracing::debug!(
                        scanned,
                        removed,
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "conntrack gc"
                    );
                    if scanned * 10 >= capacity as usize * 9 {
                        tracing::warn!(
                            entries = scanned,
                            capacity,
                            "conntrack table over 90% full: least recently used flows are evicted; raise --ct-entries"
                        );
                    }
                }
                Err(e) => tracing::warn!("conntrack gc: {e}"),
            }
            running.store(false, Ordering::Release);
        });
    }
}

/// Ends flows off the event loop: those of backends that are gone (no
/// slice lists them: their connections cannot succeed, and a client
/// should see a reset instead of a hang), and UDP flows whose backend
/// left their Service (`left`: svc id, backend id; UDP has no connection
/// to end, so clients' next datagrams pick a live backend).
pub fn forget_flows(
    dp: &Datapath,
    metrics: &Arc<Metrics>,
    left: BTreeSet<(u32, u32)>,
    gone: BTreeSet<SocketAddrV4>,
) {
    let metrics = Arc::clone(metrics);
    let ct = match dp.conntrack_handle() {
        Ok(ct) => ct,
        Err(e) => {
            tracing::warn!("cleaning conntrack: {e}");
            return;
        }
    };
    tokio::task::spawn_blocking(move || {
        let result = ct
            .entries()
            .and_then(|e| ct.remove(&e, &departed(&e, &gone, &left)));
        match result {
            Ok(0) => {}
            Ok(n) => {
                metrics.record_conntrack_deleted(n);
                tracing::info!(
                    entries = n,
                    gone_backends = gone.len(),
                    "ended flows of departed backends"
                );
            }
            Err(e) => tracing::warn!("cleaning conntrack: {e}"),
        }
    });
}
