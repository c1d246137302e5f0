//! The agent confined to its namespaces (`--allowed-namespaces`, `--allow-cluster-scoped=false`)
//! running as a service account bound to exactly the rules the agent chart grants with
//! `rbac.scope: namespaces` (read from `charts/brokkr-agent/rbac/`, the files the chart's
//! templates include), with RBAC enforced: kubesim enforces it for impersonated requests, and a
//! real spoke (`BROKKR_E2E_SPOKE_KUBECONFIG`, whose user may impersonate) does anyway.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use brokkr_agent::scope::SpokeScope;
use brokkr_crds::wire::{EventStatus, EventType};
use brokkr_crds::{AGENT_LABEL, STACK_LABEL};
use common::*;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use kubesim::TestCluster;
use kubesim::testing::{eventually_within, unique_name};
use serde_json::{Value, json};
use uuid::Uuid;

/// The agent's service account in the tests (in the test's namespace, the agent's own).
const SERVICE_ACCOUNT: &str = "brokkr-agent";
/// The key Secret the own-namespace rules name.
const KEY_SECRET: &str = "brokkr-agent-key";

/// Every log line of this test process, to look for refused calls of the agent.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures the agent's and kube's logs at debug level (watch errors are logged at debug).
fn capture_logs() -> Captured {
    let captured = Captured::default();
    let writer = captured.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "brokkr_agent=debug,kube=debug,kube_runtime=debug,info",
        ))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .try_init();
    captured
}

/// A rules file of the agent chart as JSON, with the key Secret's name filled in.
fn chart_rules(file: &str) -> Value {
    let path = format!(
        "{}/../charts/brokkr-agent/rbac/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let text = text.replace("KEY_SECRET_NAME", KEY_SECRET);
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"))
}

/// A Role with `rules` in `namespace`, bound to the agent's service account.
async fn bind(cluster: &TestCluster, namespace: &str, rules: Value) {
    let name = "brokkr-agent";
    let roles: Api<Role> = Api::namespaced(cluster.client.clone(), namespace);
    let role = serde_json::from_value(json!({ "metadata": { "name": name }, "rules": rules }))
        .unwrap_or_else(|e| panic!("the chart's rules are no Role: {e}"));
    roles.create(&PostParams::default(), &role).await.unwrap();
    let bindings: Api<RoleBinding> = Api::namespaced(cluster.client.clone(), namespace);
    let binding = serde_json::from_value(json!({
        "metadata": { "name": name },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name },
        "subjects": [{ "kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": cluster.namespace }],
    }))
    .unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

/// A client of the test cluster acting as the agent's service account.
async fn as_agent(cluster: &TestCluster) -> Client {
    let path = cluster.kubeconfig();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some(format!(
        "system:serviceaccount:{}:{SERVICE_ACCOUNT}",
        cluster.namespace
    ));
    config.default_namespace = cluster.namespace.clone();
    Client::try_from(config).unwrap()
}

/// A fresh namespace, deleted with the cluster.
async fn namespace(cluster: &TestCluster, prefix: &str) -> String {
    let name = unique_name(prefix);
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let object = serde_json::from_value(json!({ "metadata": { "name": name } })).unwrap();
    namespaces
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
    cluster.delete_on_drop::<Namespace>(&name);
    name
}

fn cluster_role_yaml(name: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {name}\nrules: []\n"
    )
}

fn mode(config_map: Option<ConfigMap>) -> Option<String> {
    config_map?.data?.get("mode").cloned()
}

