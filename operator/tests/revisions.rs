//! A Stack's history in its status: the last revisions, newest first, with who recorded
//! them, so `kubectl get stack -o yaml` answers "what changed, when, by whom"; a pin that
//! rolls every agent back in one step; and progressive rollouts, wave by wave, halted by
//! a failing agent. Agents' reports are written to the store as the agent API would.

use std::time::Duration;

use brokkr_crds::conditions::find_condition;
use brokkr_crds::{AgentTarget, AgentTargetSpec, Stack};
use brokkr_operator::store::EventReport;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kubesim::testing::eventually;
use uuid::Uuid;

mod common;
use common::Hub;

fn config_map(color: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: shop\ndata:\n  color: {color}\n"
    )
}

async fn apply(hub: &Hub, manager: &str, color: &str) {
    hub.api::<Stack>()
        .patch(
            "shop",
            &PatchParams::apply(manager).force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "brokkr.io/v1alpha1",
                "kind": "Stack",
                "metadata": {"name": "shop"},
                "spec": {"generatorRef": {"name": "ci"}, "manifests": config_map(color)},
            })),
        )
        .await
        .expect("apply the Stack");
}

#[tokio::test]
async fn the_status_lists_the_last_revisions_newest_first_with_who_recorded_them() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    apply(&hub, "kubectl", "blue").await;
    hub.stack_when("shop", "the first revision in the history", |s| {
        s.status.as_ref().is_some_and(|st| st.history.len() == 1)
    })
    .await;
    apply(&hub, "helm", "green").await;
    hub.stack_when("shop", "two revisions", |s| {
        s.status.as_ref().is_some_and(|st| st.history.len() == 2)
    })
    .await;
    apply(&hub, "argocd-controller", "red").await;
    let stack = hub
        .stack_when("shop", "three revisions", |s| {
            s.status.as_ref().is_some_and(|st| st.history.len() == 3)
        })
        .await;
    let status = stack.status.unwrap();
    let history = &status.history;
    let recorded_by: Vec<Option<&str>> = history.iter().map(|r| r.recorded_by.as_deref()).collect();
    assert_eq!(
        recorded_by,
        [Some("argocd-controller"), Some("helm"), Some("kubectl")],
        "newest first"
    );
    assert!(history[0].sequence > history[1].sequence && history[1].sequence > history[2].sequence);
    let current = status.deployment_object.unwrap();
    assert_eq!(
        history[0].sequence, current.sequence,
        "the newest is being delivered"
    );
    assert_eq!(history[0].checksum, current.checksum[..12]);
    assert!(history.iter().all(|r| r.generator.as_deref() == Some("ci")));
    assert!(history.iter().all(|r| r.recorded_at.is_some()));
    hub.stop().await;
}

async fn apply_spec(hub: &Hub, spec: serde_json::Value) {
    hub.api::<Stack>()
        .patch(
            "shop",
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "brokkr.io/v1alpha1",
                "kind": "Stack",
                "metadata": {"name": "shop"},
                "spec": spec,
            })),
        )
        .await
        .expect("apply the Stack");
}

fn rollout() -> serde_json::Value {
    serde_json::json!({
        "waves": [
            {"name": "canary", "agentSelector": {"matchLabels": {"ring": "canary"}}},
            {"name": "eu", "agentSelector": {"matchLabels": {"region": "eu"}}},
        ],
        "maxUnavailable": 1,
        "healthTimeout": "1m",
    })
}

/// Three agents, canary first, all targeted at `shop` by one selector; their row ids in
/// the order canary, eu-1, eu-2.
async fn fleet(hub: &Hub) -> Vec<Uuid> {
    let agents = [
        hub.create_agent("canary", &[("ring", "canary"), ("region", "eu")])
            .await,
        hub.create_agent("eu-1", &[("region", "eu")]).await,
        hub.create_agent("eu-2", &[("region", "eu")]).await,
    ];
    hub.api::<AgentTarget>()
        .create(
            &PostParams::default(),
            &AgentTarget::new(
                "shop-fleet",
                AgentTargetSpec {
                    stack_ref: brokkr_crds::StackRef {
                        name: "shop".into(),
                    },
                    agents: Vec::new(),
                    agent_selector: Some(
                        serde_json::from_value(serde_json::json!({
                            "matchLabels": {"brokkr.io/test": hub.agent_label}
                        }))
                        .unwrap(),
                    ),
                },
            ),
        )
        .await
        .unwrap();
    let stack = eventually("stack row", || hub.live_stack_row("shop")).await;
    let targeted = eventually("three agents targeted", || async {
        let ids = hub.store.stack_target_agent_ids(stack.id).await.unwrap();
        (ids.len() == 3).then_some(ids)
    })
    .await;
    let mut by_name = std::collections::BTreeMap::new();
    for id in targeted {
        let row = hub.store.find_agent(id).await.unwrap().unwrap();
        by_name.insert(row.name, id);
    }
    agents
        .iter()
        .map(|agent| by_name[&agent.name_any()])
        .collect()
}

