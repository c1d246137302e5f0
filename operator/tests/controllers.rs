//! The controllers against an API server (kubesim, or the cluster of $KUBECONFIG) and a
//! real PostgreSQL: every kind's lifecycle, bad input, and deletion through the finalizer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use brokkr_crds::{Agent, AgentTarget, AgentTargetSpec, Generator, Stack, StackSpec};
use brokkr_operator::keys::hash_key;
use brokkr_operator::metrics::Metrics;
use brokkr_operator::store::EventReport;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use kubesim::testing::{TestCluster, eventually, eventually_within};
use sea_orm::EntityTrait;
use tokio::sync::oneshot;

mod common;
use common::Hub;

fn condition<'a>(
    conditions: &'a [brokkr_crds::Condition],
    type_: &str,
) -> Option<&'a brokkr_crds::Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn stack_condition(stack: &Stack, type_: &str) -> Option<(String, String, String)> {
    stack
        .status
        .as_ref()
        .and_then(|s| condition(&s.conditions, type_))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

const CONFIG_MAP: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: shop\ndata:\n  color: blue\n";

#[tokio::test]
async fn generator_gets_a_row_a_key_secret_and_status_and_is_cleaned_up() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    let api = hub.api::<Generator>();
    let generator = eventually("generator status", || async {
        api.get("ci")
            .await
            .ok()
            .filter(|g| g.status.as_ref().is_some_and(|s| s.generator_id.is_some()))
    })
    .await;
    assert!(
        generator
            .finalizers()
            .contains(&brokkr_crds::FINALIZER.to_owned())
    );
    let status = generator.status.unwrap();
    assert!(status.active);
    assert_eq!(
        status.api_key_secret.as_deref(),
        Some("brokkr-generator-ci")
    );
    assert_eq!(
        condition(&status.conditions, "Ready").unwrap().status,
        "True"
    );

    let secret = hub
        .api::<Secret>()
        .get("brokkr-generator-ci")
        .await
        .unwrap();
    let key = String::from_utf8(secret.data.unwrap()["pak"].0.clone()).unwrap();
    assert!(key.starts_with("brokkr_"));
    let id = uuid::Uuid::parse_str(status.generator_id.as_deref().unwrap()).unwrap();
    let row = brokkr_operator::entity::generators::Entity::find_by_id(id)
        .one(hub.db.conn())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.name, format!("{}/ci", hub.namespace()));
    let stored = hub
        .store
        .find_api_key(brokkr_operator::keys::key_prefix(&key).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.generator_id, Some(row.id));
    assert_eq!(stored.key_hash, hash_key(&key));

    api.patch(
        "ci",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"suspend": true}})),
    )
    .await
    .unwrap();
    eventually("suspended generator is inactive", || async {
        api.get("ci")
            .await
            .ok()
            .filter(|g| g.status.as_ref().is_some_and(|s| !s.active))
    })
    .await;

    api.delete("ci", &DeleteParams::default()).await.unwrap();
    eventually("generator deleted", || async {
        api.get_opt("ci")
            .await
            .ok()
            .and_then(|g| g.is_none().then_some(()))
    })
    .await;
    let row = brokkr_operator::entity::generators::Entity::find_by_id(id)
        .one(hub.db.conn())
        .await
        .unwrap()
        .unwrap();
    assert!(row.deleted_at.is_some(), "the row is retired, not erased");
    hub.stop().await;
}

#[tokio::test]
async fn stack_content_is_recorded_once_per_change_and_described_in_status() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    let stack = hub
        .stack_when("shop", "Stack accepted", |s| {
            stack_condition(s, "Accepted").is_some_and(|c| c.0 == "True")
                && s.status
                    .as_ref()
                    .is_some_and(|st| st.deployment_object.is_some())
        })
        .await;
    let status = stack.status.clone().unwrap();
    let first = status.deployment_object.clone().unwrap();
    assert_eq!(status.ready.as_deref(), Some("0/0"));
    assert_eq!(stack_condition(&stack, "Ready").unwrap().1, "NoTargets");
    assert!(
        stack
            .owner_references()
            .iter()
            .any(|o| o.kind == "Generator" && o.name == "ci"),
        "owned by its Generator"
    );

    let row = hub.live_stack_row("shop").await.expect("stack row");
    assert_eq!(
        status.stack_id.as_deref(),
        Some(row.id.to_string().as_str())
    );
    let objects = hub.objects_of(row.id).await;
    assert_eq!(objects.len(), 1);
    assert!(objects[0].yaml_content.contains("color: blue"));
    assert_eq!(objects[0].yaml_checksum, first.checksum);

    // The same objects spelled differently are the same content: no new version.
    let api = hub.api::<Stack>();
    let respelled = "metadata: {namespace: shop, name: settings}\nkind: ConfigMap\napiVersion: v1\ndata: {color: blue}\n";
    api.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"manifests": respelled}})),
    )
    .await
    .unwrap();
    hub.stack_when("shop", "generation observed", |s| {
        s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation
    })
    .await;
    assert_eq!(hub.objects_of(row.id).await.len(), 1);

    // A real change is a new deployment object with a higher sequence.
    api.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"spec": {"manifests": CONFIG_MAP.replace("blue", "green")}}),
        ),
    )
    .await
    .unwrap();
    let stack = hub
        .stack_when("shop", "new version recorded", |s| {
            s.status
                .as_ref()
                .and_then(|st| st.deployment_object.as_ref())
                .is_some_and(|d| d.sequence > first.sequence)
        })
        .await;
    let objects = hub.objects_of(row.id).await;
    assert_eq!(objects.len(), 2);
    assert_eq!(
        stack.status.unwrap().deployment_object.unwrap().id,
        objects[1].id.to_string()
    );
    hub.stop().await;
}

