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
    model::{Cidr, Frontend, FrontendKind, NodePortMode, ServicePlan, TableName},
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
/// serves them.
pub fn units(plan: &ServicePlan, mode: NodePortMode) -> Vec<Unit<'_>> {
    let ext_flags = if mode.dsr(plan.id.protocol) {
        SVC_F_DSR
    } else {
        0
    };
    let internal: BTreeMap<ServiceKey, u32> = plan
        .frontends
        .iter()
        .filter(|f| f.kind.is_internal())
        .map(|f| (key(f, plan, scope::INTERNAL), 0))
        .collect();
    // kube-proxy applies loadBalancerSourceRanges to LoadBalancer IPs only.
    let ranges: BTreeSet<Cidr> = plan.source_ranges.iter().copied().collect();
    let external: BTreeMap<ServiceKey, u32> = plan
        .frontends
        .iter()
        .filter(|f| !f.kind.is_internal() && !f.address.is_unspecified())
        .map(|f| {
            let restricted = f.kind == FrontendKind::LoadBalancer && !ranges.is_empty();
            let flags = ext_flags | if restricted { SVC_F_SOURCE_RANGES } else { 0 };
            (key(f, plan, scope::EXTERNAL), flags)
        })
        .collect();
    let restricted = external.values().any(|f| f & SVC_F_SOURCE_RANGES != 0);
    let ranges = if restricted { ranges } else { BTreeSet::new() };
    let unit = |external, backends, table_size, keys, ranges| Unit {
        name: TableName {
            port: plan.id.clone(),
            external,
        },
        plan,
        backends,
        table_size,
        keys,
        ranges,
    };
    if plan.has_external_table() {
        vec![
            unit(
                false,
                &plan.internal_backends[..],
                plan.maglev_table_size,
                internal,
                BTreeSet::new(),
            ),
            unit(
                true,
                &plan.external_backends[..],
                plan.external_maglev_table_size,
                external,
                ranges,
            ),
        ]
    } else {
        let mut keys = internal;
        keys.extend(external);
        vec![unit(
            false,
            &plan.internal_backends[..],
            plan.maglev_table_size,
            keys,
            ranges,
        )]
    }
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
