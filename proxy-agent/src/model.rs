//! The desired datapath state in Kubernetes terms: what translation produces
//! and what `proxy-agent plan` prints.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

use serde::Serialize;

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

    /// Parses a Kubernetes protocol name (`TCP`, `UDP`; unset means TCP).
    pub fn from_k8s(name: Option<&str>) -> Option<Self> {
        match name.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            _ => None,
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

/// Kind of a frontend address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum FrontendKind {
    ClusterIP,
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

/// Everything the datapath needs for one Service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePlan {
    #[serde(flatten)]
    pub id: ServicePortName,
    /// Sorted, no duplicates.
    pub frontends: Vec<Frontend>,
    /// Where traffic from inside the cluster may go. Sorted, no duplicates.
    pub internal_backends: Vec<SocketAddrV4>,
}

/// The whole desired state: one entry per Service port, sorted by identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub services: Vec<ServicePlan>,
}
