//! Just enough OpenAPI v3 for custom resources: pruning of unknown fields, `type`, `required`,
//! `enum`, `nullable`, `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`,
//! bounds (lengths, item and property counts, minimum and maximum), and the undeclared fields
//! a server-side apply is refused for. Formats and patterns are not checked; CEL rules are in
//! [`crate::cel`].

use serde_json::{Value, json};

use crate::status::Cause;

/// Removes fields the schema does not declare, as the apiserver does for structural schemas.
/// `apiVersion`, `kind` and `metadata` at the root are always kept.
pub fn prune(schema: &Value, object: &mut Value) {
    prune_node(schema, object, true);
}

fn prune_node(schema: &Value, value: &mut Value, root: bool) {
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let preserve = schema
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let allow_any = schema.get("additionalProperties") == Some(&Value::Bool(true));
            map.retain(|key, _| {
                (root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata"))
                    || preserve
                    || allow_any
                    || additional.is_some()
                    || properties.is_some_and(|p| p.contains_key(key))
            });
            for (key, child) in map.iter_mut() {
                if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(child_schema) = properties.and_then(|p| p.get(key)).or(additional) {
                    prune_node(child_schema, child, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                items
                    .iter_mut()
                    .for_each(|item| prune_node(item_schema, item, false));
            }
        }
        _ => {}
    }
}

/// The fields of `object` that `schema` does not declare (what [`prune`] would drop), as
/// structured-merge-diff names them: `.spec.extra`, `.spec.items[0].extra`. `metadata` is not
/// looked into.
pub fn undeclared_fields(schema: &Value, object: &Value) -> Vec<String> {
    let mut found = Vec::new();
    undeclared_node(schema, object, "", true, &mut found);
    found
}

fn undeclared_node(schema: &Value, value: &Value, path: &str, root: bool, found: &mut Vec<String>) {
    if schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
    {
        return;
    }
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (key, child) in map {
                if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let child_path = format!("{path}.{key}");
                match properties.and_then(|p| p.get(key)) {
                    Some(child_schema) => {
                        undeclared_node(child_schema, child, &child_path, false, found)
                    }
                    None => match additional {
                        Some(Value::Bool(true)) => {}
                        Some(child_schema @ Value::Object(_)) => {
                            undeclared_node(child_schema, child, &child_path, false, found)
                        }
                        _ => found.push(child_path),
                    },
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    undeclared_node(item_schema, item, &format!("{path}[{i}]"), false, found);
                }
            }
        }
        _ => {}
    }
}

/// Checks `object` against `schema`; every violation becomes a 422 cause naming its field path.
pub fn validate(schema: &Value, object: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    validate_node(schema, object, "", &mut causes);
    causes
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

fn validate_node(schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    let actual = type_name(value);
    if value.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
        return;
    }
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true);
    let type_ok = match schema.get("type").and_then(Value::as_str) {
        _ if int_or_string => matches!(actual, "integer" | "string"),
        Some("number") => matches!(actual, "integer" | "number"),
        Some(expected) => actual == expected,
        None => true,
    };
    if !type_ok {
        let expected = schema
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("integer or string");
        causes.push(Cause {
            reason: "FieldValueTypeInvalid",
            message: format!("Invalid value: \"{actual}\": {path} in body must be of type {expected}: \"{actual}\""),
            field: path.to_string(),
        });
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let supported: Vec<String> = allowed.iter().map(Value::to_string).collect();
        causes.push(Cause {
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {value}: supported values: {}",
                supported.join(", ")
            ),
            field: path.to_string(),
        });
    }
    check_bounds(schema, value, path, causes);
    if let Value::Object(map) = value {
        for required in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(name) = required.as_str()
                && !map.contains_key(name)
            {
                causes.push(Cause {
                    reason: "FieldValueRequired",
                    message: "Required value".into(),
                    field: child_path(path, name),
                });
            }
        }
    }
    for (step, child_schema, child) in described_children(schema, value, path.is_empty()) {
        validate_node(child_schema, child, &step.path(path), causes);
    }
}

