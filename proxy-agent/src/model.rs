//! The desired datapath state in Kubernetes terms: what translation produces
//! and what `proxy-agent plan` prints.

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use serde::{Serialize, Serializer};

/// L4 protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::proto::TCP,
            Protocol::Udp => proxy_common::proto::UDP,
        }
    }

    /// Parses a Kubernetes protocol field (`TCP`, `UDP`; unset means TCP).
    pub fn from_k8s(name: Option<&str>) -> Option<Self> {
        name.unwrap_or("TCP").parse().ok()
    }

    /// The protocol with IANA number `n`, if it is one of ours.
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::proto::TCP => Some(Protocol::Tcp),
            proxy_common::proto::UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// Parses a protocol given on the command line: `tcp`, `udp`, any case.
    pub fn from_cli(text: &str) -> Result<Self, String> {
        text.to_ascii_uppercase()
            .parse()
            .map_err(|_| format!("{text:?}: expected tcp or udp"))
    }
}

/// The one protocol parser: the Kubernetes (and [`fmt::Display`]) names.
impl FromStr for Protocol {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            _ => Err(()),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// How external frontends reach backends on other nodes (`--nodeport-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NodePortMode {
    /// The entry node masquerades with its own address; replies come back through it.
    #[default]
    Snat,
    /// Direct server return: the client's address is kept, the backend's
    /// node answers the client itself.
    Dsr,
    /// DSR for TCP, SNAT for UDP.
    Hybrid,
}

impl NodePortMode {
    /// Whether flows of `protocol` use DSR.
    pub const fn dsr(self, protocol: Protocol) -> bool {
        match self {
            Self::Snat => false,
            Self::Dsr => true,
            Self::Hybrid => matches!(protocol, Protocol::Tcp),
        }
    }
}

/// Which sockets the cgroup hooks translate (`--socket-lb`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SocketLb {
    /// Every socket in the cgroup: pods and host processes.
    #[default]
    All,
    /// Only sockets in the node's own network namespace (host processes,
    /// host-network pods); pods' traffic is translated per packet, so a
    /// service mesh's sidecar still sees Service addresses.
    HostOnly,
    /// No socket hooks: everything per packet, host processes not served.
    Off,
}

/// Kind of a frontend address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalIP,
}

impl FrontendKind {
    /// Traffic to ClusterIPs comes from inside the cluster; to the others, from outside.
    pub const fn is_internal(self) -> bool {
        matches!(self, Self::ClusterIP)
    }

    /// How messages name a frontend of this kind.
    pub const fn name(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer IP",
            Self::ExternalIP => "externalIP",
        }
    }
}

/// One address:port a Service port is reachable at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub address: Ipv4Addr,
    pub port: u16,
}

/// Identity of a Service port: namespace/name, port name, protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

/// Which of a Service port's tables: whose backends a table holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableRole {
    /// The ClusterIPs' (internal traffic policy), shared by the other
    /// frontends whenever their backends are the same.
    Internal,
    /// NodePorts, LoadBalancer IPs and externalIPs as outside clients reach
    /// them (external traffic policy), when their backends differ.
    External,
    /// Those same frontends reached from inside the node (pods, host
    /// processes): the cluster-wide endpoints, as kube-proxy sends them,
    /// when they differ from both of the above (both policies Local).
    Cluster,
}

impl TableRole {
    /// Every role, in the order tables are made and shared.
    pub const ALL: [TableRole; 3] = [TableRole::Internal, TableRole::External, TableRole::Cluster];

    /// Suffix of the role in a table name's text.
    const fn suffix(self) -> &'static str {
        match self {
            TableRole::Internal => "",
            TableRole::External => " external",
            TableRole::Cluster => " cluster",
        }
    }

    /// What inspection shows: `all` for the table every frontend uses
    /// unless another one is set apart.
    pub const fn label(self) -> &'static str {
        match self {
            TableRole::Internal => "all",
            TableRole::External => "external",
            TableRole::Cluster => "cluster",
        }
    }
}

