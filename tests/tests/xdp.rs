//! XDP fixtures for north-south traffic (`xdp_ext`) through BPF_PROG_TEST_RUN:
//! exact output frames, verdicts and counters, as in `datapath.rs`.
//!
//! The FIB lookups the program makes run against a network namespace this
//! test creates (`fixture::fixture_net`).
//!
//! Needs root (BPF, namespaces). Runs in CI, which is root.

use std::net::{Ipv4Addr, SocketAddrV4};

use proxy_agent::model::{NodePortMode, Protocol};
use proxy_common::{
    Counter, DSR_OPT_LEN, DSR_OPT_TYPE, NODE_F_EXTERNAL, NodeConfig, maps::programs,
};
use proxy_tests::{
    fixture::{
        self, CLIENT, Case, NODE1, NODE2, NODE2_MAC, Out, TC_ACT_REDIRECT, TCX_NEXT, XDP_DROP,
        XDP_PASS, XDP_TX, fixture_net, ifindex, run_cases_on, sa,
    },
    packet::{self, CLIENT_MAC, Frame, L4, NODE_MAC},
};

const XDP: &str = programs::XDP_EXT;
const TC_EXT: &str = programs::TC_EXT_INGRESS;
const POD_INGRESS: &str = programs::TC_POD_INGRESS;
const SNAT_PORTS: (u16, u16) = (61_000, 65_535);

/// node1 serving external traffic, SNATing to its address on `ports`.
fn node1_config(ports: (u16, u16)) -> NodeConfig {
    let mut c = NodeConfig {
        snat_port_min: ports.0,
        snat_port_max: ports.1,
        flags: NODE_F_EXTERNAL,
        ..NodeConfig::default()
    };
    c.set_snat_addr(Some(NODE1.into()));
    c.set_nodeport_addr(Some(NODE1.into()));
    c
}

/// The SNAT port the datapath picks first for a flow (the hash of its tuple
/// placed in the range), the tuple's raw network-order values as the kernel
/// hashes them.
fn first_snat_port(client: SocketAddrV4, frontend: SocketAddrV4, proto: u8) -> u16 {
    let k = proxy_common::CtKey::new(client, frontend, proto, proxy_common::ct_dir::FORWARD);
    let h = proxy_common::hash::flow_hash(k.saddr_be, k.daddr_be, k.sport_be, k.dport_be, proto);
    let range = u32::from(SNAT_PORTS.1 - SNAT_PORTS.0) + 1;
    SNAT_PORTS.0 + (h % range) as u16
}

fn dsr_option(frontend: SocketAddrV4) -> Vec<u8> {
    let mut o = vec![DSR_OPT_TYPE, DSR_OPT_LEN];
    o.extend_from_slice(&frontend.port().to_be_bytes());
    o.extend_from_slice(&frontend.ip().octets());
    o
}

/// As the entry node sends a frame on to node2 or back to the client: MACs
/// from the FIB, one hop less.
fn routed(f: &Frame, to_mac: [u8; 6]) -> Frame {
    Frame {
        src_mac: NODE_MAC,
        dst_mac: to_mac,
        ttl: f.ttl - 1,
        ..f.clone()
    }
}

fn from_client(src: SocketAddrV4, dst: SocketAddrV4, l4: L4) -> Frame {
    Frame {
        l4,
        payload: if matches!(l4, L4::Udp { .. }) {
            b"query".to_vec()
        } else {
            vec![]
        },
        ..Frame::tcp_syn(src, dst)
    }
}

const SYN: L4 = L4::Tcp {
    syn: true,
    ack: false,
};
const ACK: L4 = L4::Tcp {
    syn: false,
    ack: true,
};
const UDP: L4 = L4::Udp { zero_csum: false };