/// One step from a value down to a child: a field of an object or an item of a list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step<'a> {
    Field(&'a str),
    Index(usize),
}

impl Step<'_> {
    /// The child's field path under `parent`: `spec.image`, `spec.tags[1]`.
    pub fn path(&self, parent: &str) -> String {
        match self {
            Step::Field(key) => child_path(parent, key),
            Step::Index(i) => format!("{parent}[{i}]"),
        }
    }
}

/// The children of `value` that `schema` describes (through `properties`, an
/// `additionalProperties` schema or `items`), each with its schema. At the root, `apiVersion`,
/// `kind` and `metadata` are left out.
pub fn described_children<'a>(
    schema: &'a Value,
    value: &'a Value,
    root: bool,
) -> Vec<(Step<'a>, &'a Value, &'a Value)> {
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            map.iter()
                .filter(|(key, _)| {
                    !(root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata"))
                })
                .filter_map(|(key, child)| {
                    let child_schema = properties.and_then(|p| p.get(key)).or(additional)?;
                    Some((Step::Field(key.as_str()), child_schema, child))
                })
                .collect()
        }
        Value::Array(items) => match schema.get("items") {
            Some(item_schema) => items
                .iter()
                .enumerate()
                .map(|(i, item)| (Step::Index(i), item_schema, item))
                .collect(),
            None => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// `maxLength`, `minLength`, `maxItems`, `minItems`, `maxProperties`, `minProperties`,
/// `maximum`, `minimum` (and their `exclusive*` forms), with the API server's reasons and
/// messages (kube-openapi's, as apiextensions-apiserver converts them).
fn check_bounds(schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    let limit = |key: &str| schema.get(key).and_then(Value::as_u64);
    let mut invalid = |what: String| {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {value}: {path} in body {what}"),
            field: path.to_string(),
        })
    };
    let (count, noun) = match value {
        Value::String(s) => (s.chars().count() as u64, "chars long"),
        Value::Array(items) => (items.len() as u64, "items"),
        Value::Object(map) => (map.len() as u64, "properties"),
        Value::Number(n) => {
            let Some(x) = n.as_f64() else { return };
            let exclusive = |key: &str| schema.get(key).and_then(Value::as_bool) == Some(true);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                if exclusive("exclusiveMinimum") && x <= min {
                    invalid(format!("should be greater than {min}"));
                } else if x < min {
                    invalid(format!("should be greater than or equal to {min}"));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                if exclusive("exclusiveMaximum") && x >= max {
                    invalid(format!("should be less than {max}"));
                } else if x > max {
                    invalid(format!("should be less than or equal to {max}"));
                }
            }
            return;
        }
        _ => return,
    };
    let (max_key, min_key) = match value {
        Value::String(_) => ("maxLength", "minLength"),
        Value::Array(_) => ("maxItems", "minItems"),
        _ => ("maxProperties", "minProperties"),
    };
    if let Some(min) = limit(min_key)
        && count < min
    {
        let at_least = if noun == "chars long" {
            format!("should be at least {min} chars long")
        } else {
            format!("should have at least {min} {noun}")
        };
        invalid(at_least);
    }
    if let Some(max) = limit(max_key)
        && count > max
    {
        let (reason, message) = match value {
            Value::String(_) => (
                "FieldValueTooLong",
                format!("Too long: may not be more than {max} bytes"),
            ),
            _ => (
                "FieldValueTooMany",
                format!("Too many: {count}: must have at most {max} items"),
            ),
        };
        causes.push(Cause {
            reason,
            message,
            field: path.to_string(),
        });
    }
}

