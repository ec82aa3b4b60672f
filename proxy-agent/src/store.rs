//! The object store every source feeds and translation reads: Services,
//! EndpointSlices and Nodes by namespace/name, each with where it came from.
//!
//! Every mutation reports which Services it affects (a Service's own object,
//! or a slice labelled for it), so the agent re-translates only those. A Node
//! change affects every Service (zone, addresses), reported as `all`.
//!
//! The store is also the reflector's writer: a (re-)list of one kind is
//! buffered here until it is complete and then applied as a diff, so a watch
//! restart ends in a resync of what changed, never a flush.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

/// Label naming the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// An object of a kind the store keeps.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Node(Box<Node>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::Slice(_) => Kind::Slice,
            Object::Node(_) => Kind::Node,
        }
    }
}

/// The kinds the store keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    Slice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::Slice, Kind::Node];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Services",
            Kind::Slice => "EndpointSlices",
            Kind::Node => "Node",
        }
    }
}

/// Kind + namespace/name of an object, for keys and error messages.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: &'static str, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// What kind of problem an [`ObjectError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A manifest file or document could not be read or parsed.
    Unreadable,
    /// An object, or a field or annotation of it, is invalid; what can be
    /// used of it still is.
    Invalid,
    /// An EndpointSlice without the `kubernetes.io/service-name` label.
    Unlabelled,
    /// An EndpointSlice of a Service that does not exist.
    Orphaned,
    /// A frontend another Service port already uses.
    FrontendConflict,
}

/// An object that could not be used, and why. The rest keeps working.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    /// Where it came from (a manifest file), when known.
    pub origin: Option<String>,
    /// The object, when it could be identified.
    pub object: Option<ObjectRef>,
    pub kind: ErrorKind,
    pub message: String,
}

impl ObjectError {
    /// An error about `object` (origin unknown yet).
    pub fn new(object: Option<ObjectRef>, kind: ErrorKind, message: String) -> Self {
        Self {
            origin: None,
            object,
            kind,
            message,
        }
    }
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "{origin}: ")?;
        }
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// A stored object and its origin.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored<T> {
    pub object: T,
    pub origin: Option<String>,
}

/// Namespace and name.
pub type Key = (String, String);

/// Services affected by a store change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Every Service is affected (the Node changed).
    pub all: bool,
    pub services: BTreeSet<Key>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty()
    }

    pub fn merge(&mut self, other: Dirty) {
        self.all |= other.all;
        self.services.extend(other.services);
    }
}

/// Current view of the cluster objects the agent cares about.
#[derive(Clone, Debug, Default)]
pub struct Store {
    pub services: BTreeMap<Key, Stored<Service>>,
    pub slices: BTreeMap<Key, Stored<EndpointSlice>>,
    pub nodes: BTreeMap<String, Stored<Node>>,
    /// Slice names by the Service they are labelled for.
    slices_by_service: BTreeMap<Key, BTreeSet<String>>,
    /// Objects of a (re-)list in progress, by kind.
    relists: BTreeMap<Kind, Vec<Object>>,
}

/// Keys of `map` that are not in `keep`.
fn absent<K: Ord + Clone, V>(map: &BTreeMap<K, V>, keep: &BTreeSet<K>) -> Vec<K> {
    map.keys().filter(|k| !keep.contains(*k)).cloned().collect()
}

/// The Service a slice is labelled for.
pub fn slice_service(slice: &EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get(LABEL_SERVICE_NAME)
        .map(String::as_str)
}

/// The store key of an object: namespace ("default" when unset) and name.
pub fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

impl Store {
    /// Origin of an object, for error messages.
    pub fn origin_of(&self, object: &ObjectRef) -> Option<String> {
        let key = (object.namespace.clone(), object.name.clone());
        match object.kind {
            "Service" => self.services.get(&key).and_then(|s| s.origin.clone()),
            "EndpointSlice" => self.slices.get(&key).and_then(|s| s.origin.clone()),
            "Node" => self.nodes.get(&object.name).and_then(|s| s.origin.clone()),
            _ => None,
        }
    }

    /// Every Service some slice is labelled for (existing or not).
    pub fn labelled_services(&self) -> impl Iterator<Item = &Key> {
        self.slices_by_service.keys()
    }

    /// The slices labelled for a Service.
    pub fn slices_of(&self, key: &Key) -> impl Iterator<Item = &EndpointSlice> {
        self.slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(move |name| self.slices.get(&(key.0.clone(), name.clone())))
            .map(|s| &s.object)
    }

    /// Inserts or replaces a Service.
    pub fn upsert_service(&mut self, service: Service, origin: Option<String>) -> Dirty {
        let key = key_of(&service.metadata);
        let stored = Stored {
            object: service,
            origin,
        };
        let mut dirty = Dirty::default();
        if self.services.get(&key) != Some(&stored) {
            self.services.insert(key.clone(), stored);
            dirty.services.insert(key);
        }
        dirty
    }

