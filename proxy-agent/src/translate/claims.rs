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

/// A frontend as two Service ports could collide on it.
pub type FrontendClaim = (bool, Ipv4Addr, u16, Protocol);

/// Which Service port owns each frontend: the first by name wins.
#[derive(Clone, Debug, Default)]
pub struct Claims {
    owners: BTreeMap<FrontendClaim, ServicePortName>,
    /// The same, by owner.
    owned: BTreeMap<ServicePortName, BTreeSet<FrontendClaim>>,
}

fn claim_of(f: &Frontend, protocol: Protocol) -> FrontendClaim {
    (f.kind.is_internal(), f.address, f.port, protocol)
}

impl Claims {
    /// Claims `plan`'s frontends, dropping (and reporting) those another
    /// Service port that sorts earlier already owns.
    pub fn claim(&mut self, plan: &mut ServicePlan) -> Vec<ObjectError> {
        let id = plan.id.clone();
        let mut errors = Vec::new();
        plan.frontends.retain(|f| {
            let key = claim_of(f, id.protocol);
            match self.owners.get(&key) {
                Some(owner) if *owner != id => {
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
                _ => {
                    self.owners.insert(key, id.clone());
                    self.owned.entry(id.clone()).or_default().insert(key);
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
            .map(|f| claim_of(f, plan.id.protocol))
            .collect()
    }
}
