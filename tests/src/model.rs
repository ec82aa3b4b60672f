//! A reference model of the east-west programs (`tc_pod_ingress`,
//! `tc_pod_egress`) for differential fuzzing: for a frame and the flows seen
//! so far, the verdict and the exact bytes each program must produce. Pure
//! Rust, written from the datapath's documented rules, not from its code:
//! parsing (what is malformed, a fragment, not ours), service lookup,
//! conntrack (FORWARD/REPLY entries, `CT_NEW` until the client's ACK, TCP
//! states only advancing, a SYN after a close starting anew), DNAT and
//! reverse NAT with the kernel's incremental checksum updates, and rejects
//! for Services without endpoints.
//!
//! The external path (`xdp_ext`, and `tc_ext_ingress` running the same
//! code) is modelled for NodePorts whose backends are on this node: DNAT
//! and up the stack, ICMP rejects for NodePorts without endpoints, and the
//! DSR option's check (learned and passed on untouched, or dropped).
//!
//! Scope: Services with at most one backend (so selection is determined),
//! clients that are not backends (no hairpin), for the pod programs no
//! external traffic configured on the node, for the external path no
//! backend on another node (no FIB, no SNAT), fewer flows than the tables
//! hold (no eviction). ICMP errors quoting tracked flows are not modelled:
//! the fuzzer does not generate them.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

/// `TCX_NEXT`.
pub const NEXT: i32 = -1;
/// `TC_ACT_REDIRECT` (a reject sent back out).
pub const REDIRECT: i32 = 7;

const ETH_LEN: usize = 14;
const TCP: u8 = 6;
const UDP: u8 = 17;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;

/// A Service port's frontend in the model.
#[derive(Clone, Copy, Debug)]
pub struct Service {
    pub frontend: SocketAddrV4,
    pub proto: u8,
    /// Its one backend; `None`: no endpoints (rejected, or dropped from
    /// outside).
    pub backend: Option<SocketAddrV4>,
    /// A NodePort on this node's address (its backend is local), served
    /// on the external path; else a ClusterIP.
    pub external: bool,
}

/// Which program runs the external path: verdict numbers differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    const fn pass(self) -> i32 {
        match self {
            Hook::Xdp => 2,
            Hook::Tc => NEXT,
        }
    }

    const fn drop(self) -> i32 {
        match self {
            Hook::Xdp => 1,
            Hook::Tc => 2,
        }
    }

    /// Back out of the interface it came in on (`XDP_TX`, a redirect).
    pub const fn bounce(self) -> i32 {
        match self {
            Hook::Xdp => 3,
            Hook::Tc => REDIRECT,
        }
    }
}

/// What a program does with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prediction {
    pub verdict: i32,
    pub frame: Vec<u8>,
}

impl Prediction {
    fn untouched(frame: &[u8]) -> Self {
        Self {
            verdict: NEXT,
            frame: frame.to_vec(),
        }
    }

    /// Whether the frame leaves as it came.
    pub fn is_untouched(&self, input: &[u8]) -> bool {
        self.verdict == NEXT && self.frame == input
    }
}

/// The fields of a parsed IPv4 TCP/UDP frame.
#[derive(Clone, Copy, Debug)]
struct Parsed {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: u8,
    l4_off: usize,
    flags: u8,
    /// The L4 header is in this frame (not a later fragment).
    l4: bool,
}

/// A fragmented datagram: source, destination, IP id (raw), protocol.
type FragKey = (Ipv4Addr, Ipv4Addr, [u8; 2], u8);

impl Parsed {
    fn syn_only(&self) -> bool {
        self.proto == TCP && self.flags & (SYN | ACK) == SYN
    }
}

