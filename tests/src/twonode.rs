//! A two-node "cluster" with an outside client, all in network namespaces:
//!
//! ```text
//!   client 192.168.50.100 ──┐
//!   node1  192.168.50.1  ───┼── br0 (in the fabric namespace)
//!   node2  192.168.50.2  ───┘
//!   node1 pods 10.1.1.0/24, node2 pods 10.1.2.0/24, each node routing the
//!   other's pod CIDR via the other node; the client reaches nodes, the
//!   LoadBalancer IP 192.168.60.0/24 via node1 and the externalIP
//!   192.168.61.0/24 via node2, and nothing else (no default routes).
//! ```
//!
//! Each node is a [`Cluster`] (a node namespace with pods on veths); its
//! external interface is `ext0`. Two things make the veths behave like a
//! wire for XDP: senders' checksum offload is off (frames on a wire carry
//! complete checksums; XDP sees frames, not skbs with a pending checksum),
//! and the fabric ends run `xdp_pass` (a veth only receives what XDP sends
//! into it, XDP_TX or redirect, when its far end has an XDP program).

use std::{net::Ipv4Addr, path::Path};

use anyhow::Result;

use proxy_agent::datapath::Datapath;

use crate::{
    cluster::{Agent, Cluster, GATEWAY},
    netns::{Netns, sh},
};

/// The fabric address of node `i` (1 or 2).
pub fn node_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 50, i)
}

/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
/// A LoadBalancer ingress IP the client routes via node1.
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);
/// An externalIP the client routes via node2.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 61, 10);

/// Two nodes, a client and the segment between them.
pub struct TwoNodes {
    pub nodes: [Cluster; 2],
    pub client: Netns,
    /// Holds `xdp_pass` on the fabric ends of the nodes' veths.
    _fabric_xdp: Datapath,
    // Dropped last: the bridge the others hang off.
    pub fabric: Netns,
}

fn ethtool(ns: &Netns, args: &[&str]) -> Result<()> {
    let mut all = vec!["netns", "exec", &ns.name, "ethtool", "-K"];
    all.extend_from_slice(args);
    sh("ip", &all).map(|_| ())
}

impl TwoNodes {
    /// Builds the topology (no pods yet: add them with [`TwoNodes::add_pod`]).
    pub fn new() -> Result<Self> {
        let nodes = [Cluster::new()?, Cluster::new()?];
        let prefix = nodes[0].prefix.clone();
        let fabric = Netns::new(&format!("{prefix}-fabric"))?;
        let client = Netns::new(&format!("{prefix}-client"))?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;

        let attach = |ns: &Netns, inside: &str, port: &str, mac: &str| -> Result<()> {
            fabric.ip(&[
                "link", "add", port, "type", "veth", "peer", "name", inside, "address", mac,
                "netns", &ns.name,
            ])?;
            fabric.ip(&["link", "set", port, "master", "br0", "up"])?;
            ethtool(&fabric, &[port, "tx", "off"])?;
            ns.ip(&["link", "set", inside, "up"])?;
            ethtool(ns, &[inside, "tx", "off"])?;
            Ok(())
        };
        attach(&client, "eth0", "fc", "02:00:00:00:aa:64")?;
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
        client.ip(&["route", "add", "192.168.60.0/24", "via", "192.168.50.1"])?;
        client.ip(&["route", "add", "192.168.61.0/24", "via", "192.168.50.2"])?;

        for (i, node) in nodes.iter().enumerate() {
            let n = i as u8 + 1;
            let other = 3 - n;
            attach(
                &node.node,
                "ext0",
                &format!("f{n}"),
                &format!("02:00:00:00:aa:0{n}"),
            )?;
            node.node
                .ip(&["addr", "add", &format!("{}/24", node_ip(n)), "dev", "ext0"])?;
            node.node.ip(&[
                "route",
                "add",
                &format!("10.1.{other}.0/24"),
                "via",
                &node_ip(other).to_string(),
            ])?;
            // Strict reverse-path filtering, as many distributions set it:
            // DSR replies (another node's address as their source) and
            // replies from local backends (this node's) must not depend on it.
            node.node.sysctl("net.ipv4.conf.all.rp_filter", "1")?;
            node.node.sysctl("net.ipv4.conf.default.rp_filter", "1")?;
        }
        let fabric_xdp = fabric.run(|| {
            let mut dp = crate::fixture::load()?;
            for port in ["fc", "f1", "f2"] {
                dp.attach_xdp_pass(crate::fixture::ifindex(port)?)?;
            }
            Ok(dp)
        })?;
        Ok(Self {
            nodes,
            client,
            _fabric_xdp: fabric_xdp,
            fabric,
        })
    }

    /// Adds a pod to node `n` (1 or 2) at `10.1.<n>.<host>`, able to answer
    /// outside clients.
    pub fn add_pod(&mut self, n: u8, role: &str, host: u8) -> Result<Ipv4Addr> {
        let ip = Ipv4Addr::new(10, 1, n, host);
        let pod = self.nodes[usize::from(n - 1)].add_pod(role, ip)?;
        pod.ns.ip(&[
            "route",
            "add",
            "192.168.0.0/16",
            "via",
            GATEWAY,
            "dev",
            "eth0",
        ])?;
        ethtool(&pod.ns, &["eth0", "tx", "off"])?;
        Ok(ip)
    }

    /// Starts an agent on node `n` reading `manifests`, with XDP on `ext0`.
    pub fn start_agent(&self, n: u8, manifests: &Path, extra: &[&str]) -> Result<Agent> {
        let node = &self.nodes[usize::from(n - 1)];
        let name = format!("node{n}");
        let mut args = vec!["--ext-iface", "ext0", "--node-name", &name];
        args.extend_from_slice(extra);
        Agent::start(&node.node, manifests, &node.pin_root(), &args)
    }
}
