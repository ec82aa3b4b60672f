//! The selection tables a Service port needs and the frontends that use
//! each: ClusterIPs in the internal scope; NodePorts (on a known address),
//! LoadBalancer IPs and externalIPs in the external scope. One table serves
//! them all, or two when a traffic policy gives external traffic backends of
//! its own.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
};

use proxy_common::{SVC_F_DSR, SVC_F_SOURCE_RANGES, ServiceKey, scope};

use crate::{
    maglev,
    model::{Cidr, Frontend, FrontendKind, NodePortMode, ServicePlan, TableName, TableRole},
};

/// One selection table to program and the frontends that use it.
#[derive(Clone, Debug)]
pub struct Unit<'a> {
    pub name: TableName,
    pub plan: &'a ServicePlan,
    /// Backends eligible for new flows.
    pub backends: &'a [SocketAddrV4],
    /// Maglev table size; `None` without a table.
    pub table_size: Option<u32>,
    /// Frontend keys and their `SVC_F_*` flags.
    pub keys: BTreeMap<ServiceKey, u32>,
    /// Source ranges its LoadBalancer frontends are restricted to (empty: none).
    pub ranges: BTreeSet<Cidr>,
}

fn key(f: &Frontend, plan: &ServicePlan, scope: u8) -> ServiceKey {
    ServiceKey::new(
        SocketAddrV4::new(f.address, f.port),
        plan.id.protocol.number(),
        scope,
    )
}

/// The tables a service port needs and their frontends, as the datapath
/// serves them:
/// - ClusterIPs in the internal scope, with the internal backends;
/// - NodePorts (on a known address), LoadBalancer IPs and externalIPs in the
///   external scope (outside clients), with the external backends;
/// - the same frontends in the internal scope too (pods and host processes
///   reaching them), with the cluster-wide backends.
///
/// A role whose backends equal an earlier role's shares that table.
pub fn units(plan: &ServicePlan, mode: NodePortMode) -> Vec<Unit<'_>> {
    let ext_flags = if mode.dsr(plan.id.protocol) {
        SVC_F_DSR
    } else {
        0
    };
    // kube-proxy applies loadBalancerSourceRanges to LoadBalancer IPs only;
    // an address that is also an externalIP of the port is not restricted:
    // kube-proxy's iptables rules match the externalIP (which has no
    // firewall) before the load balancer IP, so its sources are never
    // checked.
    let ranges: BTreeSet<Cidr> = plan.source_ranges.iter().copied().collect();
    let also_external_ip = |f: &Frontend| {
        plan.frontends.iter().any(|o| {
            o.kind == FrontendKind::ExternalIP && o.address == f.address && o.port == f.port
        })
    };
    let restricted = |f: &Frontend| {
        f.kind == FrontendKind::LoadBalancer && !ranges.is_empty() && !also_external_ip(f)
    };
    let outside = || {
        plan.frontends
            .iter()
            .filter(|f| !f.kind.is_internal() && !f.address.is_unspecified())
    };
    let keys_of = |role: TableRole| -> BTreeMap<ServiceKey, u32> {
        match role {
            TableRole::Internal => plan
                .frontends
                .iter()
                .filter(|f| f.kind.is_internal())
                .map(|f| (key(f, plan, scope::INTERNAL), 0))
                .collect(),
            TableRole::External => outside()
                .map(|f| {
                    let flags = ext_flags
                        | if restricted(f) {
                            SVC_F_SOURCE_RANGES
                        } else {
                            0
                        };
                    (key(f, plan, scope::EXTERNAL), flags)
                })
                .collect(),
            TableRole::Cluster => outside()
                .map(|f| {
                    let flags = if restricted(f) {
                        SVC_F_SOURCE_RANGES
                    } else {
                        0
                    };
                    (key(f, plan, scope::INTERNAL), flags)
                })
                .collect(),
        }
    };
    let mut units: Vec<Unit> = Vec::new();
    for role in TableRole::ALL {
        let keys = keys_of(role);
        if role != TableRole::Internal && keys.is_empty() {
            continue;
        }
        let table = plan.table_for(role);
        match units.iter_mut().find(|u| u.name.role == table) {
            Some(unit) => unit.keys.extend(keys),
            None => units.push(Unit {
                name: TableName {
                    port: plan.id.clone(),
                    role,
                },
                plan,
                backends: plan.backends_of(role),
                table_size: plan.table_size_of(role),
                keys,
                ranges: BTreeSet::new(),
            }),
        }
    }
    for unit in &mut units {
        if unit.keys.values().any(|f| f & SVC_F_SOURCE_RANGES != 0) {
            unit.ranges = ranges.clone();
        }
    }
    units
}

/// Frontend keys of a service port, over all its tables.
pub fn frontend_keys(plan: &ServicePlan, mode: NodePortMode) -> Vec<ServiceKey> {
    units(plan, mode)
        .into_iter()
        .flat_map(|u| u.keys.into_keys())
        .collect()
}

/// Builds a unit's Maglev table from its backends and weights.
pub fn build_entries(unit: &Unit) -> Result<Vec<u16>, maglev::MaglevError> {
    let pairs: Vec<(SocketAddrV4, u32)> = unit
        .backends
        .iter()
        .map(|b| (*b, unit.plan.weight(b)))
        .collect();
    maglev::build(&pairs, unit.table_size.unwrap_or(0))
}
