//! Turning a Stack's `resources` or `manifests` into the canonical multi-document YAML
//! that becomes a deployment object, checking each document on the way.
//!
//! Canonical means: documents in the user's order, keys sorted, one `---` between
//! documents, so the same objects always give the same SHA-256 checksum however the
//! user spelled them.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fmt;

use brokkr_crds::identity::{ObjectKey, split_api_version};
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};

/// Largest rendered content a Stack may carry (larger bundles are a later feature).
pub const MAX_CONTENT_BYTES: usize = 1024 * 1024;

/// Most values (scalars, lists and mappings, counting map keys) a Stack's manifests may
/// expand to once YAML aliases are resolved. 1 MiB of rendered YAML cannot hold more
/// than about 420,000, so real content never meets it, while an alias bomb of 100 KB
/// that would expand to 10^8 values is stopped before it is built.
pub const MAX_MANIFEST_NODES: usize = 500_000;
/// Deepest nesting of lists and mappings in one document (deep CRD schemas use ~40).
pub const MAX_MANIFEST_DEPTH: usize = 100;

/// A Stack's content, ready to be recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub yaml: String,
    /// Hex SHA-256 of `yaml`.
    pub checksum: String,
    pub objects: usize,
}

impl Rendered {
    /// The content with the Stack's agent policy (`adoptExisting`, `deletionPolicy`) as its
    /// first line, and the checksum over both: a policy change is a new deployment object.
    /// The default policy adds nothing, so the checksum of a Stack that does not use it stays.
    pub fn with_policy(self, policy: &brokkr_crds::StackPolicy) -> Rendered {
        match policy.header() {
            Some(header) => {
                let yaml = format!("{header}{}", self.yaml);
                Rendered {
                    checksum: hex::encode(Sha256::digest(yaml.as_bytes())),
                    yaml,
                    objects: self.objects,
                }
            }
            None => self,
        }
    }
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
    #[error(
        "document {document}: the manifests expand to more than {MAX_MANIFEST_NODES} values once YAML aliases are resolved"
    )]
    TooManyNodes { document: usize },
    #[error(
        "document {document}: lists and mappings are nested deeper than {MAX_MANIFEST_DEPTH} levels"
    )]
    TooDeep { document: usize },
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
    // One budget for all documents: the size check between documents bounds the rest.
    let budget = Budget {
        nodes_left: Cell::new(MAX_MANIFEST_NODES),
        exceeded: Cell::new(None),
    };
    let documents = serde_yaml::Deserializer::from_str(manifests)
        .enumerate()
        .map(|(i, document)| {
            let parsed = BoundedValue {
                budget: &budget,
                depth: 0,
            }
            .deserialize(document)
            .map_err(|err| match budget.exceeded.take() {
                Some(Limit::Nodes) => RenderError::TooManyNodes { document: i + 1 },
                Some(Limit::Depth) => RenderError::TooDeep { document: i + 1 },
                None => RenderError::InvalidYaml {
                    document: i + 1,
                    reason: err.to_string(),
                },
            });
            (i + 1, parsed)
        });
    render_documents(documents)
}

#[derive(Clone, Copy, Debug)]
enum Limit {
    Nodes,
    Depth,
}

/// What is left of the values a Stack's manifests may expand to, and which limit, if
/// any, stopped the parse (the YAML parser wraps our error in its own).
struct Budget {
    nodes_left: Cell<usize>,
    exceeded: Cell<Option<Limit>>,
}

impl Budget {
    fn take_node<E: serde::de::Error>(&self) -> Result<(), E> {
        match self.nodes_left.get().checked_sub(1) {
            Some(left) => {
                self.nodes_left.set(left);
                Ok(())
            }
            None => {
                self.exceeded.set(Some(Limit::Nodes));
                Err(E::custom("too many values"))
            }
        }
    }
}

/// Deserializes a [`Value`] as `Value::deserialize` does, but counting every value
/// against the budget as it is built, so aliases cannot expand past it.
struct BoundedValue<'a> {
    budget: &'a Budget,
    depth: usize,
}

