//! Field types of built-in kinds, checked the way the API server decodes them.
//!
//! The real server decodes a built-in object into its Go type, so a value of the wrong JSON type
//! (a number in a ConfigMap's `data`, a string in `spec.replicas`) is refused; each verb words the
//! failure differently (see [`TypeError`]). Only the fields listed here are checked (metadata and
//! the common fields of Namespace, ConfigMap, Secret, Service and Deployment); other fields are
//! stored as sent.

use serde_json::Value;

use crate::resources::ResourceType;
use crate::status::{ApiError, Cause};

/// The declared type of a field.
#[derive(Debug, PartialEq)]
enum Field {
    String,
    Int32,
    Int64,
    Bool,
    /// `[]byte`: a base64 string (standard alphabet, padded).
    Bytes,
    /// `intstr.IntOrString`.
    IntOrString,
    List(&'static Field),
    /// `map[string]T`.
    Map(&'static Field),
    /// A Go struct (its type name, for decoder messages) with the fields checked.
    Struct(&'static str, &'static [(&'static str, Field)]),
}

use Field::*;

const STRINGS: Field = List(&String);
const STRING_MAP: Field = Map(&String);

const OWNER_REFERENCE: Field = Struct(
    "OwnerReference",
    &[
        ("apiVersion", String),
        ("kind", String),
        ("name", String),
        ("uid", String),
        ("controller", Bool),
        ("blockOwnerDeletion", Bool),
    ],
);

const OBJECT_META: Field = Struct(
    "ObjectMeta",
    &[
        ("name", String),
        ("generateName", String),
        ("namespace", String),
        ("uid", String),
        ("resourceVersion", String),
        ("generation", Int64),
        ("labels", STRING_MAP),
        ("annotations", STRING_MAP),
        ("finalizers", STRINGS),
        ("ownerReferences", List(&OWNER_REFERENCE)),
    ],
);

const LABEL_SELECTOR: Field = Struct(
    "LabelSelector",
    &[
        ("matchLabels", STRING_MAP),
        (
            "matchExpressions",
            List(&Struct(
                "LabelSelectorRequirement",
                &[("key", String), ("operator", String), ("values", STRINGS)],
            )),
        ),
    ],
);

const CONTAINER: Field = Struct(
    "Container",
    &[
        ("name", String),
        ("image", String),
        ("imagePullPolicy", String),
        ("workingDir", String),
        ("command", STRINGS),
        ("args", STRINGS),
        (
            "ports",
            List(&Struct(
                "ContainerPort",
                &[
                    ("name", String),
                    ("containerPort", Int32),
                    ("hostPort", Int32),
                    ("protocol", String),
                    ("hostIP", String),
                ],
            )),
        ),
        (
            "env",
            List(&Struct("EnvVar", &[("name", String), ("value", String)])),
        ),
        (
            "volumeMounts",
            List(&Struct(
                "VolumeMount",
                &[
                    ("name", String),
                    ("mountPath", String),
                    ("subPath", String),
                    ("readOnly", Bool),
                ],
            )),
        ),
    ],
);

const VOLUME: Field = Struct(
    "Volume",
    &[
        ("name", String),
        (
            "configMap",
            Struct(
                "ConfigMapVolumeSource",
                &[("name", String), ("defaultMode", Int32), ("optional", Bool)],
            ),
        ),
        (
            "secret",
            Struct(
                "SecretVolumeSource",
                &[
                    ("secretName", String),
                    ("defaultMode", Int32),
                    ("optional", Bool),
                ],
            ),
        ),
    ],
);

const POD_TEMPLATE: Field = Struct(
    "PodTemplateSpec",
    &[
        ("metadata", OBJECT_META),
        (
            "spec",
            Struct(
                "PodSpec",
                &[
                    ("containers", List(&CONTAINER)),
                    ("initContainers", List(&CONTAINER)),
                    ("volumes", List(&VOLUME)),
                    ("serviceAccountName", String),
                    ("restartPolicy", String),
                    ("nodeSelector", STRING_MAP),
                    ("terminationGracePeriodSeconds", Int64),
                ],
            ),
        ),
    ],
);

const NAMESPACE: Field = Struct(
    "Namespace",
    &[
        ("metadata", OBJECT_META),
        ("spec", Struct("NamespaceSpec", &[("finalizers", STRINGS)])),
    ],
);

const CONFIG_MAP: Field = Struct(
    "ConfigMap",
    &[
        ("metadata", OBJECT_META),
        ("data", STRING_MAP),
        ("binaryData", Map(&Bytes)),
        ("immutable", Bool),
    ],
);

const SECRET: Field = Struct(
    "Secret",
    &[
        ("metadata", OBJECT_META),
        ("data", Map(&Bytes)),
        ("stringData", STRING_MAP),
        ("type", String),
        ("immutable", Bool),
    ],
);

const SERVICE: Field = Struct(
    "Service",
    &[
        ("metadata", OBJECT_META),
        (
            "spec",
            Struct(
                "ServiceSpec",
                &[
                    ("type", String),
                    ("selector", STRING_MAP),
                    ("clusterIP", String),
                    ("clusterIPs", STRINGS),
                    ("externalIPs", STRINGS),
                    ("externalName", String),
                    ("sessionAffinity", String),
                    ("publishNotReadyAddresses", Bool),
                    (
                        "ports",
                        List(&Struct(
                            "ServicePort",
                            &[
                                ("name", String),
                                ("protocol", String),
                                ("appProtocol", String),
                                ("port", Int32),
                                ("targetPort", IntOrString),
                                ("nodePort", Int32),
                            ],
                        )),
                    ),
                ],
            ),
        ),
    ],
);

const DEPLOYMENT: Field = Struct(
    "Deployment",
    &[
        ("metadata", OBJECT_META),
        (
            "spec",
            Struct(
                "DeploymentSpec",
                &[
                    ("replicas", Int32),
                    ("selector", LABEL_SELECTOR),
                    ("template", POD_TEMPLATE),
                    (
                        "strategy",
                        Struct(
                            "DeploymentStrategy",
                            &[
                                ("type", String),
                                (
                                    "rollingUpdate",
                                    Struct(
                                        "RollingUpdateDeployment",
                                        &[
                                            ("maxUnavailable", IntOrString),
                                            ("maxSurge", IntOrString),
                                        ],
                                    ),
                                ),
                            ],
                        ),
                    ),
                    ("minReadySeconds", Int32),
                    ("revisionHistoryLimit", Int32),
                    ("progressDeadlineSeconds", Int32),
                    ("paused", Bool),
                ],
            ),
        ),
    ],
);

/// Built-in kinds without a detailed schema here: only their metadata is checked.
const OTHER_BUILTIN: Field = Struct("Object", &[("metadata", OBJECT_META)]);

fn schema_for(rt: &ResourceType) -> Option<&'static Field> {
    if rt.custom.is_some() || rt.is_crd() {
        return None;
    }
    Some(match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "namespaces") => &NAMESPACE,
        ("", "configmaps") => &CONFIG_MAP,
        ("", "secrets") => &SECRET,
        ("", "services") => &SERVICE,
        ("apps", "deployments") => &DEPLOYMENT,
        _ => &OTHER_BUILTIN,
    })
}

/// A value whose JSON type does not fit its field.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeError {
    /// The Go struct holding the field, e.g. `ConfigMap`, `DeploymentSpec`.
    go_struct: &'static str,
    /// Struct fields from the root, as Go's decoder names them: `data`, `spec.replicas`.
    go_field: std::string::String,
    /// The path structured-merge-diff reports: `.data.mode`, `.spec.template.spec.containers[name="web"].image`.
    smd_path: std::string::String,
    expected: &'static Field,
    value: Value,
    /// A base64 string that does not decode: the offset of the first bad byte.
    bad_base64_at: Option<usize>,
}

impl TypeError {
    /// What Go's JSON decoder says.
    fn decoder_message(&self) -> std::string::String {
        if let Some(at) = self.bad_base64_at {
            return format!("illegal base64 data at input byte {at}");
        }
        let found = match &self.value {
            Value::String(_) => "string".to_string(),
            Value::Bool(_) => "bool".to_string(),
            Value::Array(_) => "array".to_string(),
            Value::Object(_) => "object".to_string(),
            Value::Number(n) if matches!(self.expected, Int32 | Int64) => format!("number {n}"),
            Value::Number(_) | Value::Null => "number".to_string(),
        };
        let go_type = match self.expected {
            String => "string".to_string(),
            Int32 => "int32".to_string(),
            Int64 => "int64".to_string(),
            Bool => "bool".to_string(),
            Bytes => "[]uint8".to_string(),
            IntOrString => "intstr.IntOrString".to_string(),
            List(_) => "[]".to_string(),
            Map(_) => "map[string]".to_string(),
            Struct(name, _) => format!("v1.{name}"),
        };
        format!(
            "json: cannot unmarshal {found} into Go struct field {}.{} of type {go_type}",
            self.go_struct, self.go_field
        )
    }