    /// Removes a Service.
    pub fn remove_service(&mut self, key: &Key) -> Dirty {
        let mut dirty = Dirty::default();
        if self.services.remove(key).is_some() {
            dirty.services.insert(key.clone());
        }
        dirty
    }

    fn unindex_slice(&mut self, key: &Key) -> Option<Key> {
        let old = self.slices.get(key)?;
        let service = (key.0.clone(), slice_service(&old.object)?.to_owned());
        if let Some(set) = self.slices_by_service.get_mut(&service) {
            set.remove(&key.1);
            if set.is_empty() {
                self.slices_by_service.remove(&service);
            }
        }
        Some(service)
    }

    /// Inserts or replaces an EndpointSlice.
    pub fn upsert_slice(&mut self, slice: EndpointSlice, origin: Option<String>) -> Dirty {
        let key = key_of(&slice.metadata);
        let stored = Stored {
            object: slice,
            origin,
        };
        let mut dirty = Dirty::default();
        if self.slices.get(&key) == Some(&stored) {
            return dirty;
        }
        if let Some(old_service) = self.unindex_slice(&key) {
            dirty.services.insert(old_service);
        }
        if let Some(service) = slice_service(&stored.object) {
            let service = (key.0.clone(), service.to_owned());
            self.slices_by_service
                .entry(service.clone())
                .or_default()
                .insert(key.1.clone());
            dirty.services.insert(service);
        }
        self.slices.insert(key, stored);
        dirty
    }

    /// Removes an EndpointSlice.
    pub fn remove_slice(&mut self, key: &Key) -> Dirty {
        let mut dirty = Dirty::default();
        if let Some(service) = self.unindex_slice(key) {
            dirty.services.insert(service);
        }
        self.slices.remove(key);
        dirty
    }

    /// Inserts or replaces a Node.
    pub fn upsert_node(&mut self, node: Node, origin: Option<String>) -> Dirty {
        let name = node.metadata.name.clone().unwrap_or_default();
        let stored = Stored {
            object: node,
            origin,
        };
        let changed = self.nodes.get(&name) != Some(&stored);
        if changed {
            self.nodes.insert(name, stored);
        }
        Dirty {
            all: changed,
            services: BTreeSet::new(),
        }
    }

    /// Removes a Node.
    pub fn remove_node(&mut self, name: &str) -> Dirty {
        Dirty {
            all: self.nodes.remove(name).is_some(),
            services: BTreeSet::new(),
        }
    }

    /// Makes one kind hold exactly `items`: removes what is not among them,
    /// upserts the rest, reporting what changed.
    fn replace<T, K: Ord>(
        &mut self,
        items: Vec<Stored<T>>,
        key: fn(&T) -> K,
        gone: fn(&Self, &BTreeSet<K>) -> Vec<K>,
        remove: fn(&mut Self, &K) -> Dirty,
        upsert: fn(&mut Self, T, Option<String>) -> Dirty,
    ) -> Dirty {
        let keep: BTreeSet<K> = items.iter().map(|s| key(&s.object)).collect();
        let mut dirty = Dirty::default();
        for k in gone(self, &keep) {
            dirty.merge(remove(self, &k));
        }
        for s in items {
            dirty.merge(upsert(self, s.object, s.origin));
        }
        dirty
    }

    /// Makes the Services exactly `items` (a complete list), reporting what changed.
    pub fn replace_services(&mut self, items: Vec<Stored<Service>>) -> Dirty {
        self.replace(
            items,
            |s| key_of(&s.metadata),
            |store, keep| absent(&store.services, keep),
            Self::remove_service,
            Self::upsert_service,
        )
    }

    /// Makes the EndpointSlices exactly `items`, reporting what changed.
    pub fn replace_slices(&mut self, items: Vec<Stored<EndpointSlice>>) -> Dirty {
        self.replace(
            items,
            |s| key_of(&s.metadata),
            |store, keep| absent(&store.slices, keep),
            Self::remove_slice,
            Self::upsert_slice,
        )
    }

    /// Makes the Nodes exactly `items`, reporting what changed.
    pub fn replace_nodes(&mut self, items: Vec<Stored<Node>>) -> Dirty {
        self.replace(
            items,
            |n| n.metadata.name.clone().unwrap_or_default(),
            |store, keep| absent(&store.nodes, keep),
            |store, name| store.remove_node(name),
            Self::upsert_node,
        )
    }

    /// Inserts or replaces an object of any kind.
    pub fn upsert(&mut self, object: Object, origin: Option<String>) -> Dirty {
        match object {
            Object::Service(s) => self.upsert_service(*s, origin),
            Object::Slice(s) => self.upsert_slice(*s, origin),
            Object::Node(n) => self.upsert_node(*n, origin),
        }
    }

