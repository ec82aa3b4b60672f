//! Reconcile's tests: order, stable ids, capacity, table reuse, names, and
//! incremental plans equal to full ones.

use std::net::Ipv4Addr;

use proxy_common::{BACKEND_F_LOCAL, SVC_F_DSR, SVC_F_SOURCE_RANGES, scope};

use super::*;
use crate::model::{Frontend, FrontendKind, Protocol, TableRole};

const CAP: Capacity = Capacity {
    frontends: 100,
    services: 100,
    backends: 100,
    ranges: 100,
    blocks: 100_000,
};

fn svc(name: &str, vip: [u8; 4], backends: &[&str]) -> ServicePlan {
    ServicePlan::new(
        ServicePortName {
            namespace: "ns".into(),
            name: name.into(),
            port_name: String::new(),
            protocol: Protocol::Tcp,
        },
        vec![Frontend {
            kind: FrontendKind::ClusterIP,
            address: Ipv4Addr::from(vip),
            port: 80,
        }],
        backends.iter().map(|b| b.parse().unwrap()).collect(),
    )
}

fn state(services: Vec<ServicePlan>) -> DesiredState {
    let mut services = services;
    services.sort_by(|a, b| a.id.cmp(&b.id));
    DesiredState { services }
}

/// Applies ops to a model of the maps, checking at every step that each
/// visible frontend has a complete table whose backends all exist.
fn apply(model: Programmed, ops: &[Op]) -> Programmed {
    model.apply(ops).unwrap()
}

/// What a client sees: frontend → (backend addresses, slot owners), ids resolved.
fn resolved(maps: &Programmed) -> BTreeMap<ServiceKey, (Vec<SocketAddrV4>, Vec<SocketAddrV4>)> {
    maps.services
        .iter()
        .map(|(k, v)| {
            let t = &maps.tables[&v.svc_id];
            let addr = |id: &u32| maps.backends[id].addr();
            let list: Vec<SocketAddrV4> = t.backends.iter().map(addr).collect();
            let slots = t.entries.iter().map(|e| list[usize::from(*e)]).collect();
            (*k, (list, slots))
        })
        .collect()
}

#[test]
fn converges_in_safe_order_and_is_idempotent() {
    let steps = [
        state(vec![svc(
            "a",
            [10, 96, 0, 1],
            &["10.0.0.1:80", "10.0.0.2:80"],
        )]),
        state(vec![
            svc("a", [10, 96, 0, 1], &["10.0.0.2:80", "10.0.0.3:80"]),
            svc("b", [10, 96, 0, 2], &["10.0.0.2:80"]),
        ]),
        state(vec![svc("b", [10, 96, 0, 2], &[])]),
        state(vec![]),
    ];
    let mut r = Reconciler::new(Programmed::default(), CAP);
    let mut maps = Programmed::default();
    for desired in &steps {
        let batch = r.full(desired);
        assert!(batch.refused.is_empty());
        maps = apply(maps, &batch.ops);
        assert_eq!(&maps, r.maps());
        assert_eq!(r.full(desired).ops, vec![], "nothing left to do");
        for s in &desired.services {
            let v = maps.services[&frontend_keys(s, NodePortMode::Snat)[0]];
            let got: Vec<SocketAddrV4> = maps.tables[&v.svc_id]
                .backends
                .iter()
                .map(|id| maps.backends[id].addr())
                .collect();
            assert_eq!(got, s.internal_backends);
        }
    }
    assert_eq!(maps, Programmed::default());
}

/// `web` with a NodePort on 192.168.1.10 (and one on an unknown node
/// address), backends .1 (local) and .2; `local_policy` narrows external
/// traffic to the local one.
fn node_port(local_policy: bool) -> ServicePlan {
    let mut p = svc("web", [10, 96, 0, 1], &["10.0.0.1:80", "10.0.0.2:80"]);
    for address in [Ipv4Addr::new(192, 168, 1, 10), Ipv4Addr::UNSPECIFIED] {
        p.frontends.push(Frontend {
            kind: FrontendKind::NodePort,
            address,
            port: 30080,
        });
    }
    p.local_backends = vec!["10.0.0.1:80".parse().unwrap()];
    p.external_backends = if local_policy {
        p.local_backends.clone()
    } else {
        p.internal_backends.clone()
    };
    p.external_maglev_table_size = local_policy.then_some(101);
    // From inside the node, the NodePort reaches every endpoint.
    p.cluster_backends = p.internal_backends.clone();
    p
}