#[test]
fn xdp_nodeport_paths() {
    let ns = fixture_net().unwrap();
    ns.run(|| {
        let ext0 = ifindex("ext0")?;
        let mut dp = fixture::load()?;
        let remote = sa([10, 1, 2, 5], 8080);
        let remote_dns = sa([10, 1, 2, 7], 5353);
        let local = sa([10, 1, 1, 5], 8080);
        let np = sa(NODE1, 30080);
        let np_dns = sa(NODE1, 30053);
        let np_local = sa(NODE1, 30090);
        let np_no_local = sa(NODE1, 30091);
        let np_empty = sa(NODE1, 30092);
        let np_empty_udp = sa(NODE1, 30093);
        let mut no_local = fixture::node_port(
            "no-local",
            sa([10, 96, 0, 4], 80),
            np_no_local,
            Protocol::Tcp,
            &[remote],
            &[],
        );
        // externalTrafficPolicy Local, no endpoint on this node.
        no_local.external_backends.clear();
        fixture::program_with_mode(
            &mut dp,
            vec![
                fixture::node_port(
                    "web",
                    sa([10, 96, 0, 1], 80),
                    np,
                    Protocol::Tcp,
                    &[remote],
                    &[],
                ),
                fixture::node_port(
                    "dns",
                    sa([10, 96, 0, 2], 53),
                    np_dns,
                    Protocol::Udp,
                    &[remote_dns],
                    &[],
                ),
                fixture::node_port(
                    "local",
                    sa([10, 96, 0, 3], 80),
                    np_local,
                    Protocol::Tcp,
                    &[local],
                    &[local],
                ),
                no_local,
                fixture::node_port(
                    "empty",
                    sa([10, 96, 0, 5], 80),
                    np_empty,
                    Protocol::Tcp,
                    &[],
                    &[],
                ),
                fixture::node_port(
                    "empty-udp",
                    sa([10, 96, 0, 6], 53),
                    np_empty_udp,
                    Protocol::Udp,
                    &[],
                    &[],
                ),
            ],
            NodePortMode::Hybrid,
        )?;
        dp.set_config(&node1_config(SNAT_PORTS))?;

        let c1 = sa(CLIENT, 40001);
        let syn = from_client(c1, np, SYN);
        let ack = from_client(c1, np, ACK);
        let c2 = sa(CLIENT, 40002);
        let query = from_client(c2, np_dns, UDP);
        let snat_port = first_snat_port(c2, np_dns, 17);
        let answer = Frame {
            src_mac: NODE2_MAC,
            dst_mac: NODE_MAC,
            ..from_client(remote_dns, sa(NODE1, snat_port), UDP)
        };
        // ICMP frag needed to `to` (quoting `quoted_src` → `quoted_dst`, the
        // query's UDP packet) from `from`; the TTL is what the XDP program
        // leaves it at when it was sent on (one less).
        let router = Ipv4Addr::new(10, 1, 2, 1);
        let icmp = |from: Ipv4Addr,
                    quoted_src: SocketAddrV4,
                    quoted_dst: SocketAddrV4,
                    src_mac,
                    dst_mac| {
            let to = *quoted_src.ip();
            let ttl = if dst_mac == CLIENT_MAC { 63 } else { 64 };
            packet::icmp_frag_needed(
                (src_mac, dst_mac),
                from,
                to,
                1400,
                &query.with_endpoints(quoted_src, quoted_dst).build(),
                64,
                ttl,
            )
        };
        let c3 = sa(CLIENT, 40003);
        let with_options = Frame {
            ip_options: vec![0x94, 0x04, 0x00, 0x00],
            ..from_client(c3, np, SYN)
        };
        let c3_port = first_snat_port(c3, np, 6);
        let c4 = sa(CLIENT, 40004);
        let to_local = from_client(c4, np_local, SYN);
        let local_reply = Frame {
            l4: L4::Tcp {
                syn: true,
                ack: true,
            },
            ..from_client(local, c4, SYN)
        };
        // Node1 as the backend's node: a DSR-marked SYN from node2's NodePort
        // of the Service whose backend is on node1.
        let c5 = sa(CLIENT, 40005);
        let node2_np = sa(NODE2, 30090);
        let learned = Frame {
            ip_options: dsr_option(node2_np),
            ..from_client(c5, local, SYN)
        };
        let learned_ack = Frame {
            ip_options: dsr_option(node2_np),
            ..from_client(c5, local, ACK)
        };
        let dsr_data_reply = from_client(local, c5, ACK);
        // Forged options: naming no frontend here; naming a NodePort whose
        // Service the destination is no backend of.
        let c6 = sa(CLIENT, 40010);
        let forged_anywhere = Frame {
            ip_options: dsr_option(sa([203, 0, 113, 7], 443)),
            ..from_client(c6, local, SYN)
        };
        let forged_other_service = Frame {
            ip_options: dsr_option(sa(NODE2, 30080)),
            ..from_client(c6, local, SYN)
        };
        let forged_reply = Frame {
            l4: L4::Tcp {
                syn: true,
                ack: true,
            },
            ..from_client(local, c6, SYN)
        };
        let dsr_reply = Frame {
            l4: L4::Tcp {
                syn: true,
                ack: true,
            },
            ..from_client(local, c5, SYN)
        };
        let to_empty = from_client(sa(CLIENT, 40007), np_empty, SYN).build();
        let to_empty_udp = from_client(sa(CLIENT, 40011), np_empty_udp, UDP).build();
        let mut truncated = syn.build();
        truncated.truncate(14 + 12);

        let cases = vec![
            Case {
                name: "tcp syn to a nodeport, remote backend, dsr: DNAT + option, out again",
                program: XDP,
                input: syn.build(),
                out: Out::Frame(
                    Frame {
                        ip_options: dsr_option(np),
                        ..routed(&syn.with_endpoints(c1, remote), NODE2_MAC)
                    }
                    .build(),
                ),
                verdict: XDP_TX,
                counter: Some(Counter::Forwarded),
            },
            Case {
                name: "the client's ack completes the handshake: DNAT + option (the backend's node moves the flow too)",
                program: XDP,
                input: ack.build(),
                out: Out::Frame(
                    Frame {
                        ip_options: dsr_option(np),
                        ..routed(&ack.with_endpoints(c1, remote), NODE2_MAC)
                    }
                    .build(),
                ),
                verdict: XDP_TX,
                counter: Some(Counter::Forwarded),
            },
            Case {
                name: "the flow's next packet: DNAT only, no option",
                program: XDP,
                input: ack.build(),
                out: Out::Frame(routed(&ack.with_endpoints(c1, remote), NODE2_MAC).build()),
                verdict: XDP_TX,
                counter: Some(Counter::Forwarded),
            },
            Case {
                name: "udp to a nodeport in hybrid mode: SNAT to the node, out again",
                program: XDP,
                input: query.build(),
                out: Out::Frame(
                    routed(
                        &query.with_endpoints(sa(NODE1, snat_port), remote_dns),
                        NODE2_MAC,
                    )
                    .build(),
                ),
                verdict: XDP_TX,
                counter: Some(Counter::Forwarded),
            },
            Case {
                name: "the backend's answer to the SNAT address goes back to the client",
                program: XDP,
                input: answer.build(),
                out: Out::Frame(routed(&answer.with_endpoints(np_dns, c2), CLIENT_MAC).build()),
                verdict: XDP_TX,
                counter: Some(Counter::SnatReply),
            },
            Case {
                name: "frag needed from a router about a SNATed packet: to the client, quoting what it sent",
                program: XDP,
                input: icmp(router, sa(NODE1, snat_port), remote_dns, NODE2_MAC, NODE_MAC),
                out: Out::Frame(icmp(router, c2, np_dns, NODE_MAC, CLIENT_MAC)),
                verdict: XDP_TX,
                counter: Some(Counter::IcmpTranslated),
            },
            Case {
                name: "an icmp error from the backend itself comes from the frontend",
                program: XDP,
                input: icmp(*remote_dns.ip(), sa(NODE1, snat_port), remote_dns, NODE2_MAC, NODE_MAC),
                out: Out::Frame(icmp(*np_dns.ip(), c2, np_dns, NODE_MAC, CLIENT_MAC)),
                verdict: XDP_TX,
                counter: Some(Counter::IcmpTranslated),
            },
            Case {
                name: "a syn with ip options of its own: no room for dsr, SNAT instead",
                program: XDP,
                input: with_options.build(),
                out: Out::Frame(
                    routed(
                        &with_options.with_endpoints(sa(NODE1, c3_port), remote),
                        NODE2_MAC,
                    )
                    .build(),
                ),
                verdict: XDP_TX,
                counter: Some(Counter::Forwarded),
            },
            Case {
                name: "local backend: DNAT, up the stack",
                program: XDP,
                input: to_local.build(),
                out: Out::Frame(to_local.with_endpoints(c4, local).build()),
                verdict: XDP_PASS,
                counter: Some(Counter::NewFlow),
            },
            Case {
                name: "the local backend's reply gets the nodeport as its source and goes straight out",
                program: POD_INGRESS,
                input: local_reply.build(),
                out: Out::Frame(
                    routed(&local_reply.with_endpoints(np_local, c4), CLIENT_MAC).build(),
                ),
                verdict: TC_ACT_REDIRECT,
                counter: Some(Counter::ExternalReply),
            },
            Case {
                name: "a dsr option for a local backend is learned, the packet goes on untouched",
                program: XDP,
                input: learned.build(),
                out: Out::Untouched,
                verdict: XDP_PASS,
                counter: Some(Counter::DsrLearned),
            },
            Case {
                name: "the dsr flow's reply gets the service address as its source and goes straight out",
                program: POD_INGRESS,
                input: dsr_reply.build(),
                out: Out::Frame(
                    routed(&dsr_reply.with_endpoints(node2_np, c5), CLIENT_MAC).build(),
                ),
                verdict: TC_ACT_REDIRECT,
                counter: Some(Counter::DsrReply),
            },
            Case {
                name: "the client's ack with the option: the flow is established here too",
                program: XDP,
                input: learned_ack.build(),
                out: Out::Untouched,
                verdict: XDP_PASS,
                counter: Some(Counter::DsrLearned),
            },
            Case {
                name: "the backend's data gets the service address as its source",
                program: POD_INGRESS,
                input: dsr_data_reply.build(),
                out: Out::Frame(
                    routed(&dsr_data_reply.with_endpoints(node2_np, c5), CLIENT_MAC).build(),
                ),
                verdict: TC_ACT_REDIRECT,
                counter: Some(Counter::DsrReply),
            },
            Case {
                name: "a dsr option naming no frontend here: dropped, nothing learned",
                program: XDP,
                input: forged_anywhere.build(),
                out: Out::Untouched,
                verdict: XDP_DROP,
                counter: Some(Counter::DsrRefused),
            },
            Case {
                name: "a dsr option naming a service the destination is no backend of: dropped",
                program: XDP,
                input: forged_other_service.build(),
                out: Out::Untouched,
                verdict: XDP_DROP,
                counter: Some(Counter::DsrRefused),
            },
            Case {
                name: "the backend's answer to a refused flow keeps its own source",
                program: POD_INGRESS,
                input: forged_reply.build(),
                out: Out::Untouched,
                verdict: TCX_NEXT,
                counter: None,
            },
            Case {
                name: "external traffic policy local without a local endpoint: dropped",
                program: XDP,
                input: from_client(sa(CLIENT, 40006), np_no_local, SYN).build(),
                out: Out::Untouched,
                verdict: XDP_DROP,
                counter: Some(Counter::NoLocalEndpoints),
            },
            Case {
                name: "a nodeport without endpoints: tcp answered with ICMP port unreachable, back out",
                program: XDP,
                input: to_empty.clone(),
                out: Out::Frame(packet::icmp_port_unreachable(&to_empty, *np_empty.ip())),
                verdict: XDP_TX,
                counter: Some(Counter::NoEndpointsExternal),
            },
            Case {
                name: "a udp nodeport without endpoints: answered with ICMP too",
                program: XDP,
                input: to_empty_udp.clone(),
                out: Out::Frame(packet::icmp_port_unreachable(
                    &to_empty_udp,
                    *np_empty_udp.ip(),
                )),
                verdict: XDP_TX,
                counter: Some(Counter::NoEndpointsExternal),
            },
            Case {
                name: "the node's own port (not a nodeport): untouched",
                program: XDP,
                input: from_client(sa(CLIENT, 40008), sa(NODE1, 22), SYN).build(),
                out: Out::Untouched,
                verdict: XDP_PASS,
                counter: None,
            },
            Case {
                name: "a clusterip from outside: not an external frontend, untouched",
                program: XDP,
                input: from_client(sa(CLIENT, 40009), sa([10, 96, 0, 1], 80), SYN).build(),
                out: Out::Untouched,
                verdict: XDP_PASS,
                counter: None,
            },
            Case {
                name: "truncated ipv4 header: untouched, counted",
                program: XDP,
                input: truncated,
                out: Out::Untouched,
                verdict: XDP_PASS,
                counter: Some(Counter::MalformedIp),
            },
        ];
        run_cases_on(&mut dp, cases, Some(ext0));
        Ok(())
    })
    .unwrap();
}

