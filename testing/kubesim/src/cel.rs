//! CRD validation rules (`x-kubernetes-validations`) in CEL, as the API server runs them.
//!
//! Every rule of a CRD's schemas is compiled when the CRD is written; a rule that does not
//! compile, or names a variable other than `self` and `oldSelf`, refuses the CRD, as the real
//! server does. Custom resources are then checked on every write: each rule runs wherever its
//! schema node has a value, with `self` bound to that value (and `oldSelf` to the value it had
//! before, for transition rules, which run on updates only). A rule that is false refuses the
//! write with 422 `Invalid`, its `message` (or `failed rule: <rule>`) and the field path; one
//! that fails to evaluate (a missing key, a function kubesim's CEL library lacks) refuses it
//! too, naming the error, so a rule kubesim cannot run never lets an object through. Updates
//! ratchet like the server's (1.30+): a rule that does not use `oldSelf` is not re-checked on a
//! value the update leaves unchanged.
//!
//! Not done: the Kubernetes CEL libraries (`isSorted`, `url`, `quantity`, `format.*`, ...), type
//! checking and cost limits at compile time, `messageExpression` beyond a plain string result,
//! timestamps and durations for `format: date-time` / `duration` strings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cel::IdedExpr;
use cel::common::ast::{EntryExpr, Expr, MapExpr, StructExpr};
use cel::objects::{Key, Map};
use cel::{Context, Env, Program, Value as Cel};
use serde_json::Value;

use crate::schema::{self, Step};
use crate::status::Cause;

const RULES: &str = "x-kubernetes-validations";

fn env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib())).clone()
}

/// Compiles `source` once per process; the error is the compiler's (or a variable it names
/// that no rule may use).
fn compile(source: &str) -> Result<Arc<Program>, String> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Program>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some(program) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(source) {
        return Ok(program.clone());
    }
    let program = env().compile(source).map_err(|e| e.to_string())?;
    let mut free = Vec::new();
    free_variables(program.expression(), &mut Vec::new(), &mut free);
    if let Some(unknown) = free.into_iter().find(|v| {
        !matches!(
            v.as_str(),
            "self"
                | "oldSelf"
                | "int"
                | "uint"
                | "double"
                | "bool"
                | "string"
                | "bytes"
                | "list"
                | "map"
                | "null_type"
                | "type"
                | "dyn"
                | "optional"
        )
    }) {
        return Err(format!("undeclared reference to '{unknown}'"));
    }
    let program = Arc::new(program);
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(source.to_string(), program.clone());
    Ok(program)
}

