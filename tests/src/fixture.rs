//! Loading the datapath for BPF_PROG_TEST_RUN fixtures and programming it with
//! the agent's own reconcile and datapath code.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Result, anyhow};
use proxy_agent::{
    datapath::{Datapath, LoadOptions, MapSizes},
    model::{DesiredState, Frontend, FrontendKind, Protocol, ServicePlan, ServicePortName},
    reconcile::{Programmed, Reconciler},
};

/// `TCX_NEXT`: continue, untouched or translated.
pub const TCX_NEXT: i32 = -1;
/// `TCX_DROP`.
pub const TCX_DROP: i32 = 2;
/// `TC_ACT_REDIRECT`.
pub const TC_ACT_REDIRECT: i32 = 7;

/// Loads an unpinned datapath with small maps.
pub fn load() -> Result<Datapath> {
    crate::netns::require_root()?;
    Ok(Datapath::load(&LoadOptions {
        sizes: MapSizes {
            frontends: 1024,
            services: 1024,
            backends: 1024,
            conntrack: 16384,
            selection_blocks: 65_536,
        },
        pin_root: None,
    })?)
}

/// A ClusterIP service port for fixtures: Maglev with the default table size.
pub fn service(
    name: &str,
    frontend: SocketAddrV4,
    protocol: Protocol,
    backends: &[SocketAddrV4],
) -> ServicePlan {
    let mut backends = backends.to_vec();
    backends.sort();
    ServicePlan::new(
        ServicePortName {
            namespace: "fixtures".into(),
            name: name.into(),
            port_name: String::new(),
            protocol,
        },
        vec![Frontend {
            kind: FrontendKind::ClusterIP,
            address: *frontend.ip(),
            port: frontend.port(),
        }],
        backends,
    )
}

/// Programs `services` into `dp` through reconcile, as the agent does.
pub fn program(dp: &mut Datapath, services: Vec<ServicePlan>) -> Result<Programmed> {
    let mut services = services;
    services.sort_by(|a, b| a.id.cmp(&b.id));
    let mut reconciler = Reconciler::new(dp.read_programmed()?, dp.capacity());
    let batch = reconciler.full(&DesiredState { services });
    if !batch.refused.is_empty() {
        return Err(anyhow!("refused: {:?}", batch.refused));
    }
    dp.apply(&batch.ops)
        .map_err(|(i, e)| anyhow!("op {i}: {e}"))?;
    Ok(reconciler.maps().clone())
}

/// Shorthand for an address:port.
pub fn sa(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}