/// The sequence each agent is served of `shop`, as the agent API answers it.
async fn served(hub: &Hub, agents: &[Uuid]) -> Vec<Option<i64>> {
    let mut sequences = Vec::new();
    for agent in agents {
        let desired = hub.store.desired_for_agent(*agent, 0).await.unwrap();
        sequences.push(desired.entries.first().map(|e| e.sequence_id));
    }
    sequences
}

async fn served_when(hub: &Hub, agents: &[Uuid], what: &str, expected: Vec<Option<i64>>) {
    eventually(what, || async {
        (served(hub, agents).await == expected).then_some(())
    })
    .await;
}

async fn reports(hub: &Hub, agent: Uuid, object: Uuid, outcome: &str, health: &str) {
    let event = |event_type: &str, status: &str, message: &str| EventReport {
        id: Uuid::now_v7(),
        deployment_object_id: object,
        event_type: event_type.into(),
        status: status.into(),
        message: Some(message.into()),
    };
    let mut events = vec![event(
        "Apply",
        outcome,
        "ConfigMap shop/settings: namespaces \"nope\" not found",
    )];
    if outcome == "Success" {
        events.push(event("Health", "Success", health));
    }
    hub.store.record_agent_events(agent, &events).await.unwrap();
}

async fn revision(hub: &Hub, sequence_after: i64) -> (Uuid, i64) {
    let stack = eventually("stack row", || hub.live_stack_row("shop")).await;
    let object = eventually("a new revision", || async {
        hub.objects_of(stack.id)
            .await
            .into_iter()
            .rfind(|o| o.sequence_id > sequence_after && !o.is_deletion_marker)
    })
    .await;
    (object.id, object.sequence_id)
}