#[tokio::test]
async fn invalid_manifests_are_refused_with_a_condition_and_an_event_and_the_last_good_content_stays()
 {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    let good = hub
        .stack_when("shop", "accepted", |s| {
            s.status
                .as_ref()
                .is_some_and(|st| st.deployment_object.is_some())
        })
        .await
        .status
        .unwrap()
        .deployment_object
        .unwrap();

    for (broken, expected) in [
        ("apiVersion: v1\nkind: [unclosed\n", "invalid YAML"),
        (
            "apiVersion: v1\nmetadata:\n  name: nameless-kind\n",
            "missing kind",
        ),
        (
            &*format!("{CONFIG_MAP}---\n{CONFIG_MAP}"),
            "appears more than once",
        ),
    ] {
        hub.api::<Stack>()
            .patch(
                "shop",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"manifests": broken}})),
            )
            .await
            .unwrap();
        let stack = hub
            .stack_when("shop", expected, |s| {
                stack_condition(s, "Accepted")
                    .is_some_and(|c| c.0 == "False" && c.2.contains(expected))
            })
            .await;
        let (_, reason, message) = stack_condition(&stack, "Accepted").unwrap();
        assert_eq!(reason, "InvalidManifest");
        assert!(message.contains(&format!(
            "still serving deployment object sequence {}",
            good.sequence
        )));
        assert_eq!(
            stack.status.unwrap().deployment_object.unwrap(),
            good,
            "the last good deployment object stays current"
        );
    }
    let row = hub.live_stack_row("shop").await.unwrap();
    assert_eq!(
        hub.objects_of(row.id).await.len(),
        1,
        "nothing invalid was recorded"
    );
    let warnings = eventually("a Warning event", || async {
        let events = hub.warning_events_for("shop").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert!(
        warnings
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidManifest"))
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_stack_waits_for_its_generator_and_proceeds_when_it_appears() {
    let hub = Hub::start().await;
    hub.create_stack("shop", "late", CONFIG_MAP).await;
    let stack = hub
        .stack_when("shop", "GeneratorNotFound", |s| {
            stack_condition(s, "Accepted").is_some_and(|c| c.1 == "GeneratorNotFound")
        })
        .await;
    assert!(
        stack_condition(&stack, "Accepted")
            .unwrap()
            .2
            .contains("\"late\"")
    );
    assert!(hub.live_stack_row("shop").await.is_none());

    hub.create_generator("late").await;
    hub.stack_when("shop", "accepted once the generator exists", |s| {
        stack_condition(s, "Accepted").is_some_and(|c| c.0 == "True")
    })
    .await;
    assert!(hub.live_stack_row("shop").await.is_some());
    hub.stop().await;
}

#[tokio::test]
async fn labels_and_annotations_past_64_characters_are_refused_never_truncated() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    let mut stack = Stack::new(
        "shop",
        StackSpec {
            generator_ref: brokkr_crds::GeneratorRef { name: "ci".into() },
            manifests: Some(CONFIG_MAP.into()),
            ..Default::default()
        },
    );
    stack.metadata.labels = Some(BTreeMap::from([("team".into(), "x".repeat(60))]));
    hub.api::<Stack>()
        .create(&PostParams::default(), &stack)
        .await
        .unwrap();
    let refused = hub
        .stack_when("shop", "InvalidSpec", |s| {
            stack_condition(s, "Accepted").is_some_and(|c| c.1 == "InvalidSpec")
        })
        .await;
    assert!(
        stack_condition(&refused, "Accepted")
            .unwrap()
            .2
            .contains("65 characters")
    );
    let labels = brokkr_operator::entity::stack_labels::Entity::find()
        .all(hub.db.conn())
        .await
        .unwrap();
    assert!(labels.iter().all(|l| l.label.chars().count() <= 64));
    assert!(
        !labels.iter().any(|l| l.label.starts_with("team=")),
        "nothing truncated was stored"
    );
    hub.stop().await;
}

#[tokio::test]
async fn agents_get_a_row_labels_and_a_key_secret() {
    let hub = Hub::start().await;
    let agent = hub.create_agent("edge", &[("env", "prod")]).await;
    let name = agent.name_any();
    let api: Api<Agent> = Api::all(hub.cluster.client.clone());
    let agent = eventually("agent registered", || async {
        api.get(&name)
            .await
            .ok()
            .filter(|a| a.status.as_ref().is_some_and(|s| s.agent_id.is_some()))
    })
    .await;
    let status = agent.status.unwrap();
    assert_eq!(status.phase, Some(brokkr_crds::AgentPhase::Pending));
    let secret_ref = status.key_secret.unwrap();
    assert_eq!(secret_ref.name, format!("brokkr-agent-{name}"));
    assert_eq!(secret_ref.namespace, hub.namespace());
    let secret = hub.api::<Secret>().get(&secret_ref.name).await.unwrap();
    let key = String::from_utf8(secret.data.unwrap()["pak"].0.clone()).unwrap();
    let prefix = brokkr_operator::keys::key_prefix(&key).unwrap();
    let row = hub
        .store
        .find_agent_by_key_prefix(prefix)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.name, name);
    assert_eq!(row.cluster_name, "cluster-edge");
    let stored = hub.store.find_api_key(prefix).await.unwrap().unwrap();
    assert!(brokkr_operator::keys::key_matches(&key, &stored.key_hash));
    let labels: BTreeSet<String> = brokkr_operator::entity::agent_labels::Entity::find()
        .all(hub.db.conn())
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.label)
        .collect();
    assert!(labels.contains("env=prod"));

    api.delete(&name, &DeleteParams::default()).await.unwrap();
    eventually("agent deleted", || async {
        api.get_opt(&name)
            .await
            .ok()
            .and_then(|a| a.is_none().then_some(()))
    })
    .await;
    assert!(
        hub.store
            .find_agent_by_key_prefix(prefix)
            .await
            .unwrap()
            .is_none()
    );
    hub.stop().await;
}