#[test]
fn xdp_snat_ports_never_collide() {
    let ns = fixture_net().unwrap();
    ns.run(|| {
        let ext0 = ifindex("ext0")?;
        let mut dp = fixture::load()?;
        let remote = sa([10, 1, 2, 9], 80);
        let np = sa(NODE1, 30100);
        fixture::program_with_mode(
            &mut dp,
            vec![fixture::node_port(
                "web",
                sa([10, 96, 1, 1], 80),
                np,
                Protocol::Tcp,
                &[remote],
                &[],
            )],
            NodePortMode::Snat,
        )?;
        // A 4-port range: the fifth flow finds no port.
        dp.set_config(&node1_config((62_000, 62_003)))?;
        let mut ports = std::collections::BTreeSet::new();
        for i in 0..4u16 {
            let out = dp.test_run_on(
                XDP,
                &from_client(sa(CLIENT, 41000 + i), np, SYN).build(),
                1,
                Some(ext0),
            )?;
            assert_eq!(out.verdict, XDP_TX);
            let src_port = u16::from_be_bytes([out.frame[34], out.frame[35]]);
            assert_eq!(&out.frame[26..30], &NODE1, "SNATed to the node");
            assert!((62_000..=62_003).contains(&src_port), "{src_port}");
            assert!(ports.insert(src_port), "port {src_port} given twice");
        }
        let out = dp.test_run_on(
            XDP,
            &from_client(sa(CLIENT, 41100), np, SYN).build(),
            1,
            Some(ext0),
        )?;
        assert_eq!(out.verdict, XDP_DROP, "no free port: dropped");
        let exhausted = dp
            .counters()?
            .into_iter()
            .find(|(c, _)| *c == Counter::SnatPortsExhausted)
            .map(|(_, n)| n);
        assert_eq!(exhausted, Some(1));
        Ok(())
    })
    .unwrap();
}