    /// What structured-merge-diff says (server-side apply): its `%#v`, `%T` and `%v` renderings.
    fn smd_message(&self) -> std::string::String {
        let found = match self.expected {
            String | Bytes => format!(
                "expected string, got &value.valueUnstructured{{Value:{}}}",
                go_literal(&self.value)
            ),
            Int32 | Int64 | IntOrString => {
                format!(
                    "expected numeric (int or float), got {}",
                    go_type(&self.value)
                )
            }
            Bool => format!("expected boolean, got &{{{}}}", go_plain(&self.value)),
            List(_) => format!("expected list, got &{{{}}}", go_plain(&self.value)),
            Map(_) | Struct(..) => format!("expected map, got &{{{}}}", go_plain(&self.value)),
        };
        format!("{}: {found}", self.smd_path)
    }
}

/// Go's `%#v` of a decoded JSON value, as far as messages need it.
fn go_literal(value: &Value) -> std::string::String {
    match value {
        Value::Array(_) => "[]interface {}{...}".into(),
        Value::Object(_) => "map[string]interface {}{...}".into(),
        other => other.to_string(),
    }
}

/// Go's `%v` of a decoded JSON value, as far as messages need it.
fn go_plain(value: &Value) -> std::string::String {
    match value {
        Value::String(text) => text.clone(),
        Value::Array(_) => "[...]".into(),
        Value::Object(_) => "map[...]".into(),
        other => other.to_string(),
    }
}

/// Go's `%T` of a decoded JSON value.
fn go_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "<nil>",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float64",
        Value::Number(_) => "int64",
        Value::String(_) => "string",
        Value::Array(_) => "[]interface {}",
        Value::Object(_) => "map[string]interface {}",
    }
}

