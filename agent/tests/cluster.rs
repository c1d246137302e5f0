//! The agent against a spoke cluster: kubesim by default, the real cluster of
//! `BROKKR_E2E_SPOKE_KUBECONFIG` when set. Each test drives a whole agent through the in-test
//! hub and checks what lands in the cluster and what is reported.

mod common;

use std::time::Duration;

use brokkr_crds::wire::{EventStatus, EventType};
use brokkr_crds::{
    AGENT_LABEL, CHECKSUM_ANNOTATION, DEPLOYMENT_OBJECT_ANNOTATION, DeletionPolicy, DriftPolicy,
    IgnoreDifference, STACK_LABEL, StackPolicy,
};
use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kubesim::testing::{eventually_within, unique_name};
use serde_json::json;
use uuid::Uuid;

/// The ownership labels and annotations of `do_id` are on the object.
fn assert_owned(meta: &ObjectMeta, stack: Uuid, agent: &str, hub: &FakeHub, do_id: Uuid) {
    let what = meta.name.clone().unwrap_or_default();
    let labels = meta.labels.clone().unwrap_or_default();
    let annotations = meta.annotations.clone().unwrap_or_default();
    assert_eq!(labels.get(STACK_LABEL), Some(&stack.to_string()), "{what}");
    assert_eq!(labels.get(AGENT_LABEL), Some(&agent.to_owned()), "{what}");
    assert_eq!(
        annotations.get(DEPLOYMENT_OBJECT_ANNOTATION),
        Some(&do_id.to_string()),
        "{what}"
    );
    assert_eq!(
        annotations.get(CHECKSUM_ANNOTATION),
        Some(&hub.deployment_object(do_id).checksum),
        "{what}"
    );
}

fn widgets(client: &kube::Client, group: &str, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(group, "v1", "Widget");
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(&gvk, "widgets"),
    )
}

/// The first `Apply` event reported for `do_id`.
async fn first_apply_event(hub: &FakeHub, do_id: Uuid) -> brokkr_crds::wire::AgentEvent {
    eventually_within(PATIENCE, "an Apply event", || async {
        hub.events_for(do_id)
            .into_iter()
            .find(|e| e.event_type == EventType::Apply)
    })
    .await
}

