//! Read-only views of a running agent's datapath for `proxy-agent service`,
//! `ct` and `explain`: built from the pinned maps, with the svc id → Service
//! port names the agent writes into `SVC_NAMES`. Nothing here writes.

use std::{collections::BTreeMap, fmt, net::SocketAddrV4, path::Path};

use anyhow::{Context as _, Result};
use proxy_common::{
    CT_F_DSR, CT_F_EXTERNAL, CT_F_HAIRPIN, CT_F_SNAT, CtKey, CtValue, NODE_F_SOCK_HOST_ONLY,
    SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue, ct_dir, ct_state, hash_mode, proto, scope,
};
use serde::{Serialize, Serializer};

use crate::{
    datapath, maglev,
    model::{Protocol, SocketLb},
    programmed::{Programmed, Table},
};

/// Everything the views are built from.
pub struct Snapshot {
    pub maps: Programmed,
    pub counters: BTreeMap<u32, proxy_common::SvcCounters>,
    /// Socket-level load balancing in effect (`None`: off).
    pub socket_lb: Option<SocketLb>,
}

impl Snapshot {
    /// Reads the maps pinned under `pin_root`.
    pub fn read(pin_root: &Path) -> Result<Self> {
        let maps = datapath::read_pinned(pin_root).with_context(|| {
            format!(
                "reading the pinned maps under {} (is the agent running with --bpffs {}?)",
                pin_root.display(),
                pin_root.display()
            )
        })?;
        let ids: Vec<u32> = maps.tables.keys().copied().collect();
        let counters = datapath::read_pinned_service_counters(pin_root, ids)?
            .into_iter()
            .collect();
        let (config, hooks) = datapath::read_pinned_node(pin_root)?;
        let socket_lb =
            (!hooks.is_empty()).then_some(if config.flags & NODE_F_SOCK_HOST_ONLY != 0 {
                SocketLb::HostOnly
            } else {
                SocketLb::All
            });
        Ok(Self {
            maps,
            counters,
            socket_lb,
        })
    }

    /// How the socket hooks serve a frontend (`None`: they do not).
    fn socket_level(&self, key: &ServiceKey, value: &ServiceValue) -> Option<&'static str> {
        if key.scope != scope::INTERNAL {
            return None;
        }
        Some(match self.socket_lb? {
            _ if value.flags & SVC_F_SOURCE_RANGES != 0 => {
                "no: source ranges apply, so pods are translated per packet"
            }
            SocketLb::All => "at connect(), for pods and host processes",
            SocketLb::HostOnly | SocketLb::Off => {
                "at connect(), for host processes (host-only); pods per packet"
            }
        })
    }

    fn name(&self, svc_id: u32) -> String {
        self.maps.names.get(&svc_id).map_or_else(
            || format!("svc#{svc_id}"),
            |n| format!("{}/{}", n.port.namespace, n.port.name),
        )
    }
}

fn protocol(p: u8) -> &'static str {
    match Protocol::from_number(p) {
        Some(Protocol::Tcp) => "TCP",
        Some(Protocol::Udp) => "UDP",
        None => "?",
    }
}

fn frontend(k: &ServiceKey) -> String {
    let scope = if k.scope == scope::EXTERNAL {
        "external"
    } else {
        "cluster"
    };
    format!("{}/{} ({scope})", k.frontend(), protocol(k.proto))
}

/// One row of `service list`.
#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: String,
    pub svc_id: u32,
    pub table: &'static str,
    pub frontends: Vec<String>,
    pub backends: usize,
    pub algorithm: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    pub rejected: u64,
}

fn algorithm(t: &Table) -> &'static str {
    match (t.algorithm, t.hash_mode) {
        (proxy_common::algorithm::MAGLEV, hash_mode::SOURCE) => "maglev (client address)",
        (proxy_common::algorithm::MAGLEV, _) => "maglev",
        (proxy_common::algorithm::ROUND_ROBIN, _) => "round-robin",
        (proxy_common::algorithm::LEAST_CONN, _) => "least-connections",
        _ => "random",
    }
}