#[tokio::test]
async fn an_agent_with_the_charts_namespaced_rbac_delivers_inside_refuses_outside_and_never_lists_cluster_wide()
 {
    let logs = capture_logs();
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let apps = namespace(&cluster, "brokkr-apps-").await;
    let outside = namespace(&cluster, "brokkr-outside-").await;
    bind(&cluster, &apps, chart_rules("namespace-rules.yaml")).await;
    bind(
        &cluster,
        &cluster.namespace,
        chart_rules("own-namespace-rules.yaml"),
    )
    .await;
    let cluster_role = unique_name("brokkr-refused-");
    cluster.delete_on_drop::<ClusterRole>(&cluster_role);

    let mut config = config_in(&hub, &cluster);
    config.scope = SpokeScope::new(Some([apps.clone()].into()), false);
    let agent_name = config.agent_name.clone();

    // A stack with objects inside and outside the agent's scope, and one wholly inside.
    let mixed = Uuid::now_v7();
    let v1 = hub.publish(
        mixed,
        &join(&[
            namespace_yaml(&outside),
            config_map_yaml("settings", &apps, "fast"),
            config_map_yaml("stray", &outside, "fast"),
            cluster_role_yaml(&cluster_role),
        ]),
    );
    let inside = Uuid::now_v7();
    let w1 = hub.publish(inside, &config_map_yaml("watched", &apps, "fast"));
    // A real API server's authorizer follows new bindings within moments: wait for them, so
    // that any refusal the agent meets later is the agent's own doing.
    let client = as_agent(&cluster).await;
    for namespace in [&apps, &cluster.namespace] {
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        eventually_within(PATIENCE, "the chart's rules to take effect", || async {
            config_maps
                .list(&ListParams::default())
                .await
                .ok()
                .map(|_| ())
        })
        .await;
    }
    let agent = start_agent(config, client).await;

    let failure = hub
        .wait_for_event(v1, EventType::Apply, EventStatus::Failure)
        .await;
    let message = failure.message.unwrap_or_default();
    assert!(message.starts_with("3 of 4 objects failed: "), "{message}");
    for refusal in [
        format!(
            "Namespace {outside}: refused: Namespace \"{outside}\" is not one this agent may write to (--allowed-namespaces: {apps}; --allow-cluster-scoped=false)"
        ),
        format!(
            "ConfigMap {outside}/stray: refused: namespace \"{outside}\" is outside the namespaces this agent may write to (--allowed-namespaces: {apps})"
        ),
        format!(
            "ClusterRole {cluster_role}: refused: cluster-scoped objects are not allowed on this agent (--allow-cluster-scoped=false; only the Namespaces {apps} may be written)"
        ),
    ] {
        assert!(message.contains(&refusal), "{refusal:?} not in {message:?}");
    }
    hub.wait_for_event(w1, EventType::Apply, EventStatus::Success)
        .await;

    // Inside: applied and labelled; outside: nothing was written.
    let in_apps: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &apps);
    let settings = in_apps.get("settings").await.unwrap();
    let labels = settings.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get(STACK_LABEL), Some(&mixed.to_string()));
    assert_eq!(labels.get(AGENT_LABEL), Some(&agent_name));
    let in_outside: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &outside);
    assert!(in_outside.get_opt("stray").await.unwrap().is_none());
    let cluster_roles: Api<ClusterRole> = Api::all(cluster.client.clone());
    assert!(
        cluster_roles
            .get_opt(&cluster_role)
            .await
            .unwrap()
            .is_none()
    );
    let inventory = inventory_of(&cluster, mixed).await.unwrap();
    assert_eq!(
        inventory.entries.len(),
        1,
        "only what was applied is listed"
    );

    // Drift of the settled stack is put back by the per-namespace watch (the resync is a
    // minute away, longer than the wait).
    in_apps
        .patch(
            "watched",
            &PatchParams::default(),
            &Patch::Merge(json!({ "data": { "mode": "slow" } })),
        )
        .await
        .unwrap();
    eventually_within(PATIENCE, "the edit to be reverted", || async {
        (mode(in_apps.get_opt("watched").await.unwrap()).as_deref() == Some("fast")).then_some(())
    })
    .await;
    in_apps
        .delete("watched", &DeleteParams::default())
        .await
        .unwrap();
    eventually_within(PATIENCE, "the deleted ConfigMap to come back", || async {
        (mode(in_apps.get_opt("watched").await.unwrap()).as_deref() == Some("fast")).then_some(())
    })
    .await;

    // Removal: a deletion marker and an untargeted stack.
    let w2 = hub.publish_deletion(inside);
    hub.wait_for_event(w2, EventType::Delete, EventStatus::Success)
        .await;
    assert!(in_apps.get_opt("watched").await.unwrap().is_none());
    hub.untarget(mixed);
    eventually_within(PATIENCE, "the untargeted stack to be removed", || async {
        let gone = in_apps.get_opt("settings").await.unwrap().is_none();
        (gone && inventory_of(&cluster, mixed).await.is_none()).then_some(())
    })
    .await;
    assert!(inventory_of(&cluster, inside).await.is_none());

    agent.stop().await;
    // The agent never had a call refused: it listed and watched only where it may.
    let captured = logs.text();
    let refused: Vec<&str> = captured
        .lines()
        .filter(|line| line.to_ascii_lowercase().contains("forbidden"))
        .collect();
    assert!(refused.is_empty(), "refused calls: {refused:#?}");
    assert!(
        captured.contains("watching for drift"),
        "the capture saw the agent's logs"
    );
    cluster.cleanup().await;
}

