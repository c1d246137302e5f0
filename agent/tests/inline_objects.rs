//! Deployment objects the hub carries inside the desired-state answer: the agent applies
//! them without fetching, and fetches whenever an answer does not carry one it can use
//! (hubs that predate inline objects, a checksum other than the desired one).

mod common;

use brokkr_crds::wire::{EventStatus, EventType};
use common::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use uuid::Uuid;

async fn config_map_value(cluster: &kubesim::testing::TestCluster, name: &str) -> Option<String> {
    let api: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    api.get_opt(name)
        .await
        .unwrap()
        .and_then(|cm| cm.data?.get("mode").cloned())
}

#[tokio::test]
async fn objects_carried_inline_are_applied_without_fetching_them() {
    let cluster = cluster().await;
    let hub = FakeHub::start().await;
    hub.inline_objects(Inline::On);
    let ns = cluster.namespace.clone();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let a1 = hub.publish(a, &config_map_yaml("a", &ns, "one"));
    let b1 = hub.publish(b, &config_map_yaml("b", &ns, "one"));
    let agent = start_agent(config(&hub), cluster.client.clone()).await;
    hub.wait_for_event(a1, EventType::Apply, EventStatus::Success)
        .await;
    hub.wait_for_event(b1, EventType::Apply, EventStatus::Success)
        .await;
    let a2 = hub.publish(a, &config_map_yaml("a", &ns, "two"));
    hub.wait_for_event(a2, EventType::Apply, EventStatus::Success)
        .await;

    assert_eq!(
        config_map_value(&cluster, "a").await.as_deref(),
        Some("two")
    );
    assert_eq!(
        config_map_value(&cluster, "b").await.as_deref(),
        Some("one")
    );
    assert!(
        hub.object_fetches().is_empty(),
        "no GET /deployment-objects/{{id}} when the answer carries the object: {:?}",
        hub.object_fetches()
    );
    // Every later answer carries the objects again (this hub does not look at the
    // cursor): the agent holds them, so it neither fetches nor applies again.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(hub.object_fetches().is_empty());
    let applies = hub
        .events()
        .iter()
        .filter(|e| e.event_type == EventType::Apply)
        .count();
    assert_eq!(applies, 3, "{:?}", hub.events());
    agent.stop().await;
    cluster.cleanup().await;
}

#[tokio::test]
async fn without_an_inline_object_or_with_another_checksum_the_agent_fetches() {
    let cluster = cluster().await;
    // A hub that predates inline objects.
    let hub = FakeHub::start().await;
    let ns = cluster.namespace.clone();
    let stack = Uuid::now_v7();
    let v1 = hub.publish(stack, &config_map_yaml("c", &ns, "one"));
    let agent = start_agent(config(&hub), cluster.client.clone()).await;
    hub.wait_for_event(v1, EventType::Apply, EventStatus::Success)
        .await;
    assert_eq!(hub.object_fetches(), [v1]);

    // An inline object whose checksum is not the desired one is not trusted.
    hub.inline_objects(Inline::WrongChecksum);
    let v2 = hub.publish(stack, &config_map_yaml("c", &ns, "two"));
    hub.wait_for_event(v2, EventType::Apply, EventStatus::Success)
        .await;
    assert_eq!(hub.object_fetches(), [v1, v2]);
    assert_eq!(
        config_map_value(&cluster, "c").await.as_deref(),
        Some("two")
    );

    // Inline again: used, no fetch.
    hub.inline_objects(Inline::On);
    let v3 = hub.publish(stack, &config_map_yaml("c", &ns, "three"));
    hub.wait_for_event(v3, EventType::Apply, EventStatus::Success)
        .await;
    assert_eq!(hub.object_fetches(), [v1, v2]);
    assert_eq!(
        config_map_value(&cluster, "c").await.as_deref(),
        Some("three")
    );
    agent.stop().await;
    cluster.cleanup().await;
}