/// Every type error in `object`, in document order; empty for kinds without a schema here.
pub fn check(rt: &ResourceType, object: &Value) -> Vec<TypeError> {
    let mut errors = Vec::new();
    if let Some(schema) = schema_for(rt) {
        walk(schema, object, rt_struct(schema), "", "", &mut errors);
    }
    errors
}

fn rt_struct(schema: &Field) -> &'static str {
    match schema {
        Struct(name, _) => name,
        _ => "",
    }
}

fn walk(
    field: &'static Field,
    value: &Value,
    go_struct: &'static str,
    go_field: &str,
    smd_path: &str,
    errors: &mut Vec<TypeError>,
) {
    // Go leaves a field at its zero value for `null`; structured-merge-diff accepts it too.
    if value.is_null() {
        return;
    }
    let mismatch = |bad_base64_at| TypeError {
        go_struct,
        go_field: go_field.to_string(),
        smd_path: smd_path.to_string(),
        expected: field,
        value: value.clone(),
        bad_base64_at,
    };
    match (field, value) {
        (String, Value::String(_)) | (Bool, Value::Bool(_)) => {}
        (Bytes, Value::String(text)) => {
            if let Some(at) = first_bad_base64_byte(text) {
                errors.push(mismatch(Some(at)));
            }
        }
        (Int32, Value::Number(n)) => {
            if n.as_i64().is_none_or(|i| i32::try_from(i).is_err()) {
                errors.push(mismatch(None));
            }
        }
        (Int64, Value::Number(n)) => {
            if n.as_i64().is_none() {
                errors.push(mismatch(None));
            }
        }
        (IntOrString, Value::String(_)) => {}
        (IntOrString, Value::Number(n)) => {
            if n.as_i64().is_none_or(|i| i32::try_from(i).is_err()) {
                errors.push(mismatch(None));
            }
        }
        (List(item), Value::Array(items)) => {
            for (index, entry) in items.iter().enumerate() {
                let key = match entry.get("name").and_then(Value::as_str) {
                    Some(name) => format!("[name={}]", Value::String(name.to_string())),
                    None => format!("[{index}]"),
                };
                walk(
                    item,
                    entry,
                    go_struct,
                    go_field,
                    &format!("{smd_path}{key}"),
                    errors,
                );
            }
        }
        (Map(entry), Value::Object(map)) => {
            for (key, child) in map {
                walk(
                    entry,
                    child,
                    go_struct,
                    go_field,
                    &format!("{smd_path}.{key}"),
                    errors,
                );
            }
        }
        (Struct(name, fields), Value::Object(map)) => {
            for (key, child) in map {
                if let Some((_, child_field)) = fields.iter().find(|(f, _)| f == key) {
                    let go_field = if go_field.is_empty() {
                        key.clone()
                    } else {
                        format!("{go_field}.{key}")
                    };
                    walk(
                        child_field,
                        child,
                        name,
                        &go_field,
                        &format!("{smd_path}.{key}"),
                        errors,
                    );
                }
            }
        }
        _ => errors.push(mismatch(None)),
    }
}