#[tokio::test]
async fn narrowing_the_scope_refuses_but_never_deletes_what_was_applied() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let apps = namespace(&cluster, "brokkr-apps-").await;
    let other = namespace(&cluster, "brokkr-other-").await;

    let stack = Uuid::now_v7();
    let v1 = hub.publish(
        stack,
        &join(&[
            config_map_yaml("kept", &apps, "fast"),
            config_map_yaml("left", &other, "fast"),
        ]),
    );
    let config = config_in(&hub, &cluster);
    let agent = start_agent(config.clone(), cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;
    agent.stop().await;

    // The same agent, now allowed only `apps`.
    let mut narrowed = config;
    narrowed.scope = SpokeScope::new(Some([apps.clone()].into()), true);
    let agent = start_agent(narrowed, cluster.client.clone()).await;
    let v2 = hub.publish(
        stack,
        &join(&[
            config_map_yaml("kept", &apps, "slow"),
            config_map_yaml("left", &other, "slow"),
        ]),
    );
    let failure = hub
        .wait_for_event(v2, EventType::Apply, EventStatus::Failure)
        .await;
    assert_eq!(
        failure.message.as_deref(),
        Some(
            format!(
                "1 of 2 objects failed: ConfigMap {other}/left: refused: namespace \"{other}\" is outside the namespaces this agent may write to (--allowed-namespaces: {apps})"
            )
            .as_str()
        )
    );
    let in_apps: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &apps);
    let in_other: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &other);
    assert_eq!(
        mode(in_apps.get_opt("kept").await.unwrap()).as_deref(),
        Some("slow")
    );
    // Refused, so not updated, and neither pruned nor forgotten.
    assert_eq!(
        mode(in_other.get_opt("left").await.unwrap()).as_deref(),
        Some("fast")
    );
    let inventory = inventory_of(&cluster, stack).await.unwrap();
    assert_eq!(inventory.entries.len(), 2);

    // Untargeted: what is in scope is removed; what is outside stays, and stays listed.
    hub.untarget(stack);
    eventually_within(PATIENCE, "the in-scope object to be removed", || async {
        in_apps
            .get_opt("kept")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(in_other.get_opt("left").await.unwrap().is_some());
    let inventory = inventory_of(&cluster, stack).await.unwrap();
    assert_eq!(
        inventory
            .entries
            .keys()
            .map(|k| k.to_string())
            .collect::<Vec<_>>(),
        [format!("ConfigMap {other}/left")]
    );
    agent.stop().await;
    cluster.cleanup().await;
}
