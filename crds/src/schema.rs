//! Hand-written schema fragments for the places where the derived schema is not
//! what the apiserver needs. Used through `#[schemars(schema_with = "...")]`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::json;

use crate::validation::{ANNOTATION_KEY_MAX_LEN, ANNOTATION_VALUE_MAX_LEN, MAX_ANNOTATIONS};

/// `status.conditions`: a list-map keyed by `type`, so server-side apply merges one
/// condition at a time and the apiserver refuses two conditions of the same type.
pub(crate) fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), json!("map"));
    schema.insert("x-kubernetes-list-map-keys".into(), json!(["type"]));
    schema
}

/// `spec.resources`: a list of whole Kubernetes objects. Each item keeps every field
/// (`x-kubernetes-preserve-unknown-fields`) and is checked by the apiserver as an
/// embedded resource: `apiVersion` and `kind` are required, `metadata` is validated.
pub(crate) fn embedded_resources(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
            "x-kubernetes-embedded-resource": true,
        },
    })
}

/// `spec.annotations`: string to string, keys and values limited to the database's
/// column size. Structural schemas cannot constrain map keys, so a CEL rule does;
/// `maxProperties` keeps that rule's estimated cost within the apiserver's budget.
pub(crate) fn annotations(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": MAX_ANNOTATIONS,
        "additionalProperties": {
            "type": "string",
            "maxLength": ANNOTATION_VALUE_MAX_LEN,
        },
        "x-kubernetes-validations": [{
            "rule": format!("self.all(k, size(k) >= 1 && size(k) <= {ANNOTATION_KEY_MAX_LEN})"),
            "message": format!("annotation keys must be 1 to {ANNOTATION_KEY_MAX_LEN} characters long"),
        }],
    })
}

/// The schema of `T` for an `Option<T>` field, without `nullable: true`. The apiserver
/// then drops an explicit `null` (as left by an empty Helm value) instead of keeping it,
/// so `has(self.field)` in CEL rules agrees with `Option::is_some` in Rust.
pub(crate) fn non_nullable<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}
