//! Datapath fixtures through BPF_PROG_TEST_RUN, table-driven as Katran's:
//! name, packet in, expected packet out (byte for byte), expected verdict and
//! the counter that must move. Every translated packet's checksums are also
//! recomputed from scratch with etherparse.
//!
//! Needs root (BPF). Runs in CI, which is root.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a failed unwrap is a test failure"
)]

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use proxy_agent::{datapath::Datapath, model::Protocol, programmed::Op};
use proxy_common::{Backend, Counter, maps::programs};
use proxy_tests::{
    fixture::{
        self, Case, Out, TC_ACT_REDIRECT, TCX_DROP, TCX_NEXT, counters, moved, run_cases, sa,
    },
    packet::{self, Frame, L4},
};

const INGRESS: &str = programs::TC_POD_INGRESS;
const EGRESS: &str = programs::TC_POD_EGRESS;

const CLIENT: [u8; 4] = [10, 244, 1, 2];

/// Truncates a frame and patches the IPv4 total length (and its checksum) to match.
fn truncated_consistently(frame: &[u8], len: usize) -> Vec<u8> {
    let mut f = frame[..len].to_vec();
    let total = u16::try_from(len - 14).unwrap();
    f[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ip_checksum(&mut f);
    f
}

/// Recomputes the IPv4 checksum over the first 20 bytes only (for headers
/// whose IHL deliberately lies).
fn fix_ip_checksum_prefix(f: &mut [u8]) {
    checksum_ip_bytes(f, 20);
}

fn fix_ip_checksum(f: &mut [u8]) {
    checksum_ip_bytes(f, usize::from(f[14] & 0x0f) * 4);
}

fn checksum_ip_bytes(f: &mut [u8], ihl: usize) {
    f[24] = 0;
    f[25] = 0;
    let mut sum: u32 = 0;
    for i in (14..14 + ihl).step_by(2) {
        sum += u32::from(u16::from_be_bytes([f[i], f[i + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

#[test]
fn fixtures_ingress_table() {
    let mut dp = fixture::load().unwrap();
    let vip = sa([10, 96, 0, 10], 80);
    let vip_dns = sa([10, 96, 0, 10], 53);
    let empty = sa([10, 96, 0, 20], 80);
    let empty_dns = sa([10, 96, 0, 20], 53);
    let backend = sa([10, 244, 1, 11], 8080);
    let backend_dns = sa([10, 244, 1, 12], 5353);
    let local_only = sa([10, 96, 0, 21], 80);
    // internalTrafficPolicy Local on a node without local endpoints, while
    // endpoints exist elsewhere: drop, not reject.
    let mut no_local = fixture::service("no-local", local_only, Protocol::Tcp, &[]);
    no_local.has_endpoints = true;
    fixture::program(
        &mut dp,
        vec![
            fixture::service("web", vip, Protocol::Tcp, &[backend]),
            fixture::service("dns", vip_dns, Protocol::Udp, &[backend_dns]),
            fixture::service("empty", empty, Protocol::Tcp, &[]),
            fixture::service("empty-dns", empty_dns, Protocol::Udp, &[]),
            no_local,
        ],
    )
    .unwrap();

    // Each case uses its own client port: a new flow.
    let mut port = 40000;
    let mut client = || {
        port += 1;
        sa(CLIENT, port)
    };
    let dnat = |f: &Frame| Out::Frame(f.with_endpoints(f.src, backend).build());

    let syn = Frame::tcp_syn(client(), vip);
    let udp = Frame::udp(client(), vip_dns, b"query");
    let udp_nocsum = Frame {
        l4: L4::Udp { zero_csum: true },
        ..Frame::udp(client(), vip_dns, b"query")
    };
    let with_options = Frame {
        // Router Alert (RFC 2113), 4 bytes.
        ip_options: vec![0x94, 0x04, 0x00, 0x00],
        ..Frame::tcp_syn(client(), vip)
    };
    let max_options = Frame {
        ip_options: [vec![0x01; 39], vec![0x00]].concat(),
        payload: b"data after forty bytes of options".to_vec(),
        ..Frame::tcp_syn(client(), vip)
    };
    let ack_with_data = Frame {
        l4: L4::Tcp {
            syn: false,
            ack: true,
        },
        payload: vec![0xab; 333],
        ..Frame::tcp_syn(client(), vip)
    };
    let reject_tcp = Frame::tcp_syn(client(), empty).build();
    let reject_udp = Frame::udp(client(), empty_dns, &[0x55; 100]).build();
    let reject_small_udp = Frame::udp(client(), empty_dns, b"x").build();

    let valid = Frame::tcp_syn(client(), vip).build();
    let valid_udp = Frame::udp(client(), vip_dns, b"abc").build();
    let mut tcp_doff_small = valid.clone();
    tcp_doff_small[14 + 20 + 12] = 0x40; // data offset 4 (< 5)
    let mut udp_len_big = valid_udp.clone();
    udp_len_big[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
    let mut ihl_beyond = truncated_consistently(&valid, 14 + 20);
    ihl_beyond[14] = 0x4f; // 60-byte header in a 20-byte packet
    fix_ip_checksum_prefix(&mut ihl_beyond);
    let mut ihl_small = valid.clone();
    ihl_small[14] = 0x44;
    let mut fragment = valid.clone();
    fragment[14 + 6] = 0x20; // more fragments, DF cleared
    fix_ip_checksum(&mut fragment);
    let mut later_fragment = valid.clone();
    later_fragment[14 + 6..14 + 8].copy_from_slice(&0x0010u16.to_be_bytes());
    fix_ip_checksum(&mut later_fragment);
    let mut arp = valid.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut ipv6 = valid.clone();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);

    let cases = vec![
        Case {
            name: "tcp syn to a clusterip is DNATed to its backend",
            program: INGRESS,
            input: syn.build(),
            out: dnat(&syn),
            verdict: TCX_NEXT,
            counter: Some(Counter::NewFlow),
        },
        Case {
            name: "udp datagram to a clusterip is DNATed",
            program: INGRESS,
            input: udp.build(),
            out: Out::Frame(udp.with_endpoints(udp.src, backend_dns).build()),
            verdict: TCX_NEXT,
            counter: Some(Counter::NewFlow),
        },
        Case {
            name: "udp without checksum keeps checksum 0",
            program: INGRESS,
            input: udp_nocsum.build(),
            out: Out::Frame(
                udp_nocsum
                    .with_endpoints(udp_nocsum.src, backend_dns)
                    .build(),
            ),
            verdict: TCX_NEXT,
            counter: Some(Counter::NewFlow),
        },
        Case {
            name: "tcp with an IP option is DNATed at the right L4 offset",
            program: INGRESS,
            input: with_options.build(),
            out: dnat(&with_options),
            verdict: TCX_NEXT,
            counter: Some(Counter::NewFlow),
        },
        Case {
            name: "tcp with 40 bytes of IP options and payload",
            program: INGRESS,
            input: max_options.build(),
            out: dnat(&max_options),
            verdict: TCX_NEXT,
            counter: Some(Counter::NewFlow),
        },
        Case {
            name: "mid-flow tcp segment with payload (no SYN) still translated",
            program: INGRESS,
            input: ack_with_data.build(),
            out: dnat(&ack_with_data),
            verdict: TCX_NEXT,
            counter: Some(Counter::NewFlow),
        },
        Case {
            name: "no endpoints: tcp syn answered with ICMP port unreachable",
            program: INGRESS,
            out: Out::Frame(packet::icmp_port_unreachable(&reject_tcp, *empty.ip())),
            input: reject_tcp,
            verdict: TC_ACT_REDIRECT,
            counter: Some(Counter::RejectNoEndpoints),
        },
        Case {
            name: "no endpoints: udp answered with ICMP quoting 80 bytes",
            program: INGRESS,
            out: Out::Frame(packet::icmp_port_unreachable(&reject_udp, *empty_dns.ip())),
            input: reject_udp,
            verdict: TC_ACT_REDIRECT,
            counter: Some(Counter::RejectNoEndpoints),
        },
        Case {
            name: "no endpoints: short udp (odd length) quoted whole",
            program: INGRESS,
            out: Out::Frame(packet::icmp_port_unreachable(
                &reject_small_udp,
                *empty_dns.ip(),
            )),
            input: reject_small_udp,
            verdict: TC_ACT_REDIRECT,
            counter: Some(Counter::RejectNoEndpoints),
        },
        Case {
            name: "Local traffic policy without local endpoints: dropped and counted",
            program: INGRESS,
            input: Frame::tcp_syn(client(), local_only).build(),
            out: Out::Untouched,
            verdict: TCX_DROP,
            counter: Some(Counter::NoLocalEndpoints),
        },
        Case {
            name: "not a service address: untouched",
            program: INGRESS,
            input: Frame::tcp_syn(client(), sa([10, 96, 0, 99], 80)).build(),
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: None,
        },
        Case {
            name: "service address, other port: untouched",
            program: INGRESS,
            input: Frame::tcp_syn(client(), sa([10, 96, 0, 10], 81)).build(),
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: None,
        },
        Case {
            name: "service address and port, other protocol: untouched",
            program: INGRESS,
            input: Frame::udp(client(), vip, b"x").build(),
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: None,
        },
        Case {
            name: "ARP: untouched",
            program: INGRESS,
            input: arp,
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: None,
        },
        Case {
            name: "IPv6 ethertype: untouched",
            program: INGRESS,
            input: ipv6,
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: None,
        },
        // BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than Ethernet +
        // 20 bytes, so runts are covered from there on.
        Case {
            name: "truncated: IPv4 header with no L4 header at all",
            program: INGRESS,
            input: truncated_consistently(&valid, 14 + 20),
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: Some(Counter::MalformedL4),
        },
        Case {
            name: "malformed: IHL claims options beyond the packet",
            program: INGRESS,
            input: ihl_beyond,
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: Some(Counter::MalformedIp),
        },
        Case {
            name: "truncated: IPv4 total length beyond the frame",
            program: INGRESS,
            input: valid[..valid.len() - 4].to_vec(),
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: Some(Counter::MalformedIp),
        },
        Case {
            name: "truncated: tcp header shorter than 20 bytes",
            program: INGRESS,
            input: truncated_consistently(&valid, 14 + 20 + 12),
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: Some(Counter::MalformedL4),
        },
        Case {
            name: "truncated: udp header shorter than 8 bytes",
            program: INGRESS,
            input: truncated_consistently(&valid_udp, 14 + 20 + 6),
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: Some(Counter::MalformedL4),
        },
        Case {
            name: "malformed: tcp data offset below 5",
            program: INGRESS,
            input: tcp_doff_small,
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: Some(Counter::MalformedL4),
        },
        Case {
            name: "malformed: udp length beyond the packet",
            program: INGRESS,
            input: udp_len_big,
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: Some(Counter::MalformedL4),
        },
        Case {
            name: "malformed: IHL below 5",
            program: INGRESS,
            input: ihl_small,
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: Some(Counter::MalformedIp),
        },
        Case {
            name: "first fragment to a service: untouched (no reassembly)",
            program: INGRESS,
            input: fragment,
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: Some(Counter::Fragment),
        },
        Case {
            name: "later fragment: untouched",
            program: INGRESS,
            input: later_fragment,
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: Some(Counter::Fragment),
        },
    ];
    run_cases(&mut dp, cases);
}

#[test]
fn same_flow_keeps_its_backend_and_flows_spread() {
    let mut dp = fixture::load().unwrap();
    let vip = sa([10, 96, 0, 30], 80);
    let backends = [
        sa([10, 244, 1, 21], 8080),
        sa([10, 244, 1, 22], 8080),
        sa([10, 244, 1, 23], 8080),
    ];
    fixture::program(
        &mut dp,
        vec![fixture::service("multi", vip, Protocol::Tcp, &backends)],
    )
    .unwrap();

    let syn = Frame::tcp_syn(sa(CLIENT, 50000), vip);
    let first = dp.test_run(INGRESS, &syn.build(), 1).unwrap();
    let chosen = packet::dst_of(&first.frame);
    assert!(backends.contains(&chosen), "{chosen}");
    let ack = Frame {
        l4: L4::Tcp {
            syn: false,
            ack: true,
        },
        payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ..syn.clone()
    };
    let before = counters(&dp).unwrap();
    for i in 0..50 {
        let f = if i % 2 == 0 { &syn } else { &ack };
        let out = dp.test_run(INGRESS, &f.build(), 1).unwrap();
        assert_eq!(
            packet::dst_of(&out.frame),
            chosen,
            "packet {i} of the flow moved"
        );
        assert_eq!(out.frame, f.with_endpoints(f.src, chosen).build());
    }
    // The first ACK completes the handshake (the flow moves from CT_NEW
    // to CONNTRACK); the rest are established, but for the first SYN after
    // it: a SYN never looks in CONNTRACK, so it opens a half-open flow of
    // its own (to the same backend: Maglev), which the next SYNs follow as
    // its retransmissions. It never takes over the established flow, which
    // is not closing.
    assert_eq!(
        moved(&before, &counters(&dp).unwrap()),
        vec![
            (Counter::NewFlow, 1),
            (Counter::Established, 48),
            (Counter::HandshakeDone, 1)
        ]
    );

    let mut seen = BTreeMap::new();
    for port in 1..=300u16 {
        let out = dp
            .test_run(INGRESS, &Frame::tcp_syn(sa(CLIENT, port), vip).build(), 1)
            .unwrap();
        *seen.entry(packet::dst_of(&out.frame)).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "all backends used: {seen:?}");
    assert!(seen.values().all(|n| *n >= 50), "roughly even: {seen:?}");
}

#[test]
fn established_tcp_flow_outlives_its_backend_leaving() {
    let mut dp = fixture::load().unwrap();
    let vip = sa([10, 96, 0, 31], 80);
    let backends = [
        sa([10, 244, 1, 21], 8080),
        sa([10, 244, 1, 22], 8080),
        sa([10, 244, 1, 23], 8080),
    ];
    let program = |dp: &mut Datapath, set: &[SocketAddrV4]| {
        fixture::program(dp, vec![fixture::service("drain", vip, Protocol::Tcp, set)]).unwrap();
    };
    program(&mut dp, &backends);
    let syn = Frame::tcp_syn(sa(CLIENT, 50001), vip);
    let chosen = packet::dst_of(&dp.test_run(INGRESS, &syn.build(), 1).unwrap().frame);
    let ack = Frame {
        l4: L4::Tcp {
            syn: false,
            ack: true,
        },
        payload: b"more".to_vec(),
        ..syn.clone()
    };
    dp.test_run(INGRESS, &ack.build(), 1).unwrap();
    let rest: Vec<SocketAddrV4> = backends.iter().copied().filter(|b| *b != chosen).collect();
    let newcomer = sa([10, 244, 1, 29], 8080);

    // The backend leaves (terminating, not ready, scaled away); later a new
    // backend may even take its freed id. The flow stays where it is; new
    // flows never go to the departed backend.
    for (step, set) in [
        ("backend left", rest.clone()),
        (
            "another backend took its place",
            [rest.clone(), vec![newcomer]].concat(),
        ),
        ("no endpoints left", vec![]),
    ] {
        program(&mut dp, &set);
        let before = counters(&dp).unwrap();
        let out = dp.test_run(INGRESS, &ack.build(), 1).unwrap();
        assert_eq!(out.verdict, TCX_NEXT, "{step}");
        assert_eq!(
            out.frame,
            ack.with_endpoints(ack.src, chosen).build(),
            "{step}"
        );
        assert_eq!(
            moved(&before, &counters(&dp).unwrap()),
            vec![(Counter::Established, 1)],
            "{step}"
        );
        for port in 1..=50u16 {
            let out = dp
                .test_run(INGRESS, &Frame::tcp_syn(sa(CLIENT, port), vip).build(), 1)
                .unwrap();
            if set.is_empty() {
                assert_eq!(
                    out.verdict, TC_ACT_REDIRECT,
                    "{step}: new flows are refused"
                );
            } else {
                let to = packet::dst_of(&out.frame);
                assert!(set.contains(&to), "{step}: new flow went to {to}");
            }
        }
    }

    // A new connection attempt reusing the tuple is a new flow: it does not
    // go to the departed backend (here: refused, nothing is left).
    let before = counters(&dp).unwrap();
    let out = dp.test_run(INGRESS, &syn.build(), 1).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        moved(&before, &counters(&dp).unwrap()),
        vec![(Counter::RejectNoEndpoints, 1)]
    );
    program(&mut dp, &[newcomer]);
    let out = dp.test_run(INGRESS, &syn.build(), 1).unwrap();
    assert_eq!(out.frame, syn.with_endpoints(syn.src, newcomer).build());
}

#[test]
fn backends_no_table_refers_to_are_removed_by_a_full_sync() {
    let mut dp = fixture::load().unwrap();
    let vip = sa([10, 96, 0, 32], 80);
    let backend = sa([10, 244, 1, 21], 8080);
    let services = || vec![fixture::service("stray", vip, Protocol::Tcp, &[backend])];
    fixture::program(&mut dp, services()).unwrap();
    // What an apply interrupted after its backend phase leaves behind.
    let stray = Backend::new(sa([10, 244, 1, 99], 8080), false);
    dp.apply(&[Op::SetBackend(77, stray)], None).unwrap();
    assert_eq!(
        dp.read_programmed().unwrap().backends.get(&77),
        Some(&stray)
    );

    let programmed = fixture::program(&mut dp, services()).unwrap();
    assert!(!programmed.backends.contains_key(&77));
    let read = dp.read_programmed().unwrap();
    assert!(!read.backends.contains_key(&77), "stray backend deleted");
    assert_eq!(read.backends.len(), 1);
}

#[test]
fn replies_are_reverse_natted() {
    let mut dp = fixture::load().unwrap();
    let vip = sa([10, 96, 0, 40], 80);
    let vip_dns = sa([10, 96, 0, 40], 53);
    let backend = sa([10, 244, 1, 31], 8080);
    let backend_dns = sa([10, 244, 1, 31], 5353);
    fixture::program(
        &mut dp,
        vec![
            fixture::service("web", vip, Protocol::Tcp, &[backend]),
            fixture::service("dns", vip_dns, Protocol::Udp, &[backend_dns]),
        ],
    )
    .unwrap();
    let client = sa(CLIENT, 41000);
    dp.test_run(INGRESS, &Frame::tcp_syn(client, vip).build(), 1)
        .unwrap();
    dp.test_run(INGRESS, &Frame::udp(client, vip_dns, b"q").build(), 1)
        .unwrap();

    let syn_ack = Frame {
        src_mac: packet::NODE_MAC,
        dst_mac: packet::CLIENT_MAC,
        l4: L4::Tcp {
            syn: true,
            ack: true,
        },
        ..Frame::tcp_syn(backend, client)
    };
    let answer = Frame {
        src_mac: packet::NODE_MAC,
        dst_mac: packet::CLIENT_MAC,
        ..Frame::udp(backend_dns, client, b"answer")
    };
    let router = Ipv4Addr::new(10, 244, 9, 1);
    let frag_needed = |from, quoted: &Frame, len| {
        packet::icmp_frag_needed(
            (packet::NODE_MAC, packet::CLIENT_MAC),
            from,
            *client.ip(),
            1400,
            &quoted.build(),
            len,
            63,
        )
    };
    let cases = vec![
        Case {
            name: "tcp reply from the backend gets the clusterip as source",
            program: EGRESS,
            input: syn_ack.build(),
            out: Out::Frame(syn_ack.with_endpoints(vip, client).build()),
            verdict: TCX_NEXT,
            counter: Some(Counter::ReplyNat),
        },
        Case {
            name: "udp reply from the backend gets the clusterip as source",
            program: EGRESS,
            input: answer.build(),
            out: Out::Frame(answer.with_endpoints(vip_dns, client).build()),
            verdict: TCX_NEXT,
            counter: Some(Counter::ReplyNat),
        },
        Case {
            name: "a packet from the backend to another client port: untouched",
            program: EGRESS,
            input: syn_ack.with_endpoints(backend, sa(CLIENT, 41001)).build(),
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: None,
        },
        Case {
            name: "frag needed from a router about the DNATed packet: the quote shows the clusterip",
            program: EGRESS,
            input: frag_needed(router, &Frame::tcp_syn(client, backend), 60),
            out: Out::Frame(frag_needed(router, &Frame::tcp_syn(client, vip), 60)),
            verdict: TCX_NEXT,
            counter: Some(Counter::IcmpTranslated),
        },
        Case {
            name: "frag needed from the backend itself: from the clusterip, quote truncated to 8 bytes of tcp",
            program: EGRESS,
            input: frag_needed(*backend.ip(), &Frame::tcp_syn(client, backend), 28),
            out: Out::Frame(frag_needed(*vip.ip(), &Frame::tcp_syn(client, vip), 28)),
            verdict: TCX_NEXT,
            counter: Some(Counter::IcmpTranslated),
        },
        Case {
            name: "udp port unreachable quote: translated, udp checksum too",
            program: EGRESS,
            input: frag_needed(router, &Frame::udp(client, backend_dns, b"q"), 64),
            out: Out::Frame(frag_needed(router, &Frame::udp(client, vip_dns, b"q"), 64)),
            verdict: TCX_NEXT,
            counter: Some(Counter::IcmpTranslated),
        },
        Case {
            name: "an icmp error about a flow we do not know: untouched",
            program: EGRESS,
            input: frag_needed(router, &Frame::tcp_syn(sa(CLIENT, 41999), backend), 60),
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: None,
        },
        Case {
            name: "client's own packet seen on egress: untouched",
            program: EGRESS,
            input: Frame::tcp_syn(client, vip).build(),
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: None,
        },
    ];
    run_cases(&mut dp, cases);

    // Per-service counters saw both directions of the TCP flow.
    let programmed = dp.read_programmed().unwrap();
    let key = programmed
        .services
        .iter()
        .find(|(k, _)| k.frontend().port() == 80)
        .map(|(_, v)| v.svc_id)
        .unwrap();
    let c = dp.service_counters(key).unwrap();
    assert_eq!((c.packets, c.new_flows, c.rejected), (2, 1, 0), "{c:?}");
}

#[test]
fn tcp_flags_move_conntrack_state_on() {
    use proxy_common::{ct_dir, ct_state};
    let vip = sa([10, 96, 0, 50], 80);
    let backend = sa([10, 244, 1, 51], 8080);
    let mut dp = one_backend(vip, backend);
    let client = sa(CLIENT, 42000);
    let state = |dp: &Datapath, dir| {
        dp.conntrack()
            .unwrap()
            .into_iter()
            .find(|(k, _)| {
                let port = client.port();
                k.dir == dir && (k.src().port() == port || k.dst().port() == port)
            })
            .map(|(_, v)| v.state)
    };
    let with_flags = |from: SocketAddrV4, to: SocketAddrV4, flags: u8| {
        let mut f = Frame::tcp_syn(from, to).build();
        packet::set_tcp_flags(&mut f, flags);
        f
    };
    // (step, program, frame, entry direction, state it must have after):
    // a half-open flow is one client entry, which both directions move on.
    let steps = [
        (
            "client SYN",
            INGRESS,
            with_flags(client, vip, 0x02),
            ct_dir::CLIENT,
            Some(ct_state::SYN_SENT),
        ),
        (
            "backend SYN-ACK",
            EGRESS,
            with_flags(backend, client, 0x12),
            ct_dir::CLIENT,
            Some(ct_state::ESTABLISHED),
        ),
        (
            "client ACK",
            INGRESS,
            with_flags(client, vip, 0x10),
            ct_dir::FORWARD,
            Some(ct_state::ESTABLISHED),
        ),
        (
            "client FIN",
            INGRESS,
            with_flags(client, vip, 0x11),
            ct_dir::FORWARD,
            Some(ct_state::CLOSING),
        ),
        (
            "backend RST",
            EGRESS,
            with_flags(backend, client, 0x14),
            ct_dir::REPLY,
            Some(ct_state::CLOSED),
        ),
    ];
    for (name, program, frame, dir, want) in steps {
        let out = dp.test_run(program, &frame, 1).unwrap();
        assert_eq!(out.verdict, TCX_NEXT, "{name}");
        packet::verify_checksums(&out.frame).unwrap();
        assert_eq!(state(&dp, dir), want, "{name}");
    }
    // States only advance: a late ACK does not reopen a closing flow.
    dp.test_run(INGRESS, &with_flags(client, vip, 0x10), 1)
        .unwrap();
    assert_eq!(state(&dp, ct_dir::FORWARD), Some(ct_state::CLOSING));
    // A SYN reusing the tuple after the client closed is its next
    // connection (a TIME_WAIT port reused): picked and recorded anew, so it
    // gets the timeouts of a new flow, not those of the closed one.
    let before = counters(&dp).unwrap();
    let out = dp
        .test_run(INGRESS, &with_flags(client, vip, 0x02), 1)
        .unwrap();
    assert_eq!(out.verdict, TCX_NEXT);
    assert_eq!(packet::dst_of(&out.frame), backend);
    assert_eq!(
        moved(&before, &counters(&dp).unwrap()),
        vec![(Counter::NewFlow, 1)]
    );
    assert_eq!(state(&dp, ct_dir::CLIENT), Some(ct_state::SYN_SENT));
    // Its handshake's last ACK finds the closed flow, and the new one
    // replaces it.
    dp.test_run(EGRESS, &with_flags(backend, client, 0x12), 1)
        .unwrap();
    let before = counters(&dp).unwrap();
    dp.test_run(INGRESS, &with_flags(client, vip, 0x10), 1)
        .unwrap();
    assert_eq!(
        moved(&before, &counters(&dp).unwrap()),
        vec![(Counter::HandshakeDone, 1)]
    );
    assert_eq!(state(&dp, ct_dir::FORWARD), Some(ct_state::ESTABLISHED));
    assert_eq!(state(&dp, ct_dir::CLIENT), None);
    // A SYN of another connection on the tuple, and its retransmission,
    // which stays in it.
    dp.test_run(INGRESS, &with_flags(client, vip, 0x02), 1)
        .unwrap();
    let before = counters(&dp).unwrap();
    dp.test_run(INGRESS, &with_flags(client, vip, 0x02), 1)
        .unwrap();
    assert_eq!(
        moved(&before, &counters(&dp).unwrap()),
        vec![(Counter::Established, 1)]
    );
}

#[test]
fn handshakes_wait_apart_and_a_syn_flood_evicts_no_established_flow() {
    use proxy_agent::model::Algorithm;
    use proxy_common::maps::{CONNTRACK, CT_NEW};
    pin_to_one_cpu();
    // Tables for a few flows; random selection, so a flow that lost its
    // entry would (most likely) be sent to another backend.
    let mut dp = fixture::load_sized(proxy_agent::datapath::MapSizes {
        conntrack: 64,
        ct_new: 64,
        ..fixture::SIZES
    })
    .unwrap();
    let vip = sa([10, 96, 0, 60], 80);
    let backends: Vec<SocketAddrV4> = (1..=4).map(|i| sa([10, 244, 6, i], 8080)).collect();
    let mut web = fixture::service("web", vip, Protocol::Tcp, &backends);
    web.algorithm = Algorithm::Random;
    web.maglev_table_size = None;
    fixture::program(&mut dp, vec![web]).unwrap();
    let with_flags = |from: SocketAddrV4, to: SocketAddrV4, flags: u8| {
        let mut f = Frame::tcp_syn(from, to).build();
        packet::set_tcp_flags(&mut f, flags);
        f
    };
    let in_table = |dp: &Datapath, table, client: SocketAddrV4| {
        dp.ct_table(table)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k.src() == client || k.dst() == client)
            .count()
    };
    let run = |dp: &mut Datapath, program, frame: &[u8]| {
        let before = counters(dp).unwrap();
        let out = dp.test_run(program, frame, 1).unwrap();
        assert_eq!(out.verdict, TCX_NEXT);
        packet::verify_checksums(&out.frame).unwrap();
        (out.frame, moved(&before, &counters(dp).unwrap()))
    };

    // Eight connections through their handshake: each waits in CT_NEW (one
    // entry, keyed by the client) until the client's ACK, and only then
    // takes room in CONNTRACK (two entries).
    let mut flows = Vec::new();
    for i in 0..8u16 {
        let client = sa(CLIENT, 44_000 + i);
        let (out, moved_by) = run(&mut dp, INGRESS, &with_flags(client, vip, 0x02));
        assert_eq!(moved_by, vec![(Counter::NewFlow, 1)]);
        let backend = packet::dst_of(&out);
        assert_eq!(
            (
                in_table(&dp, CT_NEW, client),
                in_table(&dp, CONNTRACK, client)
            ),
            (1, 0)
        );
        let (out, moved_by) = run(&mut dp, EGRESS, &with_flags(backend, client, 0x12));
        assert_eq!(
            moved_by,
            vec![(Counter::ReplyNat, 1)],
            "SYN-ACK from CT_NEW"
        );
        assert_eq!(packet::src_of(&out), vip);
        let (out, moved_by) = run(&mut dp, INGRESS, &with_flags(client, vip, 0x10));
        assert_eq!(moved_by, vec![(Counter::HandshakeDone, 1)]);
        assert_eq!(packet::dst_of(&out), backend);
        assert_eq!(
            (
                in_table(&dp, CT_NEW, client),
                in_table(&dp, CONNTRACK, client)
            ),
            (0, 2)
        );
        flows.push((client, backend));
    }

    // Ten times CONNTRACK's size in SYNs, each from a new source.
    for i in 0..640u32 {
        let spoofed = SocketAddrV4::new(Ipv4Addr::from(0x0afa_0000 + i), 1024);
        let (_, moved_by) = run(&mut dp, INGRESS, &with_flags(spoofed, vip, 0x02));
        assert_eq!(moved_by, vec![(Counter::NewFlow, 1)], "spoofed SYN {i}");
    }

    // Every connection, idle through the flood, keeps its backend both ways.
    for (client, backend) in flows {
        let (out, moved_by) = run(&mut dp, INGRESS, &with_flags(client, vip, 0x18));
        assert_eq!(moved_by, vec![(Counter::Established, 1)], "{client}");
        assert_eq!(packet::dst_of(&out), backend, "{client} kept its backend");
        let (out, moved_by) = run(&mut dp, EGRESS, &with_flags(backend, client, 0x18));
        assert_eq!(moved_by, vec![(Counter::ReplyNat, 1)], "{client}'s reply");
        assert_eq!(packet::src_of(&out), vip);
    }
    // A data segment from a backend is never looked up in CT_NEW: a
    // half-open flow's only replies are a SYN-ACK or RST.
    let spoofed = SocketAddrV4::new(Ipv4Addr::from(0x0afa_0000 + 639), 1024);
    let entries = dp.ct_table(CT_NEW).unwrap();
    let (_, v) = entries
        .iter()
        .find(|(k, _)| k.src() == spoofed)
        .expect("the last spoofed SYN waits in CT_NEW");
    let (out, moved_by) = run(&mut dp, EGRESS, &with_flags(v.nat(), spoofed, 0x18));
    assert_eq!(moved_by, vec![]);
    assert_eq!(packet::src_of(&out), v.nat());
}

/// A datapath with Service "web" at `vip` (TCP) and its one backend.
fn one_backend(vip: SocketAddrV4, backend: SocketAddrV4) -> Datapath {
    let mut dp = fixture::load().unwrap();
    fixture::program(
        &mut dp,
        vec![fixture::service("web", vip, Protocol::Tcp, &[backend])],
    )
    .unwrap();
    dp
}

/// Pins the calling thread to one CPU: per-CPU state (round robin) then
/// follows the test's own sequence.
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET sets one bit of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
    }
}

/// The backend a SYN from `client` to `vip` is sent to.
fn chosen(dp: &mut Datapath, client: SocketAddrV4, vip: SocketAddrV4) -> SocketAddrV4 {
    let out = dp
        .test_run(INGRESS, &Frame::tcp_syn(client, vip).build(), 1)
        .unwrap();
    assert_eq!(out.verdict, TCX_NEXT);
    packet::dst_of(&out.frame)
}

#[test]
fn scheduling_algorithms_and_affinity() {
    use proxy_agent::model::Algorithm;
    pin_to_one_cpu();
    let mut dp = fixture::load().unwrap();
    let backends: Vec<SocketAddrV4> = (1..=3).map(|i| sa([10, 244, 3, i], 8080)).collect();
    let svc = |name, last: u8, algorithm: Algorithm| {
        let mut p = fixture::service(name, sa([10, 96, 3, last], 80), Protocol::Tcp, &backends);
        p.algorithm = algorithm;
        if !algorithm.needs_table(false) {
            p.maglev_table_size = None;
        }
        p
    };
    let mut sticky = svc("sticky", 4, Algorithm::RoundRobin);
    sticky.session_affinity_timeout_seconds = Some(1);
    fixture::program(
        &mut dp,
        vec![
            svc("rr", 1, Algorithm::RoundRobin),
            svc("sh", 2, Algorithm::SourceHash),
            svc("lc", 3, Algorithm::LeastConnections),
            sticky,
        ],
    )
    .unwrap();
    let client = |port| sa(CLIENT, port);

    // Round robin: each new flow the next backend, in table order.
    let rr = sa([10, 96, 3, 1], 80);
    let picks: Vec<_> = (0..6)
        .map(|i| chosen(&mut dp, client(43000 + i), rr))
        .collect();
    let first = backends.iter().position(|b| *b == picks[0]).unwrap();
    let want: Vec<_> = (0..6).map(|i| backends[(first + i) % 3]).collect();
    assert_eq!(picks, want, "round robin");

    // Source hashing: every connection of a client to one backend.
    let sh = sa([10, 96, 3, 2], 80);
    let picks: std::collections::BTreeSet<_> = (0..8)
        .map(|i| chosen(&mut dp, client(43100 + i), sh))
        .collect();
    assert_eq!(picks.len(), 1, "source hash: {picks:?}");

    // Least connections: three open flows spread one each; when one
    // closes (FIN), the next flow goes to its now idle backend. A flow
    // counts once its handshake completes.
    let lc = sa([10, 96, 3, 3], 80);
    let connected = |dp: &mut Datapath, c: SocketAddrV4| {
        let backend = chosen(dp, c, lc);
        let mut ack = Frame::tcp_syn(c, lc).build();
        packet::set_tcp_flags(&mut ack, 0x10);
        dp.test_run(INGRESS, &ack, 1).unwrap();
        backend
    };
    let opened: Vec<_> = (0..3)
        .map(|i| connected(&mut dp, client(43200 + i)))
        .collect();
    let distinct: std::collections::BTreeSet<_> = opened.iter().collect();
    assert_eq!(distinct.len(), 3, "one flow each: {opened:?}");
    let mut fin = Frame::tcp_syn(client(43201), lc).build();
    packet::set_tcp_flags(&mut fin, 0x11);
    dp.test_run(INGRESS, &fin, 1).unwrap();
    assert_eq!(
        connected(&mut dp, client(43210)),
        opened[1],
        "the idle backend"
    );
    // Now all have one open flow again; a second FIN for the same flow
    // changes nothing (it is counted closed once).
    dp.test_run(INGRESS, &fin, 1).unwrap();
    let next = chosen(&mut dp, client(43211), lc);
    assert!(backends.contains(&next));

    // Session affinity over round robin: a client's new connections stick
    // to its backend while the affinity is fresh; after the timeout the
    // next connection is placed by round robin again (the next backend).
    let sticky = sa([10, 96, 3, 4], 80);
    // (16 flows: the round robin position, which every new flow advances,
    // then points at another backend than the first.)
    let stuck: Vec<_> = (0..16)
        .map(|i| chosen(&mut dp, client(43300 + i), sticky))
        .collect();
    assert!(
        stuck.iter().all(|b| *b == stuck[0]),
        "affinity holds: {stuck:?}"
    );
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let after = chosen(&mut dp, client(43400), sticky);
    let start = backends.iter().position(|b| *b == stuck[0]).unwrap();
    assert_eq!(
        after,
        backends[(start + 16) % 3],
        "affinity expired: round robin places it"
    );
    assert_ne!(after, stuck[0]);
    assert_eq!(
        chosen(&mut dp, client(43401), sticky),
        after,
        "and sticks again"
    );
}

/// `f` with new endpoints, sent back the way it came (MACs swapped): what a
/// hairpin redirects into the pod.
fn back_in(f: &Frame, src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    Frame {
        src_mac: f.dst_mac,
        dst_mac: f.src_mac,
        ..f.with_endpoints(src, dst)
    }
    .build()
}

#[test]
fn hairpin_is_translated_both_ways_and_sent_back_into_the_pod() {
    let mut dp = fixture::load().unwrap();
    let vip = sa([10, 96, 0, 60], 80);
    let pod = sa(CLIENT, 8080); // the client pod is the Service's only backend
    fixture::program(
        &mut dp,
        vec![fixture::service("self", vip, Protocol::Tcp, &[pod])],
    )
    .unwrap();
    let mut config = proxy_common::NodeConfig::default();
    config.set_vip_range(Some((*vip.ip(), *vip.ip())));
    dp.set_config(&config).unwrap();
    let client = sa(CLIENT, 41500);
    let syn = Frame::tcp_syn(client, vip);
    let syn_ack = Frame {
        l4: L4::Tcp {
            syn: true,
            ack: true,
        },
        // The pod answers the frontend address it saw as the source.
        ..Frame::tcp_syn(pod, sa([10, 96, 0, 60], 41500))
    };
    let ack = Frame {
        l4: L4::Tcp {
            syn: false,
            ack: true,
        },
        ..syn.clone()
    };
    let cases = vec![
        Case {
            name: "a pod's SYN to its own Service: to itself, from the frontend address, back in",
            program: INGRESS,
            input: syn.build(),
            out: Out::Frame(back_in(&syn, sa([10, 96, 0, 60], 41500), pod)),
            verdict: TC_ACT_REDIRECT,
            counter: Some(Counter::Hairpin),
        },
        Case {
            name: "its answer: from the frontend to the client port, back in",
            program: INGRESS,
            input: syn_ack.build(),
            out: Out::Frame(back_in(&syn_ack, vip, client)),
            verdict: TC_ACT_REDIRECT,
            counter: Some(Counter::Hairpin),
        },
        Case {
            name: "the flow's next packet takes the same way",
            program: INGRESS,
            input: ack.build(),
            out: Out::Frame(back_in(&ack, sa([10, 96, 0, 60], 41500), pod)),
            verdict: TC_ACT_REDIRECT,
            counter: Some(Counter::Hairpin),
        },
        Case {
            name: "a packet to another port of a ClusterIP without a flow: untouched",
            program: INGRESS,
            input: Frame::tcp_syn(pod, sa([10, 96, 0, 60], 41999)).build(),
            out: Out::Untouched,
            verdict: TCX_NEXT,
            counter: None,
        },
    ];
    run_cases(&mut dp, cases);
}

#[test]
fn pods_reach_node_ports_and_load_balancer_ips_from_inside() {
    let mut dp = fixture::load().unwrap();
    let node = [192, 168, 1, 10];
    let remote = sa([10, 244, 2, 5], 8080);
    let pod = sa(CLIENT, 8080);
    let lb = sa([192, 168, 60, 3], 80);
    // externalTrafficPolicy Local without a local endpoint: outside clients
    // get nothing here, pods get the cluster-wide endpoints (as kube-proxy).
    let mut web = fixture::node_port(
        "web",
        sa([10, 96, 0, 70], 80),
        sa(node, 30080),
        Protocol::Tcp,
        &[remote],
        &[],
    );
    web.external_backends.clear();
    web.frontends.push(proxy_agent::model::Frontend {
        kind: proxy_agent::model::FrontendKind::LoadBalancer,
        address: *lb.ip(),
        port: lb.port(),
    });
    // Source ranges hold for pods too; pods are outside this one.
    web.source_ranges = vec!["10.244.9.0/24".parse().unwrap()];
    // The client pod is the only backend of `self`: hairpin via its NodePort.
    let own = sa(node, 30081);
    let self_svc = fixture::node_port(
        "self",
        sa([10, 96, 0, 71], 80),
        own,
        Protocol::Tcp,
        &[pod],
        &[pod],
    );
    fixture::program(&mut dp, vec![web, self_svc]).unwrap();
    let lowest_cluster_ip = [10, 96, 0, 1];
    let mut config = proxy_common::NodeConfig::default();
    config.set_vip_range(Some((lowest_cluster_ip.into(), [10, 96, 255, 254].into())));
    dp.set_config(&config).unwrap();

    let to_np = Frame::tcp_syn(sa(CLIENT, 41600), sa(node, 30080));
    let to_lb = Frame::tcp_syn(sa(CLIENT, 41601), lb);
    let client = sa(CLIENT, 41602);
    let hairpin = Frame::tcp_syn(client, own);
    let via = sa(lowest_cluster_ip, 41602);
    let answer = Frame {
        l4: L4::Tcp {
            syn: true,
            ack: true,
        },
        ..Frame::tcp_syn(pod, via)
    };
    let cases = vec![
        Case {
            name: "a pod to this node's NodePort: the cluster-wide endpoints, whatever the external policy",
            program: INGRESS,
            input: to_np.build(),
            out: Out::Frame(to_np.with_endpoints(to_np.src, remote).build()),
            verdict: TCX_NEXT,
            counter: Some(Counter::NewFlow),
        },
        Case {
            name: "a pod to a LoadBalancer IP outside its source ranges: dropped",
            program: INGRESS,
            input: to_lb.build(),
            out: Out::Untouched,
            verdict: TCX_DROP,
            counter: Some(Counter::SourceRangeDenied),
        },
        Case {
            name: "a pod to its own Service's NodePort: back in, from the lowest ClusterIP",
            program: INGRESS,
            input: hairpin.build(),
            out: Out::Frame(back_in(&hairpin, via, pod)),
            verdict: TC_ACT_REDIRECT,
            counter: Some(Counter::Hairpin),
        },
        Case {
            name: "its answer: from the NodePort to the client, back in",
            program: INGRESS,
            input: answer.build(),
            out: Out::Frame(back_in(&answer, own, client)),
            verdict: TC_ACT_REDIRECT,
            counter: Some(Counter::Hairpin),
        },
    ];
    run_cases(&mut dp, cases);
}

#[test]
fn idle_flow_removal_spares_flows_touched_since_the_scan() {
    use proxy_common::ct_dir;
    let vip = sa([10, 96, 0, 60], 80);
    let backend = sa([10, 244, 1, 61], 8080);
    let mut dp = one_backend(vip, backend);
    let (quiet, busy) = (sa(CLIENT, 43000), sa(CLIENT, 43001));
    for c in [quiet, busy] {
        let mut ack = Frame::tcp_syn(c, vip).build();
        packet::set_tcp_flags(&mut ack, 0x10);
        dp.test_run(INGRESS, &Frame::tcp_syn(c, vip).build(), 1)
            .unwrap();
        dp.test_run(INGRESS, &ack, 1).unwrap();
        dp.test_run(EGRESS, &Frame::tcp_syn(backend, c).build(), 1)
            .unwrap();
    }
    let ct = dp.conntrack_handle().unwrap();
    let scanned = ct.entries().unwrap();
    let flow_of = |c: SocketAddrV4| -> Vec<_> {
        let mut keys: Vec<_> = scanned
            .keys()
            .filter(|k| k.src().port() == c.port() || k.dst().port() == c.port())
            .copied()
            .collect();
        keys.sort_by_key(|k| k.dir != ct_dir::FORWARD);
        keys
    };
    let flows = [flow_of(quiet), flow_of(busy)];
    assert!(flows.iter().all(|f| f.len() == 2), "{flows:?}");
    // After the scan, the busy flow's client closes it: its entry changes.
    let mut fin = Frame::tcp_syn(busy, vip).build();
    packet::set_tcp_flags(&mut fin, 0x11);
    dp.test_run(INGRESS, &fin, 1).unwrap();

    assert_eq!(ct.remove_idle(&scanned, &flows).unwrap(), 2);
    let left = ct.entries().unwrap();
    assert!(
        flows[0].iter().all(|k| !left.contains_key(k)),
        "quiet flow removed"
    );
    assert!(
        flows[1].iter().all(|k| left.contains_key(k)),
        "busy flow kept whole"
    );
}

#[test]
fn batched_conntrack_read_sees_every_entry() {
    let vip = sa([10, 96, 0, 62], 80);
    let backend = sa([10, 244, 1, 63], 8080);
    let mut dp = one_backend(vip, backend);
    // 2 entries per flow: more than one batch (4096 entries per call).
    // Data segments: flows picked up mid-stream go to CONNTRACK at once.
    for port in 20_000..25_000u16 {
        let mut data = Frame::tcp_syn(sa(CLIENT, port), vip).build();
        packet::set_tcp_flags(&mut data, 0x18);
        let out = dp.test_run(INGRESS, &data, 1).unwrap();
        assert_eq!(out.verdict, TCX_NEXT);
    }
    let one_by_one: BTreeMap<_, _> = dp.conntrack().unwrap().into_iter().collect();
    let batched: BTreeMap<_, _> = dp
        .conntrack_handle()
        .unwrap()
        .entries_batched()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(one_by_one.len(), 10_000);
    assert_eq!(batched, one_by_one);
}
