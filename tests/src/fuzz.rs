//! Differential fuzzing of the east-west programs: generated and mutated
//! frames run through `tc_pod_ingress` / `tc_pod_egress` with
//! BPF_PROG_TEST_RUN and through the reference model (`model.rs`); every
//! verdict and every output byte must agree. `cargo xtask fuzz` runs it at
//! any size and seed; the test command runs a fixed slice.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context as _, Result};
use proxy_agent::{datapath::Datapath, model::Protocol};
use proxy_common::maps::programs;

use crate::{
    fixture,
    model::{Hook, Model, Prediction, Service},
    packet::{self, Frame, L4},
};

/// xorshift64*: small, fast, and the same sequence for a seed everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True with `percent` % probability.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

const VIP: [u8; 4] = [10, 96, 0, 10];
const EMPTY_VIP: [u8; 4] = [10, 96, 0, 20];
const WEB_BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), 8080);
const DNS_BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 11), 5353);

fn sa(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip.into(), port)
}

/// The Services both sides know: a TCP and a UDP port with one backend
/// each, and both without endpoints (rejected).
pub fn services() -> Vec<Service> {
    vec![
        Service {
            frontend: sa(VIP, 80),
            proto: 6,
            backend: Some(WEB_BACKEND),
            external: false,
        },
        Service {
            frontend: sa(VIP, 53),
            proto: 17,
            backend: Some(DNS_BACKEND),
            external: false,
        },
        Service {
            frontend: sa(EMPTY_VIP, 80),
            proto: 6,
            backend: None,
            external: false,
        },
        Service {
            frontend: sa(EMPTY_VIP, 53),
            proto: 17,
            backend: None,
            external: false,
        },
    ]
}

/// Loads a datapath programmed with [`services`], its conntrack tables
/// large enough that a run of millions of packets never evicts (the model
/// has no eviction).
pub fn datapath() -> Result<Datapath> {
    let mut dp = fixture::load_sized(proxy_agent::datapath::MapSizes {
        conntrack: 262_144,
        ct_new: 131_072,
        ..fixture::SIZES
    })?;
    let plans = services()
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let protocol = if s.proto == 6 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            };
            let backends: Vec<SocketAddrV4> = s.backend.into_iter().collect();
            fixture::service(&format!("fuzz-{i}"), s.frontend, protocol, &backends)
        })
        .collect();
    fixture::program(&mut dp, plans)?;
    Ok(dp)
}

const TCP_FLAGS: [u8; 8] = [0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x19];

/// One generated frame and the program it goes through.
pub struct Input {
    pub program: &'static str,
    pub frame: Vec<u8>,
}

/// A TCP or UDP frame `src` → `dst` with random flags, payload, options.
fn l4_frame(rng: &mut Rng, src: SocketAddrV4, dst: SocketAddrV4, tcp: bool) -> Vec<u8> {
    l4_frame_with(rng, src, dst, tcp, None)
}

/// As [`l4_frame`], with these IP options if given.
fn l4_frame_with(
    rng: &mut Rng,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    tcp: bool,
    options: Option<Vec<u8>>,
) -> Vec<u8> {
    let payload: Vec<u8> = (0..rng.below(90)).map(|_| rng.next_u64() as u8).collect();
    let ip_options = if let Some(o) = options {
        o
    } else if rng.chance(10) {
        let words = 1 + rng.below(4);
        let mut o: Vec<u8> = (0..words * 4).map(|_| rng.next_u64() as u8).collect();
        if rng.chance(50) {
            // Something like a DSR option.
            o[0] = proxy_common::DSR_OPT_TYPE;
            o[1] = proxy_common::DSR_OPT_LEN;
        }
        o
    } else {
        vec![]
    };
    let l4 = if tcp {
        L4::Tcp {
            syn: true,
            ack: false,
        }
    } else {
        L4::Udp {
            zero_csum: rng.chance(20),
        }
    };
    let mut f = Frame {
        l4,
        payload,
        ip_options,
        ..Frame::tcp_syn(src, dst)
    }
    .build();
    if tcp {
        let flags = if rng.chance(10) {
            rng.next_u64() as u8
        } else {
            rng.pick(&TCP_FLAGS)
        };
        packet::set_tcp_flags(&mut f, flags);
    }
    f
}