#[test]
fn external_frontends_share_or_get_their_own_table() {
    let nodeport_key = ServiceKey::new(
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 10), 30080),
        proxy_common::proto::TCP,
        scope::EXTERNAL,
    );
    for (mode, flags) in [(NodePortMode::Snat, 0), (NodePortMode::Dsr, SVC_F_DSR)] {
        // Same backends: one table for every frontend.
        let mut r = Reconciler::new(Programmed::default(), CAP).with_mode(mode);
        let maps = apply(
            Programmed::default(),
            &r.full(&state(vec![node_port(false)])).ops,
        );
        assert_eq!(
            maps.services.len(),
            3,
            "ClusterIP, NodePort from outside and from inside; the unknown address is skipped"
        );
        assert_eq!(maps.tables.len(), 1);
        let inside_key = ServiceKey {
            scope: scope::INTERNAL,
            ..nodeport_key
        };
        assert_eq!(maps.services[&inside_key].flags, 0, "no DSR from inside");
        let v = maps.services[&nodeport_key];
        assert_eq!(v.flags, flags, "{mode:?}");
        let locals: Vec<bool> = maps
            .backends
            .values()
            .map(|b| b.flags & BACKEND_F_LOCAL != 0)
            .collect();
        assert_eq!(locals, [true, false]);

        // externalTrafficPolicy Local: an external table of its own, with
        // the local backend only; the ClusterIP keeps its table and id.
        let cluster_key = frontend_keys(&node_port(false), mode)[0];
        let cluster_id = maps.services[&cluster_key].svc_id;
        let maps = apply(maps, &r.full(&state(vec![node_port(true)])).ops);
        assert_eq!(maps.tables.len(), 2);
        assert_eq!(maps.services[&cluster_key].svc_id, cluster_id);
        let ext = maps.services[&nodeport_key];
        assert_ne!(ext.svc_id, cluster_id);
        assert_eq!(ext.flags, flags);
        let ext_table = &maps.tables[&ext.svc_id];
        assert_eq!(ext_table.backends.len(), 1);
        assert_eq!(ext_table.table_size, 101);
        assert_eq!(maps.tables[&cluster_id].backends.len(), 2);
        assert_eq!(
            maps.services[&inside_key].svc_id, cluster_id,
            "from inside, the cluster-wide endpoints (the ClusterIP's table)"
        );
        assert_eq!(
            r.table_id(&node_port(true).id, TableRole::External),
            Some(ext.svc_id)
        );

        // And back: the external table goes, its frontend rejoins.
        let maps = apply(maps, &r.full(&state(vec![node_port(false)])).ops);
        assert_eq!(maps.tables.len(), 1);
        assert_eq!(maps.services[&nodeport_key].svc_id, cluster_id);
        assert_eq!(r.full(&state(vec![node_port(false)])).ops, vec![]);
    }
}

#[test]
fn both_policies_local_give_inside_clients_a_cluster_table() {
    let inside_key = ServiceKey::new(
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 10), 30080),
        proxy_common::proto::TCP,
        scope::INTERNAL,
    );
    let mut p = node_port(true);
    p.internal_backends = p.local_backends.clone();
    p.maglev_table_size = Some(101);
    p.external_maglev_table_size = None;
    p.cluster_maglev_table_size = Some(211);
    let mut r = Reconciler::new(Programmed::default(), CAP);
    let maps = apply(Programmed::default(), &r.full(&state(vec![p.clone()])).ops);
    assert_eq!(
        maps.tables.len(),
        2,
        "local (ClusterIP, NodePort from outside), cluster"
    );
    let cluster = r.table_id(&p.id, TableRole::Cluster).unwrap();
    assert_eq!(maps.services[&inside_key].svc_id, cluster);
    assert_eq!(maps.tables[&cluster].backends.len(), 2);
    assert_eq!(maps.tables[&cluster].table_size, 211);
    assert_eq!(
        maps.names[&cluster].to_string(),
        "ns/web:/TCP cluster",
        "named for inspection"
    );
    assert_eq!(r.table_id(&p.id, TableRole::External), None, "shared");
}

