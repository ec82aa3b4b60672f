//! The object store every source feeds and translation reads: Services,
//! EndpointSlices and Nodes by namespace/name, each with where it came from.

use std::{collections::BTreeMap, fmt};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

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

/// An object that could not be used, and why. The rest keeps working.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    /// Where it came from (a manifest file), when known.
    pub origin: Option<String>,
    /// The object, when it could be identified.
    pub object: Option<ObjectRef>,
    pub message: String,
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
#[derive(Clone, Debug)]
pub struct Stored<T> {
    pub object: T,
    pub origin: Option<String>,
}

/// Current view of the cluster objects the agent cares about.
#[derive(Clone, Debug, Default)]
pub struct Store {
    pub services: BTreeMap<(String, String), Stored<Service>>,
    pub slices: BTreeMap<(String, String), Stored<EndpointSlice>>,
}

impl Store {
    /// Origin of an object, for error messages.
    pub fn origin_of(&self, object: &ObjectRef) -> Option<String> {
        let key = (object.namespace.clone(), object.name.clone());
        match object.kind {
            "Service" => self.services.get(&key).and_then(|s| s.origin.clone()),
            "EndpointSlice" => self.slices.get(&key).and_then(|s| s.origin.clone()),
            _ => None,
        }
    }
}
