//! Deployment-object YAML as objects to apply: parsing, ordering, ownership labels and
//! annotations, object identity, and the drift comparison. Pure functions only.

pub use brokkr_crds::identity::{ObjectKey, split_api_version};
use brokkr_crds::{AGENT_LABEL, CHECKSUM_ANNOTATION, DEPLOYMENT_OBJECT_ANNOTATION, STACK_LABEL};
use kube::api::GroupVersionKind;
use serde::Deserialize;
use serde_json::{Map, Value};
use uuid::Uuid;

pub const CRD_GROUP: &str = "apiextensions.k8s.io";
pub const CRD_KIND: &str = "CustomResourceDefinition";

/// Namespace of namespaced objects whose manifest names none. The agent does not guess from
/// Namespace objects in the same deployment object: `metadata.namespace` if set, else this.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Server-populated metadata that exported manifests often carry and that would make a
/// server-side apply fail or conflict; removed before applying.
const SERVER_METADATA: [&str; 6] = [
    "resourceVersion",
    "uid",
    "creationTimestamp",
    "generation",
    "managedFields",
    "selfLink",
];

/// One object of a deployment object, as written (plus cleanup of server-owned metadata).
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    /// `metadata.namespace` as written; whether it is used depends on the kind's scope.
    pub namespace: Option<String>,
    pub object: Value,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ManifestError {
    #[error("failed to parse YAML document {document}: {message}")]
    Yaml { document: usize, message: String },
    #[error("document {document} is not a mapping")]
    NotAnObject { document: usize },
    #[error("document {document} has no {field}")]
    MissingField {
        document: usize,
        field: &'static str,
    },
    #[error("document {document}: {field} must be a string")]
    NotAString {
        document: usize,
        field: &'static str,
    },
}

/// The order objects are applied in: Namespaces, then CRDs, then everything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Namespaces,
    Crds,
    Rest,
}

impl Phase {
    pub fn of(group: &str, kind: &str) -> Phase {
        match (group, kind) {
            ("", "Namespace") => Phase::Namespaces,
            (CRD_GROUP, CRD_KIND) => Phase::Crds,
            _ => Phase::Rest,
        }
    }

    /// Deletion runs the other way: ordinary (and custom) objects, then CRDs, then Namespaces.
    pub fn delete_rank(self) -> u8 {
        match self {
            Phase::Rest => 0,
            Phase::Crds => 1,
            Phase::Namespaces => 2,
        }
    }
}

impl Manifest {
    pub fn gvk(&self) -> GroupVersionKind {
        let (group, version) = split_api_version(&self.api_version);
        GroupVersionKind::gvk(group, version, &self.kind)
    }

    pub fn group(&self) -> &str {
        split_api_version(&self.api_version).0
    }

    pub fn phase(&self) -> Phase {
        Phase::of(self.group(), &self.kind)
    }

    /// For a CRD manifest: the group and kind it defines.
    pub fn defined_kind(&self) -> Option<(String, String)> {
        if self.phase() != Phase::Crds {
            return None;
        }
        let group = self.object.pointer("/spec/group")?.as_str()?;
        let kind = self.object.pointer("/spec/names/kind")?.as_str()?;
        Some((group.to_owned(), kind.to_owned()))
    }

    /// `Kind namespace/name` (or `Kind name`), as written; for logs and event messages.
    pub fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

/// Parses multi-document YAML. Empty documents are skipped; a `v1 List` is flattened into its
/// items. The result is in apply order (see [`sort_for_apply`]).
pub fn parse(yaml: &str) -> Result<Vec<Manifest>, ManifestError> {
    let mut manifests = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let document_number = index + 1;
        let value = Value::deserialize(document).map_err(|e| ManifestError::Yaml {
            document: document_number,
            message: e.to_string(),
        })?;
        match value {
            Value::Null => continue,
            Value::Object(ref map)
                if map.get("kind").and_then(Value::as_str) == Some("List")
                    && map.get("apiVersion").and_then(Value::as_str) == Some("v1") =>
            {
                let items = map.get("items").and_then(Value::as_array);
                for item in items.into_iter().flatten() {
                    manifests.push(manifest_from(document_number, item.clone())?);
                }
            }
            other => manifests.push(manifest_from(document_number, other)?),
        }
    }
    sort_for_apply(&mut manifests);
    Ok(manifests)
}