#[test]
fn an_address_both_load_balancer_ip_and_external_ip_is_not_restricted() {
    let shared = Ipv4Addr::new(192, 168, 60, 9);
    let mut p = node_port(false);
    // The load balancer IP last: the rule holds whatever the order.
    for kind in [FrontendKind::ExternalIP, FrontendKind::LoadBalancer] {
        p.frontends.push(Frontend {
            kind,
            address: shared,
            port: 80,
        });
    }
    p.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
    let mut r = Reconciler::new(Programmed::default(), CAP);
    let maps = apply(Programmed::default(), &r.full(&state(vec![p])).ops);
    for scope in [scope::EXTERNAL, scope::INTERNAL] {
        let key = ServiceKey::new(
            SocketAddrV4::new(shared, 80),
            proxy_common::proto::TCP,
            scope,
        );
        assert_eq!(
            maps.services[&key].flags & SVC_F_SOURCE_RANGES,
            0,
            "kube-proxy's externalIP rule matches first: no source check"
        );
    }
}

#[test]
fn source_ranges_restrict_load_balancer_frontends_only() {
    let lb_key = ServiceKey::new(
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 60, 1), 80),
        proxy_common::proto::TCP,
        scope::EXTERNAL,
    );
    let with_ranges = |ranges: &[&str]| {
        let mut p = node_port(false);
        p.frontends.push(Frontend {
            kind: FrontendKind::LoadBalancer,
            address: Ipv4Addr::new(192, 168, 60, 1),
            port: 80,
        });
        p.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
        p
    };
    let mut r = Reconciler::new(Programmed::default(), CAP);
    let ops = r
        .full(&state(vec![with_ranges(&[
            "10.0.0.0/8",
            "192.168.50.0/24",
        ])]))
        .ops;
    let maps = apply(Programmed::default(), &ops);
    let id = maps.services[&lb_key].svc_id;
    assert_eq!(maps.services[&lb_key].flags, SVC_F_SOURCE_RANGES);
    let lb_inside = ServiceKey {
        scope: scope::INTERNAL,
        ..lb_key
    };
    assert_eq!(
        maps.services[&lb_inside].flags, SVC_F_SOURCE_RANGES,
        "from inside too, as kube-proxy filters every source"
    );
    assert!(
        maps.services
            .iter()
            .filter(|(k, _)| k.addr_be != lb_key.addr_be)
            .all(|(_, v)| v.flags & SVC_F_SOURCE_RANGES == 0),
        "NodePort and ClusterIP stay open"
    );
    assert_eq!(maps.ranges[&id].len(), 2);
    let pos = |ops: &[Op], f: fn(&Op) -> bool| ops.iter().position(f).unwrap();
    assert!(
        pos(&ops, |o| matches!(o, Op::SetRanges(..)))
            < pos(&ops, |o| matches!(o, Op::SetService(..))),
        "ranges exist before a frontend needs them: {ops:?}"
    );

    // Narrowed: the new range added, the old one removed after.
    let ops = r.full(&state(vec![with_ranges(&["192.168.50.0/24"])])).ops;
    assert_eq!(
        ops,
        vec![Op::SetRanges(
            id,
            vec![],
            vec!["10.0.0.0/8".parse().unwrap()]
        )]
    );
    let maps = apply(maps, &ops);
    // No ranges any more: the flag goes first, then the ranges.
    let ops = r.full(&state(vec![with_ranges(&[])])).ops;
    assert!(
        pos(&ops, |o| matches!(o, Op::SetService(..)))
            < pos(&ops, |o| matches!(o, Op::SetRanges(..))),
        "{ops:?}"
    );
    let maps = apply(maps, &ops);
    assert!(maps.ranges.is_empty());
    assert_eq!(maps.services[&lb_key].flags, 0);

    // Capacity: a Service whose ranges do not fit is refused whole.
    let mut small = Reconciler::new(Programmed::default(), Capacity { ranges: 1, ..CAP });
    let batch = small.full(&state(vec![with_ranges(&[
        "10.0.0.0/8",
        "192.168.50.0/24",
    ])]));
    assert!(
        batch.refused[0]
            .1
            .to_string()
            .contains("SOURCE_RANGES map full")
    );
    assert!(small.maps().services.is_empty());
}