    /// Removes an object of any kind.
    pub fn remove(&mut self, object: &Object) -> Dirty {
        match object {
            Object::Service(s) => self.remove_service(&key_of(&s.metadata)),
            Object::Slice(s) => self.remove_slice(&key_of(&s.metadata)),
            Object::Node(n) => self.remove_node(n.metadata.name.as_deref().unwrap_or_default()),
        }
    }

    /// A (re-)list of `kind` starts: its objects are buffered until
    /// [`Self::relist_done`] (a list restarted midway starts over).
    pub fn relist_start(&mut self, kind: Kind) {
        self.relists.insert(kind, Vec::new());
    }

    /// One object of a (re-)list in progress.
    pub fn relist_item(&mut self, object: Object) {
        self.relists.entry(object.kind()).or_default().push(object);
    }

    /// The (re-)list of `kind` is complete: the kind now holds exactly what
    /// it listed (`origin` each), reporting what changed.
    pub fn relist_done(&mut self, kind: Kind, origin: Option<&str>) -> Dirty {
        fn stored<T>(object: T, origin: Option<&str>) -> Stored<T> {
            Stored {
                object,
                origin: origin.map(str::to_owned),
            }
        }
        let listed = self.relists.remove(&kind).unwrap_or_default();
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut nodes = Vec::new();
        for o in listed {
            match o {
                Object::Service(s) => services.push(stored(*s, origin)),
                Object::Slice(s) => slices.push(stored(*s, origin)),
                Object::Node(n) => nodes.push(stored(*n, origin)),
            }
        }
        match kind {
            Kind::Service => self.replace_services(services),
            Kind::Slice => self.replace_slices(slices),
            Kind::Node => self.replace_nodes(nodes),
        }
    }

    /// Makes this store hold exactly what `other` holds, reporting what that
    /// changed: how a fresh manifest read is applied without a wholesale flush.
    pub fn sync_from(&mut self, other: Store) -> Dirty {
        let mut dirty = self.replace_services(other.services.into_values().collect());
        dirty.merge(self.replace_slices(other.slices.into_values().collect()));
        dirty.merge(self.replace_nodes(other.nodes.into_values().collect()));
        dirty
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn slice(name: &str, service: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some([(LABEL_SERVICE_NAME.to_owned(), service.to_owned())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ..Default::default()
        }
    }

    fn key(name: &str) -> Key {
        ("ns".into(), name.into())
    }

    #[test]
    fn slice_changes_dirty_their_services_old_and_new() {
        let mut store = Store::default();
        let d = store.upsert_slice(slice("s1", "web"), None);
        assert_eq!(d.services, [key("web")].into());
        assert_eq!(store.slices_of(&key("web")).count(), 1);
        // Same object again: nothing changes.
        assert!(store.upsert_slice(slice("s1", "web"), None).is_empty());
        // Relabelled to another Service: both are dirty.
        let d = store.upsert_slice(slice("s1", "api"), None);
        assert_eq!(d.services, [key("web"), key("api")].into());
        assert_eq!(store.slices_of(&key("web")).count(), 0);
        let d = store.remove_slice(&key("s1"));
        assert_eq!(d.services, [key("api")].into());
        assert!(store.slices.is_empty());
    }

    #[test]
    fn relists_are_buffered_and_applied_as_a_diff() {
        let mut store = Store::default();
        let api = || Some("api".to_owned());
        store.upsert(Object::Slice(Box::new(slice("a", "web"))), api());
        store.upsert(Object::Slice(Box::new(slice("b", "api"))), api());
        store.relist_start(Kind::Slice);
        store.relist_item(Object::Slice(Box::new(slice("a", "web"))));
        assert_eq!(store.slices.len(), 2, "nothing changes while listing");
        // A restarted list starts over.
        store.relist_start(Kind::Slice);
        store.relist_item(Object::Slice(Box::new(slice("a", "web"))));
        store.relist_item(Object::Slice(Box::new(slice("c", "db"))));
        let d = store.relist_done(Kind::Slice, Some("api"));
        assert_eq!(d.services, [key("api"), key("db")].into(), "web unchanged");
        let names: Vec<&String> = store.slices.keys().map(|(_, n)| n).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(store.slices[&key("c")].origin.as_deref(), Some("api"));
    }

    #[test]
    fn sync_from_reports_only_differences() {
        let mut store = Store::default();
        store.upsert_slice(slice("a", "web"), None);
        store.upsert_slice(slice("b", "api"), None);
        let mut fresh = Store::default();
        fresh.upsert_slice(slice("a", "web"), None);
        fresh.upsert_slice(slice("c", "db"), None);
        let d = store.sync_from(fresh);
        assert_eq!(d.services, [key("api"), key("db")].into());
        assert!(!d.all);
        let names: Vec<&String> = store.slices.keys().map(|(_, n)| n).collect();
        assert_eq!(names, ["a", "c"]);
    }
}