/// Names one selection table of a Service port (see [`TableRole`]).
///
/// Its text form, `NAMESPACE/NAME:PORT/PROTOCOL[ external| cluster]` (the
/// port part empty for an unnamed port), is what `SVC_NAMES` holds for
/// every svc id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub port: ServicePortName,
    pub role: TableRole,
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.port;
        write!(
            f,
            "{}/{}:{}/{}{}",
            p.namespace,
            p.name,
            p.port_name,
            p.protocol,
            self.role.suffix()
        )
    }
}

impl FromStr for TableName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?}: expected NAMESPACE/NAME:PORT/PROTOCOL[ external| cluster]");
        let (rest, role) = [TableRole::External, TableRole::Cluster]
            .into_iter()
            .find_map(|r| Some((text.strip_suffix(r.suffix())?, r)))
            .unwrap_or((text, TableRole::Internal));
        let (namespace, rest) = rest.split_once('/').ok_or_else(bad)?;
        let (name, rest) = rest.split_once(':').ok_or_else(bad)?;
        let (port_name, protocol) = rest.rsplit_once('/').ok_or_else(bad)?;
        Ok(Self {
            port: ServicePortName {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                port_name: port_name.to_owned(),
                protocol: protocol.parse().map_err(|()| bad())?,
            },
            role,
        })
    }
}

/// An IPv4 CIDR, its host bits cleared: `loadBalancerSourceRanges` entries
/// and `--nodeport-addresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// The CIDR of `addr/prefix` (host bits cleared); `None` if `prefix` > 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then(|| Self {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask(prefix)),
            prefix,
        })
    }

    fn mask(prefix: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.addr)
    }
}

/// `a.b.c.d/n`, or a bare address for a /32.
impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.trim().split_once('/').unwrap_or((s.trim(), "32"));
        let addr: Ipv4Addr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 CIDR (a.b.c.d/n)"))?;
        prefix
            .trim()
            .parse()
            .ok()
            .and_then(|p| Self::new(addr, p))
            .ok_or_else(|| format!("{s:?}: prefix length must be 0..=32"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How a Service port picks the backend of a new flow
/// (`ebpf-proxy.io/lb-algorithm`; IPVS's short names are accepted too).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Maglev consistent hashing of the 5-tuple (the default): every node
    /// makes the same choice, little disruption when backends change.
    #[default]
    Maglev,
    /// Random, weighted when weights differ.
    Random,
    /// Round robin (`rr`): each new flow the next backend (per CPU), the next
    /// slot of the weighted table when weights differ.
    RoundRobin,
    /// Source hashing (`sh`): Maglev over the client address alone, so a
    /// client keeps its backend on every node while the backend set holds.
    SourceHash,
    /// Least connections (`lc`): the backend with the fewest open flows
    /// (weights are not considered).
    LeastConnections,
}

impl Algorithm {
    /// Parses an annotation value.
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim() {
            "maglev" | "mh" => Some(Self::Maglev),
            "random" => Some(Self::Random),
            "round-robin" | "rr" => Some(Self::RoundRobin),
            "source-hash" | "sh" => Some(Self::SourceHash),
            "least-connections" | "lc" => Some(Self::LeastConnections),
            _ => None,
        }
    }

    /// The annotation value.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Maglev => "maglev",
            Self::Random => "random",
            Self::RoundRobin => "round-robin",
            Self::SourceHash => "source-hash",
            Self::LeastConnections => "least-connections",
        }
    }

    /// The datapath's algorithm number.
    pub const fn number(self) -> u32 {
        match self {
            Self::Maglev | Self::SourceHash => proxy_common::algorithm::MAGLEV,
            Self::Random => proxy_common::algorithm::RANDOM,
            Self::RoundRobin => proxy_common::algorithm::ROUND_ROBIN,
            Self::LeastConnections => proxy_common::algorithm::LEAST_CONN,
        }
    }

    /// Whether it picks from a Maglev table (always for hashing; for the
    /// others only to honour weights).
    pub const fn needs_table(self, weighted: bool) -> bool {
        match self {
            Self::Maglev | Self::SourceHash => true,
            Self::Random | Self::RoundRobin => weighted,
            Self::LeastConnections => false,
        }
    }
}