#[test]
fn ids_are_stable_and_backends_shared() {
    let mut r = Reconciler::new(Programmed::default(), CAP);
    let one = state(vec![svc("a", [10, 96, 0, 1], &["10.0.0.1:80"])]);
    let maps = apply(Programmed::default(), &r.full(&one).ops);
    let two = state(vec![
        svc("a", [10, 96, 0, 1], &["10.0.0.1:80", "10.0.0.2:80"]),
        svc("b", [10, 96, 0, 2], &["10.0.0.1:80"]),
    ]);
    let ops = r.full(&two).ops;
    let key_a = frontend_keys(&two.services[0], NodePortMode::Snat)[0];
    assert_eq!(
        r.maps().services[&key_a],
        maps.services[&key_a],
        "svc id kept"
    );
    assert_eq!(
        r.maps().backends.len(),
        2,
        "10.0.0.1:80 shared, one new backend"
    );
    assert!(
        !ops.iter()
            .any(|o| matches!(o, Op::DelTable(_) | Op::DelService(_)))
    );
    // A restarted agent (reconciler rebuilt from the maps) keeps every id.
    let maps = apply(maps, &ops);
    let mut again = Reconciler::new(maps.clone(), CAP);
    assert_eq!(again.full(&two).ops, vec![]);
}

#[test]
fn stray_backends_are_deleted_and_referenced_ids_kept() {
    let mut r = Reconciler::new(Programmed::default(), CAP);
    let desired = state(vec![svc("a", [10, 96, 0, 1], &["10.0.0.1:80"])]);
    let mut maps = apply(Programmed::default(), &r.full(&desired).ops);
    let (id, b) = maps.backends.iter().map(|(i, b)| (*i, *b)).next().unwrap();
    // Left by interrupted applies: one unrelated, one with the same address.
    maps.backends
        .insert(50, Backend::new("10.0.0.9:80".parse().unwrap(), false));
    maps.backends.insert(60, b);
    let mut again = Reconciler::new(maps.clone(), CAP);
    let batch = again.full(&desired);
    // Only the unrelated address is gone; the duplicate's address lives on.
    assert_eq!(batch.gone, BTreeSet::from(["10.0.0.9:80".parse().unwrap()]));
    let ops = batch.ops;
    assert_eq!(ops, vec![Op::DelBackend(50), Op::DelBackend(60)]);
    assert!(
        again.full(&desired).ops.is_empty(),
        "the kept id still maps its address"
    );
    // A backend no slice lists any more is gone; one turning inactive is not.
    let mut inactive = desired.clone();
    inactive.services[0].internal_backends.clear();
    inactive.services[0].inactive_backends = vec!["10.0.0.1:80".parse().unwrap()];
    let batch = again.full(&inactive);
    assert!(batch.gone.is_empty(), "{:?}", batch.ops);
    let mut removed = inactive.clone();
    removed.services[0].inactive_backends.clear();
    let batch = again.full(&removed);
    assert_eq!(batch.gone, BTreeSet::from(["10.0.0.1:80".parse().unwrap()]));
    let maps = apply(maps, &ops);
    assert_eq!(maps.backends.keys().copied().collect::<Vec<_>>(), vec![id]);
}

