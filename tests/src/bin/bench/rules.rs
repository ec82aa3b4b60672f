//! kube-proxy's rule sets for the comparisons, written the way kube-proxy
//! writes them: the iptables layout (KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-*
//! with `statistic` probabilities) for `iptables-restore`, and the nftables
//! layout (a verdict map on address . protocol . port, `numgen random` into
//! per-endpoint chains) for `nft -f`.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

/// The pod CIDR the rules treat as "inside the cluster" (no masquerade).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// One ClusterIP Service port with its endpoints.
#[derive(Clone, Debug)]
pub struct KubeSvc {
    pub vip: SocketAddrV4,
    pub endpoints: Vec<SocketAddrV4>,
}

/// The Services the comparisons program: `n` with `per` endpoints each
/// (10.96.0.1 + i, endpoints 10.128.0.0 + i·per + k, all distinct), port 80
/// → 8080. The one at `n / 2` is the one traffic goes to in the end-to-end
/// runs: kube-proxy writes Services in no particular order, so it sits in
/// the middle of iptables' linear list.
pub fn services(n: u32, per: u32) -> Vec<KubeSvc> {
    (0..n)
        .map(|i| KubeSvc {
            vip: SocketAddrV4::new(Ipv4Addr::from(0x0a60_0001 + i), 80),
            endpoints: (0..per)
                .map(|k| SocketAddrV4::new(Ipv4Addr::from(0x0a80_0000 + i * per + k), 8080))
                .collect(),
        })
        .collect()
}

/// A stable chain-name suffix for Service `i`, as kube-proxy hashes names.
fn tag(i: usize) -> String {
    format!("{i:016X}")
}

/// `iptables-restore` input: the nat table (portals, per-Service and
/// per-endpoint chains, masquerade marking and KUBE-POSTROUTING) and the
/// filter table's forward checks, as kube-proxy's iptables mode writes them.
pub fn iptables(svcs: &[KubeSvc]) -> String {
    let per: usize = svcs.iter().map(|s| s.endpoints.len()).sum();
    let mut r = String::with_capacity(per * 220 + svcs.len() * 200);
    r.push_str(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :KUBE-FORWARD - [0:0]\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n",
    );
    r.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for (i, s) in svcs.iter().enumerate() {
        let t = tag(i);
        let _ = writeln!(r, ":KUBE-SVC-{t} - [0:0]");
        for k in 0..s.endpoints.len() {
            let _ = writeln!(r, ":KUBE-SEP-{t}-{k} - [0:0]");
        }
    }
    r.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n",
    );
    for (i, s) in svcs.iter().enumerate() {
        let t = tag(i);
        let (vip, port) = (s.vip.ip(), s.vip.port());
        let _ = writeln!(
            r,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport {port} -j KUBE-SVC-{t}"
        );
        let _ = writeln!(
            r,
            "-A KUBE-SVC-{t} ! -s {CLUSTER_CIDR} -d {vip}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ"
        );
        let n = s.endpoints.len();
        for (k, ep) in s.endpoints.iter().enumerate() {
            let left = n - k;
            if left > 1 {
                let _ = writeln!(
                    r,
                    "-A KUBE-SVC-{t} -m comment --comment \"bench/svc-{i}:http -> {ep}\" -m statistic --mode random --probability {:.11} -j KUBE-SEP-{t}-{k}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(
                    r,
                    "-A KUBE-SVC-{t} -m comment --comment \"bench/svc-{i}:http -> {ep}\" -j KUBE-SEP-{t}-{k}"
                );
            }
            let _ = writeln!(
                r,
                "-A KUBE-SEP-{t}-{k} -s {}/32 -m comment --comment \"bench/svc-{i}:http\" -j KUBE-MARK-MASQ",
                ep.ip()
            );
            let _ = writeln!(
                r,
                "-A KUBE-SEP-{t}-{k} -p tcp -m comment --comment \"bench/svc-{i}:http\" -m tcp -j DNAT --to-destination {ep}"
            );
        }
    }
    r.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    r.push_str("COMMIT\n");
    r
}

/// `nft -f` input: kube-proxy's nftables mode (table `ip kube-proxy`).
pub fn nft(svcs: &[KubeSvc]) -> String {
    let per: usize = svcs.iter().map(|s| s.endpoints.len()).sum();
    let mut r = String::with_capacity(per * 160 + svcs.len() * 200);
    r.push_str("table ip kube-proxy {\n");
    r.push_str(
        " map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; elements = {\n",
    );
    for (i, s) in svcs.iter().enumerate() {
        let sep = if i + 1 < svcs.len() { "," } else { "" };
        let _ = writeln!(
            r,
            "  {} . tcp . {} : goto service-{}{sep}",
            s.vip.ip(),
            s.vip.port(),
            tag(i)
        );
    }
    r.push_str(" } }\n");
    r.push_str(
        " chain filter-forward { type filter hook forward priority -110; policy accept; ct state invalid drop; }\n\
         \x20chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }\n\
         \x20chain nat-output { type nat hook output priority -100; policy accept; jump services; }\n\
         \x20chain nat-postrouting { type nat hook postrouting priority srcnat; policy accept; jump masquerading; }\n\
         \x20chain masquerading { meta mark & 0x4000 == 0 return; meta mark set meta mark ^ 0x4000; masquerade fully-random; }\n\
         \x20chain mark-for-masquerade { meta mark set meta mark | 0x4000; }\n\
         \x20chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }\n",
    );
    for (i, s) in svcs.iter().enumerate() {
        let t = tag(i);
        let n = s.endpoints.len();
        let _ = write!(
            r,
            " chain service-{t} {{ ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade; numgen random mod {n} vmap {{ ",
            s.vip.ip(),
            s.vip.port()
        );
        for k in 0..n {
            let sep = if k + 1 < n { ", " } else { "" };
            let _ = write!(r, "{k} : goto endpoint-{t}-{k}{sep}");
        }
        r.push_str(" }; }\n");
        for (k, ep) in s.endpoints.iter().enumerate() {
            let _ = writeln!(
                r,
                " chain endpoint-{t}-{k} {{ ip saddr {} jump mark-for-masquerade; meta l4proto tcp dnat to {ep}; }}",
                ep.ip()
            );
        }
    }
    r.push_str("}\n");
    r
}
