//! The examples a new user applies first (`examples/*.yaml`), checked with the CRDs' own
//! schemas and validation rules: every document is applied, in the order of
//! `examples/README.md`, with server-side apply and strict field validation (as `kubectl
//! apply` sends it) to kubesim with the chart's CRDs installed, or to the real cluster of
//! `$KUBECONFIG` when that is set. The examples must also fit together (references, selectors,
//! the Stacks' manifests as the hub renders them) and match what the README says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use brokkr_crds::{AlertRule, NotificationChannel};
use brokkr_operator::render::render_manifests;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{GroupVersionKind, Selector, SelectorExt};
use kube::discovery::{self, Scope};
use kubesim::TestCluster;
use serde::Deserialize;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The documents of a multi-document YAML file (empty ones skipped).
fn documents(path: &Path) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read(path))
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
        })
        .filter(|document| !document.is_null())
        .collect()
}

/// The `*.yaml` files of a directory, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string()
}

fn readme() -> String {
    read(&repo().join("examples/README.md"))
}

/// The example files in the order the README applies them (`kubectl apply -f examples/...`).
fn readme_apply_order() -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    for line in readme().lines().filter(|l| l.contains("kubectl apply")) {
        for word in line.split_whitespace() {
            if let Some(file) = word.strip_prefix("examples/")
                && file.ends_with(".yaml")
                && !order.iter().any(|f| f == file)
            {
                order.push(file.to_string());
            }
        }
    }
    order
}

