//! The `--manifests DIR` source: what `kubectl apply -f DIR` would read.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory, each
//! possibly holding several YAML documents, each document an object or a `List`
//! of objects. Services (v1), EndpointSlices (discovery.k8s.io/v1) and Nodes
//! (v1) are kept; other kinds are ignored. A broken document or object is reported with its
//! file and name and skipped; everything else still loads.

use std::{
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize as _;
use serde_yaml::Value;

use crate::store::{ErrorKind, ObjectError, ObjectRef, Store};

/// Files `kubectl apply -f DIR` reads.
fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The manifest files of `dir`, sorted by name (the order kubectl applies them in).
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_manifest(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Loads every manifest in `dir` into a fresh store.
pub fn load_dir(dir: &Path) -> Result<(Store, Vec<ObjectError>), std::io::Error> {
    let mut store = Store::default();
    let mut errors = Vec::new();
    for file in manifest_files(dir)? {
        let origin = file.display().to_string();
        match fs::read_to_string(&file) {
            Ok(text) => load_str(&text, &origin, &mut store, &mut errors),
            Err(e) => errors.push(ObjectError {
                origin: Some(origin),
                ..ObjectError::new(None, ErrorKind::Unreadable, format!("cannot read: {e}"))
            }),
        }
    }
    Ok((store, errors))
}

/// Loads the documents of one manifest file's text into `store`.
pub fn load_str(text: &str, origin: &str, store: &mut Store, errors: &mut Vec<ObjectError>) {
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(document) {
            Ok(value) => load_value(value, origin, store, errors),
            Err(e) => {
                errors.push(ObjectError {
                    origin: Some(origin.to_owned()),
                    ..ObjectError::new(
                        None,
                        ErrorKind::Unreadable,
                        format!("document {}: invalid YAML: {e}", index + 1),
                    )
                });
                // The parser cannot resynchronise after a syntax error.
                break;
            }
        }
    }
}

fn str_field<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = value;
    for key in path {
        v = v.get(key)?;
    }
    v.as_str()
}

fn load_value(value: Value, origin: &str, store: &mut Store, errors: &mut Vec<ObjectError>) {
    if value.is_null() {
        return;
    }
    let error = |object: Option<ObjectRef>, message: String| ObjectError {
        origin: Some(origin.to_owned()),
        ..ObjectError::new(object, ErrorKind::Invalid, message)
    };
    let (Some(kind), Some(api_version)) = (
        str_field(&value, &["kind"]),
        str_field(&value, &["apiVersion"]),
    ) else {
        errors.push(error(
            None,
            "object without kind/apiVersion (not a Kubernetes manifest)".into(),
        ));
        return;
    };
    if kind == "List" || kind.ends_with("List") {
        match value.get("items").and_then(Value::as_sequence) {
            Some(items) => {
                for item in items.clone() {
                    load_value(item, origin, store, errors);
                }
            }
            None => errors.push(error(None, format!("{kind} without items"))),
        }
        return;
    }
    let kind: &'static str = match (kind, api_version) {
        ("Service", "v1") => "Service",
        ("EndpointSlice", "discovery.k8s.io/v1") => "EndpointSlice",
        ("Node", "v1") => "Node",
        ("Service" | "EndpointSlice" | "Node", other) => {
            errors.push(error(
                None,
                format!("{kind} with unsupported apiVersion {other}"),
            ));
            return;
        }
        _ => {
            tracing::debug!(
                origin,
                kind,
                "ignoring object of a kind the agent does not use"
            );
            return;
        }
    };
    let name = str_field(&value, &["metadata", "name"])
        .unwrap_or_default()
        .to_owned();
    let namespace = match kind {
        "Node" => String::new(),
        _ => str_field(&value, &["metadata", "namespace"])
            .unwrap_or("default")
            .to_owned(),
    };
    let object = ObjectRef::new(kind, &namespace, &name);
    if name.is_empty() {
        errors.push(error(Some(object), "metadata.name is missing".into()));
        return;
    }
    let key = (namespace.clone(), name.clone());
    let origin = Some(origin.to_owned());
    let result = match kind {
        "Service" => serde_yaml::from_value::<Service>(value).map(|mut s| {
            s.metadata.namespace = Some(namespace);
            let dup = store.services.contains_key(&key);
            store.upsert_service(s, origin.clone());
            dup
        }),
        "EndpointSlice" => serde_yaml::from_value::<EndpointSlice>(value).map(|mut s| {
            s.metadata.namespace = Some(namespace);
            let dup = store.slices.contains_key(&key);
            store.upsert_slice(s, origin.clone());
            dup
        }),
        _ => serde_yaml::from_value::<Node>(value).map(|n| {
            let dup = store.nodes.contains_key(&name);
            store.upsert_node(n, origin.clone());
            dup
        }),
    };
    match result {
        Ok(false) => {}
        Ok(true) => {
            tracing::warn!(%object, origin, "defined more than once; the last definition wins")
        }
        Err(e) => errors.push(error(Some(object), format!("invalid {kind}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (Store, Vec<ObjectError>) {
        let mut store = Store::default();
        let mut errors = Vec::new();
        load_str(text, "test.yaml", &mut store, &mut errors);
        (store, errors)
    }

    #[test]
    fn multi_document_with_list_and_other_kinds() {
        let (store, errors) = load(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
apiVersion: v1
kind: List
items:
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  endpoints: [{addresses: [10.0.0.1]}]
---
"#,
        );
        assert_eq!(errors, vec![]);
        assert!(store.services.contains_key(&("shop".into(), "web".into())));
        assert!(store.slices.contains_key(&("shop".into(), "web-1".into())));
    }

    #[test]
    fn namespace_defaults_to_default() {
        let (store, errors) = load(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n",
        );
        assert!(errors.is_empty());
        let svc = &store.services[&("default".into(), "a".into())].object;
        assert_eq!(svc.metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn broken_object_is_named_and_others_survive() {
        let (store, errors) = load(
            r#"
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: ns}
spec: {ports: "not a list"}
---
apiVersion: v1
kind: Service
metadata: {name: good, namespace: ns}
spec: {clusterIP: 10.96.0.2}
"#,
        );
        assert_eq!(errors.len(), 1);
        let e = errors[0].to_string();
        assert!(
            e.contains("test.yaml") && e.contains("Service ns/bad"),
            "{e}"
        );
        assert!(store.services.contains_key(&("ns".into(), "good".into())));
    }

    #[test]
    fn syntax_error_is_reported_with_file() {
        let (_, errors) = load("apiVersion: v1\nkind: Service\nmetadata: {name: [\n");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .starts_with("test.yaml: document 1: invalid YAML")
        );
    }

    #[test]
    fn json_and_missing_kind() {
        let (store, errors) = load(
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j"}, "spec": {"clusterIP": "10.96.0.3"}}"#,
        );
        assert!(errors.is_empty());
        assert_eq!(store.services.len(), 1);
        let (_, errors) = load("metadata: {name: x}\n");
        assert!(errors[0].message.contains("without kind"));
    }
}