/// Everything the datapath needs for one Service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePlan {
    #[serde(flatten)]
    pub id: ServicePortName,
    /// Sorted, no duplicates.
    pub frontends: Vec<Frontend>,
    /// Where new ClusterIP flows from this node may go. Sorted, no duplicates.
    pub internal_backends: Vec<SocketAddrV4>,
    /// Where new NodePort/LoadBalancer/externalIP flows arriving at this node
    /// may go; empty when the Service is not externally reachable.
    pub external_backends: Vec<SocketAddrV4>,
    /// `sessionAffinity: ClientIP`: the flow hash covers the client address only.
    pub session_affinity_timeout_seconds: Option<u32>,
    /// `loadBalancerSourceRanges` (IPv4), sorted, no duplicates.
    pub source_ranges: Vec<Cidr>,
    /// Served by the agent when `externalTrafficPolicy: Local` (LoadBalancer).
    pub health_check_node_port: Option<u16>,
    /// Some endpoint anywhere can serve: an empty backend list then means
    /// "drop" (no local endpoint under a Local policy), not "reject".
    pub has_endpoints: bool,
    /// Backends taking no new flows (weight 0) whose existing flows continue.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub draining_backends: Vec<SocketAddrV4>,
    /// Endpoints listed in the slices but taking no traffic here (not ready,
    /// terminating beyond the fallback, another zone or node under a
    /// policy): kept referenced, so their open TCP connections finish. A
    /// backend is gone, and its flows end, only when no slice lists it.
    /// Sorted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inactive_backends: Vec<SocketAddrV4>,
    /// Weights other than the default 1, by backend.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub backend_weights: BTreeMap<SocketAddrV4, u32>,
    pub algorithm: Algorithm,
    /// Maglev table size of the internal table (prime); `None` when no table is needed.
    pub maglev_table_size: Option<u32>,
    /// Maglev table size of the external table, when external traffic has a
    /// table of its own (its backends differ from the internal ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_maglev_table_size: Option<u32>,
    /// Where new flows from inside the node (pods, host processes) to the
    /// NodePorts, LoadBalancer IPs and externalIPs go: the cluster-wide
    /// endpoints, whatever the external traffic policy, as with kube-proxy.
    /// Empty when the Service is not externally reachable. Sorted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cluster_backends: Vec<SocketAddrV4>,
    /// Maglev table size of those, when they differ from both the internal
    /// and the external backends (both traffic policies Local).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_maglev_table_size: Option<u32>,
    /// Backends (of either list) running on this node. Sorted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub local_backends: Vec<SocketAddrV4>,
}

impl ServicePlan {
    /// A plan with defaults: Maglev with the table size derived from the
    /// backend count, equal weights, no affinity.
    pub fn new(id: ServicePortName, frontends: Vec<Frontend>, backends: Vec<SocketAddrV4>) -> Self {
        let maglev_table_size = (!backends.is_empty()).then(|| {
            crate::maglev::default_size(backends.len(), crate::maglev::DEFAULT_MAX_TABLE_SIZE)
        });
        Self {
            id,
            frontends,
            has_endpoints: !backends.is_empty(),
            internal_backends: backends,
            external_backends: Vec::new(),
            session_affinity_timeout_seconds: None,
            source_ranges: Vec::new(),
            health_check_node_port: None,
            draining_backends: Vec::new(),
            inactive_backends: Vec::new(),
            backend_weights: BTreeMap::new(),
            algorithm: Algorithm::Maglev,
            maglev_table_size,
            external_maglev_table_size: None,
            cluster_backends: Vec::new(),
            cluster_maglev_table_size: None,
            local_backends: Vec::new(),
        }
    }

    /// The backends one table role selects from.
    pub fn backends_of(&self, role: TableRole) -> &[SocketAddrV4] {
        match role {
            TableRole::Internal => &self.internal_backends,
            TableRole::External => &self.external_backends,
            TableRole::Cluster => &self.cluster_backends,
        }
    }

    /// The Maglev table size of one table role.
    pub fn table_size_of(&self, role: TableRole) -> Option<u32> {
        match role {
            TableRole::Internal => self.maglev_table_size,
            TableRole::External => self.external_maglev_table_size,
            TableRole::Cluster => self.cluster_maglev_table_size,
        }
    }