/// Breaks a frame the ways the wire does.
fn mutate(rng: &mut Rng, f: &mut Vec<u8>) {
    match rng.below(9) {
        0 => f.truncate(14 + rng.below(f.len().saturating_sub(14).max(1))),
        1 if f.len() > 17 => {
            let v = (rng.next_u64() as u16).to_be_bytes();
            f[16..18].copy_from_slice(&v);
        }
        2 if f.len() > 14 => f[14] = rng.next_u64() as u8,
        3 if f.len() > 21 => {
            // A fragment: more-fragments, or an offset.
            let v = if rng.chance(50) {
                0x2000
            } else {
                1 + rng.below(0x1fff) as u16
            };
            f[20..22].copy_from_slice(&v.to_be_bytes());
        }
        4 if f.len() > 46 => f[46] = rng.next_u64() as u8, // TCP data offset
        5 if f.len() > 39 => f[38..40].copy_from_slice(&(rng.next_u64() as u16).to_be_bytes()), // UDP length
        6 => {
            let i = rng.below(f.len());
            f[i] = rng.next_u64() as u8;
        }
        7 => f.extend((0..1 + rng.below(20)).map(|_| rng.next_u64() as u8)),
        _ if f.len() > 25 => f[23] = rng.pick(&[1u8, 6, 17, 47, 132]), // protocol
        _ => {}
    }
}

/// Packets per window of client ports: the clients of a window meet each
/// other's flows in every state; later windows bring new ones, so flows keep
/// starting (half-open) throughout a long run.
const WINDOW: u64 = 500;

/// A client for the `n`-th input: one of `ips` on a port of the window.
fn window_client(rng: &mut Rng, n: u64, ips: [[u8; 4]; 2]) -> SocketAddrV4 {
    let first = 1024 + ((n / WINDOW) * 6 % 60_000) as u16;
    sa(ips[rng.below(2)], first + rng.below(6) as u16)
}

/// A frame that is not IPv4 TCP/UDP (another ethertype, another protocol)
/// or noise, from a frame `client` → `dst`.
fn not_ours(rng: &mut Rng, client: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut f = l4_frame(rng, client, dst, true);
    match rng.below(3) {
        0 => f[12..14].copy_from_slice(&rng.pick(&[[0x08u8, 0x06], [0x86, 0xdd], [0x81, 0x00]])),
        1 => f[23] = rng.pick(&[1u8, 47, 58]),
        _ => {
            let len = 14 + rng.below(100);
            f = (0..len).map(|_| rng.next_u64() as u8).collect();
            if rng.chance(70) {
                f[12..14].copy_from_slice(&[0x08, 0x00]);
            }
        }
    }
    f
}

/// The `n`-th input.
pub fn generate(rng: &mut Rng, n: u64) -> Input {
    let client = window_client(rng, n, [[10, 244, 1, 2], [10, 244, 1, 3]]);
    let (program, mut frame) = match rng.below(100) {
        // A pod's packet to a frontend, or near one.
        0..=44 => {
            let (dst, tcp) = rng.pick(&[
                (sa(VIP, 80), true),
                (sa(VIP, 53), false),
                (sa(EMPTY_VIP, 80), true),
                (sa(EMPTY_VIP, 53), false),
                (sa(VIP, 81), true),
                (sa(VIP, 80), false),
                (sa([10, 96, 0, 99], 80), true),
                (WEB_BACKEND, true),
            ]);
            (programs::TC_POD_INGRESS, l4_frame(rng, client, dst, tcp))
        }
        // A backend's answer delivered to a client.
        45..=79 => {
            let (src, tcp) = rng.pick(&[
                (WEB_BACKEND, true),
                (DNS_BACKEND, false),
                (WEB_BACKEND, false),
                (sa([10, 244, 1, 12], 8080), true),
            ]);
            (programs::TC_POD_EGRESS, l4_frame(rng, src, client, tcp))
        }
        // The other direction through each program.
        80..=87 => {
            let program = rng.pick(&[programs::TC_POD_INGRESS, programs::TC_POD_EGRESS]);
            let f = if rng.chance(50) {
                l4_frame(rng, WEB_BACKEND, client, true)
            } else {
                l4_frame(rng, client, WEB_BACKEND, true)
            };
            (program, f)
        }
        // Not IPv4 TCP/UDP at all, or noise.
        _ => {
            let program = rng.pick(&[programs::TC_POD_INGRESS, programs::TC_POD_EGRESS]);
            (program, not_ours(rng, client, sa(VIP, 80)))
        }
    };
    if rng.chance(30) {
        mutate(rng, &mut frame);
    }
    Input { program, frame }
}

