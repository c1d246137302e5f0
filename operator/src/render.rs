//! Turning a Stack's `resources` or `manifests` into the canonical multi-document YAML
//! that becomes a deployment object, checking each document on the way.
//!
//! Canonical means: documents in the user's order, keys sorted, one `---` between
//! documents, so the same objects always give the same SHA-256 checksum however the
//! user spelled them.

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Largest rendered content a Stack may carry (larger bundles are a later feature).
pub const MAX_CONTENT_BYTES: usize = 1024 * 1024;

/// A Stack's content, ready to be recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub yaml: String,
    /// Hex SHA-256 of `yaml`.
    pub checksum: String,
    pub objects: usize,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("document {document}: invalid YAML: {reason}")]
    InvalidYaml { document: usize, reason: String },
    #[error(
        "document {document}: must be a mapping (an object with apiVersion, kind and metadata)"
    )]
    NotAnObject { document: usize },
    #[error("document {document}: missing {field}")]
    MissingField {
        document: usize,
        field: &'static str,
    },
    #[error(
        "document {document}: {kind} {name:?} appears more than once (first in document {first})"
    )]
    Duplicate {
        document: usize,
        first: usize,
        kind: String,
        name: String,
    },
    #[error("the Stack holds no objects")]
    Empty,
    #[error(
        "the Stack's content is {size} bytes; at most {MAX_CONTENT_BYTES} bytes (1 MiB) are supported"
    )]
    TooLarge { size: usize },
}

/// Renders a list of embedded objects (`spec.resources`).
pub fn render_resources(resources: &[Value]) -> Result<Rendered, RenderError> {
    render_documents(
        resources
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, v)| (i + 1, Ok(v))),
    )
}

/// Renders multi-document YAML (`spec.manifests`). Empty documents are skipped.
pub fn render_manifests(manifests: &str) -> Result<Rendered, RenderError> {
    if manifests.len() > MAX_CONTENT_BYTES {
        return Err(RenderError::TooLarge {
            size: manifests.len(),
        });
    }
    let documents = serde_yaml::Deserializer::from_str(manifests)
        .enumerate()
        .map(|(i, document)| {
            let parsed = Value::deserialize(document).map_err(|err| RenderError::InvalidYaml {
                document: i + 1,
                reason: err.to_string(),
            });
            (i + 1, parsed)
        });
    render_documents(documents)
}

fn render_documents(
    documents: impl Iterator<Item = (usize, Result<Value, RenderError>)>,
) -> Result<Rendered, RenderError> {
    let mut seen: Vec<(ObjectKey, usize)> = Vec::new();
    let mut keys = BTreeSet::new();
    let mut yaml = String::new();
    for (document, parsed) in documents {
        let value = parsed?;
        if value.is_null() {
            continue;
        }
        let key = object_key(document, &value)?;
        if !keys.insert(key.clone()) {
            let first = seen
                .iter()
                .find(|(k, _)| k == &key)
                .map_or(document, |(_, d)| *d);
            return Err(RenderError::Duplicate {
                document,
                first,
                kind: key.kind,
                name: key.name,
            });
        }
        seen.push((key, document));
        if !yaml.is_empty() {
            yaml.push_str("---\n");
        }
        let text =
            serde_yaml::to_string(&canonical(value)).map_err(|err| RenderError::InvalidYaml {
                document,
                reason: err.to_string(),
            })?;
        yaml.push_str(&text);
        if yaml.len() > MAX_CONTENT_BYTES {
            return Err(RenderError::TooLarge { size: yaml.len() });
        }
    }
    if seen.is_empty() {
        return Err(RenderError::Empty);
    }
    let checksum = hex::encode(Sha256::digest(yaml.as_bytes()));
    Ok(Rendered {
        yaml,
        checksum,
        objects: seen.len(),
    })
}

/// What makes two documents the same object in a cluster: the API group (not the
/// version, which is only how it is spelled), kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    group: String,
    kind: String,
    namespace: String,
    name: String,
}

fn object_key(document: usize, value: &Value) -> Result<ObjectKey, RenderError> {
    let object = value
        .as_object()
        .ok_or(RenderError::NotAnObject { document })?;
    let text = |v: Option<&Value>, field| {
        v.and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or(RenderError::MissingField { document, field })
    };
    let api_version = text(object.get("apiVersion"), "apiVersion")?;
    let kind = text(object.get("kind"), "kind")?;
    let metadata = object.get("metadata");
    let name = text(metadata.and_then(|m| m.get("name")), "metadata.name")?;
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let group = api_version
        .rsplit_once('/')
        .map_or(String::new(), |(group, _)| group.to_owned());
    Ok(ObjectKey {
        group,
        kind,
        namespace,
        name,
    })
}