/// The identifiers `expr` reads that no comprehension (`all`, `exists`, `map`, ...) binds.
fn free_variables(expr: &IdedExpr, bound: &mut Vec<String>, free: &mut Vec<String>) {
    match &expr.expr {
        Expr::Ident(name) if !bound.contains(name) => free.push(name.clone()),
        Expr::Call(call) => {
            call.target
                .iter()
                .for_each(|t| free_variables(t, bound, free));
            call.args
                .iter()
                .for_each(|a| free_variables(a, bound, free));
        }
        Expr::Comprehension(c) => {
            free_variables(&c.iter_range, bound, free);
            free_variables(&c.accu_init, bound, free);
            let depth = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            for part in [&c.loop_cond, &c.loop_step, &c.result] {
                free_variables(part, bound, free);
            }
            bound.truncate(depth);
        }
        Expr::List(list) => list
            .elements
            .iter()
            .for_each(|e| free_variables(e, bound, free)),
        Expr::Map(MapExpr { entries }) | Expr::Struct(StructExpr { entries, .. }) => {
            for entry in entries {
                match &entry.expr {
                    EntryExpr::MapEntry(e) => {
                        free_variables(&e.key, bound, free);
                        free_variables(&e.value, bound, free);
                    }
                    EntryExpr::StructField(f) => free_variables(&f.value, bound, free),
                }
            }
        }
        Expr::Select(select) => free_variables(&select.operand, bound, free),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

fn uses_old_self(source: &str) -> bool {
    compile(source).is_ok_and(|p| {
        let mut free = Vec::new();
        free_variables(p.expression(), &mut Vec::new(), &mut free);
        free.iter().any(|v| v == "oldSelf")
    })
}

/// The rules of every version's schema of a CRD that do not compile, as causes naming the rule
/// (`spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule`).
pub fn check_crd(crd: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array);
    for (i, version) in versions.into_iter().flatten().enumerate() {
        if let Some(schema) = version.pointer("/schema/openAPIV3Schema") {
            check_node(
                schema,
                &format!("spec.versions[{i}].schema.openAPIV3Schema"),
                &mut causes,
            );
        }
    }
    causes
}

fn check_node(schema: &Value, path: &str, causes: &mut Vec<Cause>) {
    let rules = schema.get(RULES).and_then(Value::as_array);
    for (i, rule) in rules.into_iter().flatten().enumerate() {
        let field = format!("{path}.{RULES}[{i}].rule");
        let Some(source) = rule.get("rule").and_then(Value::as_str) else {
            causes.push(Cause {
                reason: "FieldValueRequired",
                message: "Required value".into(),
                field,
            });
            continue;
        };
        if let Err(error) = compile(source) {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                message: format!(
                    "Invalid value: {}: compilation failed: {error}",
                    Value::String(source.to_string())
                ),
                field,
            });
        }
    }
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, child) in properties {
            check_node(child, &format!("{path}.properties[{name}]"), causes);
        }
    }
    if let Some(child) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        check_node(child, &format!("{path}.additionalProperties"), causes);
    }
    if let Some(child) = schema.get("items") {
        check_node(child, &format!("{path}.items"), causes);
    }
}

/// The rules' verdict after the schema's own checks found `schema_causes`: as the API server,
/// the rules do not run on a value of the wrong type or outside its `enum`, and say so.
pub fn validate_after(
    schema_causes: &[Cause],
    schema: &Value,
    object: &Value,
    old: Option<&Value>,
) -> Vec<Cause> {
    let blocking = schema_causes
        .iter()
        .any(|c| matches!(c.reason, "FieldValueTypeInvalid" | "FieldValueNotSupported"));
    if blocking {
        return vec![Cause {
            reason: "FieldValueInvalid",
            message: "Invalid value: \"null\": some validation rules were not checked because the object was invalid; correct the existing errors to complete validation".into(),
            field: String::new(),
        }];
    }
    validate(schema, object, old)
}

/// Runs every rule of `schema` over `object`; `old` is the stored object on an update.
pub fn validate(schema: &Value, object: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    validate_node(schema, object, old, "", &mut causes);
    causes
}

fn validate_node(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    causes: &mut Vec<Cause>,
) {
    if value.is_null() {
        return;
    }
    let root = path.is_empty();
    for rule in schema
        .get(RULES)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(cause) = run_rule(schema, rule, value, old, path) {
            causes.push(cause);
        }
    }
    for (step, child_schema, child) in schema::described_children(schema, value, root) {
        // Items of atomic lists have no old value to ratchet against or compare with.
        let old_child = match step {
            Step::Field(key) => old.and_then(|o| o.get(key)),
            Step::Index(_) => None,
        };
        validate_node(child_schema, child, old_child, &step.path(path), causes);
    }
}

