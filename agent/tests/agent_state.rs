//! The agent's own state in its heartbeats (issue 16, item 1): `Error` with the reason
//! when it cannot do its job on the spoke, clearing by itself when the cause goes away.
//! Against the in-test hub; the spoke is kubesim (RBAC enforced for impersonated requests),
//! or the real cluster of `BROKKR_E2E_SPOKE_KUBECONFIG` (whose user may impersonate).

mod common;

use std::time::Duration;

use brokkr_agent::scope::SpokeScope;
use brokkr_crds::wire::{EventStatus, EventType, Heartbeat, STATE_ERROR, STATE_READY};
use common::*;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use kubesim::TestCluster;
use kubesim::testing::{eventually_within, unique_name};
use serde_json::{Value, json};
use uuid::Uuid;

const SERVICE_ACCOUNT: &str = "brokkr-agent";

/// The first heartbeat (newest last) that `check` accepts, once one arrives.
async fn heartbeat_where(
    hub: &FakeHub,
    what: &str,
    within: Duration,
    check: impl Fn(&Heartbeat) -> bool,
) -> Heartbeat {
    eventually_within(within, what, || async {
        hub.heartbeats().into_iter().rev().find(|h| check(h))
    })
    .await
}

#[tokio::test]
async fn an_agent_whose_spoke_api_server_is_unreachable_reports_error_naming_it() {
    init_logs();
    let hub = FakeHub::start().await;
    // Nothing listens on port 1.
    let mut spoke = Config::new("http://127.0.0.1:1".parse().unwrap());
    spoke.default_namespace = "default".into();
    let client = Client::try_from(spoke).unwrap();
    let agent = start_agent(config(&hub), client).await;
    let beat = heartbeat_where(&hub, "an Error heartbeat", PATIENCE, |h| {
        h.state == STATE_ERROR
    })
    .await;
    let message = beat.message.unwrap_or_default();
    assert!(
        message.starts_with("spoke API server unreachable: "),
        "{message}"
    );
    agent.stop().await;
}

/// A Role with `rules` in `namespace`, bound to the agent's service account.
async fn bind(cluster: &TestCluster, namespace: &str, name: &str, rules: Value) {
    let roles: Api<Role> = Api::namespaced(cluster.client.clone(), namespace);
    let role =
        serde_json::from_value(json!({ "metadata": { "name": name }, "rules": rules })).unwrap();
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
    let kubeconfig = Kubeconfig::read_from(cluster.kubeconfig()).unwrap();
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

#[tokio::test]
async fn a_drift_watch_rbac_refuses_is_an_error_until_the_watch_is_granted() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let apps = unique_name("brokkr-apps-");
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": apps } })).unwrap(),
        )
        .await
        .unwrap();
    cluster.delete_on_drop::<Namespace>(&apps);
    // Everything the agent needs on ConfigMaps but watching them, and its inventories.
    bind(
        &cluster,
        &apps,
        "brokkr-agent",
        json!([{ "apiGroups": [""], "resources": ["configmaps"],
                 "verbs": ["get", "list", "create", "patch", "update", "delete"] }]),
    )
    .await;
    bind(
        &cluster,
        &cluster.namespace,
        "brokkr-agent",
        json!([{ "apiGroups": [""], "resources": ["configmaps"],
                 "verbs": ["list", "create", "patch", "delete"] }]),
    )
    .await;
    let mut config = config_in(&hub, &cluster);
    config.scope = SpokeScope::new(Some([apps.clone()].into()), false);
    let stack = Uuid::now_v7();
    let v1 = hub.publish(stack, &config_map_yaml("settings", &apps, "fast"));
    let client = as_agent(&cluster).await;
    let agent = start_agent(config, client).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;

    let refused = format!("RBAC refuses watching configmaps in namespace {apps}: ");
    let beat = heartbeat_where(&hub, "an Error heartbeat naming the watch", PATIENCE, |h| {
        h.state == STATE_ERROR
            && h.message
                .as_deref()
                .is_some_and(|m| m.starts_with(&refused))
    })
    .await;
    assert!(
        beat.stacks.iter().any(|s| s.stack_id == stack),
        "the heartbeat still reports the stacks"
    );

    // Granted: the watch lists again (after its backoff) and the Error clears by itself.
    let errors_before = hub.heartbeats().len();
    bind(
        &cluster,
        &apps,
        "brokkr-agent-watch",
        json!([{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["watch"] }]),
    )
    .await;
    eventually_within(Duration::from_secs(60), "a Ready heartbeat", || async {
        hub.heartbeats()
            .into_iter()
            .skip(errors_before)
            .find(|h| h.state == STATE_READY && h.message.is_none())
    })
    .await;
    agent.stop().await;
    cluster.cleanup().await;
}