fn manifest_from(document: usize, mut object: Value) -> Result<Manifest, ManifestError> {
    let Some(map) = object.as_object_mut() else {
        return Err(ManifestError::NotAnObject { document });
    };
    let string = |map: &Map<String, Value>, field: &'static str| -> Result<String, ManifestError> {
        match map.get(field) {
            None | Some(Value::Null) => Err(ManifestError::MissingField { document, field }),
            Some(Value::String(s)) if s.is_empty() => {
                Err(ManifestError::MissingField { document, field })
            }
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(ManifestError::NotAString { document, field }),
        }
    };
    let api_version = string(map, "apiVersion")?;
    let kind = string(map, "kind")?;
    let metadata = match map.get_mut("metadata") {
        Some(Value::Object(metadata)) => metadata,
        _ => {
            return Err(ManifestError::MissingField {
                document,
                field: "metadata.name",
            });
        }
    };
    for field in SERVER_METADATA {
        metadata.remove(field);
    }
    let name = match metadata.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(ManifestError::MissingField {
                document,
                field: "metadata.name",
            });
        }
        Some(_) => {
            return Err(ManifestError::NotAString {
                document,
                field: "metadata.name",
            });
        }
    };
    let namespace = match metadata.get("namespace") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        None | Some(Value::Null) | Some(Value::String(_)) => None,
        Some(_) => {
            return Err(ManifestError::NotAString {
                document,
                field: "metadata.namespace",
            });
        }
    };
    Ok(Manifest {
        api_version,
        kind,
        name,
        namespace,
        object,
    })
}

/// Stable sort into apply order: Namespaces, CRDs, the rest (each in document order).
pub fn sort_for_apply(manifests: &mut [Manifest]) {
    manifests.sort_by_key(Manifest::phase);
}

/// Who an applied object belongs to; becomes its labels and annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ownership {
    pub stack_id: Uuid,
    pub agent_name: String,
    pub deployment_object_id: Uuid,
    pub checksum: String,
}

impl Ownership {
    /// `brokkr.io/stack=<id>,brokkr.io/agent=<name>`: everything this agent applied for the stack.
    pub fn selector(&self) -> String {
        stack_selector(self.stack_id, &self.agent_name)
    }
}

pub fn stack_selector(stack_id: Uuid, agent_name: &str) -> String {
    format!("{STACK_LABEL}={stack_id},{AGENT_LABEL}={agent_name}")
}

/// `brokkr.io/agent=<name>`: everything this agent applied.
pub fn agent_selector(agent_name: &str) -> String {
    format!("{AGENT_LABEL}={agent_name}")
}

/// The object with the ownership labels and annotations added (overriding any the manifest
/// set for those keys) and its namespace set as resolved (`None` removes it: cluster-scoped).
pub fn prepare(object: &Value, namespace: Option<&str>, ownership: &Ownership) -> Value {
    let mut object = object.clone();
    let Some(map) = object.as_object_mut() else {
        return object;
    };
    let metadata = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !metadata.is_object() {
        *metadata = Value::Object(Map::new());
    }
    let Some(metadata) = metadata.as_object_mut() else {
        return object;
    };
    match namespace {
        Some(ns) => {
            metadata.insert("namespace".into(), Value::String(ns.to_owned()));
        }
        None => {
            metadata.remove("namespace");
        }
    }
    let mut set = |field: &str, entries: [(&str, String); 2]| {
        let target = metadata
            .entry(field)
            .or_insert_with(|| Value::Object(Map::new()));
        if !target.is_object() {
            *target = Value::Object(Map::new());
        }
        if let Some(target) = target.as_object_mut() {
            for (key, value) in entries {
                target.insert(key.to_owned(), Value::String(value));
            }
        }
    };
    set(
        "labels",
        [
            (STACK_LABEL, ownership.stack_id.to_string()),
            (AGENT_LABEL, ownership.agent_name.clone()),
        ],
    );
    set(
        "annotations",
        [
            (
                DEPLOYMENT_OBJECT_ANNOTATION,
                ownership.deployment_object_id.to_string(),
            ),
            (CHECKSUM_ANNOTATION, ownership.checksum.clone()),
        ],
    );
    object
}

/// Fields `ignoreDifferences` may never remove: without them there is no object to apply.
const PROTECTED_POINTERS: [&str; 6] = [
    "",
    "/apiVersion",
    "/kind",
    "/metadata",
    "/metadata/name",
    "/metadata/namespace",
];

/// Removes the fields at `pointers` (RFC 6901 JSON pointers) from `object`, so that they are
/// neither applied (the agent's field manager lets go of them) nor compared for drift.
/// Pointers to missing fields, and to the object's identity, are ignored.
pub fn strip_pointers(object: &mut Value, pointers: &[String]) {
    for pointer in pointers {
        if PROTECTED_POINTERS.contains(&pointer.as_str()) || !pointer.starts_with('/') {
            continue;
        }
        let Some((parent, last)) = pointer.rsplit_once('/') else {
            continue;
        };
        let last = last.replace("~1", "/").replace("~0", "~");
        match object.pointer_mut(parent) {
            Some(Value::Object(map)) => {
                map.remove(&last);
            }
            Some(Value::Array(items)) => {
                if let Ok(index) = last.parse::<usize>()
                    && index < items.len()
                {
                    items.remove(index);
                }
            }
            _ => {}
        }
    }
}