/// The checks the apiserver makes on a CustomResourceDefinition itself that matter for serving it.
pub fn validate_crd(crd: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let text = |pointer: &str| {
        crd.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let require = |pointer: &str, causes: &mut Vec<Cause>| {
        if text(pointer).is_empty() {
            causes.push(Cause {
                reason: "FieldValueRequired",
                message: "Required value".into(),
                field: pointer.trim_start_matches('/').replace('/', "."),
            });
        }
    };
    for pointer in ["/spec/group", "/spec/names/plural", "/spec/names/kind"] {
        require(pointer, &mut causes);
    }
    let expected_name = format!("{}.{}", text("/spec/names/plural"), text("/spec/group"));
    if text("/metadata/name") != expected_name {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            message: format!(
                "Invalid value: {}: must be spec.names.plural+\".\"+spec.group",
                json!(text("/metadata/name"))
            ),
            field: "metadata.name".into(),
        });
    }
    if !matches!(text("/spec/scope"), "Namespaced" | "Cluster") {
        causes.push(Cause {
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {}: supported values: \"Cluster\", \"Namespaced\"",
                json!(text("/spec/scope"))
            ),
            field: "spec.scope".into(),
        });
    }
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array);
    let storage = versions
        .into_iter()
        .flatten()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count();
    if versions.is_none_or(|v| v.is_empty()) {
        causes.push(Cause {
            reason: "FieldValueRequired",
            message: "Required value".into(),
            field: "spec.versions".into(),
        });
    } else if storage != 1 {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            message: format!(
                "Invalid value: {storage}: must have exactly one version marked as storage version"
            ),
            field: "spec.versions".into(),
        });
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["spec"],
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": { "type": "string" },
                        "replicas": { "type": "integer" },
                        "ratio": { "type": "number" },
                        "port": { "x-kubernetes-int-or-string": true },
                        "mode": { "type": "string", "enum": ["a", "b"] },
                        "tags": { "type": "array", "items": { "type": "string" } },
                        "env": { "type": "object", "additionalProperties": { "type": "string" } },
                        "free": { "type": "object", "x-kubernetes-preserve-unknown-fields": true },
                        "note": { "type": "string", "nullable": true },
                    }
                },
                "status": { "type": "object", "properties": { "ready": { "type": "boolean" } } }
            }
        })
    }

    fn fields(causes: &[Cause]) -> Vec<(&str, &str)> {
        causes
            .iter()
            .map(|c| (c.field.as_str(), c.reason))
            .collect()
    }

    #[test]
    fn a_valid_object_passes() {
        let object = json!({
            "apiVersion": "x/v1", "kind": "W", "metadata": { "name": "w" },
            "spec": { "image": "i", "replicas": 2, "ratio": 1, "port": "http", "mode": "a",
                      "tags": ["t"], "env": { "A": "1" }, "free": { "any": [1] }, "note": null },
        });
        assert_eq!(fields(&validate(&schema(), &object)), []);
    }

    #[test]
    fn missing_required_fields_are_named_by_path() {
        assert_eq!(
            fields(&validate(&schema(), &json!({}))),
            [("spec", "FieldValueRequired")]
        );
        assert_eq!(
            fields(&validate(&schema(), &json!({ "spec": {} }))),
            [("spec.image", "FieldValueRequired")]
        );
    }

    #[test]
    fn wrong_types_are_named_by_path_with_the_apiserver_message() {
        let causes = validate(
            &schema(),
            &json!({ "spec": { "image": "i", "replicas": "two" } }),
        );
        assert_eq!(
            fields(&causes),
            [("spec.replicas", "FieldValueTypeInvalid")]
        );
        assert_eq!(
            causes[0].message,
            "Invalid value: \"string\": spec.replicas in body must be of type integer: \"string\""
        );
        let causes = validate(
            &schema(),
            &json!({ "spec": { "image": 1, "tags": ["a", 2], "env": { "A": true }, "port": 1.5, "mode": "c" } }),
        );
        assert_eq!(
            fields(&causes),
            [
                ("spec.env.A", "FieldValueTypeInvalid"),
                ("spec.image", "FieldValueTypeInvalid"),
                ("spec.mode", "FieldValueNotSupported"),
                ("spec.port", "FieldValueTypeInvalid"),
                ("spec.tags[1]", "FieldValueTypeInvalid"),
            ]
        );
    }

    #[test]
    fn pruning_drops_undeclared_fields_only() {
        let mut object = json!({
            "apiVersion": "x/v1", "kind": "W", "metadata": { "name": "w" }, "extra": 1,
            "spec": { "image": "i", "unknown": 1, "env": { "A": "1" }, "free": { "kept": 1 } },
        });
        prune(&schema(), &mut object);
        assert_eq!(
            object,
            json!({
                "apiVersion": "x/v1", "kind": "W", "metadata": { "name": "w" },
                "spec": { "image": "i", "env": { "A": "1" }, "free": { "kept": 1 } },
            })
        );
    }

    #[test]
    fn bounds_are_checked_with_the_api_servers_reasons() {
        let schema = json!({ "type": "object", "properties": {
            "name": { "type": "string", "minLength": 1, "maxLength": 3 },
            "tags": { "type": "array", "minItems": 1, "maxItems": 2, "items": { "type": "string" } },
            "env": { "type": "object", "maxProperties": 1, "additionalProperties": { "type": "string" } },
            "replicas": { "type": "integer", "minimum": 1, "maximum": 10, "exclusiveMaximum": true },
        } });
        let ok = json!({ "name": "äbc", "tags": ["a"], "env": { "A": "1" }, "replicas": 9 });
        assert_eq!(fields(&validate(&schema, &ok)), []);
        let causes = validate(
            &schema,
            &json!({ "name": "", "tags": [], "env": { "A": "1", "B": "2" }, "replicas": 10 }),
        );
        assert_eq!(
            fields(&causes),
            [
                ("env", "FieldValueTooMany"),
                ("name", "FieldValueInvalid"),
                ("replicas", "FieldValueInvalid"),
                ("tags", "FieldValueInvalid"),
            ]
        );
        assert_eq!(causes[0].message, "Too many: 2: must have at most 1 items");
        assert_eq!(
            causes[1].message,
            "Invalid value: \"\": name in body should be at least 1 chars long"
        );
        let causes = validate(&schema, &json!({ "name": "abcd", "replicas": 0 }));
        assert_eq!(
            fields(&causes),
            [
                ("name", "FieldValueTooLong"),
                ("replicas", "FieldValueInvalid")
            ]
        );
        assert_eq!(causes[0].message, "Too long: may not be more than 3 bytes");
    }

    #[test]
    fn undeclared_fields_are_named_as_structured_merge_diff_does() {
        let object = json!({
            "apiVersion": "x/v1", "kind": "W", "metadata": { "name": "w", "odd": 1 }, "extra": 1,
            "spec": { "image": "i", "unknown": 1, "env": { "A": "1" }, "free": { "kept": 1 } },
            "status": { "ready": true, "phase": "x" },
        });
        assert_eq!(
            undeclared_fields(&schema(), &object),
            [".extra", ".spec.unknown", ".status.phase"]
        );
        let mut pruned = object.clone();
        prune(&schema(), &mut pruned);
        assert_eq!(undeclared_fields(&schema(), &pruned), Vec::<String>::new());
    }

    #[test]
    fn crd_names_must_agree() {
        let crd = json!({
            "metadata": { "name": "wrong" },
            "spec": { "group": "example.com", "scope": "Namespaced",
                      "names": { "plural": "widgets", "kind": "Widget" },
                      "versions": [{ "name": "v1", "served": true, "storage": true }] }
        });
        assert_eq!(
            fields(&validate_crd(&crd)),
            [("metadata.name", "FieldValueInvalid")]
        );
    }
}