/// `service list`: every programmed Service port table.
pub fn services(s: &Snapshot) -> Vec<ServiceRow> {
    let mut frontends: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (k, v) in &s.maps.services {
        frontends.entry(v.svc_id).or_default().push(frontend(k));
    }
    let mut rows: Vec<ServiceRow> = s
        .maps
        .tables
        .iter()
        .map(|(id, t)| {
            let n = s.maps.names.get(id);
            let p = n.map(|n| &n.port);
            let c = s.counters.get(id).copied().unwrap_or_default();
            ServiceRow {
                namespace: p.map(|p| p.namespace.clone()).unwrap_or_default(),
                name: p.map_or_else(|| format!("svc#{id}"), |p| p.name.clone()),
                port: p.map(|p| p.port_name.clone()).unwrap_or_default(),
                protocol: p.map(|p| p.protocol.to_string()).unwrap_or_default(),
                svc_id: *id,
                table: n.map_or("all", |n| n.role.label()),
                frontends: frontends.remove(id).unwrap_or_default(),
                backends: t.backends.len(),
                algorithm: algorithm(t),
                packets: c.packets,
                bytes: c.bytes,
                new_connections: c.new_flows,
                rejected: c.rejected,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.namespace, &a.name, &a.port, a.svc_id).cmp(&(&b.namespace, &b.name, &b.port, b.svc_id))
    });
    rows
}

/// A backend in `service get`.
#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub address: String,
    pub backend_id: u32,
    /// `eligible` (takes new flows) or `resting` (drained, not ready,
    /// terminating: keeps its open flows only).
    pub state: &'static str,
    pub local: bool,
    pub weight: u32,
    /// Share of the Maglev table's slots, in percent (0 without a table).
    pub slot_share_percent: f64,
}

/// `service get`: one Service port table in detail.
#[derive(Debug, Serialize)]
pub struct ServiceDetail {
    #[serde(flatten)]
    pub summary: ServiceRow,
    pub hash: &'static str,
    pub maglev_table_size: u32,
    pub affinity_timeout_seconds: u32,
    pub drop_when_empty: bool,
    pub source_ranges: Vec<String>,
    /// Whether the socket hooks serve this table's frontends (clients
    /// inside the node), and for whom; absent when they do not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_level: Option<&'static str>,
    pub backend_list: Vec<BackendRow>,
}

/// `service get NS/NAME`: every table of the Service's ports.
pub fn service(s: &Snapshot, namespace: &str, name: &str) -> Vec<ServiceDetail> {
    services(s)
        .into_iter()
        .filter(|r| r.namespace == namespace && r.name == name)
        .filter_map(|summary| {
            let t = s.maps.tables.get(&summary.svc_id)?;
            let mut slots: BTreeMap<u16, u32> = BTreeMap::new();
            for e in &t.entries {
                *slots.entry(*e).or_default() += 1;
            }
            let row = |id: &u32, state, weight, index: Option<usize>| {
                let b = s.maps.backends.get(id).copied().unwrap_or_default();
                let share = index
                    .and_then(|i| u16::try_from(i).ok())
                    .and_then(|i| slots.get(&i))
                    .map_or(0.0, |n| {
                        f64::from(*n) * 100.0 / f64::from(t.table_size.max(1))
                    });
                BackendRow {
                    address: b.addr().to_string(),
                    backend_id: *id,
                    state,
                    local: b.is_local(),
                    weight,
                    slot_share_percent: (share * 100.0).round() / 100.0,
                }
            };
            let mut backend_list: Vec<BackendRow> = t
                .backends
                .iter()
                .zip(&t.weights)
                .enumerate()
                .map(|(i, (id, w))| row(id, "eligible", *w, Some(i)))
                .collect();
            backend_list.extend(t.draining.iter().map(|id| row(id, "resting", 0, None)));
            Some(ServiceDetail {
                hash: if t.hash_mode == hash_mode::SOURCE {
                    "client address"
                } else {
                    "5-tuple"
                },
                maglev_table_size: t.table_size,
                affinity_timeout_seconds: t.affinity_timeout,
                drop_when_empty: t.drop_when_empty,
                source_ranges: s
                    .maps
                    .ranges
                    .get(&summary.svc_id)
                    .into_iter()
                    .flatten()
                    .map(ToString::to_string)
                    .collect(),
                socket_level: s
                    .maps
                    .services
                    .iter()
                    .filter(|(_, v)| v.svc_id == summary.svc_id)
                    .find_map(|(k, v)| s.socket_level(k, v)),
                backend_list,
                summary,
            })
        })
        .collect()
}