/// `value` with every mapping's keys in sorted order.
fn canonical(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, canonical(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: shop
data:
  b: "2"
  a: "1"
"#;

    #[test]
    fn manifests_render_to_sorted_documents_with_a_stable_checksum() {
        let rendered = render_manifests(APP).unwrap();
        assert_eq!(rendered.objects, 2);
        assert!(
            rendered
                .yaml
                .starts_with("apiVersion: v1\nkind: Namespace\n")
        );
        assert!(rendered.yaml.contains("---\n"));
        let a = rendered.yaml.find("a: '1'").unwrap();
        let b = rendered.yaml.find("b: '2'").unwrap();
        assert!(a < b, "keys are sorted:\n{}", rendered.yaml);
        assert_eq!(rendered.checksum.len(), 64);
    }

    #[test]
    fn key_order_and_formatting_do_not_change_the_checksum() {
        let reordered = r#"
kind: Namespace
metadata: {name: shop}
apiVersion: v1
---
# a comment
data: {a: "1", b: "2"}
metadata: {namespace: shop, name: settings}
kind: ConfigMap
apiVersion: v1
"#;
        assert_eq!(
            render_manifests(APP).unwrap().checksum,
            render_manifests(reordered).unwrap().checksum
        );
    }

    #[test]
    fn resources_and_manifests_of_the_same_objects_agree() {
        let resources: Vec<Value> = serde_yaml::Deserializer::from_str(APP)
            .map(|d| Value::deserialize(d).unwrap())
            .collect();
        assert_eq!(
            render_resources(&resources).unwrap(),
            render_manifests(APP).unwrap()
        );
    }

    #[test]
    fn a_changed_value_changes_the_checksum() {
        let changed = APP.replace("b: \"2\"", "b: \"3\"");
        assert_ne!(
            render_manifests(APP).unwrap().checksum,
            render_manifests(&changed).unwrap().checksum
        );
    }

    #[test]
    fn invalid_yaml_names_the_document_and_the_parser_message() {
        let err = render_manifests(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\nkey: [unclosed\n",
        )
        .unwrap_err();
        match &err {
            RenderError::InvalidYaml { document, reason } => {
                assert_eq!(*document, 2);
                assert!(reason.contains("line"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().starts_with("document 2: invalid YAML"));
    }

    #[test]
    fn documents_without_kind_or_name_are_refused() {
        let no_kind = "apiVersion: v1\nmetadata:\n  name: a\n";
        assert_eq!(
            render_manifests(no_kind).unwrap_err(),
            RenderError::MissingField {
                document: 1,
                field: "kind"
            }
        );
        let no_name = "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n";
        assert_eq!(
            render_manifests(no_name).unwrap_err().to_string(),
            "document 1: missing metadata.name"
        );
        assert_eq!(
            render_manifests("- a\n- b\n").unwrap_err(),
            RenderError::NotAnObject { document: 1 }
        );
    }

    #[test]
    fn the_same_object_twice_is_refused() {
        let twice = format!(
            "{APP}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: shop\n"
        );
        let err = render_manifests(&twice).unwrap_err();
        assert_eq!(
            err.to_string(),
            "document 3: ConfigMap \"settings\" appears more than once (first in document 2)"
        );
        // The same name in another namespace, or of another kind, is another object.
        let other_namespace = format!(
            "{APP}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: other\n"
        );
        assert!(render_manifests(&other_namespace).is_ok());
    }

    #[test]
    fn empty_documents_are_skipped_but_an_empty_stack_is_refused() {
        assert_eq!(
            render_manifests(&format!("---\n{APP}\n---\n"))
                .unwrap()
                .objects,
            2
        );
        assert_eq!(
            render_manifests("---\n---\n").unwrap_err(),
            RenderError::Empty
        );
        assert_eq!(render_resources(&[]).unwrap_err(), RenderError::Empty);
    }

    #[test]
    fn content_over_one_mebibyte_is_refused_with_a_clear_message() {
        let big = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\ndata:\n  blob: \"{}\"\n",
            "x".repeat(MAX_CONTENT_BYTES)
        );
        let err = render_manifests(&big).unwrap_err();
        assert!(matches!(err, RenderError::TooLarge { .. }));
        assert!(err.to_string().contains("at most 1048576 bytes (1 MiB)"));
    }
}
