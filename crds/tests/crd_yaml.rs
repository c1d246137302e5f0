//! The CRDs users install: the checked-in YAML is current, and the parts users rely on
//! (printer columns, short names, status subresource, condition list keys, validation)
//! are there.

use std::path::PathBuf;

use brokkr_crds::{CHART_CRDS_DIR, all_crds, rendered_crd_files};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

const REGENERATE: &str = "run `cargo run -p brokkr-crds --bin crdgen` and commit the result";

fn chart_crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crds crate sits in the workspace root")
        .join(CHART_CRDS_DIR)
}

fn crd(kind: &str) -> CustomResourceDefinition {
    all_crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind}"))
}

/// The v1alpha1 schema of a kind, as JSON.
fn schema(kind: &str) -> Value {
    let crd = crd(kind);
    let version = &crd.spec.versions[0];
    serde_json::to_value(
        version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("every version has a schema"),
    )
    .unwrap()
}

/// `(name, type, jsonPath)` of each printer column.
fn printer_columns(kind: &str) -> Vec<(String, String, String)> {
    crd(kind).spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.to_uppercase(), c.type_.clone(), c.json_path.clone()))
        .collect()
}

fn columns(expected: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    expected
        .iter()
        .map(|(n, t, p)| (n.to_string(), t.to_string(), p.to_string()))
        .collect()
}

#[test]
fn checked_in_crd_yaml_is_up_to_date() {
    let dir = chart_crds_dir();
    let generated = rendered_crd_files();
    for (name, content) in &generated {
        let path = dir.join(name);
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}; {REGENERATE}", path.display()));
        if on_disk != *content {
            let first_difference = on_disk
                .lines()
                .zip(content.lines())
                .enumerate()
                .find(|(_, (disk, new))| disk != new)
                .map(|(i, (disk, new))| {
                    format!("line {}: checked in {disk:?}, generated {new:?}", i + 1)
                })
                .unwrap_or_else(|| "one is a prefix of the other".into());
            panic!(
                "{} is stale ({first_difference}); {REGENERATE}",
                path.display()
            );
        }
    }
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with("brokkr.io_") && !generated.iter().any(|(file, _)| *file == name) {
            panic!("{}/{name} belongs to no kind; {REGENERATE}", dir.display());
        }
    }
}

#[test]
fn kubectl_get_shows_the_columns_users_ask_for() {
    let age = ("AGE", "date", ".metadata.creationTimestamp");
    assert_eq!(
        printer_columns("Generator"),
        columns(&[
            ("STACKS", "integer", ".status.stacks"),
            ("ACTIVE", "boolean", ".status.active"),
            age,
        ])
    );
    assert_eq!(
        printer_columns("Stack"),
        columns(&[
            ("GENERATOR", "string", ".spec.generatorRef.name"),
            ("TARGETS", "integer", ".status.targetedAgents"),
            ("READY", "string", ".status.ready"),
            ("REVISION", "integer", ".status.deploymentObject.sequence"),
            ("PINNED", "integer", ".spec.pinnedRevision"),
            ("ROLLOUT", "string", ".status.rollout.summary"),
            age,
        ])
    );
    assert_eq!(
        printer_columns("AgentTarget"),
        columns(&[
            ("STACK", "string", ".spec.stackRef.name"),
            ("AGENTS", "integer", ".status.matchedAgents"),
            age,
        ])
    );
    assert_eq!(
        printer_columns("Agent"),
        columns(&[
            ("CLUSTER", "string", ".spec.clusterName"),
            ("STATUS", "string", ".status.phase"),
            ("LAST-HEARTBEAT", "date", ".status.lastHeartbeat"),
            age,
        ])
    );
}

