//! This node's settings for the datapath (`CONFIG`): the SNAT address and
//! ports for external flows, whether external traffic is served here, and the
//! range of ClusterIPs (hairpin replies are looked up only inside it).
//! Derived from flags, interfaces and the programmed frontends; pure.

use std::{collections::BTreeMap, net::Ipv4Addr};

use proxy_common::{
    NODE_F_EXTERNAL, NODE_F_SOCK_HOST_ONLY, NodeConfig, ServiceKey, ServiceValue, scope,
};

use crate::model::SocketLb;

/// What `CONFIG` is derived from.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// `--snat-address`.
    snat_flag: Option<Ipv4Addr>,
    /// `--snat-port-range`, inclusive.
    snat_ports: (u16, u16),
    /// The first address of the first external interface.
    ext_address: Option<Ipv4Addr>,
    /// Some external interface is served.
    external: bool,
    /// Lowest and highest ClusterIP programmed.
    cluster_ips: Option<(Ipv4Addr, Ipv4Addr)>,
    /// An address this node's NodePorts are keyed at.
    nodeport_address: Option<Ipv4Addr>,
    /// `--socket-lb`, and this node's network namespace cookie.
    socket_lb: SocketLb,
    host_netns_cookie: u64,
    /// What `CONFIG` holds (`None`: not written by this process yet).
    written: Option<NodeConfig>,
}

/// A change of `CONFIG` to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigChange {
    pub config: NodeConfig,
    /// The north-south part changed (worth a log line).
    pub north_south: bool,
}

impl NodeSettings {
    pub fn new(snat_flag: Option<Ipv4Addr>, snat_ports: (u16, u16)) -> Self {
        Self {
            snat_flag,
            snat_ports,
            ext_address: None,
            external: false,
            cluster_ips: None,
            nodeport_address: None,
            socket_lb: SocketLb::default(),
            host_netns_cookie: 0,
            written: None,
        }
    }

    /// Which sockets the hooks translate, and the cookie of the node's own
    /// network namespace (`host-only` compares against it).
    pub fn set_socket_lb(&mut self, mode: SocketLb, host_netns_cookie: u64) {
        self.socket_lb = mode;
        self.host_netns_cookie = host_netns_cookie;
    }

    /// The external interfaces now served, and the first address of the first.
    pub fn set_external(&mut self, external: bool, first_address: Option<Ipv4Addr>) {
        self.external = external;
        self.ext_address = first_address;
    }

    /// Notes the lowest and highest programmed ClusterIP. The internal
    /// scope also holds the external frontends (as pods and the node reach
    /// them): those have a twin in the external scope, a ClusterIP never.
    pub fn set_cluster_ips(&mut self, services: &BTreeMap<ServiceKey, ServiceValue>) {
        let internal = services
            .keys()
            .filter(|k| {
                k.scope == scope::INTERNAL
                    && !services.contains_key(&ServiceKey {
                        scope: scope::EXTERNAL,
                        ..**k
                    })
            })
            .map(|k| *k.frontend().ip());
        self.cluster_ips = internal.fold(None, |range, ip| match range {
            None => Some((ip, ip)),
            Some((lo, hi)) => Some((lo.min(ip), hi.max(ip))),
        });
    }

    /// An address this node's NodePorts are keyed at (DSR options naming
    /// another node's address are checked against the NodePort there).
    pub fn set_nodeport_address(&mut self, address: Option<Ipv4Addr>) {
        self.nodeport_address = address;
    }

    /// The SNAT address: the flag, else the first external interface's.
    pub fn snat_address(&self) -> Option<Ipv4Addr> {
        self.snat_flag.or(self.ext_address)
    }

    /// Whether external traffic is served here.
    pub fn external(&self) -> bool {
        self.external
    }

    pub fn snat_ports(&self) -> (u16, u16) {
        self.snat_ports
    }

    /// `CONFIG` as it should be.
    pub fn config(&self) -> NodeConfig {
        let mut flags = if self.external { NODE_F_EXTERNAL } else { 0 };
        if self.socket_lb == SocketLb::HostOnly {
            flags |= NODE_F_SOCK_HOST_ONLY;
        }
        let mut c = NodeConfig {
            snat_port_min: self.snat_ports.0,
            snat_port_max: self.snat_ports.1,
            flags,
            host_netns_cookie: self.host_netns_cookie,
            ..NodeConfig::default()
        };
        c.set_snat_addr(self.snat_address());
        c.set_vip_range(self.cluster_ips);
        c.set_nodeport_addr(self.nodeport_address);
        c
    }

    /// What to write, when `CONFIG` is not what it should be.
    pub fn change(&self) -> Option<ConfigChange> {
        let config = self.config();
        match self.written {
            Some(w) if w == config => None,
            Some(w) => Some(ConfigChange {
                config,
                north_south: (w.snat_addr_be, w.flags) != (config.snat_addr_be, config.flags),
            }),
            None => Some(ConfigChange {
                config,
                north_south: true,
            }),
        }
    }

    /// `config` was written.
    pub fn written(&mut self, config: NodeConfig) {
        self.written = Some(config);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;

    #[test]
    fn config_follows_flags_interfaces_and_cluster_ips() {
        let mut n = NodeSettings::new(None, (61_000, 65_535));
        let first = n.change().unwrap();
        assert!(first.north_south, "the first write is announced");
        assert_eq!(first.config.snat_addr(), None);
        assert!(
            first.config.vip_min > first.config.vip_max,
            "no ClusterIP yet"
        );
        n.written(first.config);
        assert_eq!(n.change(), None);

        n.set_external(true, Some(Ipv4Addr::new(192, 168, 1, 10)));
        let c = n.change().unwrap();
        assert!(c.north_south);
        assert_eq!(c.config.snat_addr(), Some(Ipv4Addr::new(192, 168, 1, 10)));
        assert_eq!(c.config.flags, NODE_F_EXTERNAL);
        n.written(c.config);

        let key = |ip: [u8; 4], scope| {
            (
                ServiceKey::new(SocketAddrV4::new(ip.into(), 80), 6, scope),
                ServiceValue::default(),
            )
        };
        // A LoadBalancer IP has both scopes; only ClusterIPs make the range.
        let services = BTreeMap::from([
            key([10, 96, 0, 10], scope::INTERNAL),
            key([10, 96, 3, 1], scope::INTERNAL),
            key([192, 168, 60, 1], scope::EXTERNAL),
            key([192, 168, 60, 1], scope::INTERNAL),
            key([10, 0, 0, 5], scope::EXTERNAL),
            key([10, 0, 0, 5], scope::INTERNAL),
        ]);
        n.set_cluster_ips(&services);
        let c = n.change().unwrap();
        assert!(!c.north_south, "only the ClusterIP range changed");
        assert_eq!(
            (c.config.vip_min, c.config.vip_max),
            (
                u32::from(Ipv4Addr::new(10, 96, 0, 10)),
                u32::from(Ipv4Addr::new(10, 96, 3, 1))
            )
        );

        let mut flagged = NodeSettings::new(Some(Ipv4Addr::new(10, 0, 0, 1)), (1, 2));
        assert_eq!(
            flagged.config().snat_addr(),
            Some(Ipv4Addr::new(10, 0, 0, 1)),
            "--snat-address wins"
        );
        flagged.set_socket_lb(SocketLb::HostOnly, 4242);
        let c = flagged.config();
        assert_eq!(c.flags & NODE_F_SOCK_HOST_ONLY, NODE_F_SOCK_HOST_ONLY);
        assert_eq!(c.host_netns_cookie, 4242);
    }
}
