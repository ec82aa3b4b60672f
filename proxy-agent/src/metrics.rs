//! Prometheus metrics in the text exposition format, served on
//! `--metrics-bind-address` (kube-proxy's flag; default 127.0.0.1:10249),
//! together with `/healthz` and `/readyz` (`health::serve`).
//!
//! Datapath counters are read from the pinned maps at scrape time (per-CPU
//! values summed), so a scrape never waits for the event loop; what only the
//! agent knows (sync durations, svc id → Service names, map fill) is
//! published by the event loop into [`Metrics`].

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Histogram bucket upper bounds in seconds (kube-proxy's sync buckets).
const BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
];

/// A cumulative histogram.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (c, le) in self.counts.iter_mut().zip(BUCKETS) {
            if s <= le {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, le) in self.counts.iter().zip(BUCKETS) {
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

/// A Service port as the metrics and the CLI name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: String,
    /// The table of external frontends (a traffic policy sets it apart).
    #[serde(default)]
    pub external: bool,
}

impl PortName {
    /// As stored in `SVC_NAMES`: `NAMESPACE/NAME:PORT/PROTOCOL[ external]`.
    pub fn to_text(&self) -> String {
        let ext = if self.external { " external" } else { "" };
        format!(
            "{}/{}:{}/{}{ext}",
            self.namespace, self.name, self.port, self.protocol
        )
    }

    /// Parses [`PortName::to_text`].
    pub fn from_text(text: &str) -> Option<Self> {
        let (text, external) = match text.strip_suffix(" external") {
            Some(t) => (t, true),
            None => (text, false),
        };
        let (ns, rest) = text.split_once('/')?;
        let (name, rest) = rest.split_once(':')?;
        let (port, protocol) = rest.rsplit_once('/')?;
        Some(Self {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            port: port.to_owned(),
            protocol: protocol.to_owned(),
            external,
        })
    }
}

/// What the event loop publishes.
#[derive(Debug, Default)]
pub struct State {
    /// svc id → its Service port.
    pub names: BTreeMap<u32, PortName>,
    /// (kind) → sync durations.
    pub syncs: BTreeMap<&'static str, Histogram>,
    /// Change received → maps written.
    pub programming: Histogram,
    pub sync_errors: u64,
    pub refused: u64,
    /// (map, entries in use, capacity).
    pub fill: Vec<(&'static str, u64, u64)>,
    /// Conntrack entries at the last collection, and its capacity.
    pub conntrack: Option<(u64, u64)>,
}

/// Shared metrics state.
#[derive(Debug, Default)]
pub struct Metrics {
    pub state: Mutex<State>,
    /// Pin root of the maps read at scrape time.
    pub pin_root: Option<PathBuf>,
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

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let names = state.names.clone();

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
                let _ = writeln!(
                    out,
                    "ebpf_proxy_service_{metric}_total{{namespace=\"{}\",service=\"{}\",port=\"{}\",protocol=\"{}\",scope=\"{}\"}} {v}",
                    escape(&n.namespace),
                    escape(&n.name),
                    escape(&n.port),
                    n.protocol,
                    if n.external { "external" } else { "all" }
                );
            }
        }

        out.push_str("# HELP ebpf_proxy_map_entries Entries in use per BPF map.\n# TYPE ebpf_proxy_map_entries gauge\n");
        for (map, used, _) in &state.fill {
            let _ = writeln!(out, "ebpf_proxy_map_entries{{map=\"{map}\"}} {used}");
        }
        out.push_str("# HELP ebpf_proxy_map_capacity Capacity per BPF map.\n# TYPE ebpf_proxy_map_capacity gauge\n");
        for (map, _, cap) in &state.fill {
            let _ = writeln!(out, "ebpf_proxy_map_capacity{{map=\"{map}\"}} {cap}");
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
                &format!("kind=\"{kind}\""),
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
        out
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
    fn port_names_round_trip() {
        for external in [false, true] {
            for port in ["", "http"] {
                let n = PortName {
                    namespace: "kube-system".into(),
                    name: "dns".into(),
                    port: port.into(),
                    protocol: "UDP".into(),
                    external,
                };
                assert_eq!(PortName::from_text(&n.to_text()), Some(n));
            }
        }
        assert_eq!(PortName::from_text("garbage"), None);
    }

    #[test]
    fn renders_published_state_without_maps() {
        let m = Metrics::new(None);
        {
            let mut s = m.state.lock().unwrap();
            s.fill.push(("SERVICES", 3, 100));
            s.sync_errors = 2;
            s.syncs
                .entry("full")
                .or_default()
                .observe(Duration::from_millis(5));
        }
        let text = m.render();
        assert!(text.contains("ebpf_proxy_map_entries{map=\"SERVICES\"} 3"));
        assert!(text.contains("ebpf_proxy_map_capacity{map=\"SERVICES\"} 100"));
        assert!(text.contains("ebpf_proxy_sync_errors_total 2"));
        assert!(text.contains("ebpf_proxy_sync_duration_seconds_count{kind=\"full\"} 1"));
        assert_eq!(escape("a\"b"), "a\\\"b");
    }
}
