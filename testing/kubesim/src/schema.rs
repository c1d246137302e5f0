//! Just enough OpenAPI v3 for custom resources: pruning of unknown fields, `type`, `required`,
//! `enum`, `nullable`, `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`.
//! Formats, patterns, bounds and CEL rules are not checked.

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
    match value {
        Value::Object(map) => {
            let root = path.is_empty();
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
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in map {
                if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(child_schema) = properties.and_then(|p| p.get(key)).or(additional) {
                    validate_node(child_schema, child, &child_path(path, key), causes);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate_node(item_schema, item, &format!("{path}[{i}]"), causes);
                }
            }
        }
        _ => {}
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