const NODE1: [u8; 4] = fixture::NODE1;
const NODE2: [u8; 4] = fixture::NODE2;
const LOCAL_BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 1, 1, 5), 8080);

/// The external frontends: NodePorts on node1 whose backend is on node1
/// (TCP and UDP), and one without endpoints.
pub fn external_services() -> Vec<Service> {
    let np = |port, proto, backend| Service {
        frontend: sa(NODE1, port),
        proto,
        backend,
        external: true,
    };
    vec![
        np(30_090, 6, Some(LOCAL_BACKEND)),
        np(30_090, 17, Some(LOCAL_BACKEND)),
        np(30_092, 6, None),
    ]
}

/// Loads a datapath for the external path: [`external_services`] and this
/// node (`CONFIG`) serving external traffic at node1's address.
pub fn external_datapath() -> Result<Datapath> {
    let mut dp = fixture::load_sized(proxy_agent::datapath::MapSizes {
        conntrack: 262_144,
        ct_new: 131_072,
        ..fixture::SIZES
    })?;
    let np = |name: &str, vip: u8, port, protocol, backends: &[SocketAddrV4]| {
        fixture::node_port(
            name,
            sa([10, 96, 0, vip], 80),
            sa(NODE1, port),
            protocol,
            backends,
            backends,
        )
    };
    fixture::program(
        &mut dp,
        vec![
            np("local", 3, 30_090, Protocol::Tcp, &[LOCAL_BACKEND]),
            np("local-udp", 3, 30_090, Protocol::Udp, &[LOCAL_BACKEND]),
            np("empty", 5, 30_092, Protocol::Tcp, &[]),
        ],
    )?;
    let mut config = proxy_common::NodeConfig {
        flags: proxy_common::NODE_F_EXTERNAL,
        snat_port_min: 61_000,
        snat_port_max: 65_535,
        ..proxy_common::NodeConfig::default()
    };
    config.set_snat_addr(Some(NODE1.into()));
    config.set_nodeport_addr(Some(NODE1.into()));
    dp.set_config(&config)?;
    Ok(dp)
}

/// A DSR option naming `addr:port`.
fn dsr_option(addr: [u8; 4], port: u16) -> Vec<u8> {
    let mut o = vec![proxy_common::DSR_OPT_TYPE, proxy_common::DSR_OPT_LEN];
    o.extend_from_slice(&port.to_be_bytes());
    o.extend_from_slice(&addr);
    o
}

/// The `n`-th input for the external path (from outside clients).
pub fn generate_external(rng: &mut Rng, n: u64) -> Input {
    let client = window_client(rng, n, [[192, 168, 50, 100], [192, 168, 50, 101]]);
    let program = if rng.chance(70) {
        programs::XDP_EXT
    } else {
        programs::TC_EXT_INGRESS
    };
    let mut frame = match rng.below(100) {
        0..=49 => {
            let (dst, tcp) = rng.pick(&[
                (sa(NODE1, 30_090), true),
                (sa(NODE1, 30_090), false),
                (sa(NODE1, 30_092), true),
                (sa(NODE1, 30_091), true),
                (sa(NODE1, 22), true),
                (sa([10, 96, 0, 3], 80), true),
                (sa(NODE2, 30_090), true),
            ]);
            l4_frame(rng, client, dst, tcp)
        }
        // DSR options: from another node's NodePort, or forged.
        50..=84 => {
            let addr = rng.pick(&[NODE2, NODE1, [203, 0, 113, 7], [10, 96, 0, 3]]);
            let port = rng.pick(&[30_090u16, 30_092, 30_080, 80, 443]);
            let dst = rng.pick(&[
                LOCAL_BACKEND,
                sa([10, 1, 1, 5], 9999),
                sa([10, 1, 1, 6], 8080),
            ]);
            let tcp = rng.chance(70);
            l4_frame_with(rng, client, dst, tcp, Some(dsr_option(addr, port)))
        }
        _ => not_ours(rng, client, sa(NODE1, 30_090)),
    };
    if rng.chance(30) {
        mutate(rng, &mut frame);
    }
    Input { program, frame }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub packets: u64,
    /// Frames BPF_PROG_TEST_RUN refuses to run (IPv4 shorter than its header).
    pub unrunnable: u64,
    /// Packets whose verdict or bytes differ from the model's, described
    /// (the first few in full).
    pub mismatches: u64,
    pub examples: Vec<String>,
    /// Packets the model leaves alone that the datapath changed.
    pub foreign_modified: u64,
    /// Outcomes as the model predicted them.
    pub outcomes: BTreeMap<&'static str, u64>,
}

