//! Maglev in the datapath: the kernel's choices match the userspace
//! prediction (same hash, same table), affinity and weights behave, and the
//! `proxy-agent maglev` CLI is deterministic across processes.
//!
//! The BPF tests need root (CI is root).
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a failed unwrap is a test failure"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use proxy_agent::{
    maglev::predict,
    model::{Algorithm, Protocol},
    programmed::{Programmed, Table},
};
use proxy_common::maps::programs;
use proxy_tests::{
    fixture::{self, sa},
    packet::{self, Frame},
};

/// xorshift32: a tiny deterministic PRNG for reproducible flows.
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
}

fn table_of(programmed: &Programmed) -> &Table {
    assert_eq!(programmed.tables.len(), 1);
    programmed.tables.values().next().unwrap()
}

#[test]
fn kernel_and_userspace_agree_on_10000_random_flows() {
    let mut dp = fixture::load().unwrap();
    let vip = sa([10, 96, 1, 1], 443);
    let backends: Vec<SocketAddrV4> = (1..=20u8).map(|i| sa([10, 244, 3, i], 8443)).collect();
    let mut plan = fixture::service("maglev", vip, Protocol::Tcp, &backends);
    // Unequal weights too: the table is weighted, the lookup the same.
    for (i, b) in backends.iter().enumerate().take(5) {
        plan.backend_weights
            .insert(*b, 1 + u32::try_from(i).unwrap());
    }
    let udp_vip = sa([10, 96, 1, 1], 53);
    let udp = fixture::service("maglev-udp", udp_vip, Protocol::Udp, &backends);
    fixture::program(&mut dp, vec![plan, udp]).unwrap();
    let programmed = dp.read_programmed().unwrap();

    let mut rng = Rng(0x2545_f491);
    let mut mismatches = Vec::new();
    let mut used = BTreeSet::new();
    for i in 0..10_000 {
        let client = SocketAddrV4::new(
            Ipv4Addr::from(0x0a00_0000 | (rng.next() & 0x00ff_ffff)),
            1024 + (rng.next() % 60_000) as u16,
        );
        let (frame, target, proto) = if i % 4 == 3 {
            (Frame::udp(client, udp_vip, b"q").build(), udp_vip, 17)
        } else {
            (Frame::tcp_syn(client, vip).build(), vip, 6)
        };
        let out = dp.test_run(programs::TC_POD_INGRESS, &frame, 1).unwrap();
        let chosen = packet::dst_of(&out.frame);
        let svc = programmed
            .services
            .iter()
            .find(|(k, _)| k.frontend() == target && k.proto == proto);
        let table = &programmed.tables[&svc.unwrap().1.svc_id];
        let predicted =
            predict(table, client, target, proto).map(|id| programmed.backends[&id].addr());
        used.insert(chosen);
        if predicted != Some(chosen) {
            mismatches.push((client, predicted, chosen));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches, first: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );
    assert_eq!(used.len(), 20, "every backend chosen");
}

#[test]
fn session_affinity_hashes_the_client_address_only() {
    let mut dp = fixture::load().unwrap();
    let vip = sa([10, 96, 1, 2], 80);
    let backends: Vec<SocketAddrV4> = (1..=8u8).map(|i| sa([10, 244, 4, i], 80)).collect();
    let mut plan = fixture::service("sticky", vip, Protocol::Tcp, &backends);
    plan.session_affinity_timeout_seconds = Some(10_800);
    fixture::program(&mut dp, vec![plan]).unwrap();
    let programmed = dp.read_programmed().unwrap();
    let table = table_of(&programmed);
    let mut clients_per_backend: BTreeMap<SocketAddrV4, usize> = BTreeMap::new();
    for c in 1..=40u8 {
        let client_ip = [10, 1, 0, c];
        let mut seen = BTreeSet::new();
        for port in 0..15u16 {
            let client = sa(client_ip, 30_000 + port);
            let out = dp
                .test_run(
                    programs::TC_POD_INGRESS,
                    &Frame::tcp_syn(client, vip).build(),
                    1,
                )
                .unwrap();
            let chosen = packet::dst_of(&out.frame);
            let predicted = programmed.backends[&predict(table, client, vip, 6).unwrap()].addr();
            assert_eq!(chosen, predicted);
            seen.insert(chosen);
        }
        assert_eq!(
            seen.len(),
            1,
            "client {c:?} moved between backends: {seen:?}"
        );
        *clients_per_backend
            .entry(*seen.iter().next().unwrap())
            .or_insert(0) += 1;
    }
    assert!(
        clients_per_backend.len() >= 5,
        "clients spread: {clients_per_backend:?}"
    );
}

#[test]
fn drained_backend_keeps_its_flows_and_gets_no_new_ones() {
    let mut dp = fixture::load().unwrap();
    let vip = sa([10, 96, 1, 3], 80);
    let backends: Vec<SocketAddrV4> = (1..=3u8).map(|i| sa([10, 244, 5, i], 80)).collect();
    fixture::program(
        &mut dp,
        vec![fixture::service("drain", vip, Protocol::Tcp, &backends)],
    )
    .unwrap();
    // Find an established flow on backends[0].
    let mut on_first = None;
    for port in 1..=200u16 {
        let client = sa([10, 1, 1, 1], port);
        let out = dp
            .test_run(
                programs::TC_POD_INGRESS,
                &Frame::tcp_syn(client, vip).build(),
                1,
            )
            .unwrap();
        if packet::dst_of(&out.frame) == backends[0] {
            on_first = Some(client);
            break;
        }
    }
    let old = on_first.expect("some flow lands on the first backend");
    // Drain backends[0]: weight 0.
    let mut plan = fixture::service("drain", vip, Protocol::Tcp, &backends[1..]);
    plan.draining_backends = vec![backends[0]];
    fixture::program(&mut dp, vec![plan]).unwrap();
    let out = dp
        .test_run(
            programs::TC_POD_INGRESS,
            &Frame::tcp_syn(old, vip).build(),
            1,
        )
        .unwrap();
    assert_eq!(
        packet::dst_of(&out.frame),
        backends[0],
        "existing flow stays"
    );
    for port in 1000..1300u16 {
        let out = dp
            .test_run(
                programs::TC_POD_INGRESS,
                &Frame::tcp_syn(sa([10, 1, 1, 2], port), vip).build(),
                1,
            )
            .unwrap();
        assert_ne!(
            packet::dst_of(&out.frame),
            backends[0],
            "new flow to a drained backend"
        );
    }
}

#[test]
fn random_algorithm_is_available_per_service() {
    let mut dp = fixture::load().unwrap();
    let vip = sa([10, 96, 1, 4], 80);
    let backends: Vec<SocketAddrV4> = (1..=4u8).map(|i| sa([10, 244, 6, i], 80)).collect();
    let mut plan = fixture::service("random", vip, Protocol::Tcp, &backends);
    plan.algorithm = Algorithm::Random;
    plan.maglev_table_size = None;
    fixture::program(&mut dp, vec![plan]).unwrap();
    let programmed = dp.read_programmed().unwrap();
    assert_eq!(
        table_of(&programmed).table_size,
        0,
        "no table for unweighted random"
    );
    // The same 5-tuple, new each time (conntrack entry removed by a fresh
    // source port is not possible with one tuple): count spread over tuples.
    let mut seen = BTreeMap::new();
    for port in 1..=400u16 {
        let out = dp
            .test_run(
                programs::TC_POD_INGRESS,
                &Frame::tcp_syn(sa([10, 1, 2, 1], port), vip).build(),
                1,
            )
            .unwrap();
        *seen.entry(packet::dst_of(&out.frame)).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.values().all(|n| *n > 50), "{seen:?}");
}