#[tokio::test]
async fn agent_targets_follow_names_selectors_and_label_changes() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    let prod = hub.create_agent("prod", &[("env", "prod")]).await;
    let dev = hub.create_agent("dev", &[("env", "dev")]).await;
    let stack_row = eventually("stack row", || hub.live_stack_row("shop")).await;
    create_target(
        &hub,
        "prod-only",
        "shop",
        &[],
        Some("matchLabels: {env: prod}"),
    )
    .await;

    let agent_id = |agent: &Agent| {
        let store = hub.store.clone();
        let uid = uuid::Uuid::parse_str(&agent.uid().unwrap()).unwrap();
        async move {
            store
                .find_live_agent_by_resource(uid)
                .await
                .unwrap()
                .map(|a| a.id)
        }
    };
    let prod_id = eventually("prod agent row", || agent_id(&prod)).await;
    let dev_id = eventually("dev agent row", || agent_id(&dev)).await;
    eventually("prod targeted", || async {
        let targets = hub
            .store
            .stack_target_agent_ids(stack_row.id)
            .await
            .unwrap();
        (targets == BTreeSet::from([prod_id])).then_some(())
    })
    .await;
    let api = hub.api::<AgentTarget>();
    let status = eventually("target status", || async {
        api.get("prod-only")
            .await
            .ok()
            .and_then(|t| t.status)
            .filter(|s| s.matched_agents == 1)
    })
    .await;
    assert_eq!(status.agent_names, vec![prod.name_any()]);
    assert_eq!(
        condition(&status.conditions, "Ready").unwrap().reason,
        "Matched"
    );

    // Relabelling an Agent re-expands the selector.
    Api::<Agent>::all(hub.cluster.client.clone())
        .patch(
            &dev.name_any(),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"env": "prod"}}})),
        )
        .await
        .unwrap();
    eventually("relabelled agent targeted", || async {
        let targets = hub
            .store
            .stack_target_agent_ids(stack_row.id)
            .await
            .unwrap();
        (targets == BTreeSet::from([prod_id, dev_id])).then_some(())
    })
    .await;

    // Deleting the AgentTarget removes its targets.
    api.delete("prod-only", &DeleteParams::default())
        .await
        .unwrap();
    eventually("targets removed", || async {
        let targets = hub
            .store
            .stack_target_agent_ids(stack_row.id)
            .await
            .unwrap();
        targets.is_empty().then_some(())
    })
    .await;
    hub.stop().await;
}

/// A restarted hub starts with empty caches; an AgentTarget reconciled before the
/// Agents are listed used to write an empty target set, which makes every agent
/// delete the stack's objects (Namespaces and PVCs included) and apply them again.
#[tokio::test]
async fn restarting_the_controllers_never_shrinks_or_rewrites_a_target_set() {
    use brokkr_operator::entity::agent_targets;
    use sea_orm::{ColumnTrait, QueryFilter};

    const AGENTS: usize = 30;
    let mut hub = Hub::start().await;
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    for n in 0..AGENTS {
        hub.create_agent(&format!("edge-{n}"), &[("fleet", "edge")])
            .await;
    }
    let stack_row = eventually("stack row", || hub.live_stack_row("shop")).await;
    create_target(
        &hub,
        "edges",
        "shop",
        &[],
        Some("matchLabels: {fleet: edge}"),
    )
    .await;
    let conn = hub.db.conn().clone();
    let rows = move || {
        let db = conn.clone();
        async move {
            agent_targets::Entity::find()
                .filter(agent_targets::Column::StackId.eq(stack_row.id))
                .all(&db)
                .await
                .unwrap()
                .into_iter()
                .map(|row| row.id)
                .collect::<BTreeSet<_>>()
        }
    };
    let before = eventually_within(Duration::from_secs(60), "every agent targeted", || async {
        let rows = rows().await;
        (rows.len() == AGENTS).then_some(rows)
    })
    .await;

    // Watch the set from the database while the controllers restart.
    let (done, mut finished) = oneshot::channel::<()>();
    let db = hub.db.conn().clone();
    let watcher = tokio::spawn(async move {
        let mut smallest = usize::MAX;
        loop {
            let count = agent_targets::Entity::find()
                .filter(agent_targets::Column::StackId.eq(stack_row.id))
                .all(&db)
                .await
                .unwrap()
                .len();
            smallest = smallest.min(count);
            if finished.try_recv().is_ok() {
                return smallest;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // Agents are listed slowly (a big fleet), so AgentTargets are reconciled first.
    let slow = hub
        .client_with_slow_lists("agents", Duration::from_millis(1500))
        .await;
    for _ in 0..3 {
        hub.restart_controllers_with(slow.clone()).await;
        // Long enough for the AgentTarget to be reconciled after the restart.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let _ = done.send(());
    let smallest = watcher.await.unwrap();
    assert_eq!(smallest, AGENTS, "the target set shrank during a restart");
    assert_eq!(
        rows().await,
        before,
        "target rows were deleted and re-inserted"
    );

    // The restarted controllers do act: an Agent leaving the selector leaves the set.
    let leaving = format!("{}-edge-0", hub.namespace());
    Api::<Agent>::all(hub.cluster.client.clone())
        .patch(
            &leaving,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"fleet": "other"}}})),
        )
        .await
        .unwrap();
    eventually_within(
        Duration::from_secs(30),
        "the relabelled agent untargeted",
        || async { (rows().await.len() == AGENTS - 1).then_some(()) },
    )
    .await;
    hub.stop().await;
}