/// Go's `base64.StdEncoding` (which skips `\r` and `\n`): `None` when `text` decodes.
fn first_bad_base64_byte(text: &str) -> Option<usize> {
    let bytes: Vec<(usize, u8)> = text
        .bytes()
        .enumerate()
        .filter(|(_, b)| !matches!(b, b'\r' | b'\n'))
        .collect();
    let is_alphabet = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
    let padding = bytes.iter().rev().take_while(|(_, b)| *b == b'=').count();
    let body = &bytes[..bytes.len() - padding];
    if let Some((at, _)) = body.iter().find(|(_, b)| !is_alphabet(*b)) {
        return Some(*at);
    }
    if padding > 2 || !bytes.len().is_multiple_of(4) {
        return Some(body.last().map_or(0, |(at, _)| *at));
    }
    None
}

/// The error a create or update (POST, PUT) gets: the body does not decode (400).
pub fn decode_error(rt: &ResourceType, version: &str, error: &TypeError) -> ApiError {
    ApiError::bad_request(format!(
        "{kind} in version {version:?} cannot be handled as a {kind}: {}",
        error.decoder_message(),
        kind = rt.kind
    ))
}

/// The error a JSON, merge or strategic merge patch gets: the patched object does not decode
/// (422 Invalid on the field `patch`, whose value is the patched object).
pub fn patch_error(patched: &Value, error: &TypeError) -> ApiError {
    ApiError::invalid(
        "",
        "",
        "",
        vec![Cause {
            reason: "FieldValueInvalid",
            message: format!(
                "Invalid value: {}: {}",
                Value::String(patched.to_string()),
                error.decoder_message()
            ),
            field: "patch".into(),
        }],
    )
}

