//! Incremental translation: the store plus per-Service translations, updated
//! for the Services a change touched only.
//!
//! Frontend conflicts (two Service ports on one frontend) are settled by name,
//! as the full [`translate`](crate::translate::translate) does. Claims are kept
//! incrementally; a change that involves a contested frontend falls back to
//! settling every claim again (conflicts are misconfigurations, hence rare),
//! so the result is always what a full translation of the store gives.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use crate::{
    model::{DesiredState, ServicePlan, ServicePortName},
    store::{Dirty, ErrorKind, Key, ObjectError, ObjectRef, Store},
    translate::{
        Claims, FrontendClaim, NodeContext, ServiceTranslation, TranslateOptions, orphaned_message,
        slice_errors, translate_service,
    },
};

/// What one update changed.
#[derive(Clone, Debug, Default)]
pub struct Update {
    /// New state of each changed service port (`None`: gone).
    pub changes: BTreeMap<ServicePortName, Option<ServicePlan>>,
    /// Problems that appeared with this update (already reported ones are not repeated).
    pub new_errors: Vec<ObjectError>,
    /// Every problem known now.
    pub error_count: usize,
}

/// The store and its translation, kept up to date incrementally.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    pub store: Store,
    opts: TranslateOptions,
    node: NodeContext,
    raw: BTreeMap<Key, ServiceTranslation>,
    claims: Claims,
    /// Frontends two service ports wanted at the last full settlement.
    contested: BTreeSet<FrontendClaim>,
    claim_errors: Vec<ObjectError>,
    desired: BTreeMap<ServicePortName, ServicePlan>,
    /// Problems reported so far, by the Service they belong to (errors not tied
    /// to one Service, such as frontend conflicts, under the empty key).
    reported: BTreeMap<Key, Vec<ObjectError>>,
    /// Service ports with a Local policy and no endpoint here (internal,
    /// external), kept in step with each change.
    no_local: BTreeMap<ServicePortName, (bool, bool)>,
}

/// Whether a plan has endpoints, but none here for its internal and its
/// external traffic (a Local traffic policy).
fn no_local_of(p: &ServicePlan) -> (bool, bool) {
    if !p.has_endpoints {
        return (false, false);
    }
    let external = p.frontends.iter().any(|f| !f.kind.is_internal());
    (
        p.internal_backends.is_empty(),
        external && p.external_backends.is_empty(),
    )
}

fn ports_of(desired: &BTreeMap<ServicePortName, ServicePlan>, key: &Key) -> Vec<ServicePortName> {
    desired
        .range(
            ServicePortName {
                namespace: key.0.clone(),
                name: key.1.clone(),
                port_name: String::new(),
                protocol: crate::model::Protocol::Tcp,
            }..,
        )
        .take_while(|(id, _)| id.namespace == key.0 && id.name == key.1)
        .map(|(id, _)| id.clone())
        .collect()
}

impl Engine {
    pub fn new(opts: TranslateOptions) -> Self {
        Self {
            opts,
            ..Self::default()
        }
    }

    /// An address this node's NodePorts are keyed at, if any is known.
    pub fn nodeport_address(&self) -> Option<Ipv4Addr> {
        self.node
            .nodeport_addresses(&self.opts.nodeport_cidrs)
            .into_iter()
            .find(|a| !a.is_unspecified())
    }

    /// Service ports with a Local traffic policy and no endpoint on this
    /// node while they have endpoints elsewhere (kube-proxy's
    /// `sync_proxy_rules_no_local_endpoints_total`): (internal, external).
    pub fn no_local_endpoints(&self) -> (usize, usize) {
        self.no_local.values().fold((0, 0), |(i, e), (li, le)| {
            (i + usize::from(*li), e + usize::from(*le))
        })
    }

    /// The whole desired state, sorted.
    pub fn desired(&self) -> DesiredState {
        DesiredState {
            services: self.desired.values().cloned().collect(),
        }
    }

    /// Re-translates what `dirty` names and reports the changes.
    pub fn update(&mut self, dirty: &Dirty) -> Update {
        let affected: BTreeSet<Key> = if dirty.all {
            self.node = NodeContext::from_store(&self.store, &self.opts.node_name);
            self.raw
                .keys()
                .chain(self.store.services.keys())
                .cloned()
                .collect()
        } else {
            dirty.services.clone()
        };
        for key in &affected {
            let t = translate_service(&self.store, key, &self.node, &self.opts);
            if t == ServiceTranslation::default() {
                self.raw.remove(key);
            } else {
                self.raw.insert(key.clone(), t);
            }
        }

        let before: BTreeMap<ServicePortName, ServicePlan> = if dirty.all {
            std::mem::take(&mut self.desired)
        } else {
            let ids: Vec<ServicePortName> = affected
                .iter()
                .flat_map(|k| ports_of(&self.desired, k))
                .collect();
            ids.into_iter()
                .filter_map(|id| self.desired.remove(&id).map(|p| (id, p)))
                .collect()
        };
        let settled = !dirty.all && self.claim_incrementally(&affected, &before);
        let global = !settled;
        if !settled {
            // Put back what was taken out, then settle every claim again.
            self.desired.extend(before.clone());
            self.settle_all();
        }

        let mut changes = BTreeMap::new();
        let names: BTreeSet<ServicePortName> = if settled {
            before
                .keys()
                .cloned()
                .chain(affected.iter().flat_map(|k| ports_of(&self.desired, k)))
                .collect()
        } else {
            before.keys().chain(self.desired.keys()).cloned().collect()
        };
        for id in names {
            let now = self.desired.get(&id);
            if now != before.get(&id) {
                match now.map(no_local_of) {
                    Some(n) if n != (false, false) => self.no_local.insert(id.clone(), n),
                    _ => self.no_local.remove(&id),
                };
                changes.insert(id, now.cloned());
            }
        }
        self.report(changes, &affected, global)
    }