#[tokio::test]
async fn agent_targets_naming_missing_stacks_or_agents_say_so() {
    let hub = Hub::start().await;
    let api = hub.api::<AgentTarget>();
    api.create(
        &PostParams::default(),
        &AgentTarget::new(
            "orphan",
            AgentTargetSpec {
                stack_ref: brokkr_crds::StackRef {
                    name: "nowhere".into(),
                },
                agents: vec!["ghost".into()],
                ..Default::default()
            },
        ),
    )
    .await
    .unwrap();
    let status = eventually("StackNotFound", || async {
        api.get("orphan")
            .await
            .ok()
            .and_then(|t| t.status)
            .filter(|s| {
                condition(&s.conditions, "Ready").is_some_and(|c| c.reason == "StackNotFound")
            })
    })
    .await;
    assert!(
        condition(&status.conditions, "Ready")
            .unwrap()
            .message
            .contains("\"nowhere\"")
    );

    hub.create_generator("ci").await;
    hub.create_stack("nowhere", "ci", CONFIG_MAP).await;
    let status = eventually("AgentNotFound once the stack exists", || async {
        api.get("orphan")
            .await
            .ok()
            .and_then(|t| t.status)
            .filter(|s| {
                condition(&s.conditions, "Ready").is_some_and(|c| c.reason == "AgentNotFound")
            })
    })
    .await;
    assert!(
        condition(&status.conditions, "Ready")
            .unwrap()
            .message
            .contains("ghost")
    );
    hub.stop().await;
}

async fn target_status_when(
    hub: &Hub,
    name: &str,
    what: &str,
    check: impl Fn(&brokkr_crds::AgentTargetStatus) -> bool,
) -> brokkr_crds::AgentTargetStatus {
    let api = hub.api::<AgentTarget>();
    eventually(what, || {
        let api = api.clone();
        let check = &check;
        async move {
            api.get_opt(name)
                .await
                .ok()
                .flatten()
                .and_then(|t| t.status)
                .filter(|s| check(s))
        }
    })
    .await
}

fn ready_reason(status: &brokkr_crds::AgentTargetStatus) -> Option<&str> {
    condition(&status.conditions, "Ready").map(|c| c.reason.as_str())
}

async fn targeted_ids(hub: &Hub, stack_id: uuid::Uuid) -> BTreeSet<uuid::Uuid> {
    hub.store.stack_target_agent_ids(stack_id).await.unwrap()
}

async fn agent_row_id(hub: &Hub, agent: &Agent) -> uuid::Uuid {
    let uid = uuid::Uuid::parse_str(&agent.uid().unwrap()).unwrap();
    eventually("agent row", || async {
        hub.store
            .find_live_agent_by_resource(uid)
            .await
            .unwrap()
            .map(|a| a.id)
    })
    .await
}

fn targetable_from(yaml: &str) -> Option<brokkr_crds::TargetableFrom> {
    Some(serde_yaml::from_str(yaml).unwrap())
}

/// The `NotPermitted` Warning Events about AgentTarget `name`, with how often each was
/// reported (an Event repeated by the recorder counts in its series).
async fn not_permitted_events(hub: &Hub, name: &str) -> Vec<(String, i32)> {
    hub.warning_events_for(name)
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("NotPermitted"))
        .map(|e| {
            let count = e.series.as_ref().map_or(1, |s| s.count);
            (e.note.unwrap_or_default(), count)
        })
        .collect()
}

/// The `TargetingRefused` rows of the audit log.
async fn refusals_recorded(hub: &Hub) -> Vec<brokkr_operator::store::audit::AuditRecord> {
    let query = brokkr_operator::store::audit::AuditQuery {
        kind: Some("AgentTarget".into()),
        ..Default::default()
    };
    let rows = hub.store.audit_entries(&query).await.unwrap();
    rows.into_iter()
        .filter(|row| row.action == brokkr_operator::store::audit::actions::TARGETING_REFUSED)
        .collect()
}