fn run_rule(
    schema: &Value,
    rule: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
) -> Option<Cause> {
    let source = rule.get("rule").and_then(Value::as_str)?;
    let transition = uses_old_self(source);
    if transition && old.is_none() {
        return None;
    }
    if !transition && old == Some(value) {
        return None;
    }
    let type_name = schema
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let refuse = |message: String| {
        let (reason, message) = match rule.get("reason").and_then(Value::as_str) {
            Some("FieldValueForbidden") => ("FieldValueForbidden", format!("Forbidden: {message}")),
            Some("FieldValueRequired") => {
                ("FieldValueRequired", format!("Required value: {message}"))
            }
            Some("FieldValueDuplicate") => (
                "FieldValueDuplicate",
                format!("Duplicate value: {}", Value::String(message)),
            ),
            _ => (
                "FieldValueInvalid",
                format!(
                    "Invalid value: {}: {message}",
                    Value::String(type_name.to_string())
                ),
            ),
        };
        let field = match rule.get("fieldPath").and_then(Value::as_str) {
            Some(extra) => format!("{path}{extra}").trim_start_matches('.').to_string(),
            None => path.to_string(),
        };
        Some(Cause {
            reason,
            message,
            field,
        })
    };
    let program = match compile(source) {
        Ok(program) => program,
        Err(error) => return refuse(format!("compilation failed: {error}")),
    };
    let mut context = Context::with_env(env());
    context.add_variable_from_value("self", to_cel(schema, value));
    if let Some(old) = old {
        context.add_variable_from_value("oldSelf", to_cel(schema, old));
    }
    match program.execute(&context) {
        Ok(Cel::Bool(true)) => None,
        Ok(Cel::Bool(false)) => refuse(failure_message(rule, source, &context)),
        Ok(other) => refuse(format!(
            "rule evaluated to {other:?}, not a bool, evaluating rule: {source}"
        )),
        Err(error) => refuse(format!("{error} evaluating rule: {source}")),
    }
}

/// `messageExpression` when it yields a non-empty string, else `message`, else
/// `failed rule: <rule>`.
fn failure_message(rule: &Value, source: &str, context: &Context) -> String {
    let from_expression = rule
        .get("messageExpression")
        .and_then(Value::as_str)
        .and_then(|e| compile(e).ok())
        .and_then(|p| p.execute(context).ok())
        .and_then(|v| match v {
            Cel::String(s) if !s.trim().is_empty() => Some(s.to_string()),
            _ => None,
        });
    from_expression
        .or_else(|| {
            rule.get("message")
                .and_then(Value::as_str)
                .filter(|m| !m.is_empty())
                .map(String::from)
        })
        .unwrap_or_else(|| format!("failed rule: {source}"))
}