#[tokio::test]
async fn namespaces_and_crds_are_applied_first_and_every_object_is_labelled() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let group = unique_group();
    let ns = unique_name("brokkr-shop-");
    cluster.delete_on_drop::<CustomResourceDefinition>(&format!("widgets.{group}"));
    cluster.delete_on_drop::<Namespace>(&ns);

    // Written in the worst order: the custom object and the ConfigMap come before the CRD and
    // the Namespace they need. Applied in document order, both would fail.
    let stack = Uuid::now_v7();
    let do_id = hub.publish(
        stack,
        &join(&[
            widget_yaml(&group, "w1", &ns, "3"),
            config_map_yaml("settings", &ns, "fast"),
            widget_crd_yaml(&group),
            namespace_yaml(&ns),
        ]),
    );
    let config = config_in(&hub, &cluster);
    let agent_name = config.agent_name.clone();
    let agent = start_agent(config, cluster.client.clone()).await;

    let first = first_apply_event(&hub, do_id).await;
    assert_eq!(first.status, EventStatus::Success, "{:?}", first.message);
    assert_eq!(first.message.as_deref(), Some("applied 4 objects"));

    let client = &cluster.client;
    let namespace = Api::<Namespace>::all(client.clone())
        .get(&ns)
        .await
        .unwrap();
    assert_owned(&namespace.metadata, stack, &agent_name, &hub, do_id);
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get(&format!("widgets.{group}"))
        .await
        .unwrap();
    assert_owned(&crd.metadata, stack, &agent_name, &hub, do_id);
    let established = crd.status.and_then(|s| s.conditions).unwrap_or_default();
    assert!(
        established
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("settings")
        .await
        .unwrap();
    assert_owned(&config_map.metadata, stack, &agent_name, &hub, do_id);
    // The manifest's own labels survive next to ours.
    assert_eq!(
        config_map.metadata.labels.as_ref().unwrap().get("app"),
        Some(&"shop".to_owned())
    );
    // Written by server-side apply under the agent's field manager.
    let managers = config_map.metadata.managed_fields.unwrap_or_default();
    assert!(
        managers
            .iter()
            .any(|m| m.manager.as_deref() == Some("brokkr.io/agent")
                && m.operation.as_deref() == Some("Apply")),
        "{managers:?}"
    );
    let widget = widgets(client, &group, &ns).get("w1").await.unwrap();
    assert_owned(&widget.metadata, stack, &agent_name, &hub, do_id);
    assert_eq!(widget.data["spec"]["size"], 3);

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn objects_dropped_from_the_next_version_are_pruned_and_nothing_else_is() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let config = config_in(&hub, &cluster);
    let agent_name = config.agent_name.clone();
    let config_maps: Api<ConfigMap> = cluster.api();

    // Someone else's objects of the same kind: one without labels, one labelled for the same
    // stack by another agent.
    let stack = Uuid::now_v7();
    let mut unlabelled = ConfigMap::default();
    unlabelled.metadata.name = Some("not-ours".into());
    config_maps
        .create(&PostParams::default(), &unlabelled)
        .await
        .unwrap();
    let mut other_agent = ConfigMap::default();
    other_agent.metadata.name = Some("other-agent".into());
    other_agent.metadata.labels = Some(
        [
            (STACK_LABEL.to_owned(), stack.to_string()),
            (AGENT_LABEL.to_owned(), "someone-else".to_owned()),
        ]
        .into(),
    );
    config_maps
        .create(&PostParams::default(), &other_agent)
        .await
        .unwrap();

    let v1 = hub.publish(
        stack,
        &join(&[
            config_map_yaml("kept", &ns, "a"),
            config_map_yaml("dropped", &ns, "b"),
        ]),
    );
    let agent = start_agent(config, cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;
    assert!(config_maps.get_opt("dropped").await.unwrap().is_some());

    let v2 = hub.publish(stack, &config_map_yaml("kept", &ns, "a2"));
    hub.wait_for_event(v2, EventType::Apply, EventStatus::Success)
        .await;
    assert!(config_maps.get_opt("dropped").await.unwrap().is_none());
    let kept = config_maps.get("kept").await.unwrap();
    assert_owned(&kept.metadata, stack, &agent_name, &hub, v2);
    assert_eq!(kept.data.unwrap()["mode"], "a2");
    assert!(config_maps.get_opt("not-ours").await.unwrap().is_some());
    assert!(config_maps.get_opt("other-agent").await.unwrap().is_some());
    let metrics = get_text(agent.metrics_addr, "/metrics").await.1;
    assert!(
        metrics
            .lines()
            .any(|l| l == "brokkr_agent_prune_deletes_total 1"),
        "{metrics}"
    );

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn a_restarted_agent_still_prunes_and_removes_stacks_that_left_while_it_was_down() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let config = config_in(&hub, &cluster);
    let config_maps: Api<ConfigMap> = cluster.api();

    let stack = Uuid::now_v7();
    let leaving = Uuid::now_v7();
    let v1 = hub.publish(
        stack,
        &join(&[
            config_map_yaml("kept", &ns, "a"),
            config_map_yaml("dropped", &ns, "b"),
        ]),
    );
    let gone = hub.publish(leaving, &config_map_yaml("leaving", &ns, "c"));
    let agent = start_agent(config.clone(), cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;
    hub.wait_for_event(gone, EventType::Apply, EventStatus::Success)
        .await;
    agent.stop().await;

    // While the agent is down: one object dropped, one stack untargeted.
    let v2 = hub.publish(stack, &config_map_yaml("kept", &ns, "a"));
    hub.untarget(leaving);
    let agent = start_agent(config, cluster.client.clone()).await;
    hub.wait_for_event(v2, EventType::Apply, EventStatus::Success)
        .await;
    eventually_within(
        PATIENCE,
        "the untargeted stack's ConfigMap to go",
        || async {
            config_maps
                .get_opt("leaving")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(config_maps.get_opt("dropped").await.unwrap().is_none());
    assert!(config_maps.get_opt("kept").await.unwrap().is_some());

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn a_deletion_marker_or_an_untargeted_stack_removes_everything_of_that_stack() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let group = unique_group();
    let own_ns = unique_name("brokkr-gone-");
    cluster.delete_on_drop::<CustomResourceDefinition>(&format!("widgets.{group}"));
    cluster.delete_on_drop::<Namespace>(&own_ns);
    let client = &cluster.client;
    let config_maps: Api<ConfigMap> = cluster.api();

    let deleted = Uuid::now_v7();
    let untargeted = Uuid::now_v7();
    let v1 = hub.publish(
        deleted,
        &join(&[
            namespace_yaml(&own_ns),
            widget_crd_yaml(&group),
            widget_yaml(&group, "w1", &own_ns, "1"),
            config_map_yaml("inside", &own_ns, "x"),
            config_map_yaml("outside", &ns, "y"),
        ]),
    );
    let other = hub.publish(untargeted, &config_map_yaml("untargeted", &ns, "z"));
    let agent = start_agent(config_in(&hub, &cluster), client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;
    hub.wait_for_event(other, EventType::Apply, EventStatus::Success)
        .await;

    let marker = hub.publish_deletion(deleted);
    hub.untarget(untargeted);
    let event = hub
        .wait_for_event(marker, EventType::Delete, EventStatus::Success)
        .await;
    assert_eq!(event.message.as_deref(), Some("deleted 5 objects"));
    assert!(config_maps.get_opt("outside").await.unwrap().is_none());
    let namespace = Api::<Namespace>::all(client.clone())
        .get_opt(&own_ns)
        .await
        .unwrap();
    // Gone, or (on a real cluster) terminating.
    assert!(namespace.is_none_or(|n| n.metadata.deletion_timestamp.is_some()));
    eventually_within(PATIENCE, "the CRD to go", || async {
        let crd = Api::<CustomResourceDefinition>::all(client.clone())
            .get_opt(&format!("widgets.{group}"))
            .await
            .unwrap();
        crd.is_none_or(|c| c.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await;
    eventually_within(
        PATIENCE,
        "the untargeted stack's ConfigMap to go",
        || async {
            config_maps
                .get_opt("untargeted")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    // Leaving the set has no deployment object to report on: no Delete event for it.
    assert!(
        hub.events_for(other)
            .iter()
            .all(|e| e.event_type != EventType::Delete)
    );

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn an_edited_or_deleted_object_is_put_back() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let config_maps: Api<ConfigMap> = cluster.api();

    let stack = Uuid::now_v7();
    let v1 = hub.publish(stack, &config_map_yaml("settings", &ns, "fast"));
    let agent = start_agent(config_in(&hub, &cluster), cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;

    let mode = |cm: Option<ConfigMap>| {
        cm.and_then(|cm| cm.data)
            .and_then(|d| d.get("mode").cloned())
    };
    config_maps
        .patch(
            "settings",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"mode": "slow"}})),
        )
        .await
        .unwrap();
    eventually_within(PATIENCE, "the edit to be reverted", || async {
        (mode(config_maps.get_opt("settings").await.unwrap()).as_deref() == Some("fast"))
            .then_some(())
    })
    .await;

    config_maps
        .delete("settings", &DeleteParams::default())
        .await
        .unwrap();
    eventually_within(PATIENCE, "the deleted ConfigMap to come back", || async {
        (mode(config_maps.get_opt("settings").await.unwrap()).as_deref() == Some("fast"))
            .then_some(())
    })
    .await;
    // Each correction is a drift episode, reported as corrected.
    let drifts = |hub: &FakeHub| {
        hub.events_for(v1)
            .into_iter()
            .filter(|e| e.event_type == EventType::Drift)
            .map(|e| (e.status, e.message.unwrap_or_default()))
            .collect::<Vec<_>>()
    };
    eventually_within(PATIENCE, "two corrected drift episodes", || async {
        let found = drifts(&hub);
        (found.len() >= 2).then_some(())
    })
    .await;
    let found = drifts(&hub);
    assert_eq!(
        found[0],
        (
            EventStatus::Success,
            format!("1 object drifted: ConfigMap {ns}/settings (changed, corrected)")
        )
    );
    assert_eq!(
        found[1],
        (
            EventStatus::Success,
            format!("1 object drifted: ConfigMap {ns}/settings (deleted, corrected)")
        )
    );

    // The same edit again is a new episode.
    config_maps
        .patch(
            "settings",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"mode": "slow"}})),
        )
        .await
        .unwrap();
    eventually_within(PATIENCE, "a third drift episode", || async {
        let found = drifts(&hub);
        (found.len() >= 3).then_some(())
    })
    .await;
    assert_eq!(
        drifts(&hub)[2],
        (
            EventStatus::Success,
            format!("1 object drifted: ConfigMap {ns}/settings (changed, corrected)")
        )
    );
    eventually_within(PATIENCE, "the edit to be reverted again", || async {
        (mode(config_maps.get_opt("settings").await.unwrap()).as_deref() == Some("fast"))
            .then_some(())
    })
    .await;

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn a_rejected_object_is_reported_with_the_servers_message_and_fixed_by_the_next_version() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let group = unique_group();
    cluster.delete_on_drop::<CustomResourceDefinition>(&format!("widgets.{group}"));
    let config_maps: Api<ConfigMap> = cluster.api();

    let stack = Uuid::now_v7();
    let nowhere =
        format!("apiVersion: {group}/v1\nkind: Gizmo\nmetadata:\n  name: g1\n  namespace: {ns}\n");
    let v1 = hub.publish(
        stack,
        &join(&[
            widget_crd_yaml(&group),
            widget_yaml(&group, "w1", &ns, "big"),
            nowhere,
            config_map_yaml("settings", &ns, "fast"),
        ]),
    );
    let agent = start_agent(config_in(&hub, &cluster), cluster.client.clone()).await;
    let failure = hub
        .wait_for_event(v1, EventType::Apply, EventStatus::Failure)
        .await;
    let message = failure.message.unwrap_or_default();
    assert!(message.starts_with("2 of 4 objects failed"), "{message}");
    // The API server's own words for the invalid object and for the unknown kind.
    assert!(message.contains(&format!("Widget {ns}/w1: ")), "{message}");
    assert!(message.contains("spec.size"), "{message}");
    assert!(
        message.contains(&format!("Gizmo {ns}/g1: no matches for kind \"Gizmo\"")),
        "{message}"
    );
    // The rest was applied all the same.
    assert!(config_maps.get_opt("settings").await.unwrap().is_some());

    // Retries go on, but an unchanged outcome is not reported again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failures = hub
        .events_for(v1)
        .into_iter()
        .filter(|e| e.event_type == EventType::Apply)
        .count();
    assert_eq!(failures, 1);
    let metrics = get_text(agent.metrics_addr, "/metrics").await.1;
    let apply_failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("brokkr_agent_apply_failures_total "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_default();
    assert!(
        apply_failures >= 4,
        "the failed objects were retried: {metrics}"
    );

    let v2 = hub.publish(
        stack,
        &join(&[
            widget_crd_yaml(&group),
            widget_yaml(&group, "w1", &ns, "5"),
            config_map_yaml("settings", &ns, "fast"),
        ]),
    );
    hub.wait_for_event(v2, EventType::Apply, EventStatus::Success)
        .await;
    let widget = widgets(&cluster.client, &group, &ns)
        .get("w1")
        .await
        .unwrap();
    assert_eq!(widget.data["spec"]["size"], 5);

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn health_follows_the_deployment_and_rolls_up_per_stack() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let deployment = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: {ns}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
      - name: pause
        image: registry.k8s.io/pause:3.10
"#
    );
    let stack = Uuid::now_v7();
    let v1 = hub.publish(
        stack,
        &join(&[config_map_yaml("settings", &ns, "fast"), deployment]),
    );
    let agent = start_agent(config_in(&hub, &cluster), cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;

    let deployments: Api<Deployment> = cluster.api();
    if !cluster.is_real() {
        // No controller in kubesim: nothing has rolled out yet.
        let progressing = hub.wait_for_health(v1, "progressing").await;
        assert_eq!(progressing.status, EventStatus::Success);
        assert_eq!(
            progressing.message.as_deref(),
            Some(
                format!(
                    "progressing: Deployment {ns}/web: waiting for the controller to observe the new spec"
                )
                .as_str()
            )
        );
        // Play the deployment controller through the status subresource: first stuck...
        let generation = deployments
            .get("web")
            .await
            .unwrap()
            .metadata
            .generation
            .unwrap_or(1);
        deployments
            .patch_status(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "observedGeneration": generation,
                    "replicas": 1, "updatedReplicas": 1, "availableReplicas": 0,
                    "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                    "message": "ReplicaSet \"web-1\" has timed out progressing."}]
                }})),
            )
            .await
            .unwrap();
        let degraded = hub.wait_for_health(v1, "degraded").await;
        assert_eq!(degraded.status, EventStatus::Failure);
        assert_eq!(
            degraded.message.as_deref(),
            Some(
                format!(
                    "degraded: Deployment {ns}/web: ReplicaSet \"web-1\" has timed out progressing."
                )
                .as_str()
            )
        );
        // ...then rolled out.
        deployments
            .patch_status(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "observedGeneration": generation,
                    "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1,
                    "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                                   {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]
                }})),
            )
            .await
            .unwrap();
    }
    let healthy = hub.wait_for_health(v1, "healthy").await;
    assert_eq!(healthy.status, EventStatus::Success);
    assert_eq!(
        healthy.message.as_deref(),
        Some("healthy: 2 objects healthy")
    );

    eventually_within(PATIENCE, "a heartbeat with the stack healthy", || async {
        hub.heartbeats().into_iter().rev().find(|h| {
            h.stacks.iter().any(|s| {
                s.stack_id == stack
                    && s.health == brokkr_crds::wire::Health::Healthy
                    && s.objects == 2
                    && s.failed == 0
            }) && h.state == "Ready"
        })
    })
    .await;

    agent.stop().await;
    cluster.cleanup().await;
}