#[test]
fn dsr_option_layout() {
    // The option as documented: type, length, port, address, network order.
    let o = dsr_option(SocketAddrV4::new(Ipv4Addr::new(192, 168, 50, 1), 30080));
    assert_eq!(o, vec![0x9a, 8, 0x75, 0x80, 192, 168, 50, 1]);
}

#[test]
fn tc_ext_ingress_does_the_same_job_and_takes_what_xdp_defers() {
    let ns = fixture_net().unwrap();
    // 10.1.3.0/24 is routed via 192.168.50.3, whose MAC nobody knows yet.
    ns.ip(&[
        "route",
        "add",
        "10.1.3.0/24",
        "via",
        "192.168.50.3",
        "dev",
        "ext0",
    ])
    .unwrap();
    ns.run(|| {
        let ext0 = ifindex("ext0")?;
        let mut dp = fixture::load()?;
        let remote = sa([10, 1, 2, 5], 8080);
        let unresolved = sa([10, 1, 3, 5], 8080);
        let np = sa(NODE1, 30080);
        let np_far = sa(NODE1, 30081);
        fixture::program_with_mode(
            &mut dp,
            vec![
                fixture::node_port("web", sa([10, 96, 0, 1], 80), np, Protocol::Tcp, &[remote], &[]),
                fixture::node_port(
                    "far",
                    sa([10, 96, 0, 2], 80),
                    np_far,
                    Protocol::Tcp,
                    &[unresolved],
                    &[],
                ),
            ],
            NodePortMode::Dsr,
        )?;
        let syn = from_client(sa(CLIENT, 40001), np, SYN);
        let far = from_client(sa(CLIENT, 40002), np_far, SYN);
        let far_out = Frame {
            ip_options: dsr_option(np_far),
            ttl: far.ttl - 1,
            ..far.with_endpoints(far.src, unresolved)
        };
        let cases = vec![
            Case {
                name: "tc: a nodeport syn to a remote backend is sent on (redirect) like xdp sends it",
                program: TC_EXT,
                input: syn.build(),
                out: Out::Frame(
                    Frame {
                        ip_options: dsr_option(np),
                        ..routed(&syn.with_endpoints(syn.src, remote), NODE2_MAC)
                    }
                    .build(),
                ),
                verdict: TC_ACT_REDIRECT,
                counter: Some(Counter::Forwarded),
            },
            Case {
                name: "xdp: next hop without a known MAC: left untouched for tc, nothing recorded",
                program: XDP,
                input: far.build(),
                out: Out::Untouched,
                verdict: XDP_PASS,
                counter: Some(Counter::DeferredToTc),
            },
            Case {
                name: "tc: the same packet is translated and handed to the kernel's neighbour resolution",
                program: TC_EXT,
                input: far.build(),
                out: Out::Frame(far_out.build()),
                verdict: TC_ACT_REDIRECT,
                counter: Some(Counter::Forwarded),
            },
        ];
        run_cases_on(&mut dp, cases, Some(ext0));
        Ok(())
    })
    .unwrap();
}