/// structured-merge-diff's message for each type error, as in [`apply_error`].
pub fn smd_messages(errors: &[TypeError]) -> Vec<std::string::String> {
    errors.iter().map(TypeError::smd_message).collect()
}

/// The error a server-side apply gets: structured-merge-diff cannot type the apply
/// configuration (`messages`: [`smd_messages`], or `.spec.x: field not declared in schema` for
/// a custom resource). The API server returns it as a plain error: 500 with no reason (through
/// 1.33 at least; kubernetes/kubernetes#139253).
pub fn apply_error(
    rt: &ResourceType,
    version: &str,
    namespace: &str,
    name: &str,
    messages: &[std::string::String],
) -> ApiError {
    let summary = match messages {
        [one] => one.clone(),
        many => format!("errors:\n  {}", many.join("\n  ")),
    };
    ApiError::internal(format!(
        "failed to create typed patch object ({namespace}/{name}; {}/{version}, Kind={}): {summary}",
        rt.group, rt.kind
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::resources::builtin_types;

    fn rt(plural: &str) -> ResourceType {
        builtin_types()
            .into_iter()
            .find(|t| t.plural == plural)
            .unwrap_or_else(|| panic!("{plural} is built in"))
    }

    #[test]
    fn string_maps_refuse_numbers() {
        let errors = check(
            &rt("configmaps"),
            &json!({ "metadata": { "name": "a" }, "data": { "ok": "x", "mode": 1 } }),
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].decoder_message(),
            "json: cannot unmarshal number into Go struct field ConfigMap.data of type string"
        );
        assert_eq!(
            errors[0].smd_message(),
            ".data.mode: expected string, got &value.valueUnstructured{Value:1}"
        );
    }

    #[test]
    fn nested_fields_are_named_by_struct_and_path() {
        let deployment = json!({
            "spec": {
                "replicas": "two",
                "template": { "spec": { "containers": [{ "name": "web", "image": 7 }] } },
            }
        });
        let errors = check(&rt("deployments"), &deployment);
        let messages: Vec<_> = errors.iter().map(TypeError::smd_message).collect();
        assert_eq!(
            messages,
            [
                ".spec.replicas: expected numeric (int or float), got string",
                ".spec.template.spec.containers[name=\"web\"].image: expected string, got &value.valueUnstructured{Value:7}",
            ]
        );
        assert_eq!(
            errors[1].decoder_message(),
            "json: cannot unmarshal number into Go struct field Container.spec.template.spec.containers.image of type string"
        );
    }

    #[test]
    fn int_or_string_null_and_unknown_fields_pass() {
        let service = json!({
            "metadata": { "labels": { "a": "b" }, "creationTimestamp": null },
            "spec": { "ports": [{ "port": 80, "targetPort": "http" }, { "port": 81, "targetPort": 8081 }],
                      "selector": null, "someFutureField": 1 },
        });
        assert_eq!(check(&rt("services"), &service), []);
        let labels = json!({ "metadata": { "labels": { "a": true } } });
        assert_eq!(check(&rt("leases"), &labels).len(), 1);
    }

    #[test]
    fn secret_data_must_be_base64() {
        for good in ["", "c2VjcmV0", "YQ==", "YWI=", "c2Vj\ncmV0"] {
            assert_eq!(first_bad_base64_byte(good), None, "{good:?}");
        }
        for bad in ["secret!", "YQ", "Y===", "a b="] {
            assert!(first_bad_base64_byte(bad).is_some(), "{bad:?}");
        }
        let errors = check(
            &rt("secrets"),
            &json!({ "data": { "token": "not base64!" } }),
        );
        assert_eq!(
            errors[0].decoder_message(),
            "illegal base64 data at input byte 3"
        );
    }
}