#[test]
fn printer_columns_point_at_fields_that_exist() {
    for crd in all_crds() {
        let kind = crd.spec.names.kind.clone();
        let schema = schema(&kind);
        for (name, _, path) in printer_columns(&kind) {
            if path == ".metadata.creationTimestamp" {
                continue;
            }
            // A filter such as `conditions[?(@.type=="Ready")]` selects list items: the
            // list's item schema must have the fields after it.
            let plain = match (path.find("[?("), path.find(")]")) {
                (Some(start), Some(end)) => format!("{}[]{}", &path[..start], &path[end + 2..]),
                _ => path.clone(),
            };
            let mut node = &schema;
            for part in plain.trim_start_matches('.').split('.') {
                let (field, list) = match part.strip_suffix("[]") {
                    Some(field) => (field, true),
                    None => (part, false),
                };
                node = node
                    .get("properties")
                    .and_then(|p| p.get(field))
                    .unwrap_or_else(|| panic!("{kind} column {name}: {path} is not in the schema"));
                if list {
                    node = node
                        .get("items")
                        .unwrap_or_else(|| panic!("{kind} column {name}: {field} is not a list"));
                }
            }
        }
    }
}

#[test]
fn short_names_scope_and_category() {
    let expected = [
        ("Generator", "generators", "gen", "Namespaced"),
        ("Stack", "stacks", "stk", "Namespaced"),
        ("AgentTarget", "agenttargets", "at", "Namespaced"),
        ("Agent", "agents", "agt", "Cluster"),
        (
            "NotificationChannel",
            "notificationchannels",
            "nch",
            "Namespaced",
        ),
        ("AlertRule", "alertrules", "alr", "Namespaced"),
    ];
    for (kind, plural, short, scope) in expected {
        let crd = crd(kind);
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{plural}.brokkr.io").as_str())
        );
        assert_eq!(crd.spec.group, "brokkr.io");
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(
            crd.spec.names.short_names,
            Some(vec![short.to_string()]),
            "{kind}"
        );
        assert_eq!(
            crd.spec.names.categories,
            Some(vec!["brokkr".to_string()]),
            "{kind}"
        );
        assert_eq!(crd.spec.scope, scope, "{kind}");
    }
}

#[test]
fn every_kind_has_one_served_stored_version_with_the_status_subresource() {
    for crd in all_crds() {
        let kind = &crd.spec.names.kind;
        assert_eq!(crd.spec.versions.len(), 1, "{kind}");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage, "{kind}");
        let subresources = version.subresources.as_ref().expect("subresources");
        assert!(
            subresources.status.is_some(),
            "{kind} has no status subresource"
        );
    }
}

#[test]
fn conditions_are_a_list_map_keyed_by_type() {
    for crd in all_crds() {
        let kind = crd.spec.names.kind.clone();
        let schema = schema(&kind);
        let conditions = &schema["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["type"], "array", "{kind}");
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{kind}");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"]),
            "{kind}"
        );
        // A list-map key must be required in every item.
        let required = conditions["items"]["required"].as_array().unwrap();
        assert!(required.contains(&Value::from("type")), "{kind}");
        let status = &schema["properties"]["status"]["properties"]["observedGeneration"];
        assert_eq!(
            status["type"], "integer",
            "{kind} has no status.observedGeneration"
        );
    }
}

#[test]
fn stack_spec_requires_exactly_one_of_resources_and_manifests() {
    let spec = &schema("Stack")["properties"]["spec"];
    assert_eq!(
        spec["x-kubernetes-validations"],
        serde_json::json!([{
            "rule": "has(self.resources) != has(self.manifests)",
            "message": "set exactly one of spec.resources or spec.manifests",
        }])
    );
    assert_eq!(spec["required"], serde_json::json!(["generatorRef"]));
    assert_eq!(
        spec["properties"]["generatorRef"]["properties"]["name"]["minLength"],
        1
    );
    // The CEL rule tests presence, so an explicit null must be dropped, not kept.
    for field in ["resources", "manifests"] {
        assert!(
            spec["properties"][field].get("nullable").is_none(),
            "{field} is nullable"
        );
    }
}