/// A JSON value as CEL sees it under its schema: integers are `int`, `type: number` is always
/// `double`, objects are maps keyed by field name.
fn to_cel(schema: &Value, value: &Value) -> Cel {
    let number = schema.get("type").and_then(Value::as_str) == Some("number");
    match value {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) if number => Cel::Float(n.as_f64().unwrap_or(f64::NAN)),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Cel::Int(i),
            (None, Some(u)) => Cel::UInt(u),
            _ => Cel::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(items) => {
            let item_schema = schema.get("items").unwrap_or(&Value::Null);
            Cel::List(Arc::new(
                items.iter().map(|i| to_cel(item_schema, i)).collect(),
            ))
        }
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema
                .get("additionalProperties")
                .filter(|a| a.is_object())
                .unwrap_or(&Value::Null);
            let entries: HashMap<Key, Cel> = map
                .iter()
                .map(|(k, v)| {
                    let child = properties.and_then(|p| p.get(k)).unwrap_or(additional);
                    (Key::String(Arc::new(k.clone())), to_cel(child, v))
                })
                .collect();
            Cel::Map(Map {
                map: Arc::new(entries),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "x-kubernetes-validations": [
                        { "rule": "has(self.a) != has(self.b)", "message": "set exactly one of a or b" },
                        { "rule": "!has(self.replicas) || self.replicas >= 1" },
                    ],
                    "properties": {
                        "a": { "type": "string" },
                        "b": { "type": "string" },
                        "replicas": { "type": "integer" },
                        "ratio": { "type": "number", "x-kubernetes-validations": [
                            { "rule": "self < 1.0", "reason": "FieldValueForbidden", "message": "below one" },
                        ] },
                        "labels": {
                            "type": "object",
                            "additionalProperties": { "type": "string" },
                            "x-kubernetes-validations": [
                                { "rule": "self.all(k, size(k) <= 3)", "message": "short keys" },
                            ],
                        },
                        "tags": { "type": "array", "items": {
                            "type": "string",
                            "x-kubernetes-validations": [{ "rule": "self != 'bad'" }],
                        } },
                        "version": { "type": "integer", "x-kubernetes-validations": [
                            { "rule": "self >= oldSelf", "message": "may not go down" },
                        ] },
                    }
                }
            }
        })
    }

    fn causes(object: Value, old: Option<Value>) -> Vec<(String, &'static str, String)> {
        validate(&schema(), &object, old.as_ref())
            .into_iter()
            .map(|c| (c.field, c.reason, c.message))
            .collect()
    }

    fn cause(field: &str, reason: &'static str, message: &str) -> (String, &'static str, String) {
        (field.to_string(), reason, message.to_string())
    }

    #[test]
    fn a_valid_object_passes_every_rule() {
        let object = json!({ "spec": { "a": "x", "replicas": 2, "ratio": 0.5,
            "labels": { "abc": "1" }, "tags": ["ok"], "version": 3 } });
        assert_eq!(causes(object, None), []);
    }

    #[test]
    fn a_false_rule_names_its_field_and_message_like_the_api_server() {
        assert_eq!(
            causes(json!({ "spec": { "a": "x", "b": "y" } }), None),
            [cause(
                "spec",
                "FieldValueInvalid",
                "Invalid value: \"object\": set exactly one of a or b"
            )]
        );
        assert_eq!(
            causes(json!({ "spec": { "a": "x", "replicas": 0 } }), None),
            [cause(
                "spec",
                "FieldValueInvalid",
                "Invalid value: \"object\": failed rule: !has(self.replicas) || self.replicas >= 1"
            )]
        );
        assert_eq!(
            causes(
                json!({ "spec": { "b": "y", "ratio": 2, "labels": { "long": "1" }, "tags": ["ok", "bad"] } }),
                None
            ),
            [
                cause(
                    "spec.labels",
                    "FieldValueInvalid",
                    "Invalid value: \"object\": short keys"
                ),
                cause("spec.ratio", "FieldValueForbidden", "Forbidden: below one"),
                cause(
                    "spec.tags[1]",
                    "FieldValueInvalid",
                    "Invalid value: \"string\": failed rule: self != 'bad'"
                ),
            ]
        );
    }

    #[test]
    fn transition_rules_run_on_updates_only_and_unchanged_values_ratchet() {
        let lower = json!({ "spec": { "a": "x", "version": 1 } });
        let higher = json!({ "spec": { "a": "x", "version": 2 } });
        assert_eq!(causes(lower.clone(), None), []);
        assert_eq!(causes(higher.clone(), Some(lower.clone())), []);
        assert_eq!(
            causes(lower.clone(), Some(higher)),
            [cause(
                "spec.version",
                "FieldValueInvalid",
                "Invalid value: \"integer\": may not go down"
            )]
        );
        let both = json!({ "spec": { "a": "x", "b": "y" } });
        assert_eq!(causes(both.clone(), Some(both.clone())), []);
        assert_eq!(causes(both, Some(lower)).len(), 1);
    }

    #[test]
    fn a_rule_that_cannot_be_evaluated_refuses_the_object() {
        let schema = json!({ "type": "object", "x-kubernetes-validations": [
            { "rule": "self.missing == 1" },
            { "rule": "self.name.isSorted()" },
        ] });
        let found = validate(&schema, &json!({ "name": "x" }), None);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0]
                .message
                .contains("evaluating rule: self.missing == 1")
        );
        assert!(
            found[1]
                .message
                .contains("evaluating rule: self.name.isSorted()")
        );
    }

    #[test]
    fn a_crd_whose_rule_does_not_compile_is_refused() {
        let crd = json!({ "spec": { "versions": [{ "name": "v1", "schema": { "openAPIV3Schema": {
            "type": "object",
            "properties": { "spec": { "type": "object", "x-kubernetes-validations": [
                { "rule": "has(self.a) &&" },
                { "rule": "request.user == 'x'" },
                { "rule": "has(self.a)" },
            ] } }
        } } }] } });
        let found = check_crd(&crd);
        let fields: Vec<&str> = found.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule",
                "spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[1].rule",
            ]
        );
        assert!(
            found
                .iter()
                .all(|c| c.message.contains("compilation failed"))
        );
        assert!(
            found[1]
                .message
                .contains("undeclared reference to 'request'")
        );
    }
}