/// Parses as the datapath does: `None` for anything it leaves alone
/// (not IPv4 TCP/UDP, or malformed, truncated, a TCP fragment, a later
/// UDP fragment whose first one was not seen). A first UDP fragment's
/// ports are remembered in `frags` for the later ones.
fn parse(f: &[u8], frags: &mut HashMap<FragKey, (u16, u16)>) -> Option<Parsed> {
    if f.len() < ETH_LEN || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = f.get(ETH_LEN..ETH_LEN + 20)?;
    let proto = ip[9];
    let l4_min = match proto {
        TCP => 20,
        UDP => 8,
        _ => return None,
    };
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if tot_len < ihl || tot_len + ETH_LEN > f.len() {
        return None;
    }
    let frag_bits = u16::from_be_bytes([ip[6], ip[7]]);
    let fragment = frag_bits & 0x3fff != 0;
    if fragment && proto != UDP {
        return None;
    }
    let addr = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    let key = (addr(12), addr(16), [ip[4], ip[5]], proto);
    let l4_off = ETH_LEN + ihl;
    if frag_bits & 0x1fff != 0 {
        let (sport, dport) = frags.get(&key).copied()?;
        return Some(Parsed {
            src: SocketAddrV4::new(key.0, sport),
            dst: SocketAddrV4::new(key.1, dport),
            proto,
            l4_off,
            flags: 0,
            l4: false,
        });
    }
    if tot_len < ihl + l4_min {
        return None;
    }
    let l4 = f.get(l4_off..l4_off + l4_min)?;
    let l4_len = tot_len - ihl;
    let flags = if proto == TCP {
        let doff = usize::from(l4[12] >> 4) * 4;
        if doff < 20 || doff > l4_len {
            return None;
        }
        l4[13]
    } else {
        let len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
        if len < 8 || (!fragment && len > l4_len) {
            return None;
        }
        0
    };
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    if fragment {
        frags.insert(key, (port(0), port(2)));
    }
    Some(Parsed {
        src: SocketAddrV4::new(key.0, port(0)),
        dst: SocketAddrV4::new(key.1, port(2)),
        proto,
        l4_off,
        flags,
        l4: true,
    })
}

// The kernel's checksum arithmetic on raw (memory-order) values, as
// `csum_replace4` does it for a packet whose checksum is complete.
fn csum_add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(u32::from(carry))
}

