//! Prometheus metrics in the text exposition format, served on
//! `--metrics-bind-address` (kube-proxy's flag; default 127.0.0.1:10249),
//! together with `/healthz` and `/readyz` (`health::serve`).
//!
//! Datapath counters and the svc id → Service port names (`SVC_NAMES`) are
//! read from the pinned maps at scrape time (per-CPU values summed), so a
//! scrape never waits for the event loop; what only the agent knows (sync
//! durations, map fill, conntrack use) is recorded by the event loop through
//! [`Metrics::record_sync`] and [`Metrics::record_conntrack`].

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{datapath::PinnedView, model::TableName};

/// kube-proxy's sync buckets: 1 ms doubling to 16.384 s (15 bounds,
/// `ExponentialBuckets(0.001, 2, 15)`).
const SYNC_BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];

/// kube-proxy's network programming buckets: 0, 0.25 s, 0.5 s, 1–59 s by
/// 1, 60–115 s by 5, 120–300 s by 30 (`MergeBuckets`, which starts at 0).
fn programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| f64::from(60 + 5 * i)));
    b.extend((0..7).map(|i| f64::from(120 + 30 * i)));
    b
}

/// A cumulative histogram over fixed bucket bounds.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Default for Histogram {
    /// kube-proxy's sync buckets.
    fn default() -> Self {
        Self::with_bounds(SYNC_BUCKETS.to_vec())
    }
}

impl Histogram {
    pub fn with_bounds(bounds: Vec<f64>) -> Self {
        Self {
            counts: vec![0; bounds.len()],
            bounds,
            count: 0,
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, d: Duration) {
        self.observe_secs(d.as_secs_f64());
    }

    pub fn observe_secs(&mut self, s: f64) {
        for (c, le) in self.counts.iter_mut().zip(&self.bounds) {
            if s <= *le {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, le) in self.counts.iter().zip(&self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// What a sync was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SyncKind {
    /// Everything, from the store and the maps read back.
    Full,
    /// The Service ports a change touched.
    Incremental,
}

impl SyncKind {
    /// The `kind` label.
    pub const fn name(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Incremental => "incremental",
        }
    }
}

/// Entries in use and capacity of one map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub map: &'static str,
    pub used: u64,
    pub capacity: u64,
}

/// What changed in the source, for kube-proxy's change counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Service,
    EndpointSlice,
}

/// Which health probe answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Probe {
    Healthz,
    Livez,
}

/// kube-proxy's own metrics (`pkg/proxy/metrics`), kept as kube-proxy
/// keeps them so its dashboards and alerts work unchanged.
#[derive(Debug)]
struct KubeProxy {
    sync: Histogram,
    full: Histogram,
    partial: Histogram,
    /// From an EndpointSlice's `last-change-trigger-time` to its change
    /// written.
    programming: Histogram,
    /// Unix seconds of the last successful sync and the last queued one.
    last_synced: Option<f64>,
    last_queued: Option<f64>,
    endpoint_changes: u64,
    service_changes: u64,
    endpoint_pending: u64,
    service_pending: u64,
    /// Trigger times (unix seconds) of the EndpointSlice changes not yet synced.
    triggers: Vec<f64>,
    /// Service ports with a Local policy and no local endpoint: internal, external.
    no_local: (u64, u64),
    conntrack_deleted: u64,
    /// Answers per probe and HTTP status.
    probes: BTreeMap<(Probe, u16), u64>,
}

impl Default for KubeProxy {
    fn default() -> Self {
        Self {
            sync: Histogram::default(),
            full: Histogram::default(),
            partial: Histogram::default(),
            programming: Histogram::with_bounds(programming_buckets()),
            last_synced: None,
            last_queued: None,
            endpoint_changes: 0,
            service_changes: 0,
            endpoint_pending: 0,
            service_pending: 0,
            triggers: Vec::new(),
            no_local: (0, 0),
            conntrack_deleted: 0,
            probes: BTreeMap::new(),
        }
    }
}

/// Now, in unix seconds.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The IP family label of kube-proxy's per-family metrics (IPv4 only, so far).
const FAMILY: &str = "ip_family=\"IPv4\"";