#[test]
fn full_maps_refuse_whole_services_and_keep_old_state() {
    let cap = Capacity {
        backends: 4, // ids 1..=3
        ..CAP
    };
    let mut r = Reconciler::new(Programmed::default(), cap);
    let first = state(vec![svc(
        "a",
        [10, 96, 0, 1],
        &["10.0.0.1:80", "10.0.0.2:80"],
    )]);
    let maps = apply(Programmed::default(), &r.full(&first).ops);
    // a wants two more backends: only one id is left, so a is refused as a
    // whole and keeps its old table; b fits.
    let second = state(vec![
        svc(
            "a",
            [10, 96, 0, 1],
            &["10.0.0.1:80", "10.0.0.3:80", "10.0.0.4:80"],
        ),
        svc("b", [10, 96, 0, 2], &["10.0.0.2:80"]),
    ]);
    let batch = r.full(&second);
    assert_eq!(batch.refused.len(), 1);
    assert_eq!(batch.refused[0].0.name, "a");
    assert!(batch.refused[0].1.to_string().contains("BACKENDS map full"));
    let maps2 = apply(maps.clone(), &batch.ops);
    assert_eq!(&maps2, r.maps());
    let key_a = frontend_keys(&second.services[0], NodePortMode::Snat)[0];
    let id_a = maps2.services[&key_a].svc_id;
    assert_eq!(maps2.tables[&id_a], maps.tables[&id_a]);
    assert_eq!(maps2.services.len(), 2);

    let mut r = Reconciler::new(
        Programmed::default(),
        Capacity {
            frontends: 1,
            ..CAP
        },
    );
    let batch = r.full(&state(vec![
        svc("a", [10, 96, 0, 1], &[]),
        svc("b", [10, 96, 0, 2], &[]),
    ]));
    assert_eq!(r.maps().services.len(), 1);
    assert!(batch.refused[0].1.to_string().contains("SERVICES map full"));
}

#[test]
fn frontends_go_first_tables_after_and_ids_wait_a_batch() {
    let mut r = Reconciler::new(Programmed::default(), CAP);
    let a = state(vec![svc("a", [10, 96, 0, 1], &["10.0.0.1:80"])]);
    let maps = apply(Programmed::default(), &r.full(&a).ops);
    let b = state(vec![svc("b", [10, 96, 0, 2], &["10.0.0.9:80"])]);
    let ops = r.full(&b).ops;
    let first_set = ops
        .iter()
        .position(|o| matches!(o, Op::SetBackend(..) | Op::SetTable { .. }))
        .unwrap();
    let last_del = ops
        .iter()
        .rposition(|o| matches!(o, Op::DelService(_)))
        .unwrap();
    assert!(last_del < first_set, "{ops:?}");
    let last_frontend = ops
        .iter()
        .rposition(|o| matches!(o, Op::SetService(..)))
        .unwrap();
    let del_table = ops
        .iter()
        .position(|o| matches!(o, Op::DelTable(_)))
        .unwrap();
    assert!(last_frontend < del_table, "{ops:?}");
    assert!(matches!(ops.last(), Some(Op::DelBackend(_))));
    let new_id = ops.iter().find_map(|o| match o {
        Op::SetTable { svc_id, .. } => Some(*svc_id),
        _ => None,
    });
    assert_ne!(
        new_id,
        Some(1),
        "a removed table's id is not reused in the same batch"
    );
    let _ = apply(maps, &ops);
}

#[test]
fn unchanged_maglev_tables_are_reused_and_changed_ones_rebuilt() {
    let mut r = Reconciler::new(Programmed::default(), CAP);
    let one = state(vec![svc(
        "a",
        [10, 96, 0, 1],
        &["10.0.0.1:80", "10.0.0.2:80"],
    )]);
    r.full(&one);
    let t = r.maps().tables.values().next().unwrap().clone();
    assert_eq!(t.table_size, 211, "smallest prime >= 100 x 2 backends");
    assert_eq!(t.entries.len(), 211);
    assert_eq!(r.full(&one).ops, vec![], "nothing rebuilt");
    let mut weighted = one.clone();
    weighted.services[0]
        .backend_weights
        .insert("10.0.0.2:80".parse().unwrap(), 3);
    let ops = r.full(&weighted).ops;
    let Some(Op::SetTable { table: new, .. }) =
        ops.iter().find(|o| matches!(o, Op::SetTable { .. }))
    else {
        panic!("weight change must rebuild the table: {ops:?}");
    };
    let heavy = new.entries.iter().filter(|e| **e == 1).count();
    assert!(
        (156..=160).contains(&heavy),
        "weight 3 of 4 gets 3/4 of 211 slots: {heavy}"
    );
}

#[test]
fn draining_backends_stay_programmed_but_out_of_the_table() {
    let mut s = svc("a", [10, 96, 0, 1], &["10.0.0.1:80"]);
    s.draining_backends = vec!["10.0.0.2:80".parse().unwrap()];
    let mut r = Reconciler::new(Programmed::default(), CAP);
    r.full(&state(vec![s]));
    let t = r.maps().tables.values().next().unwrap();
    assert_eq!(t.backends.len(), 1);
    assert_eq!(t.draining.len(), 1);
    assert!(t.entries.iter().all(|e| *e == 0));
    assert_eq!(
        r.maps().backends.len(),
        2,
        "the draining backend keeps its id"
    );
}