fn condition_of(stack: &Stack, type_: &str) -> Option<(String, String, String)> {
    let status = stack.status.as_ref()?;
    find_condition(&status.conditions, type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn events_with_reason(hub: &Hub, reason: &str) -> Vec<Event> {
    hub.api::<Event>()
        .list(&ListParams::default())
        .await
        .map(|list| {
            list.items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_rollout_goes_wave_by_wave_halts_on_a_failing_agent_and_a_pin_rolls_everyone_back() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    apply_spec(
        &hub,
        serde_json::json!({"generatorRef": {"name": "ci"}, "manifests": config_map("v1"), "rollout": rollout()}),
    )
    .await;
    let agents = fleet(&hub).await;
    let [canary, eu1, eu2] = [agents[0], agents[1], agents[2]];
    let (first, first_sequence) = revision(&hub, 0).await;
    let one = Some(first_sequence);

    // The first revision: the canary alone, then one eu agent at a time.
    served_when(&hub, &agents, "the canary first", vec![one, None, None]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        served(&hub, &agents).await,
        [one, None, None],
        "eu waits for the canary"
    );
    reports(&hub, canary, first, "Success", "healthy").await;
    served_when(&hub, &agents, "then eu-1", vec![one, one, None]).await;
    reports(&hub, eu1, first, "Success", "healthy").await;
    served_when(&hub, &agents, "then eu-2", vec![one, one, one]).await;
    reports(&hub, eu2, first, "Success", "healthy").await;
    let stack = hub
        .stack_when("shop", "the rollout complete", |s| {
            condition_of(s, "RolloutHalted").is_some_and(|c| c.1 == "RolloutComplete")
        })
        .await;
    let rollout_status = stack.status.unwrap().rollout.unwrap();
    assert_eq!(
        rollout_status.summary.as_deref(),
        Some("canary 1/1 → eu 2/2")
    );
    assert_eq!((rollout_status.updated, rollout_status.pending), (3, 0));

    // A revision that fails on the canary halts the rollout; eu keeps the first.
    apply_spec(
        &hub,
        serde_json::json!({"generatorRef": {"name": "ci"}, "manifests": config_map("v2"), "rollout": rollout()}),
    )
    .await;
    let (second, second_sequence) = revision(&hub, first_sequence).await;
    served_when(
        &hub,
        &agents,
        "the canary gets the second",
        vec![Some(second_sequence), one, one],
    )
    .await;
    reports(&hub, canary, second, "Failure", "").await;
    let stack = hub
        .stack_when("shop", "the rollout halted", |s| {
            condition_of(s, "RolloutHalted").is_some_and(|c| c.0 == "True")
        })
        .await;
    let (_, reason, message) = condition_of(&stack, "RolloutHalted").unwrap();
    assert_eq!(reason, "ApplyFailed");
    assert!(
        message.contains(&format!("{}-canary", hub.namespace())),
        "{message}"
    );
    assert!(message.contains("not found"), "{message}");
    let status = stack.status.unwrap();
    assert!(
        status
            .rollout
            .unwrap()
            .summary
            .unwrap()
            .ends_with("(halted)")
    );
    let canary_status = status
        .agents
        .iter()
        .find(|a| a.name.ends_with("-canary"))
        .unwrap();
    assert_eq!(canary_status.state, brokkr_crds::AgentDeployState::Failed);
    eventually("a Warning Event RolloutHalted", || async {
        let events = events_with_reason(&hub, "RolloutHalted").await;
        (events.len() == 1 && events[0].type_.as_deref() == Some("Warning")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        served(&hub, &agents).await,
        [Some(second_sequence), one, one],
        "no further agent moves"
    );

    // A fixed revision resumes the rollout from the canary.
    apply_spec(
        &hub,
        serde_json::json!({"generatorRef": {"name": "ci"}, "manifests": config_map("v3"), "rollout": rollout()}),
    )
    .await;
    let (third, third_sequence) = revision(&hub, second_sequence).await;
    let three = Some(third_sequence);
    served_when(
        &hub,
        &agents,
        "the canary gets the fix",
        vec![three, one, one],
    )
    .await;
    reports(&hub, canary, third, "Success", "healthy").await;
    served_when(&hub, &agents, "eu-1 follows", vec![three, three, one]).await;
    reports(&hub, eu1, third, "Success", "healthy").await;
    served_when(&hub, &agents, "eu-2 follows", vec![three, three, three]).await;
    hub.stack_when("shop", "the halt cleared", |s| {
        condition_of(s, "RolloutHalted").is_some_and(|c| c.0 == "False")
    })
    .await;

    // A pin rolls every agent back at once; the history's third revision stays recorded.
    apply_spec(
        &hub,
        serde_json::json!({"generatorRef": {"name": "ci"}, "manifests": config_map("v3"),
                           "rollout": rollout(), "pinnedRevision": first_sequence}),
    )
    .await;
    served_when(
        &hub,
        &agents,
        "everyone back on the first",
        vec![one, one, one],
    )
    .await;
    let stack = hub
        .stack_when("shop", "Pinned", |s| {
            condition_of(s, "Pinned").is_some_and(|c| c.0 == "True")
        })
        .await;
    let status = stack.status.as_ref().unwrap();
    assert_eq!(
        status.deployment_object.as_ref().unwrap().sequence,
        first_sequence
    );
    assert_eq!(status.history[0].sequence, third_sequence);
    assert!(status.rollout.is_none(), "a pinned stack does not roll out");
    eventually("a Normal Event Pinned", || async {
        let events = events_with_reason(&hub, "Pinned").await;
        (events.len() == 1 && events[0].type_.as_deref() == Some("Normal")).then_some(())
    })
    .await;

    // An unknown revision is refused and changes nothing.
    apply_spec(
        &hub,
        serde_json::json!({"generatorRef": {"name": "ci"}, "manifests": config_map("v4"),
                           "rollout": rollout(), "pinnedRevision": third_sequence + 1000}),
    )
    .await;
    let stack = hub
        .stack_when("shop", "UnknownRevision", |s| {
            condition_of(s, "Accepted").is_some_and(|c| c.1 == "UnknownRevision")
        })
        .await;
    let (accepted, _, message) = condition_of(&stack, "Accepted").unwrap();
    assert_eq!(accepted, "False");
    assert!(
        message.ends_with(&format!(
            "still serving deployment object sequence {first_sequence}"
        )),
        "{message}"
    );
    let (pinned, _, _) = condition_of(&stack, "Pinned").unwrap();
    assert_eq!(pinned, "True", "the pin in force stays");
    assert!(stack.status.as_ref().unwrap().rollout.is_none());
    assert_eq!(served(&hub, &agents).await, [one, one, one]);
    let stack_row = hub.live_stack_row("shop").await.unwrap();
    assert_eq!(
        hub.objects_of(stack_row.id).await.len(),
        3,
        "the content of a spec with an unknown pin is not recorded"
    );

    // Unpinning rolls the newest out again from the canary.
    apply_spec(
        &hub,
        serde_json::json!({"generatorRef": {"name": "ci"}, "manifests": config_map("v3"), "rollout": rollout()}),
    )
    .await;
    served_when(
        &hub,
        &agents,
        "the canary first again",
        vec![three, one, one],
    )
    .await;
    // Its reports on that revision from before the pin do not count: eu waits for new ones.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(served(&hub, &agents).await, [three, one, one]);
    reports(&hub, canary, third, "Success", "healthy").await;
    served_when(
        &hub,
        &agents,
        "eu-1 after the canary's new report",
        vec![three, three, one],
    )
    .await;
    let stack = hub
        .stack_when("shop", "Unpinned", |s| {
            condition_of(s, "Pinned").is_some_and(|c| c.1 == "Unpinned")
        })
        .await;
    assert_eq!(condition_of(&stack, "Pinned").unwrap().0, "False");
    hub.stop().await;
}

#[tokio::test]
async fn without_a_rollout_a_pin_and_an_unpin_reach_every_agent_at_once() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    apply(&hub, "kubectl", "blue").await;
    let agents = fleet(&hub).await;
    let (_, first) = revision(&hub, 0).await;
    apply(&hub, "kubectl", "green").await;
    let (_, second) = revision(&hub, first).await;
    served_when(
        &hub,
        &agents,
        "the second everywhere",
        vec![Some(second); 3],
    )
    .await;
    apply_spec(
        &hub,
        serde_json::json!({"generatorRef": {"name": "ci"}, "manifests": config_map("green"),
                           "pinnedRevision": first}),
    )
    .await;
    served_when(&hub, &agents, "the first everywhere", vec![Some(first); 3]).await;
    apply(&hub, "kubectl", "green").await;
    served_when(&hub, &agents, "the second again", vec![Some(second); 3]).await;
    eventually("Pinned and Unpinned Events", || async {
        let pinned = events_with_reason(&hub, "Pinned").await.len();
        let unpinned = events_with_reason(&hub, "Unpinned").await.len();
        (pinned == 1 && unpinned == 1).then_some(())
    })
    .await;
    hub.stop().await;
}

#[tokio::test]
async fn an_agent_not_healthy_in_time_halts_the_rollout_and_a_pause_and_resume_retries_it() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    let mut rollout = rollout();
    rollout["healthTimeout"] = serde_json::json!("3s");
    let spec = |paused: bool| {
        let mut rollout = rollout.clone();
        rollout["paused"] = serde_json::json!(paused);
        serde_json::json!({"generatorRef": {"name": "ci"}, "manifests": config_map("v1"), "rollout": rollout})
    };
    apply_spec(&hub, spec(false)).await;
    let agents = fleet(&hub).await;
    let (first, first_sequence) = revision(&hub, 0).await;
    let one = Some(first_sequence);
    served_when(&hub, &agents, "the canary first", vec![one, None, None]).await;

    // The canary never reports: past healthTimeout the rollout halts.
    let stack = hub
        .stack_when("shop", "halted by the timeout", |s| {
            condition_of(s, "RolloutHalted").is_some_and(|c| c.0 == "True")
        })
        .await;
    let (_, reason, message) = condition_of(&stack, "RolloutHalted").unwrap();
    assert_eq!(reason, "HealthTimeout");
    assert!(message.contains("within 3s"), "{message}");

    // A pause and a resume give it a new health timeout: no longer halted, for a while.
    apply_spec(&hub, spec(true)).await;
    hub.stack_when("shop", "paused", |s| {
        s.status
            .as_ref()
            .and_then(|status| status.rollout.as_ref())
            .is_some_and(|rollout| rollout.paused)
    })
    .await;
    apply_spec(&hub, spec(false)).await;
    hub.stack_when("shop", "resumed", |s| {
        condition_of(s, "RolloutHalted").is_some_and(|c| c.0 == "False" && c.1 == "RollingOut")
    })
    .await;
    // Within its new timeout the canary reports healthy: the rollout goes on.
    reports(&hub, agents[0], first, "Success", "healthy").await;
    served_when(&hub, &agents, "eu-1 follows", vec![one, one, None]).await;
    hub.stop().await;
}