impl BoundedValue<'_> {
    fn nested<E: serde::de::Error>(&self) -> Result<BoundedValue<'_>, E> {
        if self.depth >= MAX_MANIFEST_DEPTH {
            self.budget.exceeded.set(Some(Limit::Depth));
            return Err(E::custom("nested too deeply"));
        }
        Ok(BoundedValue {
            budget: self.budget,
            depth: self.depth + 1,
        })
    }
}

impl<'de> DeserializeSeed<'de> for BoundedValue<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BoundedValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        self.budget.take_node()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        self.budget.take_node()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        self.budget.take_node()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        self.budget.take_node()?;
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.budget.take_node()?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        self.budget.take_node()?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.budget.take_node()?;
        Ok(Value::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.budget.take_node()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.nested()?)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.budget.take_node()?;
        let mut entries = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            self.budget.take_node()?;
            let value = map.next_value_seed(self.nested()?)?;
            entries.insert(key, value);
        }
        Ok(Value::Object(entries))
    }
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

/// The document's identity in a cluster ([`ObjectKey`]: group, kind, namespace, name).
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
    // An empty namespace is no namespace, as the apiserver reads it.
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    Ok(ObjectKey {
        group: split_api_version(&api_version).0.to_owned(),
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
    use serde::Deserialize;

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
    fn the_agent_policy_is_the_first_line_and_part_of_the_checksum() {
        use brokkr_crds::{DeletionPolicy, StackPolicy};
        let plain = render_manifests(APP).unwrap();
        assert_eq!(plain.clone().with_policy(&StackPolicy::default()), plain);
        let orphan = StackPolicy {
            deletion_policy: DeletionPolicy::Orphan,
            ..StackPolicy::default()
        };
        let with = plain.clone().with_policy(&orphan);
        assert!(with.yaml.ends_with(&plain.yaml));
        assert_ne!(with.checksum, plain.checksum);
        assert_eq!(with.objects, plain.objects);
        assert_eq!(StackPolicy::from_yaml(&with.yaml), Ok(orphan));
        let adopt = StackPolicy {
            adopt_existing: true,
            ..StackPolicy::default()
        };
        assert_ne!(plain.with_policy(&adopt).checksum, with.checksum);
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

    /// About 100 KB: one anchor of 20,000 items referenced 20,000 times would expand
    /// to 4×10⁸ values.
    fn alias_bomb() -> String {
        let mut yaml = String::from(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bomb\ndata:\n  items: &a [",
        );
        yaml.push_str(&vec!["x"; 20_000].join(","));
        yaml.push_str("]\n  copies: [");
        yaml.push_str(&vec!["*a"; 20_000].join(","));
        yaml.push_str("]\n");
        yaml
    }

    #[test]
    fn an_alias_bomb_is_refused_before_it_expands() {
        let bomb = alias_bomb();
        assert!(bomb.len() < 120_000, "{}", bomb.len());
        let err = render_manifests(&bomb).unwrap_err();
        assert_eq!(err, RenderError::TooManyNodes { document: 1 });
        assert!(
            err.to_string()
                .contains("expand to more than 500000 values once YAML aliases are resolved"),
            "{err}"
        );
    }

    #[test]
    fn aliases_within_the_budget_still_work() {
        let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  labels: &l {app: web}\n  annotations: *l\n";
        let rendered = render_manifests(yaml).unwrap();
        assert!(
            rendered.yaml.contains("annotations:\n    app: web"),
            "{}",
            rendered.yaml
        );
    }

    #[test]
    fn nesting_past_the_depth_limit_is_refused() {
        let deep = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: deep\nx: {}{}\n",
            "[".repeat(MAX_MANIFEST_DEPTH + 1),
            "]".repeat(MAX_MANIFEST_DEPTH + 1)
        );
        let err = render_manifests(&deep).unwrap_err();
        assert_eq!(err, RenderError::TooDeep { document: 1 });
        assert!(err.to_string().contains("deeper than 100 levels"));
        let fine = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: deep\nx: {}{}\n",
            "[".repeat(90),
            "]".repeat(90)
        );
        assert!(render_manifests(&fine).is_ok());
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