/// Sorts keys into delete order (ordinary objects, CRDs, Namespaces), then by key.
pub fn sort_for_delete(keys: &mut [ObjectKey]) {
    let rank = |key: &ObjectKey| Phase::of(&key.group, &key.kind).delete_rank();
    keys.sort_by(|a, b| (rank(a), a).cmp(&(rank(b), b)));
}

/// Whether the live object still holds everything the agent applied: every field of
/// `desired` is present in `live` with the same value (maps compared key by key, lists
/// element by element with equal lengths). Top-level `apiVersion` and `kind` (a watch may
/// show another version), `status` and a Secret's `stringData` (the server keeps neither as
/// written) are ignored. Server defaults in `live` are fine. A false "differs" only costs a
/// no-op re-apply.
pub fn live_matches(desired: &Value, live: &Value) -> bool {
    let (Some(desired), Some(live)) = (desired.as_object(), live.as_object()) else {
        return false;
    };
    desired
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "apiVersion" | "kind" | "status" | "stringData"))
        .all(|(k, v)| live.get(k).is_some_and(|l| contains(v, l)))
}

fn contains(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, v)| match l.get(k) {
            Some(lv) => contains(v, lv),
            // An explicit null asks for the field to be absent.
            None => v.is_null(),
        }),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(d, l)| contains(d, l))
        }
        (Value::Number(d), Value::Number(l)) => d == l || d.as_f64() == l.as_f64(),
        (d, l) => d == l,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const BUNDLE: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: shop
  resourceVersion: "42"
  uid: 0b5c1e9e-0000-0000-0000-000000000000
data:
  mode: fast
---
# a comment-only document is skipped
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  names: {kind: Widget, plural: widgets}
  scope: Namespaced
