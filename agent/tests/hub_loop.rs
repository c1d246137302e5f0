//! The agent's conversation with the hub, against the in-test hub over a real socket (the
//! spoke is kubesim, or the real cluster of `BROKKR_E2E_SPOKE_KUBECONFIG`).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use brokkr_agent::hub::Endpoint;
use brokkr_crds::wire::{EventStatus, EventType};
use common::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kubesim::testing::eventually_within;
use uuid::Uuid;

#[tokio::test]
async fn long_polls_from_its_cursor_and_fetches_only_changed_deployment_objects() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    // ConfigMap data holds strings: a bare `1` would be a number, which a real server refuses.
    let a1 = hub.publish(a, &config_map_yaml("a", &ns, "one"));
    let b1 = hub.publish(b, &config_map_yaml("b", &ns, "one"));
    let agent = start_agent(config(&hub), cluster.client.clone()).await;
    hub.wait_for_event(a1, EventType::Apply, EventStatus::Success)
        .await;
    hub.wait_for_event(b1, EventType::Apply, EventStatus::Success)
        .await;

    let before = hub.cursor();
    let a2 = hub.publish(a, &config_map_yaml("a", &ns, "two"));
    hub.wait_for_event(a2, EventType::Apply, EventStatus::Success)
        .await;
    // Idle for a while: the agent waits on the hub rather than asking again and again.
    let idle_from = hub.desired_requests().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_requests = hub.desired_requests().len() - idle_from;
    assert!(
        idle_requests <= 3,
        "{idle_requests} polls in 3s with a 2s wait"
    );

    // Only the deployment objects that changed were fetched, each once.
    assert_eq!(hub.object_fetches(), [a1, b1, a2]);
    let requests = hub.desired_requests();
    assert_eq!(requests[0].since, None, "the first poll has no cursor");
    assert!(
        requests[1..]
            .iter()
            .all(|r| r.since.is_some() && r.wait.as_deref() == Some("2")),
        "{requests:?}"
    );
    // The poll that saw the change was made from the cursor before it.
    assert!(
        requests
            .iter()
            .any(|r| r.since.as_deref() == Some(before.as_str()))
    );
    let last = requests.last().and_then(|r| r.since.clone());
    assert_eq!(last, Some(hub.cursor()));

    let (status, _) = get_text(agent.metrics_addr, "/readyz").await;
    assert_eq!(status, 200);
    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn events_are_retried_with_the_same_ids_until_the_hub_accepts_them() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    hub.refuse_event_posts(2);
    let stack = Uuid::now_v7();
    let v1 = hub.publish(
        stack,
        &config_map_yaml("settings", &cluster.namespace, "fast"),
    );
    let agent = start_agent(config(&hub), cluster.client.clone()).await;
    let event = hub
        .wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;
    assert_eq!(event.id.get_version_num(), 7);

    let posts = hub.event_posts();
    assert!(posts.len() >= 3, "{posts:?}");
    // The refused batches held the same event, with the same id, as the accepted one.
    for refused in &posts[..2] {
        assert!(refused.contains(&event.id), "{posts:?}");
    }
    // Every event was stored once.
    let events = hub.events();
    let ids: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), events.len());
    assert!(agent.metrics.hub_errors(Endpoint::Events) >= 2);

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn heartbeats_carry_the_version_state_and_stack_summaries() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let stack = Uuid::now_v7();
    let v1 = hub.publish(
        stack,
        &config_map_yaml("settings", &cluster.namespace, "fast"),
    );
    let agent = start_agent(config(&hub), cluster.client.clone()).await;
    let heartbeat = eventually_within(PATIENCE, "a heartbeat naming the stack", || async {
        hub.heartbeats()
            .into_iter()
            .find(|h| h.state == "Ready" && h.stacks.iter().any(|s| s.stack_id == stack))
    })
    .await;
    assert_eq!(heartbeat.version, env!("CARGO_PKG_VERSION"));
    let summary = heartbeat
        .stacks
        .iter()
        .find(|s| s.stack_id == stack)
        .unwrap();
    assert_eq!(summary.deployment_object_id, v1);
    assert_eq!(summary.objects, 1);
    assert_eq!(summary.failed, 0);

    let metrics = get_text(agent.metrics_addr, "/metrics").await.1;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("brokkr_agent_last_successful_sync_timestamp_seconds ")
            && !l.ends_with(" 0.0")),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "brokkr_agent_applies_total 1"),
        "{metrics}"
    );
    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn a_down_hub_means_backoff_and_nothing_deleted_then_the_agent_resumes_from_its_cursor() {
    let cluster = cluster().await;
    let mut hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let config_maps: Api<ConfigMap> = cluster.api();
    let stack = Uuid::now_v7();
    let v1 = hub.publish(stack, &config_map_yaml("settings", &ns, "fast"));
    let agent = start_agent(config(&hub), cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;
    let (ready, _) = get_text(agent.metrics_addr, "/readyz").await;
    assert_eq!(ready, 200);

    let cursor = hub.cursor();
    hub.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let errors = agent.metrics.hub_errors(Endpoint::Desired);
    // Backoff from 100ms doubling to 500ms: a handful of tries in 3s, not a busy loop.
    assert!((2..=20).contains(&errors), "{errors} failed polls in 3s");
    assert!(
        config_maps.get_opt("settings").await.unwrap().is_some(),
        "nothing is deleted while the hub is down"
    );

    let requests_before = hub.desired_requests().len();
    let v2 = hub.publish(stack, &config_map_yaml("settings", &ns, "slow"));
    hub.restart().await;
    hub.wait_for_event(v2, EventType::Apply, EventStatus::Success)
        .await;
    let resumed = &hub.desired_requests()[requests_before];
    assert_eq!(resumed.since.as_deref(), Some(cursor.as_str()));
    let data = config_maps.get("settings").await.unwrap().data.unwrap();
    assert_eq!(data["mode"], "slow");

    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn a_refused_key_keeps_everything_applied_and_the_agent_recovers_when_it_is_accepted() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let config_maps: Api<ConfigMap> = cluster.api();
    let stack = Uuid::now_v7();
    let v1 = hub.publish(stack, &config_map_yaml("settings", &ns, "fast"));
    let agent = start_agent(config(&hub), cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;

    // The agent is suspended (its key refused), and its stack untargeted meanwhile.
    hub.set_key("brokkr_other_key");
    eventually_within(PATIENCE, "the hub to refuse a poll", || async {
        (agent.metrics.hub_errors(Endpoint::Desired) >= 1).then_some(())
    })
    .await;
    hub.untarget(stack);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(hub.unauthorized_requests() >= 2);
    assert!(config_maps.get_opt("settings").await.unwrap().is_some());

    // Accepted again: the agent now learns that the stack left and removes it.
    hub.set_key(KEY);
    eventually_within(PATIENCE, "the untargeted stack to be removed", || async {
        config_maps
            .get_opt("settings")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    agent.stop().await;
    cluster.cleanup().await;
}
