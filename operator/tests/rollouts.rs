//! Pins and progressive rollouts in the store, against a real PostgreSQL: what each agent
//! is served, what the change feed's per-stack heads say, and what the status query
//! judges each agent on.

use std::collections::{BTreeMap, HashSet};

use brokkr_operator::entity::deployment_objects;
use brokkr_operator::store::{
    AgentSync, AuditQuery, EventReport, GeneratorSync, Serving, StackContent, StackHead, StackSync,
    Store,
};
use brokkr_testdb::TestDb;
use uuid::Uuid;

struct Fixture {
    _db: TestDb,
    store: Store,
    generator: Uuid,
}

impl Fixture {
    async fn new() -> Fixture {
        let db = TestDb::new().await;
        let store = Store::new(db.conn().clone());
        let generator = store
            .upsert_generator(&GeneratorSync {
                resource_uid: Uuid::new_v4(),
                name: "team/ci",
                description: None,
                is_active: true,
            })
            .await
            .unwrap()
            .id;
        Fixture {
            _db: db,
            store,
            generator,
        }
    }

    /// Records `yaml` for the Stack resource `resource_uid` (created on first use).
    async fn push(
        &self,
        resource_uid: Uuid,
        yaml: &str,
        progressive: bool,
    ) -> deployment_objects::Model {
        let checksum = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(yaml.as_bytes()))
        };
        self.store
            .sync_stack(&StackSync {
                resource_uid,
                name: "team/web",
                description: None,
                generator_id: self.generator,
                labels: Some(&[]),
                annotations: Some(&BTreeMap::new()),
                content: Some(StackContent {
                    yaml,
                    checksum: &checksum,
                }),
                author: None,
                progressive,
            })
            .await
            .unwrap()
            .deployment_object
            .unwrap()
    }

    async fn agents(&self, names: &[&str]) -> Vec<Uuid> {
        let mut ids = Vec::new();
        for name in names {
            let agent = self
                .store
                .sync_agent(&AgentSync {
                    resource_uid: Uuid::new_v4(),
                    name,
                    cluster_name: name,
                    is_suspended: false,
                    labels: &[],
                    annotations: &BTreeMap::new(),
                })
                .await
                .unwrap();
            ids.push(agent.id);
        }
        ids
    }

    async fn target(&self, stack_id: Uuid, agents: &[Uuid]) {
        self.store
            .replace_stack_targets(stack_id, &agents.iter().copied().collect())
            .await
            .unwrap();
    }

    /// The sequence `agent` is served of the stack, by its own query; `None` when nothing.
    async fn served(&self, agent: Uuid) -> Option<i64> {
        let desired = self.store.desired_for_agent(agent, 0).await.unwrap();
        desired.entries.first().map(|entry| entry.sequence_id)
    }

    /// Checks that the change feed's head of the stack serves each agent exactly what the
    /// agent's own query does, with the same stamp.
    async fn heads_agree(&self, stack_id: Uuid, agents: &[Uuid]) -> StackHead {
        let head = self.store.stack_heads(&[stack_id]).await.unwrap().remove(0);
        for agent in agents {
            let desired = self.store.desired_for_agent(*agent, 0).await.unwrap();
            let by_query = desired
                .entries
                .first()
                .map(|e| (e.deployment_object_id, e.sequence_id, e.stamp));
            let object = match &head.assigned {
                Some(assigned) => assigned.get(agent),
                None => head.head.as_ref(),
            };
            let by_head = object.map(|o| (o.deployment_object_id, o.sequence_id, o.stamp));
            assert_eq!(by_head, by_query, "agent {agent}");
        }
        head
    }
}

fn report(
    deployment_object_id: Uuid,
    event_type: &str,
    status: &str,
    message: &str,
) -> EventReport {
    EventReport {
        id: Uuid::now_v7(),
        deployment_object_id,
        event_type: event_type.to_owned(),
        status: status.to_owned(),
        message: Some(message.to_owned()),
    }
}