#[test]
fn load_balancer_source_ranges_allow_and_deny() {
    let ns = fixture_net().unwrap();
    ns.run(|| {
        let ext0 = ifindex("ext0")?;
        let mut dp = fixture::load()?;
        let local = sa([10, 1, 1, 5], 8080);

        let lb_open = sa([192, 168, 60, 1], 80);
        let lb_closed = sa([192, 168, 60, 2], 80);
        let with_lb = |name, lb: SocketAddrV4, ranges: &[&str]| {
            let mut p = fixture::node_port(
                name,
                sa([10, 96, 3, lb.ip().octets()[3]], 80),
                sa(NODE1, 30200 + u16::from(lb.ip().octets()[3])),
                Protocol::Tcp,
                &[local],
                &[local],
            );
            p.frontends.push(proxy_agent::model::Frontend {
                kind: proxy_agent::model::FrontendKind::LoadBalancer,
                address: *lb.ip(),
                port: lb.port(),
            });
            p.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
            p
        };
        fixture::program(
            &mut dp,
            vec![
                with_lb("open", lb_open, &["10.0.0.0/8", "192.168.50.96/28"]),
                with_lb("closed", lb_closed, &["10.0.0.0/8"]),
            ],
        )?;
        let client = sa(CLIENT, 40001);
        let to = |dst| from_client(client, dst, SYN);
        let cases = vec![
            Case {
                name: "LoadBalancer IP, client inside a source range: served",
                program: XDP,
                input: to(lb_open).build(),
                out: Out::Frame(to(lb_open).with_endpoints(client, local).build()),
                verdict: XDP_PASS,
                counter: Some(Counter::NewFlow),
            },
            Case {
                name: "LoadBalancer IP, client outside every source range: dropped",
                program: XDP,
                input: to(lb_closed).build(),
                out: Out::Untouched,
                verdict: XDP_DROP,
                counter: Some(Counter::SourceRangeDenied),
            },
            Case {
                name: "the same Service's NodePort is not restricted (as kube-proxy)",
                program: XDP,
                input: to(sa(NODE1, 30202)).build(),
                out: Out::Frame(to(sa(NODE1, 30202)).with_endpoints(client, local).build()),
                verdict: XDP_PASS,
                counter: Some(Counter::NewFlow),
            },
        ];

        run_cases_on(&mut dp, cases, Some(ext0));
        Ok(())
    })
    .unwrap();
}