/// What the model predicted for a frame; `drop` is the program's drop verdict.
fn outcome(input: &[u8], p: &Prediction, drop: i32) -> &'static str {
    if p.frame != input {
        if p.verdict == crate::model::REDIRECT || p.verdict == Hook::Xdp.bounce() {
            "rejected"
        } else {
            "translated"
        }
    } else if p.verdict == drop {
        "dropped"
    } else {
        "untouched"
    }
}

/// An IPv4 or IPv6 frame shorter than its fixed IP header.
fn too_short_to_run(f: &[u8]) -> bool {
    match f.get(12..14) {
        Some([0x08, 0x00]) => f.len() < 14 + 20,
        Some([0x86, 0xdd]) => f.len() < 14 + 40,
        _ => false,
    }
}

/// Which programs a run exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum World {
    /// `tc_pod_ingress` and `tc_pod_egress` ([`datapath`]).
    EastWest,
    /// `xdp_ext` and `tc_ext_ingress` ([`external_datapath`]).
    External,
}

/// Runs `packets` generated frames from `seed` through `dp` (fresh, from
/// [`datapath`] or [`external_datapath`] for `world`) and the model.
pub fn run(dp: &mut Datapath, world: World, seed: u64, packets: u64) -> Result<Report> {
    let mut rng = Rng::new(seed);
    let mut model = match world {
        World::EastWest => Model::new(services()),
        World::External => Model::with_node(external_services(), NODE1.into()),
    };
    let mut report = Report::default();
    for i in 0..packets {
        let input = match world {
            World::EastWest => generate(&mut rng, i),
            World::External => generate_external(&mut rng, i),
        };
        report.packets += 1;
        let want = match input.program {
            programs::TC_POD_INGRESS => model.pod_ingress(&input.frame),
            programs::TC_POD_EGRESS => model.pod_egress(&input.frame),
            programs::XDP_EXT => model.external(&input.frame, Hook::Xdp),
            _ => model.external(&input.frame, Hook::Tc),
        };
        let got = match dp.test_run(input.program, &input.frame, 1) {
            Ok(got) => got,
            // BPF_PROG_TEST_RUN refuses an IPv4 or IPv6 frame shorter than
            // its IP header (EINVAL): such frames cannot be run, only counted.
            Err(_) if too_short_to_run(&input.frame) => {
                report.unrunnable += 1;
                continue;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("packet {i} (seed {seed}): {:02x?}", input.frame));
            }
        };
        let drop = if input.program == programs::XDP_EXT {
            1
        } else {
            2
        };
        *report
            .outcomes
            .entry(outcome(&input.frame, &want, drop))
            .or_default() += 1;
        if got.verdict == want.verdict && got.frame == want.frame {
            continue;
        }
        report.mismatches += 1;
        if want.frame == input.frame && got.frame != input.frame {
            report.foreign_modified += 1;
        }
        if report.examples.len() < 5 {
            let mut e = String::new();
            let _ = write!(
                e,
                "packet {i} (seed {seed}) through {}:\n  in:    {:02x?}\n  got:   {} {:02x?}\n  model: {} {:02x?}",
                input.program, input.frame, got.verdict, got.frame, want.verdict, want.frame
            );
            report.examples.push(e);
        }
    }
    Ok(report)
}