/// What the event loop recorded.
#[derive(Debug, Default)]
struct State {
    kube: KubeProxy,
    syncs: BTreeMap<SyncKind, Histogram>,
    /// Change received → maps written.
    programming: Histogram,
    sync_errors: u64,
    refused: u64,
    fill: Vec<MapFill>,
    /// Conntrack entries at the last collection, and its capacity.
    conntrack: Option<(u64, u64)>,
}

/// Shared metrics state.
#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<State>,
    /// Pin root of the maps read at scrape time.
    pin_root: Option<PathBuf>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn new(pin_root: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            pin_root,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A sync ended: how long it took (an incremental one is a change's
    /// network programming latency), whether its apply succeeded, how many
    /// Service ports it refused, and the maps' fill after it.
    pub fn record_sync(
        &self,
        kind: SyncKind,
        took: Duration,
        ok: bool,
        refused: usize,
        fill: Vec<MapFill>,
    ) {
        let mut st = self.state();
        st.syncs.entry(kind).or_default().observe(took);
        if kind == SyncKind::Incremental {
            st.programming.observe(took);
        }
        st.sync_errors += u64::from(!ok);
        st.refused += refused as u64;
        st.fill = fill;
        let kube = &mut st.kube;
        kube.sync.observe(took);
        match kind {
            SyncKind::Full => kube.full.observe(took),
            SyncKind::Incremental => kube.partial.observe(took),
        }
        if ok {
            let now = unix_now();
            kube.last_synced = Some(now);
            for t in std::mem::take(&mut kube.triggers) {
                kube.programming.observe_secs((now - t).max(0.0));
            }
            kube.endpoint_pending = 0;
            kube.service_pending = 0;
        }
    }

    /// A Service or EndpointSlice changed in the source (a sync is queued);
    /// `trigger` is an EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`
    /// in unix seconds.
    pub fn record_change(&self, kind: ChangeKind, trigger: Option<f64>) {
        let mut st = self.state();
        let kube = &mut st.kube;
        kube.last_queued = Some(unix_now());
        match kind {
            ChangeKind::Service => {
                kube.service_changes += 1;
                kube.service_pending += 1;
            }
            ChangeKind::EndpointSlice => {
                kube.endpoint_changes += 1;
                kube.endpoint_pending += 1;
            }
        }
        kube.triggers.extend(trigger);
    }

    /// Service ports with a Local traffic policy and no local endpoint.
    pub fn record_no_local_endpoints(&self, internal: usize, external: usize) {
        self.state().kube.no_local = (internal as u64, external as u64);
    }

    /// Conntrack entries removed because their backend left.
    pub fn record_conntrack_deleted(&self, entries: usize) {
        self.state().kube.conntrack_deleted += entries as u64;
    }

    /// A health probe answered with HTTP `status`.
    pub fn record_probe(&self, probe: Probe, status: u16) {
        *self.state().kube.probes.entry((probe, status)).or_default() += 1;
    }

    /// A conntrack collection found `entries` of `capacity`.
    pub fn record_conntrack(&self, entries: u64, capacity: u64) {
        self.state().conntrack = Some((entries, capacity));
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let names: BTreeMap<u32, TableName> = self
            .pin_root
            .as_deref()
            .and_then(|root| PinnedView::open(root).and_then(|v| v.names()).ok())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(id, text)| Some((id, text.parse().ok()?)))
            .collect();

        out.push_str("# HELP ebpf_proxy_datapath_packets_total Packets by the path they took or the reason they were left alone or dropped (one per packet).\n# TYPE ebpf_proxy_datapath_packets_total counter\n");
        if let Some(root) = &self.pin_root
            && let Ok(counters) = crate::datapath::read_pinned_counters(root)
        {
            for (c, v) in counters {
                let verdict = format!("{:?}", c.verdict()).to_lowercase();
                let _ = writeln!(
                    out,
                    "ebpf_proxy_datapath_packets_total{{path=\"{}\",verdict=\"{verdict}\"}} {v}",
                    c.name()
                );
            }
        }
        out.push_str("# HELP ebpf_proxy_datapath_drops_total Packets dropped, by reason.\n# TYPE ebpf_proxy_datapath_drops_total counter\n");
        if let Some(root) = &self.pin_root
            && let Ok(counters) = crate::datapath::read_pinned_counters(root)
        {
            for (c, v) in counters.iter().filter(|(c, _)| {
                matches!(
                    c.verdict(),
                    proxy_common::Verdict::Dropped | proxy_common::Verdict::Failed
                )
            }) {
                let _ = writeln!(
                    out,
                    "ebpf_proxy_datapath_drops_total{{reason=\"{}\"}} {v}",
                    c.name()
                );
            }
        }

        let per_service: Vec<(u32, proxy_common::SvcCounters)> = match &self.pin_root {
            Some(root) => {
                crate::datapath::read_pinned_service_counters(root, names.keys().copied())
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        for (metric, help, pick) in [
            (
                "packets",
                "Packets of the Service port's flows, both directions.",
                0usize,
            ),
            ("bytes", "Bytes (IPv4 length) of those packets.", 1),
            ("new_connections", "Flows that selected a backend.", 2),
            ("rejected", "Packets refused for lack of endpoints.", 3),
        ] {
            let _ = writeln!(
                out,
                "# HELP ebpf_proxy_service_{metric}_total {help}\n# TYPE ebpf_proxy_service_{metric}_total counter"
            );
            for (id, c) in &per_service {
                let Some(n) = names.get(id) else { continue };
                let v = [c.packets, c.bytes, c.new_flows, c.rejected][pick];
                let p = &n.port;
                let _ = writeln!(
                    out,
                    "ebpf_proxy_service_{metric}_total{{namespace=\"{}\",service=\"{}\",port=\"{}\",protocol=\"{}\",scope=\"{}\"}} {v}",
                    escape(&p.namespace),
                    escape(&p.name),
                    escape(&p.port_name),
                    p.protocol,
                    n.role.label()
                );
            }
        }

        // The maps are read above, without holding up the event loop's records.
        let state = self.state();
        out.push_str("# HELP ebpf_proxy_map_entries Entries in use per BPF map.\n# TYPE ebpf_proxy_map_entries gauge\n");
        for f in &state.fill {
            let _ = writeln!(
                out,
                "ebpf_proxy_map_entries{{map=\"{}\"}} {}",
                f.map, f.used
            );
        }
        out.push_str("# HELP ebpf_proxy_map_capacity Capacity per BPF map.\n# TYPE ebpf_proxy_map_capacity gauge\n");
        for f in &state.fill {
            let _ = writeln!(
                out,
                "ebpf_proxy_map_capacity{{map=\"{}\"}} {}",
                f.map, f.capacity
            );
        }
        if let Some((entries, cap)) = state.conntrack {
            let _ = writeln!(
                out,
                "# HELP ebpf_proxy_conntrack_entries Conntrack entries at the last collection (two per flow).\n# TYPE ebpf_proxy_conntrack_entries gauge\nebpf_proxy_conntrack_entries {entries}"
            );
            let _ = writeln!(
                out,
                "# HELP ebpf_proxy_conntrack_capacity Conntrack table capacity.\n# TYPE ebpf_proxy_conntrack_capacity gauge\nebpf_proxy_conntrack_capacity {cap}"
            );
        }
        out.push_str("# HELP ebpf_proxy_sync_duration_seconds Time to plan and apply a sync.\n# TYPE ebpf_proxy_sync_duration_seconds histogram\n");
        for (kind, h) in &state.syncs {
            h.write(
                &mut out,
                "ebpf_proxy_sync_duration_seconds",
                &format!("kind=\"{}\"", kind.name()),
            );
        }
        out.push_str("# HELP ebpf_proxy_network_programming_duration_seconds From a change reaching the agent to the maps written.\n# TYPE ebpf_proxy_network_programming_duration_seconds histogram\n");
        state.programming.write(
            &mut out,
            "ebpf_proxy_network_programming_duration_seconds",
            "",
        );
        let _ = writeln!(
            out,
            "# HELP ebpf_proxy_sync_errors_total Syncs whose apply failed (retried).\n# TYPE ebpf_proxy_sync_errors_total counter\nebpf_proxy_sync_errors_total {}",
            state.sync_errors
        );
        let _ = writeln!(
            out,
            "# HELP ebpf_proxy_refused_service_ports_total Service ports refused for lack of map room (kept their old state).\n# TYPE ebpf_proxy_refused_service_ports_total counter\nebpf_proxy_refused_service_ports_total {}",
            state.refused
        );
        state.kube.write(&mut out);
        out
    }
}

impl KubeProxy {
    /// kube-proxy's metrics, its names, types, buckets and labels.
    fn write(&self, out: &mut String) {
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        for (name, help, h) in [
            (
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                &self.sync,
            ),
            (
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                &self.full,
            ),
            (
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                &self.partial,
            ),
            (
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                &self.programming,
            ),
        ] {
            header(out, name, "histogram", help);
            h.write(out, name, FAMILY);
        }
        for (name, help, v) in [
            (
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
                self.last_synced,
            ),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
                self.last_queued,
            ),
        ] {
            header(out, name, "gauge", help);
            let _ = writeln!(out, "{name}{{{FAMILY}}} {}", v.unwrap_or(0.0));
        }
        for (name, kind, help, v) in [
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "counter",
                "Cumulative proxy rules Endpoint changes",
                self.endpoint_changes,
            ),
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "gauge",
                "Pending proxy rules Endpoint changes",
                self.endpoint_pending,
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "counter",
                "Cumulative proxy rules Service changes",
                self.service_changes,
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "gauge",
                "Pending proxy rules Service changes",
                self.service_pending,
            ),
        ] {
            header(out, name, kind, help);
            let _ = writeln!(out, "{name} {v}");
        }
        let (name, help) = (
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
        );
        header(out, name, "gauge", help);
        for (policy, v) in [("internal", self.no_local.0), ("external", self.no_local.1)] {
            let _ = writeln!(out, "{name}{{{FAMILY},traffic_policy=\"{policy}\"}} {v}");
        }
        let (name, help) = (
            "kubeproxy_conntrack_reconciler_deleted_entries_total",
            "Cumulative conntrack flows deleted by conntrack reconciler",
        );
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name}{{{FAMILY}}} {}", self.conntrack_deleted);
        for (probe, name, help) in [
            (
                Probe::Healthz,
                "kubeproxy_proxy_healthz_total",
                "Cumulative proxy healthz HTTP status",
            ),
            (
                Probe::Livez,
                "kubeproxy_proxy_livez_total",
                "Cumulative proxy livez HTTP status",
            ),
        ] {
            header(out, name, "counter", help);
            for ((p, code), v) in &self.probes {
                if *p == probe {
                    let _ = writeln!(out, "{name}{{code=\"{code}\"}} {v}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_renders() {
        let mut h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(5));
        let mut out = String::new();
        h.write(&mut out, "x", "kind=\"full\"");
        assert!(
            out.contains("x_bucket{kind=\"full\",le=\"0.004\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{kind=\"full\",le=\"0.032\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{kind=\"full\",le=\"+Inf\"} 3"),
            "{out}"
        );
        assert!(out.contains("x_count{kind=\"full\"} 3"), "{out}");
    }

    #[test]
    fn renders_published_state_without_maps() {
        let m = Metrics::new(None);
        let fill = vec![MapFill {
            map: "SERVICES",
            used: 3,
            capacity: 100,
        }];
        m.record_sync(
            SyncKind::Full,
            Duration::from_millis(5),
            false,
            0,
            fill.clone(),
        );
        m.record_sync(
            SyncKind::Incremental,
            Duration::from_millis(1),
            false,
            2,
            fill,
        );
        let text = m.render();
        assert!(text.contains("ebpf_proxy_map_entries{map=\"SERVICES\"} 3"));
        assert!(text.contains("ebpf_proxy_map_capacity{map=\"SERVICES\"} 100"));
        assert!(text.contains("ebpf_proxy_sync_errors_total 2"));
        assert!(text.contains("ebpf_proxy_sync_duration_seconds_count{kind=\"full\"} 1"));
        assert!(text.contains("ebpf_proxy_refused_service_ports_total 2"));
        assert!(text.contains("ebpf_proxy_network_programming_duration_seconds_count{} 1"));
        assert_eq!(escape("a\"b"), "a\\\"b");
    }
}