/// An AgentTarget outside the operator's namespace delivers only to Agents that list its
/// namespace: the others are named as refused, with a condition and one Warning Event,
/// and get no target rows until their owner grants the namespace.
#[tokio::test]
async fn agent_targets_from_a_tenant_namespace_deliver_only_to_agents_that_admit_it() {
    // No periodic resync: what happens follows from the watches alone.
    let hub = Hub::start_for_tenant(Duration::from_secs(600)).await;
    let tenant = hub.namespace().to_owned();
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    let stack_row = eventually("stack row", || hub.live_stack_row("shop")).await;
    // Without spec.targetableFrom: only the operator's namespace may target it.
    let closed = hub.create_agent("closed", &[("fleet", "edge")]).await;
    let open = hub
        .create_agent_targetable_from(
            "open",
            &[("fleet", "edge")],
            targetable_from(&format!("namespaces: [{tenant}]")),
        )
        .await;
    let closed_id = agent_row_id(&hub, &closed).await;
    let open_id = agent_row_id(&hub, &open).await;
    create_target(
        &hub,
        "edges",
        "shop",
        &[],
        Some("matchLabels: {fleet: edge}"),
    )
    .await;

    let status = target_status_when(&hub, "edges", "NotPermitted", |s| {
        ready_reason(s) == Some("NotPermitted")
    })
    .await;
    assert_eq!(status.refused_agents, vec![closed.name_any()]);
    assert_eq!(status.agent_names, vec![open.name_any()]);
    assert_eq!(status.matched_agents, 1);
    let ready = condition(&status.conditions, "Ready").unwrap();
    assert_eq!(ready.status, "False");
    for part in [
        closed.name_any(),
        format!("add {tenant} to spec.targetableFrom.namespaces"),
        format!("operator's namespace {}", hub.operator_namespace()),
        "delivering to the 1 permitted Agent(s)".to_owned(),
    ] {
        assert!(
            ready.message.contains(&part),
            "{part:?} in {:?}",
            ready.message
        );
    }
    // The status is written after the target set: the permitted agent only.
    assert_eq!(
        targeted_ids(&hub, stack_row.id).await,
        BTreeSet::from([open_id])
    );
    let events = eventually("a NotPermitted Warning Event", || async {
        let events = not_permitted_events(&hub, "edges").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert!(events[0].0.contains(&closed.name_any()), "{events:?}");

    // Reconciled again with the same refusal (a new generation): no second Event.
    hub.api::<AgentTarget>()
        .patch(
            "edges",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"agents": [open.name_any()]}})),
        )
        .await
        .unwrap();
    target_status_when(&hub, "edges", "the new generation observed", |s| {
        s.observed_generation == Some(2)
    })
    .await;
    let events = not_permitted_events(&hub, "edges").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].1, 1,
        "the refusal was announced again: {events:?}"
    );
    // And recorded once in the audit log, naming the refused agents and the namespace.
    let refusals = refusals_recorded(&hub).await;
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0].resource_name, "edges");
    assert_eq!(
        refusals[0].resource_namespace.as_deref(),
        Some(tenant.as_str())
    );
    assert_eq!(refusals[0].details["namespace"], tenant.as_str());
    assert_eq!(
        refusals[0].details["refused"],
        serde_json::json!({"count": 1, "items": [closed.name_any()]})
    );

    // The Agent's owner grants the namespace: it joins the target set.
    Api::<Agent>::all(hub.cluster.client.clone())
        .patch(
            &closed.name_any(),
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"spec": {"targetableFrom": {"namespaces": [tenant]}}}),
            ),
        )
        .await
        .unwrap();
    let status = target_status_when(&hub, "edges", "Matched once granted", |s| {
        ready_reason(s) == Some("Matched")
    })
    .await;
    assert!(status.refused_agents.is_empty());
    assert_eq!(status.matched_agents, 2);
    assert_eq!(
        targeted_ids(&hub, stack_row.id).await,
        BTreeSet::from([open_id, closed_id])
    );
    hub.stop().await;
}