/// One conntrack entry in `ct list`.
#[derive(Debug, Serialize)]
pub struct CtRow {
    pub direction: &'static str,
    pub protocol: &'static str,
    pub source: String,
    pub destination: String,
    /// FORWARD: the backend; REPLY: the frontend restored as the source.
    pub translated_to: String,
    pub state: &'static str,
    pub flags: Vec<&'static str>,
    pub service: String,
    pub backend_id: u32,
    pub idle_seconds: u64,
}

/// Filters of `ct list`.
#[derive(Debug, Default)]
pub struct CtFilter {
    /// `NS/NAME`.
    pub service: Option<String>,
    /// Backend (or any) address, with an optional port.
    pub address: Option<String>,
    pub protocol: Option<u8>,
}

/// `ct list`: the conntrack entries matching `filter`, idle time from `now_ns`.
pub fn conntrack(
    s: &Snapshot,
    entries: &[(CtKey, CtValue)],
    filter: &CtFilter,
    now_ns: u64,
) -> Vec<CtRow> {
    let mut rows: Vec<CtRow> = entries
        .iter()
        .filter(|(k, _)| filter.protocol.is_none_or(|p| p == k.proto))
        .map(|(k, v)| {
            let flags = [
                (CT_F_EXTERNAL, "external"),
                (CT_F_SNAT, "snat"),
                (CT_F_DSR, "dsr"),
                (CT_F_HAIRPIN, "hairpin"),
                (proxy_common::CT_F_REMOTE, "remote"),
                (proxy_common::CT_F_COUNTED, "counted"),
            ]
            .into_iter()
            .filter(|(f, _)| v.flags & f != 0)
            .map(|(_, n)| n)
            .collect();
            CtRow {
                direction: if k.dir == ct_dir::FORWARD {
                    "forward"
                } else {
                    "reply"
                },
                protocol: protocol(k.proto),
                source: k.src().to_string(),
                destination: k.dst().to_string(),
                translated_to: v.nat().to_string(),
                state: match (k.proto, v.state) {
                    (proto::UDP, _) => "-",
                    (_, ct_state::SYN_SENT) => "syn-sent",
                    (_, ct_state::ESTABLISHED) => "established",
                    (_, ct_state::CLOSING) => "closing",
                    (_, ct_state::CLOSED) => "closed",
                    _ => "new",
                },
                flags,
                service: if v.svc_id == 0 {
                    "(dsr, learned)".to_owned()
                } else {
                    s.name(v.svc_id)
                },
                backend_id: v.backend_id,
                idle_seconds: now_ns.saturating_sub(v.last_seen_ns) / 1_000_000_000,
            }
        })
        .filter(|r| filter.service.as_ref().is_none_or(|f| &r.service == f))
        .filter(|r| {
            filter.address.as_ref().is_none_or(|a| {
                [&r.source, &r.destination, &r.translated_to]
                    .iter()
                    .any(|x| *x == a || x.split(':').next() == Some(a.as_str()))
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.service, &a.source, a.direction).cmp(&(&b.service, &b.source, b.direction))
    });
    rows
}

/// What the datapath does with the packet `explain` is asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not addressed to a frontend.
    NotAFrontend,
    /// A frontend with no endpoint: refused, or dropped when endpoints
    /// exist but a traffic policy allows none of them here.
    NoEndpoints { dropped: bool },
    /// A tracked flow, DNATed to its backend.
    Tracked(SocketAddrV4),
    /// A new flow, DNATed to the backend Maglev picks.
    NewFlow(SocketAddrV4),
    /// A new flow; the algorithm picks at the time.
    ChosenAtTheTime(&'static str),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::NotAFrontend => f.write_str("not a Service frontend: passed untouched"),
            Verdict::NoEndpoints { dropped: true } => {
                f.write_str("no endpoint may take it here (traffic policy): dropped")
            }
            Verdict::NoEndpoints { dropped: false } => f.write_str(
                "no endpoints: refused (ICMP port unreachable; dropped on external frontends)",
            ),
            Verdict::Tracked(b) => write!(f, "tracked flow: DNAT to {b}"),
            Verdict::NewFlow(b) => write!(f, "new flow: DNAT to {b}"),
            Verdict::ChosenAtTheTime(a) => {
                write!(f, "new flow: a backend chosen by {a} at the time")
            }
        }
    }
}