/// A ConfigMap in the test namespace labelled as `stack`'s by someone else (not the agent).
async fn forge(config_maps: &Api<ConfigMap>, name: &str, stack: Uuid, agent: &str) {
    let mut object = ConfigMap::default();
    object.metadata.name = Some(name.into());
    object.metadata.labels = Some(
        [
            (STACK_LABEL.to_owned(), stack.to_string()),
            (AGENT_LABEL.to_owned(), agent.to_owned()),
        ]
        .into(),
    );
    config_maps
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

#[tokio::test]
async fn objects_labelled_by_someone_else_are_never_deleted_and_a_deletion_is_reported_once() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let config_maps: Api<ConfigMap> = cluster.api();
    let mut config = config_in(&hub, &cluster);
    config.resync_interval = Duration::from_secs(1);
    let agent_name = config.agent_name.clone();

    let stack = Uuid::now_v7();
    let untargeted = Uuid::now_v7();
    // Labelled as the stack's before the agent ever ran: labels alone make nothing ours.
    forge(&config_maps, "planted", stack, &agent_name).await;
    let v1 = hub.publish(stack, &config_map_yaml("settings", &ns, "fast"));
    let other = hub.publish(untargeted, &config_map_yaml("other", &ns, "x"));
    let agent = start_agent(config, cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;
    hub.wait_for_event(other, EventType::Apply, EventStatus::Success)
        .await;
    // Labelled behind the agent's back while the stacks are live.
    forge(&config_maps, "came-later", untargeted, &agent_name).await;
    forge(&config_maps, "stray", Uuid::now_v7(), &agent_name).await;

    let marker = hub.publish_deletion(stack);
    hub.untarget(untargeted);
    let deleted = hub
        .wait_for_event(marker, EventType::Delete, EventStatus::Success)
        .await;
    assert_eq!(deleted.message.as_deref(), Some("deleted 1 object"));
    eventually_within(
        PATIENCE,
        "the untargeted stack's ConfigMap to go",
        || async {
            config_maps
                .get_opt("other")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(config_maps.get_opt("settings").await.unwrap().is_none());
    // Resyncs come and go; what the agent never applied stays.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for name in ["planted", "came-later", "stray"] {
        assert!(
            config_maps.get_opt(name).await.unwrap().is_some(),
            "{name} was deleted"
        );
    }
    assert!(inventory_of(&cluster, stack).await.is_none());
    assert!(inventory_of(&cluster, untargeted).await.is_none());
    let deletes = hub
        .events_for(marker)
        .into_iter()
        .filter(|e| e.event_type == EventType::Delete)
        .count();
    assert_eq!(deletes, 1, "the deletion is reported once");

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn a_custom_object_dropped_or_untargeted_while_the_agent_was_down_is_removed_after_a_restart()
{
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let group = unique_group();
    let other_group = unique_group();
    cluster.delete_on_drop::<CustomResourceDefinition>(&format!("widgets.{group}"));
    cluster.delete_on_drop::<CustomResourceDefinition>(&format!("widgets.{other_group}"));
    let config = config_in(&hub, &cluster);
    let widgets = widgets(&cluster.client, &group, &ns);
    let other_widgets = self::widgets(&cluster.client, &other_group, &ns);

    let stack = Uuid::now_v7();
    let leaving = Uuid::now_v7();
    let v1 = hub.publish(
        stack,
        &join(&[
            widget_crd_yaml(&group),
            widget_yaml(&group, "kept", &ns, "1"),
            widget_yaml(&group, "dropped", &ns, "2"),
        ]),
    );
    let gone = hub.publish(
        leaving,
        &join(&[
            widget_crd_yaml(&other_group),
            widget_yaml(&other_group, "leaving", &ns, "3"),
        ]),
    );
    let agent = start_agent(config.clone(), cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;
    hub.wait_for_event(gone, EventType::Apply, EventStatus::Success)
        .await;
    // What the agent recorded: every object with its uid.
    let recorded = inventory_of(&cluster, stack).await.unwrap();
    let dropped_uid = widgets.get("dropped").await.unwrap().metadata.uid;
    let entry = recorded
        .entries
        .values()
        .find(|e| e.kind == "Widget" && e.name == "dropped")
        .unwrap();
    assert_eq!(
        (
            entry.group.as_str(),
            entry.version.as_str(),
            entry.namespace.as_deref()
        ),
        (group.as_str(), "v1", Some(ns.as_str()))
    );
    assert_eq!(entry.uid, dropped_uid);
    assert_eq!(recorded.entries.len(), 3);
    agent.stop().await;

    // While the agent is down: a custom object leaves the stack, and a stack of custom
    // objects leaves the agent. No well-known kind anywhere.
    let v2 = hub.publish(
        stack,
        &join(&[
            widget_crd_yaml(&group),
            widget_yaml(&group, "kept", &ns, "1"),
        ]),
    );
    hub.untarget(leaving);
    let agent = start_agent(config, cluster.client.clone()).await;
    hub.wait_for_event(v2, EventType::Apply, EventStatus::Success)
        .await;
    assert!(widgets.get_opt("dropped").await.unwrap().is_none());
    assert!(widgets.get_opt("kept").await.unwrap().is_some());
    eventually_within(PATIENCE, "the untargeted stack's Widget to go", || async {
        let widget = other_widgets.get_opt("leaving").await.ok().flatten();
        widget.is_none().then_some(())
    })
    .await;
    eventually_within(
        PATIENCE,
        "the untargeted stack's inventory to go",
        || async {
            inventory_of(&cluster, leaving)
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        inventory_of(&cluster, stack).await.unwrap().entries.len(),
        2
    );

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn an_existing_object_is_refused_until_the_stack_adopts_it_and_another_stacks_never_is() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let config_maps: Api<ConfigMap> = cluster.api();
    let config = config_in(&hub, &cluster);
    let agent_name = config.agent_name.clone();

    let mut existing = ConfigMap::default();
    existing.metadata.name = Some("settings".into());
    existing.data = Some([("mode".to_owned(), "theirs".to_owned())].into());
    config_maps
        .create(&PostParams::default(), &existing)
        .await
        .unwrap();

    let stack = Uuid::now_v7();
    let v1 = hub.publish(
        stack,
        &join(&[
            config_map_yaml("settings", &ns, "ours"),
            config_map_yaml("fresh", &ns, "ours"),
        ]),
    );
    let agent = start_agent(config, cluster.client.clone()).await;
    let refused = hub
        .wait_for_event(v1, EventType::Apply, EventStatus::Failure)
        .await;
    assert_eq!(
        refused.message.as_deref(),
        Some(
            format!(
                "1 of 2 objects failed: ConfigMap {ns}/settings: exists and is not managed by Brokkr; set spec.adoptExisting: true on the Stack to take it over"
            )
            .as_str()
        )
    );
    let untouched = config_maps.get("settings").await.unwrap();
    assert_eq!(untouched.data.unwrap()["mode"], "theirs");
    assert!(
        !untouched
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key(STACK_LABEL)
    );
    assert!(config_maps.get_opt("fresh").await.unwrap().is_some());

    let adopt = StackPolicy {
        adopt_existing: true,
        ..StackPolicy::default()
    };
    let v2 = hub.publish(
        stack,
        &with_policy(
            &adopt,
            &[
                config_map_yaml("settings", &ns, "ours"),
                config_map_yaml("fresh", &ns, "ours"),
            ],
        ),
    );
    hub.wait_for_event(v2, EventType::Apply, EventStatus::Success)
        .await;
    let adopted = config_maps.get("settings").await.unwrap();
    assert_owned(&adopted.metadata, stack, &agent_name, &hub, v2);
    assert_eq!(adopted.data.unwrap()["mode"], "ours");
    let uid = adopted.metadata.uid.clone();
    let recorded = inventory_of(&cluster, stack).await.unwrap();
    assert!(
        recorded
            .entries
            .values()
            .any(|e| e.name == "settings" && e.uid == uid)
    );

    // Another stack, even one allowed to adopt, never takes over the first stack's object.
    let rival = Uuid::now_v7();
    let r1 = hub.publish(
        rival,
        &with_policy(&adopt, &[config_map_yaml("settings", &ns, "rival")]),
    );
    let taken = hub
        .wait_for_event(r1, EventType::Apply, EventStatus::Failure)
        .await;
    let message = taken.message.unwrap_or_default();
    assert!(
        message.contains(&format!("is managed by another Brokkr stack ({stack})")),
        "{message}"
    );
    let kept = config_maps.get("settings").await.unwrap();
    assert_eq!(kept.data.unwrap()["mode"], "ours");
    assert_owned(&kept.metadata, stack, &agent_name, &hub, v2);

    // Adopted means owned: dropped from the stack, it is pruned like any other.
    let v3 = hub.publish(
        stack,
        &with_policy(&adopt, &[config_map_yaml("fresh", &ns, "ours")]),
    );
    hub.wait_for_event(v3, EventType::Apply, EventStatus::Success)
        .await;
    assert!(config_maps.get_opt("settings").await.unwrap().is_none());

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn orphan_leaves_the_objects_without_brokkr_labels_and_forgets_them() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let config_maps: Api<ConfigMap> = cluster.api();
    let config = config_in(&hub, &cluster);
    let orphan = StackPolicy {
        deletion_policy: DeletionPolicy::Orphan,
        ..StackPolicy::default()
    };

    let deleted = Uuid::now_v7();
    let untargeted = Uuid::now_v7();
    let v1 = hub.publish(
        deleted,
        &with_policy(
            &orphan,
            &[
                config_map_yaml("kept-a", &ns, "a"),
                config_map_yaml("kept-b", &ns, "b"),
            ],
        ),
    );
    let other = hub.publish(
        untargeted,
        &with_policy(&orphan, &[config_map_yaml("kept-c", &ns, "c")]),
    );
    let agent = start_agent(config.clone(), cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;
    hub.wait_for_event(other, EventType::Apply, EventStatus::Success)
        .await;
    assert_eq!(
        inventory_of(&cluster, untargeted)
            .await
            .unwrap()
            .deletion_policy,
        DeletionPolicy::Orphan
    );

    // The deletion marker carries the policy line of the last version.
    let marker = hub.publish_object(deleted, &orphan.header().unwrap(), true);
    let event = hub
        .wait_for_event(marker, EventType::Delete, EventStatus::Success)
        .await;
    assert_eq!(
        event.message.as_deref(),
        Some("orphaned 2 objects: left in place without brokkr.io labels and annotations")
    );
    // Untargeted while the agent is down: the inventory's policy decides.
    agent.stop().await;
    hub.untarget(untargeted);
    let agent = start_agent(config, cluster.client.clone()).await;
    eventually_within(
        PATIENCE,
        "the untargeted stack's inventory to go",
        || async {
            inventory_of(&cluster, untargeted)
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;

    for name in ["kept-a", "kept-b", "kept-c"] {
        let object = config_maps.get(name).await.unwrap();
        let brokkr = |keys: Option<std::collections::BTreeMap<String, String>>| {
            keys.unwrap_or_default()
                .keys()
                .filter(|k| k.starts_with("brokkr.io/"))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            brokkr(object.metadata.labels.clone()),
            Vec::<String>::new(),
            "{name}"
        );
        assert_eq!(
            brokkr(object.metadata.annotations.clone()),
            Vec::<String>::new(),
            "{name}"
        );
        // The manifest's own label stays.
        assert_eq!(object.metadata.labels.unwrap()["app"], "shop", "{name}");
    }
    assert!(inventory_of(&cluster, deleted).await.is_none());

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn an_object_replaced_by_someone_else_is_not_deleted() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let config_maps: Api<ConfigMap> = cluster.api();
    let config = config_in(&hub, &cluster);

    let stack = Uuid::now_v7();
    let v1 = hub.publish(
        stack,
        &join(&[
            config_map_yaml("replaced", &ns, "a"),
            config_map_yaml("ours", &ns, "b"),
        ]),
    );
    let agent = start_agent(config.clone(), cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;
    agent.stop().await;

    // While the agent is down, someone deletes the object and creates their own of the same
    // name, with the same labels.
    let original = config_maps.get("replaced").await.unwrap();
    config_maps
        .delete("replaced", &DeleteParams::default())
        .await
        .unwrap();
    eventually_within(PATIENCE, "the original to go", || async {
        config_maps
            .get_opt("replaced")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let mut theirs = ConfigMap::default();
    theirs.metadata.name = Some("replaced".into());
    theirs.metadata.labels = original.metadata.labels.clone();
    theirs.data = Some([("mode".to_owned(), "theirs".to_owned())].into());
    let theirs = config_maps
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    assert_ne!(theirs.metadata.uid, original.metadata.uid);

    let marker = hub.publish_deletion(stack);
    let agent = start_agent(config, cluster.client.clone()).await;
    let event = hub
        .wait_for_event(marker, EventType::Delete, EventStatus::Success)
        .await;
    assert_eq!(
        event.message.as_deref(),
        Some("deleted 1 object; left 1 object alone that had been replaced by someone else")
    );
    assert!(config_maps.get_opt("ours").await.unwrap().is_none());
    let left = config_maps.get("replaced").await.unwrap();
    assert_eq!(left.metadata.uid, theirs.metadata.uid);
    assert_eq!(left.data.unwrap()["mode"], "theirs");

    agent.stop().await;
    cluster.cleanup().await;
}

fn config_map_data(object: Option<ConfigMap>, key: &str) -> Option<String> {
    object
        .and_then(|cm| cm.data)
        .and_then(|d| d.get(key).cloned())
}

#[tokio::test]
async fn drift_policy_detect_reports_drift_and_never_writes_until_a_new_version() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let config_maps: Api<ConfigMap> = cluster.api();
    let detect = StackPolicy {
        drift_policy: DriftPolicy::Detect,
        ..StackPolicy::default()
    };

    let stack = Uuid::now_v7();
    let documents = |value: &str| {
        vec![
            config_map_yaml("settings", &ns, value),
            config_map_yaml("other", &ns, value),
        ]
    };
    let v1 = hub.publish(stack, &with_policy(&detect, &documents("fast")));
    let agent = start_agent(config_in(&hub, &cluster), cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;

    let drift_messages = |hub: &FakeHub| {
        hub.events_for(v1)
            .into_iter()
            .filter(|e| e.event_type == EventType::Drift)
            .map(|e| (e.status, e.message.unwrap_or_default()))
            .collect::<Vec<_>>()
    };
    let wait_for_drifts = |count: usize| {
        let hub = &hub;
        async move {
            eventually_within(PATIENCE, &format!("{count} drift reports"), || async {
                let found = drift_messages(hub);
                (found.len() >= count).then_some(found)
            })
            .await
        }
    };
    let set_mode = |mode: &'static str| {
        let config_maps = config_maps.clone();
        async move {
            config_maps
                .patch(
                    "settings",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"data": {"mode": mode}})),
                )
                .await
                .unwrap();
        }
    };

    set_mode("slow").await;
    let found = wait_for_drifts(1).await;
    assert_eq!(
        found[0],
        (
            EventStatus::Failure,
            format!("1 object drifted: ConfigMap {ns}/settings (changed, not corrected)")
        )
    );
    eventually_within(PATIENCE, "the drifted-objects metric", || async {
        let metrics = get_text(agent.metrics_addr, "/metrics").await.1;
        metrics
            .lines()
            .any(|l| l == "brokkr_agent_drifted_objects 1")
            .then_some(())
    })
    .await;
    // Nothing is written back, and unchanged drift is not reported again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        config_map_data(config_maps.get_opt("settings").await.unwrap(), "mode").as_deref(),
        Some("slow")
    );
    assert_eq!(drift_messages(&hub).len(), 1);

    // Put back by hand: the episode ends.
    set_mode("fast").await;
    let found = wait_for_drifts(2).await;
    assert_eq!(
        found[1],
        (
            EventStatus::Success,
            "no drift: every object holds what was applied".to_owned()
        )
    );

    // A deleted object stays deleted.
    config_maps
        .delete("other", &DeleteParams::default())
        .await
        .unwrap();
    let found = wait_for_drifts(3).await;
    assert_eq!(
        found[2],
        (
            EventStatus::Failure,
            format!("1 object drifted: ConfigMap {ns}/other (deleted, not corrected)")
        )
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(config_maps.get_opt("other").await.unwrap().is_none());

    // A new version is applied as usual.
    let v2 = hub.publish(stack, &with_policy(&detect, &documents("fast")));
    hub.wait_for_event(v2, EventType::Apply, EventStatus::Success)
        .await;
    assert_eq!(
        config_map_data(config_maps.get_opt("settings").await.unwrap(), "mode").as_deref(),
        Some("fast")
    );
    assert!(config_maps.get_opt("other").await.unwrap().is_some());

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn ignored_differences_are_neither_applied_nor_corrected() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let config_maps: Api<ConfigMap> = cluster.api();
    let mut config = config_in(&hub, &cluster);
    config.resync_interval = Duration::from_secs(1);
    let policy = StackPolicy {
        ignore_differences: vec![IgnoreDifference {
            kind: "ConfigMap".into(),
            name: Some("settings".into()),
            json_pointers: vec!["/data/level".into()],
            ..IgnoreDifference::default()
        }],
        ..StackPolicy::default()
    };
    let manifest = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: {ns}\ndata:\n  mode: fast\n  level: \"1\"\n"
    );
    let stack = Uuid::now_v7();
    let v1 = hub.publish(stack, &with_policy(&policy, &[manifest]));
    let agent = start_agent(config, cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;
    // Left to whoever else manages it (as /spec/replicas is to an HPA).
    let live = config_maps.get_opt("settings").await.unwrap();
    assert_eq!(
        config_map_data(live.clone(), "mode").as_deref(),
        Some("fast")
    );
    assert_eq!(config_map_data(live, "level"), None);

    config_maps
        .patch(
            "settings",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"level": "9"}})),
        )
        .await
        .unwrap();
    // Resyncs and the watch come and go: the ignored field is not drift.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        config_map_data(config_maps.get_opt("settings").await.unwrap(), "level").as_deref(),
        Some("9")
    );
    assert!(
        hub.events_for(v1)
            .iter()
            .all(|e| e.event_type != EventType::Drift)
    );

    // Any other field is still put back.
    config_maps
        .patch(
            "settings",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"mode": "slow"}})),
        )
        .await
        .unwrap();
    hub.wait_for_event(v1, EventType::Drift, EventStatus::Success)
        .await;
    eventually_within(PATIENCE, "the edit to be reverted", || async {
        let live = config_maps.get_opt("settings").await.unwrap();
        (config_map_data(live, "mode").as_deref() == Some("fast")).then_some(())
    })
    .await;
    assert_eq!(
        config_map_data(config_maps.get_opt("settings").await.unwrap(), "level").as_deref(),
        Some("9")
    );

    agent.stop().await;
    cluster.cleanup().await;
}