---
apiVersion: example.com/v1
kind: Widget
metadata: {name: w1, namespace: shop}
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
"#;

    fn ownership() -> Ownership {
        Ownership {
            stack_id: Uuid::from_u128(1),
            agent_name: "edge-1".into(),
            deployment_object_id: Uuid::from_u128(2),
            checksum: "abc123".into(),
        }
    }

    #[test]
    fn namespaces_then_crds_then_the_rest_in_document_order() {
        let manifests = parse(BUNDLE).unwrap();
        let order: Vec<String> = manifests.iter().map(Manifest::describe).collect();
        assert_eq!(
            order,
            [
                "Namespace shop",
                "CustomResourceDefinition widgets.example.com",
                "ConfigMap shop/settings",
                "Widget shop/w1",
            ]
        );
        assert_eq!(
            manifests[1].defined_kind(),
            Some(("example.com".into(), "Widget".into()))
        );
        assert_eq!(
            manifests[3].gvk(),
            GroupVersionKind::gvk("example.com", "v1", "Widget")
        );
        assert_eq!(
            manifests[2].gvk(),
            GroupVersionKind::gvk("", "v1", "ConfigMap")
        );
    }

    #[test]
    fn server_owned_metadata_is_dropped() {
        let manifests = parse(BUNDLE).unwrap();
        let cm = &manifests[2].object;
        assert!(cm.pointer("/metadata/resourceVersion").is_none());
        assert!(cm.pointer("/metadata/uid").is_none());
        assert_eq!(cm.pointer("/data/mode"), Some(&json!("fast")));
    }

    #[test]
    fn lists_are_flattened() {
        let yaml = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n- {apiVersion: v1, kind: Secret, metadata: {name: b}}\n";
        let names: Vec<String> = parse(yaml).unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn an_empty_deployment_object_has_no_objects() {
        assert_eq!(parse("").unwrap(), []);
        assert_eq!(parse("---\n---\n").unwrap(), []);
    }

    #[test]
    fn bad_documents_are_named_in_the_error() {
        assert_eq!(
            parse(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\nkind: Secret\nmetadata: {name: b}\n"
            ),
            Err(ManifestError::MissingField {
                document: 2,
                field: "apiVersion"
            })
        );
        assert_eq!(
            parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {namespace: x}\n"),
            Err(ManifestError::MissingField {
                document: 1,
                field: "metadata.name"
            })
        );
        assert_eq!(
            parse("- just\n- a list\n"),
            Err(ManifestError::NotAnObject { document: 1 })
        );
        assert_eq!(
            parse("apiVersion: v1\nkind: 7\nmetadata: {name: a}\n"),
            Err(ManifestError::NotAString {
                document: 1,
                field: "kind"
            })
        );
        let err = parse("apiVersion: v1\nkind: [unclosed\n").unwrap_err();
        assert!(
            matches!(err, ManifestError::Yaml { document: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn ownership_labels_and_annotations_are_added_and_win() {
        let object = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": "settings", "namespace": "shop",
                "labels": {"app": "web", "brokkr.io/stack": "forged"},
                "annotations": {"note": "kept"}
            }
        });
        let prepared = prepare(&object, Some("shop"), &ownership());
        let meta = &prepared["metadata"];
        assert_eq!(meta["labels"]["app"], "web");
        assert_eq!(meta["labels"][STACK_LABEL], Uuid::from_u128(1).to_string());
        assert_eq!(meta["labels"][AGENT_LABEL], "edge-1");
        assert_eq!(meta["annotations"]["note"], "kept");
        assert_eq!(
            meta["annotations"][DEPLOYMENT_OBJECT_ANNOTATION],
            Uuid::from_u128(2).to_string()
        );
        assert_eq!(meta["annotations"][CHECKSUM_ANNOTATION], "abc123");
        assert_eq!(meta["namespace"], "shop");
    }

    #[test]
    fn cluster_scoped_objects_lose_their_namespace_and_namespaced_ones_get_one() {
        let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "namespace": "oops"}});
        assert!(
            prepare(&object, None, &ownership())
                .pointer("/metadata/namespace")
                .is_none()
        );
        let object = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}});
        assert_eq!(
            prepare(&object, Some(DEFAULT_NAMESPACE), &ownership())["metadata"]["namespace"],
            "default"
        );
    }

    #[test]
    fn the_stack_selector_names_stack_and_agent() {
        assert_eq!(
            ownership().selector(),
            format!(
                "brokkr.io/stack={},brokkr.io/agent=edge-1",
                Uuid::from_u128(1)
            )
        );
        assert_eq!(agent_selector("edge-1"), "brokkr.io/agent=edge-1");
    }

    #[test]
    fn deletion_runs_objects_then_crds_then_namespaces() {
        let key = |group: &str, kind: &str, name: &str| ObjectKey {
            group: group.into(),
            kind: kind.into(),
            namespace: None,
            name: name.into(),
        };
        let mut keys = vec![
            key("", "Namespace", "shop"),
            key(CRD_GROUP, CRD_KIND, "widgets.example.com"),
            key("example.com", "Widget", "w1"),
            key("", "ConfigMap", "a"),
        ];
        sort_for_delete(&mut keys);
        let kinds: Vec<&str> = keys.iter().map(|k| k.kind.as_str()).collect();
        assert_eq!(kinds, ["ConfigMap", "Widget", CRD_KIND, "Namespace"]);
    }

    #[test]
    fn drift_is_a_missing_or_changed_field_not_a_server_default() {
        let desired = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"ports": [{"port": 80}], "replicas": 2}
        });
        let defaulted = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "uid": "u", "labels": {"app": "web", "extra": "x"}},
            "spec": {"ports": [{"port": 80, "protocol": "TCP"}], "replicas": 2.0, "type": "ClusterIP"},
            "status": {}
        });
        assert!(live_matches(&desired, &defaulted));

        let mut edited = defaulted.clone();
        edited["spec"]["ports"][0]["port"] = json!(8080);
        assert!(!live_matches(&desired, &edited));

        let mut unlabelled = defaulted.clone();
        unlabelled["metadata"]["labels"] = json!({});
        assert!(!live_matches(&desired, &unlabelled));

        let mut extra_port = defaulted;
        extra_port["spec"]["ports"] = json!([{"port": 80}, {"port": 81}]);
        assert!(!live_matches(&desired, &extra_port));
    }

    #[test]
    fn ignored_fields_are_removed_but_never_the_identity() {
        let mut object = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop",
                         "annotations": {"example.com/owner": "x", "keep": "y"}},
            "spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "a"}, {"name": "b"}]}}}
        });
        strip_pointers(
            &mut object,
            &[
                "/spec/replicas".into(),
                "/metadata/annotations/example.com~1owner".into(),
                "/spec/template/spec/containers/1".into(),
                "/spec/missing/field".into(),
                "/metadata/name".into(),
                "/kind".into(),
                "spec".into(),
            ],
        );
        assert_eq!(
            object,
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "shop", "annotations": {"keep": "y"}},
                "spec": {"template": {"spec": {"containers": [{"name": "a"}]}}}
            })
        );
        // What is not applied is not compared either.
        let live = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "annotations": {"keep": "y"}},
            "spec": {"replicas": 7, "template": {"spec": {"containers": [{"name": "a"}]}}}});
        assert!(live_matches(&object, &live));
    }

    #[test]
    fn status_and_string_data_do_not_count_as_drift() {
        let desired = json!({"kind": "Secret", "stringData": {"a": "b"}, "status": {"x": 1}});
        let live = json!({"kind": "Secret", "data": {"a": "Yg=="}});
        assert!(live_matches(&desired, &live));
    }
}