    /// The table that serves `role`'s frontends: the first role with the
    /// same backends (every frontend shares the internal table unless a
    /// traffic policy sets its backends apart).
    pub fn table_for(&self, role: TableRole) -> TableRole {
        TableRole::ALL
            .into_iter()
            .find(|r| self.backends_of(*r) == self.backends_of(role))
            .unwrap_or(role)
    }

    /// Backends kept referenced without taking new flows: drained (weight
    /// 0) and inactive ones.
    pub fn resting(&self) -> impl Iterator<Item = &SocketAddrV4> {
        self.draining_backends.iter().chain(&self.inactive_backends)
    }

    /// Whether a backend runs on this node.
    pub fn is_local(&self, backend: &SocketAddrV4) -> bool {
        self.local_backends.binary_search(backend).is_ok()
    }

    /// Weight of a backend (1 unless set).
    pub fn weight(&self, backend: &SocketAddrV4) -> u32 {
        self.backend_weights.get(backend).copied().unwrap_or(1)
    }
}

/// The whole desired state: one entry per Service port, sorted by identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub services: Vec<ServicePlan>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_and_ipvs_aliases() {
        for (names, a, table) in [
            (&["maglev", "mh"][..], Algorithm::Maglev, true),
            (&["random"][..], Algorithm::Random, false),
            (&["round-robin", "rr"][..], Algorithm::RoundRobin, false),
            (&["source-hash", "sh"][..], Algorithm::SourceHash, true),
            (
                &["least-connections", "lc"][..],
                Algorithm::LeastConnections,
                false,
            ),
        ] {
            for n in names {
                assert_eq!(Algorithm::parse(n), Some(a), "{n}");
            }
            assert_eq!(Algorithm::parse(a.name()), Some(a));
            assert_eq!(a.needs_table(false), table, "{a:?}");
        }
        assert!(
            Algorithm::RoundRobin.needs_table(true),
            "weights need the table"
        );
        assert!(!Algorithm::LeastConnections.needs_table(true));
        assert_eq!(Algorithm::parse("wlc"), None);
    }

    #[test]
    fn protocol_names() {
        for p in [Protocol::Tcp, Protocol::Udp] {
            assert_eq!(p.to_string().parse(), Ok(p));
            assert_eq!(Protocol::from_cli(&p.to_string().to_lowercase()), Ok(p));
            assert_eq!(Protocol::from_number(p.number()), Some(p));
        }
        assert_eq!(Protocol::from_k8s(None), Some(Protocol::Tcp));
        assert_eq!(Protocol::from_k8s(Some("SCTP")), None);
        assert_eq!(
            Protocol::from_k8s(Some("tcp")),
            None,
            "the API's names only"
        );
        assert!(Protocol::from_cli("icmp").is_err());
    }

    #[test]
    fn table_names_round_trip() {
        for role in TableRole::ALL {
            for port_name in ["", "http"] {
                let n = TableName {
                    port: ServicePortName {
                        namespace: "kube-system".into(),
                        name: "dns".into(),
                        port_name: port_name.into(),
                        protocol: Protocol::Udp,
                    },
                    role,
                };
                assert_eq!(n.to_string().parse(), Ok(n.clone()));
            }
        }
        assert_eq!(
            "ns/web:/TCP external".parse::<TableName>().map(|n| n.role),
            Ok(TableRole::External)
        );
        for bad in [
            "garbage",
            "ns/web/TCP",
            "ns/web:p/ICMP",
            "ns/web:p/TCP internal",
        ] {
            assert!(bad.parse::<TableName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains(Ipv4Addr::new(10, 200, 0, 1)));
        assert!(!c.contains(Ipv4Addr::new(11, 0, 0, 1)));
        assert_eq!("192.168.1.1".parse::<Cidr>().unwrap().prefix, 32);
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains(Ipv4Addr::BROADCAST)
        );
        for bad in ["10.0.0.0/33", "fd00::/8", "x/8", "10.0.0.0/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            "\"10.0.0.0/8\"",
            "plan -o json shows CIDRs as text"
        );
    }
}