/// Every document of every example, as `(file, document)`, in the README's order.
fn examples() -> Vec<(String, Value)> {
    readme_apply_order()
        .into_iter()
        .flat_map(|file| {
            documents(&repo().join("examples").join(&file))
                .into_iter()
                .map(move |doc| (file.clone(), doc))
        })
        .collect()
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn describe(doc: &Value) -> String {
    format!("{} {}", text(doc, "/kind"), text(doc, "/metadata/name"))
}

fn crds() -> Vec<CustomResourceDefinition> {
    yaml_files(&repo().join("charts/brokkr-operator/crds"))
        .iter()
        .map(|path| {
            serde_yaml::from_str(&read(path))
                .unwrap_or_else(|e| panic!("{} is not a CRD: {e}", path.display()))
        })
        .collect()
}

#[tokio::test]
async fn every_example_is_accepted_by_the_crds_with_strict_field_validation() {
    let cluster = TestCluster::new().await;
    for crd in crds() {
        kubesim::testing::install_crd(&cluster.client, &crd).await;
    }
    let apply = PatchParams::apply("brokkr-examples").validation_strict();
    let mut created: Vec<(Api<DynamicObject>, String)> = Vec::new();
    let examples = examples();
    assert!(!examples.is_empty(), "the README applies no example");
    for (file, doc) in &examples {
        let what = format!("{file}: {}", describe(doc));
        let (group, version) = match text(doc, "/apiVersion").split_once('/') {
            Some((group, version)) => (group, version),
            None => ("", text(doc, "/apiVersion")),
        };
        let gvk = GroupVersionKind::gvk(group, version, text(doc, "/kind"));
        let (resource, capabilities) = discovery::pinned_kind(&cluster.client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("{what}: the cluster does not serve {gvk:?}: {e}"));
        let name = text(doc, "/metadata/name");
        let namespace = doc.pointer("/metadata/namespace").and_then(Value::as_str);
        let api: Api<DynamicObject> = match (&capabilities.scope, namespace) {
            (Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(cluster.client.clone(), ns, &resource)
            }
            (Scope::Cluster, None) => Api::all_with(cluster.client.clone(), &resource),
            (scope, namespace) => {
                panic!("{what}: a {scope:?} kind with metadata.namespace {namespace:?}")
            }
        };
        let existed = api
            .get_opt(name)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .is_some();
        api.patch(name, &apply, &Patch::Apply(doc))
            .await
            .unwrap_or_else(|e| panic!("{what} is refused: {e}"));
        if !existed {
            created.push((api, name.to_string()));
        }
    }
    // On a real cluster, remove what this test created, newest first.
    if cluster.is_real() {
        for (api, name) in created.iter().rev() {
            if let Err(e) = api.delete(name, &DeleteParams::background()).await {
                eprintln!("cleaning up {name}: {e}");
            }
        }
    }
}

/// The example Agents a label selector (an AgentTarget's or AlertRule's `agentSelector`)
/// matches, by name.
fn agents_selected(what: &str, selector: &Value, agents: &[&Value]) -> Vec<String> {
    let selector: LabelSelector = serde_json::from_value(selector.clone())
        .unwrap_or_else(|e| panic!("{what}: agentSelector: {e}"));
    let selector =
        Selector::try_from(selector).unwrap_or_else(|e| panic!("{what}: agentSelector: {e}"));
    agents
        .iter()
        .filter(|agent| {
            let labels: BTreeMap<String, String> = agent
                .pointer("/metadata/labels")
                .map(|l| serde_json::from_value(l.clone()).expect("string labels"))
                .unwrap_or_default();
            selector.matches(&labels)
        })
        .map(|agent| text(agent, "/metadata/name").to_string())
        .collect()
}

#[test]
fn the_examples_refer_to_each_other_and_select_the_example_agents() {
    let examples = examples();
    let of_kind = |kind: &str| -> Vec<&Value> {
        examples
            .iter()
            .map(|(_, doc)| doc)
            .filter(|doc| text(doc, "/kind") == kind)
            .collect()
    };
    let exists = |kind: &str, name: &str, namespace: &str| {
        of_kind(kind).iter().any(|doc| {
            text(doc, "/metadata/name") == name && text(doc, "/metadata/namespace") == namespace
        })
    };
    for (file, doc) in &examples {
        let what = format!("{file}: {}", describe(doc));
        let namespace = text(doc, "/metadata/namespace");
        if !namespace.is_empty() {
            assert!(
                exists("Namespace", namespace, ""),
                "{what}: its namespace {namespace} is not an example"
            );
        }
        match text(doc, "/kind") {
            "Stack" => {
                let generator = text(doc, "/spec/generatorRef/name");
                assert!(
                    exists("Generator", generator, namespace),
                    "{what}: Generator {generator} is not in {namespace}"
                );
            }
            "AgentTarget" => {
                let stack = text(doc, "/spec/stackRef/name");
                assert!(
                    exists("Stack", stack, namespace),
                    "{what}: Stack {stack} is not in {namespace}"
                );
                let mut selected: Vec<String> = doc
                    .pointer("/spec/agentSelector")
                    .map(|selector| agents_selected(&what, selector, &of_kind("Agent")))
                    .unwrap_or_default();
                for name in doc
                    .pointer("/spec/agents")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let name = name.as_str().unwrap_or_default();
                    assert!(
                        exists("Agent", name, ""),
                        "{what}: Agent {name} is not an example"
                    );
                    selected.push(name.to_string());
                }
                selected.sort();
                selected.dedup();
                assert!(
                    selected.len() >= 2,
                    "{what} selects {selected:?}, not the example Agents"
                );
            }
            "NotificationChannel" => {
                let channel: NotificationChannel =
                    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
                channel
                    .spec
                    .validate()
                    .unwrap_or_else(|e| panic!("{what} is refused by the operator: {e}"));
                let secret_refs = [
                    channel.spec.webhook.as_ref().map(|w| &w.url_secret_ref),
                    channel
                        .spec
                        .webhook
                        .as_ref()
                        .and_then(|w| w.signing_secret_ref.as_ref()),
                    channel.spec.slack.as_ref().map(|s| &s.url_secret_ref),
                ];
                for secret_ref in secret_refs.into_iter().flatten() {
                    let holds_key = of_kind("Secret").iter().any(|secret| {
                        text(secret, "/metadata/name") == secret_ref.name
                            && text(secret, "/metadata/namespace") == namespace
                            && ["stringData", "data"].iter().any(|field| {
                                secret
                                    .get(field)
                                    .and_then(|d| d.get(&secret_ref.key))
                                    .is_some()
                            })
                    });
                    assert!(
                        holds_key,
                        "{what}: no example Secret {} in {namespace} holds the key {}",
                        secret_ref.name, secret_ref.key
                    );
                }
            }
            "AlertRule" => {
                let rule: AlertRule =
                    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
                rule.spec
                    .validate()
                    .unwrap_or_else(|e| panic!("{what} is refused by the operator: {e}"));
                for channel in &rule.spec.channels {
                    assert!(
                        exists("NotificationChannel", channel, namespace),
                        "{what}: NotificationChannel {channel} is not in {namespace}"
                    );
                }
                if let Some(selector) = doc.pointer("/spec/agentSelector") {
                    // Agent conditions watch only Agents that accept the rule's namespace.
                    let watched: Vec<String> = agents_selected(&what, selector, &of_kind("Agent"))
                        .into_iter()
                        .filter(|name| {
                            of_kind("Agent").iter().any(|agent| {
                                text(agent, "/metadata/name") == name
                                    && agent
                                        .pointer("/spec/targetableFrom/namespaces")
                                        .and_then(Value::as_array)
                                        .is_some_and(|n| n.iter().any(|n| n == namespace))
                            })
                        })
                        .collect();
                    assert!(
                        watched.len() >= 2,
                        "{what} watches {watched:?}, not the example Agents (selected, and accepting {namespace})"
                    );
                }
            }
            _ => {}
        }
    }
}