/// A refused AgentTarget writes no target rows at all, and an Agent admitting hub
/// namespaces by label follows the namespace's labels both ways: labelled, it is
/// targeted; unlabelled, it leaves the target set (a shrink to nothing, which is
/// confirmed from a fresh read of the Agents, AgentTargets and the Namespace).
#[tokio::test]
async fn a_namespace_selector_grants_and_revokes_with_the_namespace_labels() {
    use k8s_openapi::api::core::v1::Namespace;
    let hub = Hub::start_for_tenant(Duration::from_secs(600)).await;
    let tenant = hub.namespace().to_owned();
    let label = format!("tenant.brokkr.test/{}", hub.agent_label);
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    let stack_row = eventually("stack row", || hub.live_stack_row("shop")).await;
    let edge = hub
        .create_agent_targetable_from(
            "edge",
            &[],
            targetable_from(&format!(
                "namespaceSelector: {{matchLabels: {{{label}: shop}}}}"
            )),
        )
        .await;
    let edge_id = agent_row_id(&hub, &edge).await;
    create_target(&hub, "shop-edge", "shop", &[edge.name_any()], None).await;
    let status = target_status_when(&hub, "shop-edge", "NotPermitted", |s| {
        ready_reason(s) == Some("NotPermitted")
    })
    .await;
    assert_eq!(status.refused_agents, vec![edge.name_any()]);
    assert_eq!(status.matched_agents, 0);
    assert!(
        targeted_ids(&hub, stack_row.id).await.is_empty(),
        "refused: no target rows"
    );
    eventually("a NotPermitted Warning Event", || async {
        (!not_permitted_events(&hub, "shop-edge").await.is_empty()).then_some(())
    })
    .await;

    let namespaces: Api<Namespace> = Api::all(hub.cluster.client.clone());
    let set_label = |value: Option<&str>| {
        let namespaces = namespaces.clone();
        let patch = serde_json::json!({"metadata": {"labels": {label.clone(): value}}});
        let tenant = tenant.clone();
        async move {
            namespaces
                .patch(&tenant, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .unwrap();
        }
    };
    set_label(Some("shop")).await;
    eventually("targeted once the namespace is labelled", || async {
        (targeted_ids(&hub, stack_row.id).await == BTreeSet::from([edge_id])).then_some(())
    })
    .await;
    let status = target_status_when(&hub, "shop-edge", "Matched", |s| {
        ready_reason(s) == Some("Matched")
    })
    .await;
    assert!(status.refused_agents.is_empty());

    set_label(None).await;
    eventually("untargeted once the label is gone", || async {
        targeted_ids(&hub, stack_row.id)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    let status = target_status_when(&hub, "shop-edge", "NotPermitted again", |s| {
        ready_reason(s) == Some("NotPermitted")
    })
    .await;
    assert_eq!(status.refused_agents, vec![edge.name_any()]);
    hub.stop().await;
}

/// Creates AgentTarget `name` delivering Stack `stack` to the Agents named `agents` and
/// to those matching the label selector `selector` (YAML).
async fn create_target(
    hub: &Hub,
    name: &str,
    stack: &str,
    agents: &[String],
    selector: Option<&str>,
) {
    hub.api::<AgentTarget>()
        .create(
            &PostParams::default(),
            &AgentTarget::new(
                name,
                AgentTargetSpec {
                    stack_ref: brokkr_crds::StackRef { name: stack.into() },
                    agents: agents.to_vec(),
                    agent_selector: selector.map(|yaml| serde_yaml::from_str(yaml).unwrap()),
                },
            ),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn deleting_a_stack_waits_for_its_agents_to_report_the_removal() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    let agent = hub.create_agent("edge", &[]).await;
    hub.api::<AgentTarget>()
        .create(
            &PostParams::default(),
            &AgentTarget::new(
                "edge",
                AgentTargetSpec {
                    stack_ref: brokkr_crds::StackRef {
                        name: "shop".into(),
                    },
                    agents: vec![agent.name_any()],
                    ..Default::default()
                },
            ),
        )
        .await
        .unwrap();
    let stack_row = eventually("stack row", || hub.live_stack_row("shop")).await;
    let agent_id = eventually("agent targeted", || async {
        hub.store
            .stack_target_agent_ids(stack_row.id)
            .await
            .unwrap()
            .into_iter()
            .next()
    })
    .await;

    let api = hub.api::<Stack>();
    api.delete("shop", &DeleteParams::default()).await.unwrap();
    let marker = eventually("deletion marker written", || async {
        hub.store
            .current_deployment_object(stack_row.id)
            .await
            .unwrap()
            .filter(|d| d.is_deletion_marker)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = api
        .get_opt("shop")
        .await
        .unwrap()
        .expect("held by its finalizer");
    assert!(held.metadata.deletion_timestamp.is_some());

    hub.store
        .record_agent_events(
            agent_id,
            &[EventReport {
                id: uuid::Uuid::now_v7(),
                deployment_object_id: marker.id,
                event_type: "Delete".into(),
                status: "Success".into(),
                message: None,
            }],
        )
        .await
        .unwrap();
    eventually("stack released", || async {
        api.get_opt("shop")
            .await
            .ok()
            .and_then(|s| s.is_none().then_some(()))
    })
    .await;
    hub.stop().await;
}

/// Stack `shop` targeted at an Agent that never reports; its row.
async fn stack_shop_targeted_at_a_silent_agent(
    hub: &Hub,
) -> (Agent, brokkr_operator::entity::stacks::Model) {
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    let agent = hub.create_agent("silent", &[]).await;
    hub.api::<AgentTarget>()
        .create(
            &PostParams::default(),
            &AgentTarget::new(
                "silent",
                AgentTargetSpec {
                    stack_ref: brokkr_crds::StackRef {
                        name: "shop".into(),
                    },
                    agents: vec![agent.name_any()],
                    ..Default::default()
                },
            ),
        )
        .await
        .unwrap();
    let stack_row = eventually("stack row", || hub.live_stack_row("shop")).await;
    eventually("agent targeted", || async {
        let targets = hub
            .store
            .stack_target_agent_ids(stack_row.id)
            .await
            .unwrap();
        (!targets.is_empty()).then_some(())
    })
    .await;
    (agent, stack_row)
}

/// Waits until the deleted Stack `shop` is gone; the note of its DeletionTimedOut event.
async fn released_after_the_timeout(hub: &Hub, within: Duration) -> String {
    let api = hub.api::<Stack>();
    eventually_within(within, "released after the timeout", || async {
        api.get_opt("shop")
            .await
            .ok()
            .and_then(|s| s.is_none().then_some(()))
    })
    .await;
    eventually("DeletionTimedOut event", || async {
        hub.warning_events_for("shop")
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("DeletionTimedOut"))
            .and_then(|e| e.note)
    })
    .await
}

#[tokio::test]
async fn a_deleted_stack_is_released_after_the_deletion_timeout_with_an_event() {
    let hub = Hub::start_with(Duration::from_secs(2), Duration::from_millis(500)).await;
    let (agent, _) = stack_shop_targeted_at_a_silent_agent(&hub).await;
    hub.api::<Stack>()
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    let note = released_after_the_timeout(&hub, Duration::from_secs(20)).await;
    assert!(
        note.contains(&agent.name_any()),
        "names who never reported: {note}"
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_deleted_stack_is_released_after_the_timeout_even_while_postgresql_is_down() {
    let hub = Hub::start_with(Duration::from_secs(3), Duration::from_millis(500)).await;
    let (_, stack_row) = stack_shop_targeted_at_a_silent_agent(&hub).await;

    hub.db.refuse_connections().await;
    let api = hub.api::<Stack>();
    api.delete("shop", &DeleteParams::default()).await.unwrap();
    // Before the timeout, the finalizer holds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(api.get_opt("shop").await.unwrap().is_some());
    let note = released_after_the_timeout(&hub, Duration::from_secs(30)).await;
    assert!(
        note.contains("without knowing which agents removed it"),
        "says why: {note}"
    );
    hub.db.accept_connections().await;
    // Released without the database, the row is retired once the database answers,
    // so its agents get the deletion marker after all.
    eventually_within(Duration::from_secs(30), "the row retired", || async {
        let row = hub.store.find_stack(stack_row.id).await.ok()??;
        row.deleted_at.map(|_| ())
    })
    .await;
    let marker = hub
        .store
        .current_deployment_object(stack_row.id)
        .await
        .unwrap()
        .unwrap();
    assert!(marker.is_deletion_marker);
    hub.stop().await;
}

#[tokio::test]
async fn deleting_a_generator_deletes_its_stacks_and_retires_their_rows() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    hub.stack_when("shop", "owned and recorded", |s| {
        !s.owner_references().is_empty()
            && s.status
                .as_ref()
                .is_some_and(|st| st.deployment_object.is_some())
    })
    .await;
    let row = hub.live_stack_row("shop").await.unwrap();

    hub.api::<Generator>()
        .delete("ci", &DeleteParams::background())
        .await
        .unwrap();
    let stacks = hub.api::<Stack>();
    eventually_within(
        Duration::from_secs(60),
        "stack garbage-collected",
        || async {
            stacks
                .get_opt("shop")
                .await
                .ok()
                .and_then(|s| s.is_none().then_some(()))
        },
    )
    .await;
    let retired = hub.store.find_stack(row.id).await.unwrap().unwrap();
    assert!(retired.deleted_at.is_some());
    let current = hub
        .store
        .current_deployment_object(row.id)
        .await
        .unwrap()
        .unwrap();
    assert!(current.is_deletion_marker);
    hub.stop().await;
}

#[tokio::test]
async fn a_stack_recreated_under_the_same_name_gets_new_rows() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    let first = hub
        .stack_when("shop", "first recorded", |s| {
            s.status.as_ref().is_some_and(|st| st.stack_id.is_some())
        })
        .await
        .status
        .unwrap()
        .stack_id
        .unwrap();
    let api = hub.api::<Stack>();
    api.delete("shop", &DeleteParams::default()).await.unwrap();
    eventually("deleted", || async {
        api.get_opt("shop")
            .await
            .ok()
            .and_then(|s| s.is_none().then_some(()))
    })
    .await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    let second = hub
        .stack_when("shop", "second recorded", |s| {
            s.status.as_ref().is_some_and(|st| st.stack_id.is_some())
        })
        .await
        .status
        .unwrap()
        .stack_id
        .unwrap();
    assert_ne!(first, second);
    let old = hub
        .store
        .find_stack(uuid::Uuid::parse_str(&first).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(old.deleted_at.is_some());
    hub.stop().await;
}

#[tokio::test]
async fn only_one_replica_leads_and_another_takes_over_when_it_stops() {
    use brokkr_operator::leader::{LeaseConfig, run_when_leader};
    let cluster = TestCluster::new().await;
    let leading = Arc::new(std::sync::Mutex::new(Vec::<&'static str>::new()));
    let replica = |identity: &'static str| {
        let client = cluster.client.clone();
        let config = LeaseConfig {
            name: "brokkr-test-lease".into(),
            namespace: cluster.namespace.clone(),
            identity: identity.into(),
            duration: Duration::from_secs(3),
            retry: Duration::from_millis(300),
        };
        let leading = leading.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run_when_leader(
            client,
            config,
            Metrics::default(),
            async move {
                let _ = stopped.await;
            },
            move |mut lost| {
                let leading = leading.clone();
                async move {
                    leading.lock().unwrap().push(identity);
                    let _ = lost.wait_for(|l| *l).await;
                    leading.lock().unwrap().retain(|i| *i != identity);
                }
            },
        ));
        (stop, task)
    };
    let (stop_a, task_a) = replica("a");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (stop_b, task_b) = replica("b");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(*leading.lock().unwrap(), vec!["a"], "exactly one leader");

    let _ = stop_a.send(());
    let _ = task_a.await;
    eventually_within(Duration::from_secs(10), "b takes over", || async {
        (*leading.lock().unwrap() == vec!["b"]).then_some(())
    })
    .await;
    let _ = stop_b.send(());
    let _ = task_b.await;
    cluster.cleanup().await;
}

async fn target_agent(hub: &Hub, stack: &str, agent: &Agent) -> (uuid::Uuid, uuid::Uuid) {
    let name = format!("{stack}-{}", agent.name_any());
    create_target(hub, &name, stack, &[agent.name_any()], None).await;
    let stack_row = eventually("stack row", || hub.live_stack_row(stack)).await;
    let agent_id = eventually("agent targeted", || async {
        hub.store
            .stack_target_agent_ids(stack_row.id)
            .await
            .unwrap()
            .into_iter()
            .next()
    })
    .await;
    (stack_row.id, agent_id)
}

fn report(object: uuid::Uuid, event_type: &str, status: &str, message: &str) -> EventReport {
    EventReport {
        id: uuid::Uuid::now_v7(),
        deployment_object_id: object,
        event_type: event_type.into(),
        status: status.into(),
        message: Some(message.into()),
    }
}

#[tokio::test]
async fn agent_reports_are_mirrored_into_stack_status_without_waiting_for_a_resync() {
    // A refresh period far beyond the test: only the notifications can update status.
    let hub = Hub::start_with(Duration::from_secs(60), Duration::from_secs(600)).await;
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    let agent = hub.create_agent("edge", &[]).await;
    let (stack_id, agent_id) = target_agent(&hub, "shop", &agent).await;
    let object = hub
        .store
        .current_deployment_object(stack_id)
        .await
        .unwrap()
        .unwrap()
        .id;

    hub.store
        .record_agent_events(
            agent_id,
            &[
                report(object, "Apply", "Success", "applied 1 object"),
                report(object, "Health", "Success", "healthy"),
            ],
        )
        .await
        .unwrap();
    let stack = hub
        .stack_when("shop", "Ready 1/1", |s| {
            s.status.as_ref().and_then(|st| st.ready.as_deref()) == Some("1/1")
        })
        .await;
    assert_eq!(stack_condition(&stack, "Ready").unwrap().0, "True");
    let status = stack.status.unwrap();
    assert_eq!(status.agents[0].name, agent.name_any());
    assert_eq!(
        status.agents[0].state,
        brokkr_crds::AgentDeployState::Applied
    );

    hub.store
        .record_agent_events(
            agent_id,
            &[report(
                object,
                "Apply",
                "Failure",
                "admission webhook \"policy\" denied the request",
            )],
        )
        .await
        .unwrap();
    let stack = hub
        .stack_when("shop", "Degraded", |s| {
            stack_condition(s, "Degraded").is_some_and(|c| c.0 == "True")
        })
        .await;
    let (_, reason, message) = stack_condition(&stack, "Degraded").unwrap();
    assert_eq!(reason, "ApplyFailed");
    assert!(message.contains(&agent.name_any()), "{message}");
    let status = stack.status.unwrap();
    assert_eq!(status.failed_agents, 1);
    assert!(
        status.agents[0]
            .message
            .as_deref()
            .unwrap()
            .contains("denied")
    );
    hub.stop().await;
}

#[tokio::test]
async fn agents_go_online_with_heartbeats_and_offline_after_three_missed() {
    let hub = Hub::start_with(Duration::from_secs(60), Duration::from_secs(600)).await;
    let agent = hub.create_agent("edge", &[]).await;
    let name = agent.name_any();
    let api: Api<Agent> = Api::all(hub.cluster.client.clone());
    let uid = uuid::Uuid::parse_str(&agent.uid().unwrap()).unwrap();
    let row = eventually("agent row", || async {
        hub.store.find_live_agent_by_resource(uid).await.unwrap()
    })
    .await;
    hub.store.heartbeat(row.id, Some("9.9.9")).await.unwrap();
    let online = eventually("Online", || async {
        api.get(&name).await.ok().filter(|a| {
            a.status.as_ref().and_then(|s| s.phase) == Some(brokkr_crds::AgentPhase::Online)
        })
    })
    .await;
    let status = online.status.unwrap();
    assert_eq!(status.version.as_deref(), Some("9.9.9"));
    assert!(status.last_heartbeat.is_some());

    // The test hub expects a heartbeat every second: three missed ones mark it Offline.
    eventually_within(Duration::from_secs(15), "Offline", || async {
        api.get(&name).await.ok().filter(|a| {
            a.status.as_ref().and_then(|s| s.phase) == Some(brokkr_crds::AgentPhase::Offline)
        })
    })
    .await;
    assert_eq!(
        hub.store.find_agent(row.id).await.unwrap().unwrap().status,
        "Offline"
    );
    hub.stop().await;
}

#[tokio::test]
async fn suspending_and_resuming_an_agent_is_audited_once_each_with_who_did_it() {
    let hub = Hub::start().await;
    let agent = hub.create_agent("edge", &[]).await;
    let name = agent.name_any();
    let agents: Api<Agent> = Api::all(hub.cluster.client.clone());
    let phase_is = |phase: &'static str| {
        let agents = agents.clone();
        let name = name.clone();
        move || {
            let agents = agents.clone();
            let name = name.clone();
            async move {
                let agent = agents.get(&name).await.ok()?;
                (agent.status?.phase?.as_str() == phase).then_some(())
            }
        }
    };
    eventually("registered", phase_is("Pending")).await;
    for (suspend, phase) in [(true, "Suspended"), (false, "Pending")] {
        agents
            .patch(
                &name,
                &PatchParams::apply("ops-team").force(),
                &Patch::Apply(serde_json::json!({
                    "apiVersion": "brokkr.io/v1alpha1",
                    "kind": "Agent",
                    "metadata": {"name": name},
                    "spec": {"clusterName": "cluster-edge", "suspend": suspend},
                })),
            )
            .await
            .unwrap();
        eventually(phase, phase_is(phase)).await;
    }
    let rows = hub
        .store
        .audit_entries(&brokkr_operator::store::AuditQuery {
            kind: Some("Agent".into()),
            name: Some(name.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let suspensions: Vec<(&str, &str)> = rows
        .iter()
        .filter(|row| row.action.starts_with("Agent"))
        .map(|row| (row.action.as_str(), row.actor.as_str()))
        .collect();
    assert_eq!(
        suspensions,
        [("AgentSuspended", "ops-team"), ("AgentResumed", "ops-team")],
        "{rows:?}"
    );
    hub.stop().await;
}