#[test]
fn empty_tables_drop_or_reject() {
    let mut none = svc("a", [10, 96, 0, 1], &[]);
    let mut r = Reconciler::new(Programmed::default(), CAP);
    r.full(&state(vec![none.clone()]));
    assert!(
        !r.maps().tables.values().next().unwrap().drop_when_empty,
        "no endpoints: reject"
    );
    none.has_endpoints = true;
    r.full(&state(vec![none]));
    assert!(
        r.maps().tables.values().next().unwrap().drop_when_empty,
        "endpoints elsewhere: drop"
    );
}

/// xorshift32 for reproducible random change sequences.
struct Rng(u32);
impl Rng {
    fn next(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0 % n
    }
}

#[test]
fn incremental_changes_match_a_full_plan() {
    let mut rng = Rng(0x9e37_79b9);
    let mut desired: BTreeMap<ServicePortName, ServicePlan> = BTreeMap::new();
    let mut r = Reconciler::new(Programmed::default(), CAP);
    let mut maps = Programmed::default();
    for step in 0..300 {
        let mut changes = BTreeMap::new();
        for _ in 0..=rng.next(3) {
            let i = rng.next(12) as u8;
            let name = format!("s{i}");
            let change = if rng.next(5) == 0 {
                None
            } else {
                let n = rng.next(6);
                let backends: Vec<String> = (0..n)
                    .map(|_| format!("10.0.{}.{}:80", rng.next(3), rng.next(8)))
                    .collect();
                let mut backends: Vec<&str> = backends.iter().map(String::as_str).collect();
                backends.sort();
                backends.dedup();
                let mut plan = svc(&name, [10, 96, 1, i], &backends);
                if rng.next(4) == 0 && !plan.internal_backends.is_empty() {
                    let b = plan.internal_backends[0];
                    plan.backend_weights.insert(b, 1 + rng.next(4));
                }
                Some(plan)
            };
            let key = svc(&name, [0; 4], &[]).id;
            match &change {
                Some(p) => desired.insert(key.clone(), p.clone()),
                None => desired.remove(&key),
            };
            changes.insert(key, change);
        }
        let batch = r.changes(&changes);
        assert!(batch.refused.is_empty(), "step {step}: {:?}", batch.refused);
        maps = apply(maps, &batch.ops);
        assert_eq!(&maps, r.maps(), "step {step}: mirror and maps agree");
        // A reconciler built from scratch sees nothing to do, and a full
        // plan from empty maps gives clients the same view.
        let everything = DesiredState {
            services: desired.values().cloned().collect(),
        };
        let mut rebuilt = Reconciler::new(maps.clone(), CAP);
        assert_eq!(rebuilt.full(&everything).ops, vec![], "step {step}");
        let mut fresh = Reconciler::new(Programmed::default(), CAP);
        fresh.full(&everything);
        assert_eq!(resolved(fresh.maps()), resolved(&maps), "step {step}");
    }
}