    /// Claims the affected Services' frontends; false when a contested
    /// frontend is involved and every claim must be settled again.
    fn claim_incrementally(
        &mut self,
        affected: &BTreeSet<Key>,
        before: &BTreeMap<ServicePortName, ServicePlan>,
    ) -> bool {
        for id in before.keys() {
            for key in self.claims.release(id) {
                if self.contested.contains(&key) {
                    return false;
                }
            }
        }
        let mut plans: Vec<ServicePlan> = affected
            .iter()
            .filter_map(|k| self.raw.get(k))
            .flat_map(|t| t.plans.iter().cloned())
            .collect();
        plans.sort_by(|a, b| a.id.cmp(&b.id));
        for plan in &plans {
            for key in Claims::keys_of(plan) {
                if self.contested.contains(&key)
                    || self.claims.owner(&key).is_some_and(|o| *o != plan.id)
                {
                    return false;
                }
            }
        }
        for mut plan in plans {
            let errors = self.claims.claim(&mut plan);
            debug_assert!(errors.is_empty(), "checked above");
            if !plan.frontends.is_empty() {
                self.desired.insert(plan.id.clone(), plan);
            }
        }
        true
    }

    /// Settles every frontend claim from the per-Service translations.
    fn settle_all(&mut self) {
        let mut plans: Vec<ServicePlan> = self
            .raw
            .values()
            .flat_map(|t| t.plans.iter().cloned())
            .collect();
        plans.sort_by(|a, b| a.id.cmp(&b.id));
        let mut claims = Claims::default();
        let mut desired = BTreeMap::new();
        let mut wanted: BTreeMap<FrontendClaim, usize> = BTreeMap::new();
        self.claim_errors.clear();
        for mut plan in plans {
            for key in Claims::keys_of(&plan) {
                *wanted.entry(key).or_insert(0) += 1;
            }
            for mut e in claims.claim(&mut plan) {
                e.origin = e.object.as_ref().and_then(|o| self.store.origin_of(o));
                self.claim_errors.push(e);
            }
            if !plan.frontends.is_empty() {
                desired.insert(plan.id.clone(), plan);
            }
        }
        self.contested = wanted
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(k, _)| k)
            .collect();
        self.claims = claims;
        self.desired = desired;
    }

    /// The problems of one Service: its translation's and those of slices
    /// labelled for it when it does not exist.
    fn errors_of(&self, key: &Key) -> Vec<ObjectError> {
        let mut errors: Vec<ObjectError> = self
            .raw
            .get(key)
            .map(|t| t.errors.clone())
            .unwrap_or_default();
        if !self.store.services.contains_key(key) {
            for slice in self.store.slices_of(key) {
                let name = slice.metadata.name.as_deref().unwrap_or_default();
                let object = ObjectRef::new("EndpointSlice", &key.0, name);
                errors.push(ObjectError {
                    origin: self.store.origin_of(&object),
                    ..ObjectError::new(
                        Some(object),
                        ErrorKind::Orphaned,
                        orphaned_message(&key.0, &key.1),
                    )
                });
            }
        }
        errors
    }

    /// Reports the problems that appeared for the affected Services (all of
    /// them after a full settlement), each only once.
    fn report(
        &mut self,
        changes: BTreeMap<ServicePortName, Option<ServicePlan>>,
        affected: &BTreeSet<Key>,
        global: bool,
    ) -> Update {
        let keys: BTreeSet<Key> = if global {
            self.reported
                .keys()
                .chain(self.raw.keys())
                .chain(self.store.labelled_services())
                .chain(affected)
                .filter(|k| !k.0.is_empty() || !k.1.is_empty())
                .cloned()
                .collect()
        } else {
            affected.clone()
        };
        let mut updates: Vec<(Key, Vec<ObjectError>)> = keys
            .into_iter()
            .map(|k| {
                let e = self.errors_of(&k);
                (k, e)
            })
            .collect();
        if global {
            // Not tied to one Service: unlabelled slices, frontend conflicts.
            let mut other: Vec<ObjectError> = slice_errors(&self.store)
                .into_iter()
                .filter(|e| e.kind == ErrorKind::Unlabelled)
                .collect();
            other.extend(self.claim_errors.iter().cloned());
            updates.push(((String::new(), String::new()), other));
        }
        let mut new_errors = Vec::new();
        for (key, now) in updates {
            let old = self.reported.remove(&key).unwrap_or_default();
            new_errors.extend(now.iter().filter(|e| !old.contains(e)).cloned());
            if !now.is_empty() {
                self.reported.insert(key, now);
            }
        }
        Update {
            changes,
            new_errors,
            error_count: self.reported.values().map(Vec::len).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{manifests::load_str, translate::translate};

    fn store_from(yaml: &str) -> Store {
        let mut store = Store::default();
        let mut errors = Vec::new();
        load_str(yaml, "t.yaml", &mut store, &mut errors);
        assert_eq!(errors, vec![]);
        store
    }

    fn service(name: &str, vip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: {vip}, ports: [{{name: p, port: 80}}]}}\n---\n"
        )
    }

    fn slice(name: &str, service: &str, ips: &[&str]) -> String {
        let eps: String = ips
            .iter()
            .map(|ip| format!("- addresses: [\"{ip}\"]\n"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints:\n{eps}---\n"
        )
    }

    /// Applies each manifest state in turn through the engine and checks the
    /// incremental result equals a full translation every time.
    fn check_sequence(states: &[String]) {
        let opts = TranslateOptions::default();
        let mut engine = Engine::new(opts.clone());
        let mut first = true;
        for (i, yaml) in states.iter().enumerate() {
            let fresh = store_from(yaml);
            let mut dirty = engine.store.sync_from(fresh.clone());
            if first {
                dirty.all = true;
                first = false;
            }
            let before = engine.desired();
            let update = engine.update(&dirty);
            let full = translate(&fresh, &opts);
            assert_eq!(engine.desired(), full.desired, "state {i}");
            let no_local = full
                .desired
                .services
                .iter()
                .map(no_local_of)
                .fold((0, 0), |(i, e), (li, le)| {
                    (i + usize::from(li), e + usize::from(le))
                });
            assert_eq!(
                engine.no_local_endpoints(),
                no_local,
                "state {i}: no local endpoints"
            );
            // The changes turn the previous state into the new one.
            let mut replay: BTreeMap<ServicePortName, ServicePlan> = before
                .services
                .into_iter()
                .map(|p| (p.id.clone(), p))
                .collect();
            for (id, change) in update.changes {
                match change {
                    Some(p) => replay.insert(id, p),
                    None => replay.remove(&id),
                };
            }
            assert_eq!(
                replay.into_values().collect::<Vec<_>>(),
                full.desired.services,
                "state {i}: changes replay"
            );
        }
    }

    #[test]
    fn incremental_translation_matches_full_translation() {
        let s = |parts: &[String]| parts.concat();
        check_sequence(&[
            s(&[service("a", "10.96.0.1"), slice("a-1", "a", &["10.0.0.1"])]),
            s(&[
                service("a", "10.96.0.1"),
                slice("a-1", "a", &["10.0.0.1", "10.0.0.2"]),
                service("b", "10.96.0.2"),
            ]),
            // A slice moves from a to b.
            s(&[
                service("a", "10.96.0.1"),
                slice("a-1", "b", &["10.0.0.1"]),
                service("b", "10.96.0.2"),
            ]),
            // b takes a's ClusterIP: a conflict, a (by name) keeps it.
            s(&[
                service("a", "10.96.0.1"),
                service("b", "10.96.0.1"),
                slice("a-1", "b", &["10.0.0.1"]),
            ]),
            // a goes away: b gets the frontend.
            s(&[service("b", "10.96.0.1"), slice("a-1", "b", &["10.0.0.1"])]),
            // c appears on b's frontend and loses; then b leaves and c wins.
            s(&[
                service("b", "10.96.0.1"),
                service("c", "10.96.0.1"),
                slice("a-1", "b", &["10.0.0.1"]),
            ]),
            s(&[service("c", "10.96.0.1"), slice("c-1", "c", &["10.0.0.9"])]),
            // internalTrafficPolicy Local, no endpoint on this node.
            s(&[
                service("c", "10.96.0.1")
                    .replace("spec: {", "spec: {internalTrafficPolicy: Local, "),
                slice("c-1", "c", &["10.0.0.9"]),
            ]),
            String::new(),
        ]);
    }

    #[test]
    fn errors_are_reported_once() {
        let mut engine = Engine::new(TranslateOptions::default());
        let yaml = format!(
            "{}{}",
            service("a", "10.96.0.1"),
            slice("x", "ghost", &["10.0.0.1"])
        );
        let mut dirty = engine.store.sync_from(store_from(&yaml));
        dirty.all = true;
        let u = engine.update(&dirty);
        assert_eq!(u.new_errors.len(), 1);
        assert!(u.new_errors[0].to_string().contains("ghost"));
        let u = engine.update(&Dirty {
            all: true,
            ..Dirty::default()
        });
        assert!(u.new_errors.is_empty(), "not repeated");
        assert_eq!(u.error_count, 1);
    }
}