#[test]
fn stack_resources_are_embedded_kubernetes_objects() {
    let items = &schema("Stack")["properties"]["spec"]["properties"]["resources"]["items"];
    assert_eq!(items["type"], "object");
    assert_eq!(items["x-kubernetes-embedded-resource"], true);
    assert_eq!(items["x-kubernetes-preserve-unknown-fields"], true);
}

#[test]
fn annotations_are_limited_to_64_characters() {
    for kind in ["Stack", "Agent"] {
        let annotations = &schema(kind)["properties"]["spec"]["properties"]["annotations"];
        assert_eq!(
            annotations["additionalProperties"]["maxLength"], 64,
            "{kind}"
        );
        assert_eq!(annotations["maxProperties"], 64, "{kind}");
        let rule = annotations["x-kubernetes-validations"][0]["rule"]
            .as_str()
            .unwrap();
        assert!(rule.contains("size(k) <= 64"), "{kind}: {rule}");
    }
}

#[test]
fn agent_target_requires_agents_or_a_selector() {
    let spec = &schema("AgentTarget")["properties"]["spec"];
    assert_eq!(
        spec["x-kubernetes-validations"][0]["rule"],
        "has(self.agentSelector) || (has(self.agents) && size(self.agents) > 0)"
    );
    assert_eq!(spec["required"], serde_json::json!(["stackRef"]));
    let selector = &spec["properties"]["agentSelector"]["properties"];
    assert!(selector.get("matchLabels").is_some() && selector.get("matchExpressions").is_some());
}

#[test]
fn agent_requires_a_cluster_name() {
    let spec = &schema("Agent")["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["clusterName"]));
    assert_eq!(spec["properties"]["clusterName"]["minLength"], 1);
    assert_eq!(spec["properties"]["clusterName"]["maxLength"], 255);
}

#[test]
fn agent_phase_explains_its_values() {
    let phase = &schema("Agent")["properties"]["status"]["properties"]["phase"];
    assert_eq!(
        phase["enum"],
        serde_json::json!(["Pending", "Online", "Error", "Offline", "Suspended"])
    );
    let description = phase["description"].as_str().unwrap();
    assert!(
        description.contains("until the first heartbeat"),
        "{description}"
    );
}

/// Walks every schema node and checks the rules of a structural schema that a derive can
/// get wrong, plus our own rule that every field is documented for `kubectl explain`.
fn check_node(path: &str, node: &Value, problems: &mut Vec<String>) {
    let Some(object) = node.as_object() else {
        problems.push(format!("{path}: schema is not an object"));
        return;
    };
    for forbidden in [
        "$ref",
        "$schema",
        "definitions",
        "$defs",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
    ] {
        if object.contains_key(forbidden) {
            problems.push(format!("{path}: has {forbidden}"));
        }
    }
    let typed = object.get("type").is_some_and(Value::is_string)
        || object.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        || object.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if !typed {
        problems.push(format!("{path}: has no single type"));
    }
    // Array items and map values are described by their parent field.
    let described = object
        .get("description")
        .and_then(Value::as_str)
        .is_some_and(|d| !d.trim().is_empty());
    if !described && !path.ends_with("[]") && !path.ends_with("{}") {
        problems.push(format!("{path}: has no description"));
    }
    if let Some(properties) = object.get("properties").and_then(Value::as_object) {
        for (name, child) in properties {
            check_node(&format!("{path}.{name}"), child, problems);
        }
    }
    if let Some(items) = object.get("items") {
        check_node(&format!("{path}[]"), items, problems);
    }
    if let Some(values) = object.get("additionalProperties").filter(|v| v.is_object()) {
        check_node(&format!("{path}{{}}"), values, problems);
    }
}

#[test]
fn schemas_are_structural_and_every_field_is_documented() {
    let mut problems = Vec::new();
    for crd in all_crds() {
        let kind = crd.spec.names.kind.clone();
        check_node(&kind, &schema(&kind), &mut problems);
    }
    assert!(
        problems.is_empty(),
        "schema problems:\n{}",
        problems.join("\n")
    );
}
