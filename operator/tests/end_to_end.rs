//! One in-process end to end: the hub (controllers and agent API) on one API server, a
//! real agent on a second one as the spoke, and a real PostgreSQL. A Stack goes out,
//! becomes Ready, changes (updated and pruned), and is deleted (spoke cleaned, finalizer
//! released). Runs against real clusters given KUBECONFIG (hub) and
//! BROKKR_E2E_SPOKE_KUBECONFIG (spoke).

use std::time::Duration;

use brokkr_agent::{AgentKey, Config};
use brokkr_crds::{Agent, AgentTarget, AgentTargetSpec, Stack};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use kubesim::testing::{TestCluster, eventually_within, unique_name};

mod common;
use common::Hub;

const PATIENCE: Duration = Duration::from_secs(45);

fn manifests(namespace: &str, color: &str, with_extra: bool) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: {namespace}\ndata:\n  color: {color}\n"
    );
    if with_extra {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: extra\n  namespace: {namespace}\ndata:\n  a: b\n"
        ));
    }
    text
}

fn ready(stack: &Stack) -> Option<String> {
    stack.status.as_ref().and_then(|s| s.ready.clone())
}

#[tokio::test]
async fn a_stack_travels_from_hub_to_spoke_and_back() {
    let hub = Hub::start().await;
    let spoke = TestCluster::from_env_var("BROKKR_E2E_SPOKE_KUBECONFIG").await;
    let api_url = hub.serve_api().await;
    let app_namespace = unique_name("e2e-shop-");

    hub.create_generator("ci").await;
    let agent = hub.create_agent("spoke", &[("env", "prod")]).await;
    let agent_name = agent.name_any();
    let secrets = hub.api::<Secret>();
    let key = eventually_within(PATIENCE, "agent key Secret", || async {
        secrets
            .get_opt(&format!("brokkr-agent-{agent_name}"))
            .await
            .ok()
            .flatten()
            .and_then(|s| s.data)
            .and_then(|d| {
                d.get("pak")
                    .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            })
    })
    .await;

    let mut config = Config::new(&api_url, AgentKey::new(&key).expect("key"), &agent_name)
        .expect("agent config");
    config.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.heartbeat_interval = Duration::from_secs(1);
    config.poll_wait = Duration::from_secs(5);
    config.health_interval = Duration::from_secs(1);
    let running = brokkr_agent::start(config, spoke.client.clone())
        .await
        .expect("start the agent");

    hub.create_stack("shop", "ci", &manifests(&app_namespace, "blue", true))
        .await;
    hub.api::<AgentTarget>()
        .create(
            &PostParams::default(),
            &AgentTarget::new(
                "prod",
                AgentTargetSpec {
                    stack_ref: brokkr_crds::StackRef {
                        name: "shop".into(),
                    },
                    agent_selector: Some(serde_yaml::from_str("matchLabels: {env: prod}").unwrap()),
                    ..Default::default()
                },
            ),
        )
        .await
        .unwrap();

    // Out to the spoke, and Ready in the hub as `kubectl get stacks` shows it.
    let spoke_maps: Api<ConfigMap> = Api::namespaced(spoke.client.clone(), &app_namespace);
    let settings = eventually_within(PATIENCE, "ConfigMap in the spoke", || async {
        spoke_maps.get_opt("settings").await.ok().flatten()
    })
    .await;
    let stack = eventually_within(PATIENCE, "Stack Ready 1/1", || async {
        hub.api::<Stack>()
            .get("shop")
            .await
            .ok()
            .filter(|s| ready(s).as_deref() == Some("1/1"))
    })
    .await;
    let stack_id = stack.status.as_ref().unwrap().stack_id.clone().unwrap();
    assert_eq!(settings.labels().get("brokkr.io/stack"), Some(&stack_id));
    assert_eq!(settings.labels().get("brokkr.io/agent"), Some(&agent_name));
    assert_eq!(
        settings.data.as_ref().unwrap()["color"],
        "blue",
        "the spoke holds the content"
    );
    let agents: Api<Agent> = Api::all(hub.cluster.client.clone());
    eventually_within(PATIENCE, "Agent Online", || async {
        agents.get(&agent_name).await.ok().filter(|a| {
            a.status.as_ref().and_then(|s| s.phase) == Some(brokkr_crds::AgentPhase::Online)
        })
    })
    .await;

    let first_sequence = stack_sequence(&stack);

    // A change: the value is updated and the dropped object pruned.
    hub.api::<Stack>()
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"manifests": manifests(&app_namespace, "green", false)}})),
        )
        .await
        .unwrap();
    eventually_within(PATIENCE, "updated and pruned in the spoke", || async {
        let settings = spoke_maps.get_opt("settings").await.ok().flatten()?;
        let extra = spoke_maps.get_opt("extra").await.ok()?;
        (settings.data?.get("color").map(String::as_str) == Some("green") && extra.is_none())
            .then_some(())
    })
    .await;
    eventually_within(PATIENCE, "Ready again at the new sequence", || async {
        let stack = hub.api::<Stack>().get("shop").await.ok()?;
        let applied_new =
            stack.status.as_ref()?.agents.first()?.state == brokkr_crds::AgentDeployState::Applied;
        (ready(&stack).as_deref() == Some("1/1")
            && stack_sequence(&stack) > first_sequence
            && applied_new)
            .then_some(())
    })
    .await;

    // Deletion: the spoke is cleaned, then the finalizer lets the Stack go.
    hub.api::<Stack>()
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    eventually_within(PATIENCE, "Stack released", || async {
        hub.api::<Stack>()
            .get_opt("shop")
            .await
            .ok()
            .and_then(|s| s.is_none().then_some(()))
    })
    .await;
    let spoke_namespaces: Api<k8s_openapi::api::core::v1::Namespace> =
        Api::all(spoke.client.clone());
    eventually_within(PATIENCE, "spoke cleaned", || async {
        let namespace = spoke_namespaces.get_opt(&app_namespace).await.ok()?;
        let gone = namespace.is_none()
            || namespace.is_some_and(|n| n.metadata.deletion_timestamp.is_some());
        gone.then_some(())
    })
    .await;

    running.stop().await;
    spoke.cleanup().await;
    hub.stop().await;
}

fn stack_sequence(stack: &Stack) -> i64 {
    stack
        .status
        .as_ref()
        .and_then(|s| s.deployment_object.as_ref())
        .map_or(0, |d| d.sequence)
}