#[test]
fn selection_blocks_are_planned_and_a_table_that_does_not_fit_is_refused_up_front() {
    // Two backends with the default Maglev size (211) take 1 + 1 + 1 + 7 = 10 blocks.
    let two = |name: &str, vip: u8| {
        svc(
            name,
            [10, 96, 0, vip],
            &[&format!("10.0.{vip}.1:80"), &format!("10.0.{vip}.2:80")],
        )
    };
    let cap = Capacity {
        blocks: 1 + 25,
        ..CAP
    };
    let mut r = Reconciler::new(Programmed::default(), cap);
    let first = r.full(&state(vec![two("a", 1), two("b", 2)]));
    assert!(first.refused.is_empty(), "{:?}", first.refused);
    let maps = apply(Programmed::default(), &first.ops);
    let regions: Vec<u32> = maps.regions.values().copied().collect();
    assert_eq!(regions, [1, 11], "first fit, block 0 never used");
    assert_eq!(r.selection_usage(), (20, 26));
    r.applied(Instant::now());

    // c does not fit (5 blocks left): refused whole, no operation touches it,
    // and a and b are untouched.
    let batch = r.full(&state(vec![two("a", 1), two("b", 2), two("c", 3)]));
    assert_eq!(batch.refused.len(), 1);
    assert_eq!(batch.refused[0].0.name, "c");
    assert!(
        batch.refused[0]
            .1
            .to_string()
            .contains("SELECTION map full"),
        "{}",
        batch.refused[0].1
    );
    assert_eq!(batch.ops, vec![], "nothing written for a refused Service");
    assert_eq!(r.maps(), &maps);

    // b goes: its blocks are not reused by the batch that frees them (a
    // packet may still read them until the batch has run).
    let batch = r.full(&state(vec![two("a", 1), two("c", 3)]));
    assert_eq!(batch.refused.len(), 1, "{:?}", batch.ops);
    let maps = apply(maps, &batch.ops);
    assert_eq!(maps.tables.len(), 1);
    r.applied(Instant::now());

    // Next time c fits in b's blocks, by waiting for their quarantine to end.
    let batch = r.full(&state(vec![two("a", 1), two("c", 3)]));
    assert!(batch.refused.is_empty(), "{:?}", batch.refused);
    let wait = batch.tables_not_before.expect("reuses quarantined blocks");
    assert!(wait > Instant::now() && wait <= Instant::now() + QUARANTINE);
    let maps = apply(maps, &batch.ops);
    assert_eq!(maps.regions[&r.svc_id(&two("c", 3).id).unwrap()], 11);
    r.applied(Instant::now() + QUARANTINE);

    // c goes; a reconciler rebuilt from the maps read back right after (as
    // after a failed apply) still keeps c's blocks in quarantine.
    let batch = r.full(&state(vec![two("a", 1)]));
    let maps = apply(maps, &batch.ops);
    r.applied(Instant::now());
    let with_d = state(vec![two("a", 1), two("d", 4)]);
    let batch = r.rebuild(maps.clone()).full(&with_d);
    assert!(batch.refused.is_empty(), "{:?}", batch.refused);
    assert!(batch.tables_not_before.is_some(), "d waits for c's blocks");
    let unaware = Reconciler::new(maps, cap).full(&with_d);
    assert!(
        unaware.tables_not_before.is_none(),
        "what carrying prevents"
    );
}

#[test]
fn names_follow_tables() {
    let mut r = Reconciler::new(Programmed::default(), CAP);
    let a = svc("a", [10, 96, 0, 1], &["10.0.0.1:80"]);
    let batch = r.full(&state(vec![a.clone()]));
    let maps = apply(Programmed::default(), &batch.ops);
    let id = r.svc_id(&a.id).unwrap();
    let name = TableName {
        port: a.id.clone(),
        role: TableRole::Internal,
    };
    assert_eq!(maps.names, BTreeMap::from([(id, name.clone())]));
    let set_name = batch
        .ops
        .iter()
        .position(|o| matches!(o, Op::SetName(..)))
        .unwrap();
    let set_service = batch
        .ops
        .iter()
        .position(|o| matches!(o, Op::SetService(..)))
        .unwrap();
    assert!(set_service < set_name, "{:?}", batch.ops);

    // A restarted agent reads the names back: nothing to do. One that lost
    // them (or finds a stale one) repairs them.
    let mut again = Reconciler::new(maps.clone(), CAP);
    assert_eq!(again.full(&state(vec![a.clone()])).ops, vec![]);
    let mut damaged = maps.clone();
    damaged.names.clear();
    damaged.names.insert(99, name.clone());
    let ops = Reconciler::new(damaged, CAP).full(&state(vec![a])).ops;
    assert_eq!(ops, vec![Op::SetName(id, name), Op::DelName(99)]);

    // The Service goes: its name goes with its table.
    let ops = r.full(&state(vec![])).ops;
    let maps = apply(maps, &ops);
    assert!(maps.names.is_empty());
    let del_table = ops
        .iter()
        .position(|o| matches!(o, Op::DelTable(_)))
        .unwrap();
    let del_name = ops
        .iter()
        .position(|o| matches!(o, Op::DelName(_)))
        .unwrap();
    assert!(del_table < del_name, "{ops:?}");
}