fn csum_fold(c: u32) -> u16 {
    let s = (c & 0xffff) + (c >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

fn csum_replace(sum: u16, from: u32, to: u32) -> u16 {
    csum_fold(csum_add(csum_add(!u32::from(sum), !from), to))
}

/// `bpf_l3/l4_csum_replace` on the field at `off`; UDP's "no checksum"
/// stays 0 and a computed 0 becomes 0xffff (`BPF_F_MARK_MANGLED_0`).
fn replace_at(f: &mut [u8], off: usize, from: u32, to: u32, mangled0: bool) {
    let sum = u16::from_ne_bytes([f[off], f[off + 1]]);
    if mangled0 && sum == 0 {
        return;
    }
    let mut new = csum_replace(sum, from, to);
    if mangled0 && new == 0 {
        new = 0xffff;
    }
    f[off..off + 2].copy_from_slice(&new.to_ne_bytes());
}

/// Rewrites the destination (`dst`) or source of `p` in `f` to `to`, with
/// the datapath's order of checksum updates.
fn rewrite(f: &mut [u8], p: &Parsed, dst: bool, to: SocketAddrV4) {
    let (addr_off, port_off, old) = if dst {
        (ETH_LEN + 16, p.l4_off + 2, p.dst)
    } else {
        (ETH_LEN + 12, p.l4_off, p.src)
    };
    f[addr_off..addr_off + 4].copy_from_slice(&to.ip().octets());
    let raw_addr = |a: SocketAddrV4| u32::from_ne_bytes(a.ip().octets());
    if !p.l4 {
        // A later fragment: the IPv4 header alone.
        if old.ip() != to.ip() {
            replace_at(f, ETH_LEN + 10, raw_addr(old), raw_addr(to), false);
        }
        return;
    }
    f[port_off..port_off + 2].copy_from_slice(&to.port().to_be_bytes());
    let csum_off = p.l4_off + if p.proto == TCP { 16 } else { 6 };
    let mangled0 = p.proto == UDP;
    let raw_port = |a: SocketAddrV4| u32::from(u16::from_ne_bytes(a.port().to_be_bytes()));
    if old.port() != to.port() {
        replace_at(f, csum_off, raw_port(old), raw_port(to), mangled0);
    }
    if old.ip() != to.ip() {
        replace_at(f, csum_off, raw_addr(old), raw_addr(to), mangled0);
        replace_at(f, ETH_LEN + 10, raw_addr(old), raw_addr(to), false);
    }
}

/// The service address:port a DSR option right after a 20-byte IPv4 header
/// names (type 0x9a, length 8: port, then address).
fn dsr_option(f: &[u8], p: &Parsed) -> Option<(Ipv4Addr, u16)> {
    if p.l4_off < ETH_LEN + 20 + 8 {
        return None;
    }
    let o = f.get(ETH_LEN + 20..ETH_LEN + 28)?;
    (o[0] == proxy_common::DSR_OPT_TYPE && o[1] == proxy_common::DSR_OPT_LEN).then(|| {
        (
            Ipv4Addr::new(o[4], o[5], o[6], o[7]),
            u16::from_be_bytes([o[2], o[3]]),
        )
    })
}

/// The furthest TCP state a packet shows (0 none, 1 SYN sent, 2
/// established, 3 closing, 4 closed), never going back.
fn next_state(state: u8, p: &Parsed) -> u8 {
    if p.proto != TCP {
        return 0;
    }
    let seen = if p.flags & RST != 0 {
        4
    } else if p.flags & FIN != 0 {
        3
    } else if p.flags & SYN != 0 && p.flags & ACK == 0 {
        1
    } else {
        2
    };
    seen.max(state)
}

/// A tracked flow, by its client's tuple (client, frontend, protocol).
#[derive(Clone, Copy, Debug)]
struct Flow {
    backend: SocketAddrV4,
    state: u8,
    /// Still in `CT_NEW` (its client has not completed the handshake).
    half_open: bool,
}

/// The model: the Services and the flows the programs have seen.
#[derive(Debug, Default)]
pub struct Model {
    services: Vec<Service>,
    flows: HashMap<(SocketAddrV4, SocketAddrV4, u8), Flow>,
    /// The address this node's NodePorts are keyed at (`CONFIG`).
    node: Option<Ipv4Addr>,
    /// First fragments' ports (`FRAGMENTS`).
    frags: HashMap<FragKey, (u16, u16)>,
}

impl Model {
    pub fn new(services: Vec<Service>) -> Self {
        Self {
            services,
            flows: HashMap::new(),
            node: None,
            frags: HashMap::new(),
        }
    }

    /// As `new`, for a node serving external traffic at `node`.
    pub fn with_node(services: Vec<Service>, node: Ipv4Addr) -> Self {
        Self {
            node: Some(node),
            ..Self::new(services)
        }
    }

    fn service(&self, frontend: SocketAddrV4, proto: u8, external: bool) -> Option<Service> {
        self.services
            .iter()
            .find(|s| s.frontend == frontend && s.proto == proto && s.external == external)
            .copied()
    }

    /// A client's packet to a frontend: the backend of its flow (followed,
    /// or recorded anew), `None` when the Service has no endpoints.
    fn track(&mut self, p: &Parsed, svc: &Service) -> Option<SocketAddrV4> {
        let key = (p.src, p.dst, p.proto);
        let tracked = self.flows.get(&key).copied();
        if let Some(flow) = tracked
            && (!p.syn_only() || flow.state < 3)
        {
            let completes = flow.half_open && p.flags & (SYN | RST | ACK) == ACK;
            let entry = self.flows.entry(key).or_insert(flow);
            entry.state = next_state(entry.state, p);
            if completes {
                entry.half_open = false;
            }
            return Some(flow.backend);
        }
        let backend = svc.backend?;
        let in_main = tracked.is_some_and(|t| !t.half_open);
        self.flows.insert(
            key,
            Flow {
                backend,
                state: next_state(0, p),
                half_open: p.syn_only() && !in_main,
            },
        );
        Some(backend)
    }

    /// `xdp_ext` / `tc_ext_ingress`: what arrives on an external interface.
    pub fn external(&mut self, f: &[u8], hook: Hook) -> Prediction {
        let pass = Prediction {
            verdict: hook.pass(),
            frame: f.to_vec(),
        };
        let drop = Prediction {
            verdict: hook.drop(),
            frame: f.to_vec(),
        };
        let Some(p) = parse(f, &mut self.frags) else {
            return pass;
        };
        if let Some(svc) = self.service(p.dst, p.proto, true) {
            return match self.track(&p, &svc) {
                Some(backend) => {
                    let mut out = f.to_vec();
                    rewrite(&mut out, &p, true, backend);
                    Prediction {
                        verdict: hook.pass(),
                        frame: out,
                    }
                }
                // A later fragment: its first was refused.
                None if !p.l4 => pass,
                // No endpoints at all: refused, as ClusterIPs are.
                None => Prediction {
                    verdict: hook.bounce(),
                    frame: crate::packet::icmp_port_unreachable(f, *svc.frontend.ip()),
                },
            };
        }
        // No SNAT flows in this model: what is addressed to the node goes
        // on to the DSR option check.
        let Some((addr, port)) = dsr_option(f, &p) else {
            return pass;
        };
        let named = self
            .service(SocketAddrV4::new(addr, port), p.proto, true)
            .or_else(|| {
                self.node
                    .and_then(|n| self.service(SocketAddrV4::new(n, port), p.proto, true))
            });
        if named.is_some_and(|s| s.backend == Some(p.dst)) {
            pass
        } else {
            drop
        }
    }

    /// Flows tracked so far.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// `tc_pod_ingress`: what a pod sends.
    pub fn pod_ingress(&mut self, f: &[u8]) -> Prediction {
        let Some(p) = parse(f, &mut self.frags) else {
            return Prediction::untouched(f);
        };
        let Some(svc) = self.service(p.dst, p.proto, false) else {
            // No node-wide external traffic, no ClusterIP range: nothing
            // else is looked up.
            return Prediction::untouched(f);
        };
        let Some(backend) = self.track(&p, &svc) else {
            if !p.l4 {
                return Prediction::untouched(f);
            }
            return Prediction {
                verdict: REDIRECT,
                frame: crate::packet::icmp_port_unreachable(f, *svc.frontend.ip()),
            };
        };
        let mut out = f.to_vec();
        rewrite(&mut out, &p, true, backend);
        Prediction {
            verdict: NEXT,
            frame: out,
        }
    }

    /// `tc_pod_egress`: what is delivered to a pod.
    pub fn pod_egress(&mut self, f: &[u8]) -> Prediction {
        let Some(p) = parse(f, &mut self.frags) else {
            return Prediction::untouched(f);
        };
        // The flow whose backend answers this client.
        let found = self.flows.iter_mut().find(|((client, _, proto), flow)| {
            *client == p.dst && *proto == p.proto && flow.backend == p.src
        });
        let Some(((_, frontend, _), flow)) = found else {
            return Prediction::untouched(f);
        };
        let handshake_reply = p.flags & (SYN | ACK) == SYN | ACK || p.flags & RST != 0;
        if flow.half_open && !(p.proto == TCP && handshake_reply) {
            return Prediction::untouched(f);
        }
        let frontend = *frontend;
        let mut out = f.to_vec();
        rewrite(&mut out, &p, false, frontend);
        Prediction {
            verdict: NEXT,
            frame: out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_checksum_matches_a_full_recomputation() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 40000);
        let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
        let backend = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), 8080);
        let f = crate::packet::Frame::tcp_syn(src, vip);
        let mut out = f.build();
        let p = parse(&out, &mut HashMap::new()).unwrap();
        rewrite(&mut out, &p, true, backend);
        crate::packet::verify_checksums(&out).unwrap();
        assert_eq!(out, f.with_endpoints(src, backend).build());
    }
}