/// JSON shows the verdict as its sentence.
impl Serialize for Verdict {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `explain`: what the datapath does with a packet, from the live maps and
/// the kernel's own hash functions.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub source: String,
    pub destination: String,
    pub protocol: &'static str,
    /// The frontend entry matched, if any.
    pub frontend: Option<String>,
    pub service: Option<String>,
    pub svc_id: Option<u32>,
    pub flags: Vec<&'static str>,
    pub algorithm: Option<&'static str>,
    pub hash: Option<&'static str>,
    /// Flow hash and Maglev slot a new flow would use (Maglev only).
    pub flow_hash: Option<u32>,
    pub slot: Option<u32>,
    pub table_size: Option<u32>,
    /// The backend a new flow would get (Maglev; affinity aside).
    pub new_flow_backend: Option<String>,
    /// The tracked flow, if any: its backend, state, idle time.
    pub conntrack: Option<CtRow>,
    /// What the packet is rewritten to now.
    pub verdict: Verdict,
    /// Whether the socket hooks translate this frontend at connect time
    /// (clients inside the node); absent when they do not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_level: Option<&'static str>,
    /// What the backend's replies are rewritten to.
    pub reply: Option<String>,
}

/// Explains a packet `src` → `dst` of `proto`.
pub fn explain(
    s: &Snapshot,
    entries: &[(CtKey, CtValue)],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto_: u8,
    now_ns: u64,
) -> Explanation {
    let mut e = Explanation {
        source: src.to_string(),
        destination: dst.to_string(),
        protocol: protocol(proto_),
        frontend: None,
        service: None,
        svc_id: None,
        flags: Vec::new(),
        algorithm: None,
        hash: None,
        flow_hash: None,
        slot: None,
        table_size: None,
        new_flow_backend: None,
        conntrack: None,
        verdict: Verdict::NotAFrontend,
        socket_level: None,
        reply: None,
    };
    let found = [scope::INTERNAL, scope::EXTERNAL]
        .into_iter()
        .find_map(|sc| {
            let key = ServiceKey::new(dst, proto_, sc);
            s.maps.services.get(&key).map(|v| (key, *v))
        });
    let Some((k, v)) = found else {
        return e;
    };
    e.frontend = Some(frontend(&k));
    e.socket_level = s.socket_level(&k, &v);
    e.service = Some(s.name(v.svc_id));
    e.svc_id = Some(v.svc_id);
    if v.flags & proxy_common::SVC_F_DSR != 0 {
        e.flags.push("dsr");
    }
    if v.flags & SVC_F_SOURCE_RANGES != 0 {
        e.flags.push("source-ranges");
    }
    let fwd = CtKey::new(src, dst, proto_, ct_dir::FORWARD);
    let tracked = entries.iter().find(|(ek, _)| *ek == fwd);
    let mut new_flow = None;
    if let Some(t) = s.maps.tables.get(&v.svc_id) {
        e.algorithm = Some(algorithm(t));
        e.hash = Some(if t.hash_mode == hash_mode::SOURCE {
            "client address"
        } else {
            "5-tuple"
        });
        if let Some(h) = maglev::flow_hash(t, src, dst, proto_) {
            e.flow_hash = Some(h);
            e.slot = Some(h % t.table_size);
            e.table_size = Some(t.table_size);
        }
        new_flow = maglev::predict(t, src, dst, proto_)
            .and_then(|id| s.maps.backends.get(&id))
            .map(|b| b.addr());
        e.new_flow_backend = new_flow.map(|b| b.to_string());
        e.verdict = if t.backends.is_empty() {
            Verdict::NoEndpoints {
                dropped: t.drop_when_empty,
            }
        } else {
            Verdict::ChosenAtTheTime(algorithm(t))
        };
    }
    if let Some((_, cv)) = tracked {
        e.verdict = Verdict::Tracked(cv.nat());
        e.conntrack = conntrack(s, &[(fwd, *cv)], &CtFilter::default(), now_ns).pop();
    } else if let Some(b) = new_flow {
        e.verdict = Verdict::NewFlow(b);
    }
    if let Verdict::Tracked(b) | Verdict::NewFlow(b) = e.verdict {
        e.reply = Some(format!("replies from {b} get the source {dst}"));
    }
    e
}