#[test]
fn the_example_stacks_render_as_the_hub_renders_them() {
    let mut stacks = 0;
    for (file, doc) in examples()
        .into_iter()
        .filter(|(_, doc)| text(doc, "/kind") == "Stack")
    {
        stacks += 1;
        let what = format!("{file}: {}", describe(&doc));
        let manifests = text(&doc, "/spec/manifests");
        if file == "broken-stack.yaml" {
            let error = render_manifests(manifests).expect_err("the broken Stack is refused");
            assert!(
                error.to_string().contains("missing kind"),
                "{what}: the hub refuses it for another reason: {error}"
            );
        } else {
            let rendered = render_manifests(manifests).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(rendered.objects >= 1, "{what} holds no objects");
        }
    }
    assert!(
        stacks >= 2,
        "the examples hold a Stack and the broken Stack"
    );
}

#[test]
fn the_readme_applies_every_example_and_shows_the_crds_columns() {
    let readme = readme();
    let files: Vec<String> = yaml_files(&repo().join("examples"))
        .iter()
        .map(|p| file_name(p))
        .collect();
    let mut mentioned: Vec<String> = readme
        .split(|c: char| c.is_whitespace() || "`|(),".contains(c))
        .filter_map(|word| word.strip_prefix("examples/"))
        .filter(|file| file.ends_with(".yaml"))
        .map(String::from)
        .collect();
    mentioned.sort();
    mentioned.dedup();
    assert_eq!(
        mentioned, files,
        "the README names exactly the example files"
    );
    let mut applied = readme_apply_order();
    applied.sort();
    assert_eq!(applied, files, "the README applies every example");
    for needle in [
        "kubectl get stacks -n brokkr-demo",
        "kubectl describe stack broken -n brokkr-demo",
        "-o jsonpath='{.data.pak}' | base64 -d",
        "helm install brokkr-agent charts/brokkr-agent",
        "--set hub.url=",
        "--set agentName=",
        "--set agentKey.value=",
    ] {
        assert!(readme.contains(needle), "the README shows `{needle}`");
    }
    for kind in ["Stack", "AlertRule", "NotificationChannel"] {
        let crd = crds()
            .into_iter()
            .find(|crd| crd.spec.names.kind == kind)
            .unwrap_or_else(|| panic!("a {kind} CRD"));
        let mut columns = vec!["NAME".to_string()];
        columns.extend(
            crd.spec.versions[0]
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| c.name.to_uppercase()),
        );
        let header = columns.join(" ");
        assert!(
            readme
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == header),
            "the README's `kubectl get {}` output has the CRD's columns: {header}",
            crd.spec.names.plural
        );
    }
}
