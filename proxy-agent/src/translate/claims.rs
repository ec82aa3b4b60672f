//! Frontend conflicts: two Service ports wanting one frontend. The first by
//! name wins, as kube-proxy settles them; the loser's frontend is dropped
//! and reported.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use crate::{
    model::{Frontend, Protocol, ServicePlan, ServicePortName},
    store::{ErrorKind, ObjectError, ObjectRef},
};

/// A frontend as two Service ports could collide on it: a `SERVICES` key
/// (internal scope?, address, port, protocol).
pub type FrontendClaim = (bool, Ipv4Addr, u16, Protocol);

/// Which Service port owns each frontend: the first by name wins.
#[derive(Clone, Debug, Default)]
pub struct Claims {
    owners: BTreeMap<FrontendClaim, ServicePortName>,
    /// The same, by owner.
    owned: BTreeMap<ServicePortName, BTreeSet<FrontendClaim>>,
}

/// The keys a frontend takes: a ClusterIP the internal scope; the others
/// the external scope and, as pods and the node reach them too, the
/// internal one.
fn claims_of(f: &Frontend, protocol: Protocol) -> impl Iterator<Item = FrontendClaim> {
    let outside = (!f.kind.is_internal()).then_some((false, f.address, f.port, protocol));
    outside
        .into_iter()
        .chain([(true, f.address, f.port, protocol)])
}

impl Claims {
    /// Claims `plan`'s frontends, dropping (and reporting) those another
    /// Service port that sorts earlier already owns.
    pub fn claim(&mut self, plan: &mut ServicePlan) -> Vec<ObjectError> {
        let id = plan.id.clone();
        let mut errors = Vec::new();
        plan.frontends.retain(|f| {
            let taken = claims_of(f, id.protocol)
                .find_map(|key| self.owners.get(&key).filter(|owner| **owner != id));
            match taken {
                Some(owner) => {
                    errors.push(ObjectError::new(
                        Some(ObjectRef::new("Service", &id.namespace, &id.name)),
                        ErrorKind::FrontendConflict,
                        format!(
                            "{} {}:{}/{} is already used by {owner}; not programmed",
                            f.kind.name(),
                            f.address,
                            f.port,
                            id.protocol
                        ),
                    ));
                    false
                }
                None => {
                    for key in claims_of(f, id.protocol) {
                        self.owners.insert(key, id.clone());
                        self.owned.entry(id.clone()).or_default().insert(key);
                    }
                    true
                }
            }
        });
        errors
    }

    /// Owner of a frontend.
    pub fn owner(&self, key: &FrontendClaim) -> Option<&ServicePortName> {
        self.owners.get(key)
    }

    /// Releases every frontend `id` owns, returning them.
    pub fn release(&mut self, id: &ServicePortName) -> Vec<FrontendClaim> {
        let mine: Vec<FrontendClaim> = self
            .owned
            .remove(id)
            .unwrap_or_default()
            .into_iter()
            .collect();
        for k in &mine {
            self.owners.remove(k);
        }
        mine
    }

    /// Frontend keys of a plan (before claiming).
    pub fn keys_of(plan: &ServicePlan) -> Vec<FrontendClaim> {
        plan.frontends
            .iter()
            .flat_map(|f| claims_of(f, plan.id.protocol))
            .collect()
    }
}