#[tokio::test]
async fn a_pin_serves_every_agent_the_pinned_revision_and_content_changes_wait_for_the_unpin() {
    let f = Fixture::new().await;
    let resource = Uuid::new_v4();
    let first = f.push(resource, "v: 1", false).await;
    let second = f.push(resource, "v: 2", false).await;
    let stack = first.stack_id;
    let agents = f.agents(&["edge-1", "edge-2"]).await;
    f.target(stack, &agents).await;
    let before = f.heads_agree(stack, &agents).await;
    assert_eq!(f.served(agents[0]).await, Some(second.sequence_id));

    assert_eq!(
        f.store
            .find_revision(stack, second.sequence_id + 100)
            .await
            .unwrap(),
        None
    );
    let pinned = f
        .store
        .find_revision(stack, first.sequence_id)
        .await
        .unwrap()
        .unwrap();
    let changed = f
        .store
        .set_serving(
            stack,
            Serving {
                pinned: Some(pinned.id),
                progressive: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(changed.pinned, Some(first.sequence_id));
    for agent in &agents {
        assert_eq!(
            f.served(*agent).await,
            Some(first.sequence_id),
            "rolled back at once"
        );
    }
    let after = f.heads_agree(stack, &agents).await;
    assert!(
        after.stamp > before.stamp,
        "the stamp grows although the served sequence went down"
    );

    // While pinned, new content is recorded (with the pinned revision as its parent) but
    // not served.
    let third = f.push(resource, "v: 3", false).await;
    assert_eq!(third.parent_id, Some(first.id));
    assert_eq!(f.served(agents[0]).await, Some(first.sequence_id));
    f.heads_agree(stack, &agents).await;
    assert_eq!(
        f.store.served_head(stack).await.unwrap().map(|o| o.id),
        Some(first.id)
    );

    let changed = f
        .store
        .set_serving(stack, Serving::default())
        .await
        .unwrap();
    assert_eq!(
        (changed.pinned, changed.unpinned),
        (None, Some(first.sequence_id))
    );
    assert_eq!(f.served(agents[1]).await, Some(third.sequence_id));
    f.heads_agree(stack, &agents).await;

    let audit = f.store.audit_entries(&AuditQuery::default()).await.unwrap();
    let pins: Vec<(&str, &serde_json::Value)> = audit
        .iter()
        .filter(|row| row.action.starts_with("Revision"))
        .map(|row| (row.action.as_str(), &row.details["sequence"]))
        .collect();
    assert_eq!(
        pins,
        [
            ("RevisionPinned", &serde_json::json!(first.sequence_id)),
            ("RevisionUnpinned", &serde_json::json!(first.sequence_id))
        ]
    );

    // A deleted stack serves its deletion marker, pinned or not.
    f.store
        .set_serving(
            stack,
            Serving {
                pinned: Some(pinned.id),
                progressive: false,
            },
        )
        .await
        .unwrap();
    let marker = f.store.soft_delete_stack(stack).await.unwrap().unwrap();
    let desired = f.store.desired_for_agent(agents[0], 0).await.unwrap();
    assert_eq!(desired.entries[0].deployment_object_id, marker.id);
    f.heads_agree(stack, &agents).await;
}

#[tokio::test]
async fn a_progressive_stack_serves_each_agent_its_assignment_and_never_removes_what_it_served() {
    let f = Fixture::new().await;
    let resource = Uuid::new_v4();
    let first = f.push(resource, "v: 1", false).await;
    let stack = first.stack_id;
    let agents = f.agents(&["canary", "eu-1", "eu-2"]).await;
    f.target(stack, &agents).await;

    // Turning progressive on keeps everyone where they are.
    let changed = f
        .store
        .set_serving(
            stack,
            Serving {
                pinned: None,
                progressive: true,
            },
        )
        .await
        .unwrap();
    assert!(changed.progressive);
    let head = f.heads_agree(stack, &agents).await;
    assert_eq!(head.assigned.as_ref().map(|a| a.len()), Some(3));
    for agent in &agents {
        assert_eq!(f.served(*agent).await, Some(first.sequence_id));
    }

    // A new revision reaches no one until assigned; then only the agents assigned it.
    let second = f.push(resource, "v: 2", true).await;
    assert_eq!(f.served(agents[0]).await, Some(first.sequence_id));
    let moved = f
        .store
        .assign_revision(stack, &agents[..1], second.id)
        .await
        .unwrap();
    assert_eq!(moved, 1);
    assert_eq!(
        f.store
            .assign_revision(stack, &agents[..1], second.id)
            .await
            .unwrap(),
        0,
        "an agent holding the revision keeps its health clock"
    );
    assert_eq!(f.served(agents[0]).await, Some(second.sequence_id));
    assert_eq!(f.served(agents[1]).await, Some(first.sequence_id));
    f.heads_agree(stack, &agents).await;

    // Each agent is judged on its own revision; one not assigned yet on the new one.
    f.store
        .record_agent_events(
            agents[0],
            &[report(second.id, "Apply", "Failure", "refused")],
        )
        .await
        .unwrap();
    f.store
        .record_agent_events(agents[1], &[report(first.id, "Apply", "Success", "")])
        .await
        .unwrap();
    let status = f.store.stack_status(stack, second.id).await.unwrap();
    let by_name = |name: &str| status.iter().find(|s| s.agent_name == name).unwrap();
    assert_eq!(
        by_name("canary").outcome.as_ref().unwrap().status,
        "Failure"
    );
    assert_eq!(
        by_name("canary").assignment.as_ref().map(|a| a.sequence_id),
        Some(second.sequence_id)
    );
    assert_eq!(by_name("eu-1").outcome.as_ref().unwrap().status, "Success");
    assert_eq!(
        by_name("eu-1").assignment.as_ref().map(|a| a.sequence_id),
        Some(first.sequence_id)
    );

    // A newly targeted agent gets nothing until its wave; an untargeted one loses its
    // assignment, so that it starts from its wave if it comes back.
    let late = f.agents(&["late"]).await[0];
    let mut targets = agents.clone();
    targets.push(late);
    f.target(stack, &targets).await;
    assert_eq!(f.served(late).await, None);
    f.target(stack, &agents[..2]).await;
    let head = f.heads_agree(stack, &agents[..2]).await;
    assert!(!head.assigned.unwrap().contains_key(&agents[2]));

    // A pin of a progressive stack holds everyone at it, and is where an unpin starts from.
    f.target(stack, &agents).await;
    f.store
        .set_serving(
            stack,
            Serving {
                pinned: Some(first.id),
                progressive: true,
            },
        )
        .await
        .unwrap();
    for agent in &agents {
        assert_eq!(f.served(*agent).await, Some(first.sequence_id));
    }
    f.heads_agree(stack, &agents).await;
    // An agent targeted while pinned is served the pin, and keeps it after the unpin.
    let mut with_late = agents.clone();
    with_late.push(late);
    f.target(stack, &with_late).await;
    assert_eq!(f.served(late).await, Some(first.sequence_id));
    f.store
        .set_serving(
            stack,
            Serving {
                pinned: None,
                progressive: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        f.served(late).await,
        Some(first.sequence_id),
        "never served nothing"
    );
    f.target(stack, &agents).await;
    for agent in &agents {
        assert_eq!(
            f.served(*agent).await,
            Some(first.sequence_id),
            "after the unpin the new revision rolls out again, wave by wave"
        );
    }

    // Without the rollout, everyone is served the newest at once.
    f.store
        .set_serving(stack, Serving::default())
        .await
        .unwrap();
    let head = f.heads_agree(stack, &agents).await;
    assert!(head.assigned.is_none());
    for agent in &agents {
        assert_eq!(f.served(*agent).await, Some(second.sequence_id));
    }
}

#[tokio::test]
async fn a_stack_created_progressive_serves_nobody_before_the_first_wave() {
    let f = Fixture::new().await;
    let first = f.push(Uuid::new_v4(), "v: 1", true).await;
    let agents = f.agents(&["canary", "eu-1"]).await;
    f.target(first.stack_id, &agents).await;
    assert_eq!(f.served(agents[0]).await, None);
    let head = f.heads_agree(first.stack_id, &agents).await;
    assert_eq!(head.agents, HashSet::from_iter(agents.iter().copied()));
    f.store
        .assign_revision(first.stack_id, &agents[..1], first.id)
        .await
        .unwrap();
    assert_eq!(f.served(agents[0]).await, Some(first.sequence_id));
    assert_eq!(f.served(agents[1]).await, None);
}

#[tokio::test]
async fn the_desired_state_query_stays_index_probes_with_pins_and_assignments() {
    let f = Fixture::new().await;
    let resource = Uuid::new_v4();
    let first = f.push(resource, "v: 1", false).await;
    for version in 2..50 {
        f.push(resource, &format!("v: {version}"), false).await;
    }
    let agent = f.agents(&["edge"]).await[0];
    f.target(first.stack_id, &[agent]).await;
    for serving in [
        Serving::default(),
        Serving {
            pinned: Some(first.id),
            progressive: false,
        },
        Serving {
            pinned: None,
            progressive: true,
        },
    ] {
        f.store.set_serving(first.stack_id, serving).await.unwrap();
        let plan = f.store.explain_desired_for_agent(agent).await.unwrap();
        assert!(
            !plan.contains("Seq Scan on deployment_objects"),
            "{serving:?}:\n{plan}"
        );
        let walked = plan
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Rows Removed by Filter: "))
            .filter_map(|rows| rows.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        assert!(
            walked < 5,
            "no walk through the history, {serving:?}:\n{plan}"
        );
    }
}
