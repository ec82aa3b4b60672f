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
    model::{Model, Prediction, Service},
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
        },
        Service {
            frontend: sa(VIP, 53),
            proto: 17,
            backend: Some(DNS_BACKEND),
        },
        Service {
            frontend: sa(EMPTY_VIP, 80),
            proto: 6,
            backend: None,
        },
        Service {
            frontend: sa(EMPTY_VIP, 53),
            proto: 17,
            backend: None,
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
    let payload: Vec<u8> = (0..rng.below(90)).map(|_| rng.next_u64() as u8).collect();
    let ip_options = if rng.chance(10) {
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

/// The `n`-th input.
pub fn generate(rng: &mut Rng, n: u64) -> Input {
    let first = 1024 + ((n / WINDOW) * 6 % 60_000) as u16;
    let clients: Vec<SocketAddrV4> = [[10, 244, 1, 2], [10, 244, 1, 3]]
        .iter()
        .flat_map(|ip| (first..first + 6).map(move |p| sa(*ip, p)))
        .collect();
    let client = rng.pick(&clients);
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
            let mut f = l4_frame(rng, client, sa(VIP, 80), true);
            match rng.below(3) {
                0 => f[12..14].copy_from_slice(&rng.pick(&[
                    [0x08u8, 0x06],
                    [0x86, 0xdd],
                    [0x81, 0x00],
                ])),
                1 => f[23] = rng.pick(&[1u8, 47, 58]),
                _ => {
                    let len = 14 + rng.below(100);
                    f = (0..len).map(|_| rng.next_u64() as u8).collect();
                    if rng.chance(70) {
                        f[12..14].copy_from_slice(&[0x08, 0x00]);
                    }
                }
            }
            (program, f)
        }
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

fn outcome(input: &[u8], p: &Prediction) -> &'static str {
    if p.is_untouched(input) {
        "untouched"
    } else if p.verdict == crate::model::REDIRECT {
        "rejected"
    } else {
        "translated"
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

/// Runs `packets` generated frames from `seed` through `dp` (fresh, from
/// [`datapath`]) and the model.
pub fn run(dp: &mut Datapath, seed: u64, packets: u64) -> Result<Report> {
    let mut rng = Rng::new(seed);
    let mut model = Model::new(services());
    let mut report = Report::default();
    for i in 0..packets {
        let input = generate(&mut rng, i);
        report.packets += 1;
        let want = if input.program == programs::TC_POD_INGRESS {
            model.pod_ingress(&input.frame)
        } else {
            model.pod_egress(&input.frame)
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
        *report
            .outcomes
            .entry(outcome(&input.frame, &want))
            .or_default() += 1;
        if got.verdict == want.verdict && got.frame == want.frame {
            continue;
        }
        report.mismatches += 1;
        if want.is_untouched(&input.frame) {
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
