//! The store and the schema's triggers against a real PostgreSQL: every behaviour of
//! the seed design's table descriptions and sequence diagrams.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use brokkr_operator::entity::{agent_events, agent_targets, deployment_objects, stacks};
use brokkr_operator::store::{
    AgentKey, AgentSync, AuditQuery, ContentAuthor, EventReport, GeneratorSync, StackContent,
    StackSync, Store, StoreError,
};
use brokkr_testdb::TestDb;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    Statement,
};
use uuid::Uuid;

struct Fixture {
    db: TestDb,
    store: Store,
}

impl Fixture {
    async fn new() -> Fixture {
        let db = TestDb::new().await;
        let store = Store::new(db.conn().clone());
        Fixture { db, store }
    }

    async fn exec(&self, sql: &str) -> Result<u64, sea_orm::DbErr> {
        Ok(self
            .db
            .conn()
            .execute_unprepared(sql)
            .await?
            .rows_affected())
    }

    async fn generator(&self, name: &str) -> Uuid {
        self.store
            .upsert_generator(&GeneratorSync {
                resource_uid: Uuid::new_v4(),
                name,
                description: None,
                is_active: true,
            })
            .await
            .expect("upsert generator")
            .id
    }

    async fn stack(&self, generator_id: Uuid, name: &str, yaml: &str) -> (Uuid, Uuid) {
        let synced = self
            .store
            .sync_stack(&StackSync {
                resource_uid: Uuid::new_v4(),
                name,
                description: None,
                generator_id,
                labels: Some(&[]),
                annotations: Some(&BTreeMap::new()),
                content: Some(StackContent {
                    yaml,
                    checksum: &checksum(yaml),
                }),
                author: None,
                progressive: false,
            })
            .await
            .expect("sync stack");
        (
            synced.stack.id,
            synced.deployment_object.expect("content recorded").id,
        )
    }

    async fn agent(&self, name: &str, cluster: &str) -> Uuid {
        self.store
            .sync_agent(&AgentSync {
                resource_uid: Uuid::new_v4(),
                name,
                cluster_name: cluster,
                is_suspended: false,
                labels: &[],
                annotations: &BTreeMap::new(),
            })
            .await
            .expect("sync agent")
            .id
    }

    async fn target(&self, stack_id: Uuid, agents: &[Uuid]) {
        self.store
            .replace_stack_targets(stack_id, &agents.iter().copied().collect())
            .await
            .expect("replace targets");
    }

    async fn new_version(&self, stack_id: Uuid, yaml: &str) -> deployment_objects::Model {
        self.store
            .record_deployment_object(
                stack_id,
                StackContent {
                    yaml,
                    checksum: &checksum(yaml),
                },
            )
            .await
            .expect("record deployment object")
            .0
    }

    async fn count<E: EntityTrait>(&self, _entity: E) -> u64
    where
        E::Model: Sync,
    {
        E::find().count(self.db.conn()).await.expect("count")
    }
}

fn checksum(yaml: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(yaml.as_bytes()))
}

fn event(deployment_object_id: Uuid, event_type: &str, status: &str) -> EventReport {
    EventReport {
        id: Uuid::now_v7(),
        deployment_object_id,
        event_type: event_type.to_owned(),
        status: status.to_owned(),
        message: Some(format!("{event_type} {status}")),
    }
}

#[tokio::test]
async fn updated_at_moves_on_update_of_every_table_that_has_it() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, object) = f.stack(generator, "ns/app", "a: 1").await;
    let agent = f.agent("edge-1", "edge").await;
    f.target(stack, &[agent]).await;
    f.store
        .record_agent_events(agent, &[event(object, "Apply", "Success")])
        .await
        .unwrap();
    for table in [
        "generators",
        "stacks",
        "agents",
        "deployment_objects",
        "agent_events",
    ] {
        let before: (chrono::DateTime<chrono::Utc>,) = updated_at(&f, table).await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        f.exec(&format!("UPDATE {table} SET deleted_at = now()"))
            .await
            .unwrap_or_else(|e| panic!("soft delete of {table}: {e}"));
        let after = updated_at(&f, table).await;
        assert!(after.0 > before.0, "{table}.updated_at moves on update");
    }
}

async fn updated_at(f: &Fixture, table: &str) -> (chrono::DateTime<chrono::Utc>,) {
    let row =
        f.db.conn()
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT max(updated_at) AS t FROM {table}"),
            ))
            .await
            .unwrap()
            .unwrap();
    (row.try_get("", "t").unwrap(),)
}

#[tokio::test]
async fn deployment_object_content_is_immutable() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (_, object) = f.stack(generator, "ns/app", "a: 1").await;
    for change in [
        "yaml_content = 'b: 2'",
        "yaml_checksum = 'x'",
        "sequence_id = 999",
        "is_deletion_marker = true",
        "stack_id = gen_random_uuid()",
    ] {
        let err = f
            .exec(&format!(
                "UPDATE deployment_objects SET {change} WHERE id = '{object}'"
            ))
            .await
            .expect_err(change);
        let err = StoreError::from(err);
        assert!(
            matches!(&err, StoreError::Immutable { message } if message.contains("immutable")),
            "{change}: {err:?}"
        );
    }
    // Soft deletion is the one change allowed.
    assert_eq!(
        f.exec(&format!(
            "UPDATE deployment_objects SET deleted_at = now() WHERE id = '{object}'"
        ))
        .await
        .unwrap(),
        1
    );
}

#[tokio::test]
async fn deletion_markers_may_change() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, _) = f.stack(generator, "ns/app", "a: 1").await;
    let marker = f.store.soft_delete_stack(stack).await.unwrap().unwrap();
    assert_eq!(
        f.exec(&format!(
            "UPDATE deployment_objects SET submitted_at = now() WHERE id = '{}'",
            marker.id
        ))
        .await
        .unwrap(),
        1
    );
}

#[tokio::test]
async fn stack_soft_delete_retires_its_objects_and_writes_a_deletion_marker() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, first) = f.stack(generator, "ns/app", "a: 1").await;
    let second = f.new_version(stack, "a: 2").await;

    let marker = f
        .store
        .soft_delete_stack(stack)
        .await
        .unwrap()
        .expect("a deletion marker");
    assert!(marker.is_deletion_marker);
    assert_eq!(marker.yaml_content, "");
    assert_eq!(marker.yaml_checksum, "d41d8cd98f00b204e9800998ecf8427e"); // md5('')
    assert_eq!(marker.generator_id, generator);
    assert!(marker.sequence_id > second.sequence_id);
    assert_eq!(
        marker.id.get_version_num(),
        7,
        "database-made ids are UUIDv7"
    );

    let objects = deployment_objects::Entity::find()
        .filter(deployment_objects::Column::StackId.eq(stack))
        .order_by_asc(deployment_objects::Column::SequenceId)
        .all(f.db.conn())
        .await
        .unwrap();
    assert_eq!(objects.len(), 3);
    for retired in [first, second.id] {
        let row = objects.iter().find(|o| o.id == retired).unwrap();
        assert!(
            row.deleted_at.is_some(),
            "earlier versions are soft-deleted"
        );
    }
    assert!(objects[2].deleted_at.is_none(), "the marker stays live");

    // Deleting again changes nothing and writes no second marker.
    assert!(f.store.soft_delete_stack(stack).await.unwrap().is_none());
    assert_eq!(f.count(deployment_objects::Entity).await, 3);
}

#[tokio::test]
async fn generator_soft_delete_cascades_to_stacks_and_objects() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let other = f.generator("other").await;
    let (a, _) = f.stack(generator, "ns/a", "a: 1").await;
    let (b, _) = f.stack(generator, "ns/b", "b: 1").await;
    let (kept, kept_object) = f.stack(other, "ns/kept", "k: 1").await;

    assert!(f.store.soft_delete_generator(generator).await.unwrap());

    for stack in [a, b] {
        let row = f.store.find_stack(stack).await.unwrap().unwrap();
        assert!(row.deleted_at.is_some());
        let current = f
            .store
            .current_deployment_object(stack)
            .await
            .unwrap()
            .unwrap();
        assert!(
            current.is_deletion_marker,
            "each stack got its deletion marker"
        );
    }
    let live_content = deployment_objects::Entity::find()
        .filter(deployment_objects::Column::GeneratorId.eq(generator))
        .filter(deployment_objects::Column::DeletedAt.is_null())
        .filter(deployment_objects::Column::IsDeletionMarker.eq(false))
        .count(f.db.conn())
        .await
        .unwrap();
    assert_eq!(live_content, 0, "the generator's content is retired");
    assert!(
        f.store
            .find_stack(kept)
            .await
            .unwrap()
            .unwrap()
            .deleted_at
            .is_none()
    );
    assert_eq!(
        f.store
            .current_deployment_object(kept)
            .await
            .unwrap()
            .unwrap()
            .id,
        kept_object
    );
    assert!(!f.store.soft_delete_generator(generator).await.unwrap());
}

#[tokio::test]
async fn agent_soft_delete_soft_deletes_its_events() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, object) = f.stack(generator, "ns/app", "a: 1").await;
    let agent = f.agent("edge-1", "edge").await;
    let other = f.agent("edge-2", "edge").await;
    f.target(stack, &[agent, other]).await;
    f.store
        .record_agent_events(agent, &[event(object, "Apply", "Success")])
        .await
        .unwrap();
    f.store
        .record_agent_events(other, &[event(object, "Apply", "Success")])
        .await
        .unwrap();

    assert!(f.store.soft_delete_agent(agent).await.unwrap());

    let events = agent_events::Entity::find().all(f.db.conn()).await.unwrap();
    for e in events {
        assert_eq!(e.deleted_at.is_some(), e.agent_id == agent);
    }
}

#[tokio::test]
async fn stack_hard_delete_removes_targets_events_and_objects() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, object) = f.stack(generator, "ns/app", "a: 1").await;
    let (other_stack, other_object) = f.stack(generator, "ns/other", "o: 1").await;
    let agent = f.agent("edge-1", "edge").await;
    f.target(stack, &[agent]).await;
    f.target(other_stack, &[agent]).await;
    f.store
        .replace_stack_labels(stack, &["team=web".to_owned()])
        .await
        .unwrap();
    f.store
        .record_agent_events(
            agent,
            &[
                event(object, "Apply", "Success"),
                event(other_object, "Apply", "Success"),
            ],
        )
        .await
        .unwrap();

    assert!(f.store.hard_delete_stack(stack).await.unwrap());

    assert!(f.store.find_stack(stack).await.unwrap().is_none());
    let targets = agent_targets::Entity::find()
        .all(f.db.conn())
        .await
        .unwrap();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].stack_id, other_stack);
    let events = agent_events::Entity::find().all(f.db.conn()).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].deployment_object_id, other_object);
    let objects = deployment_objects::Entity::find()
        .all(f.db.conn())
        .await
        .unwrap();
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].id, other_object);
    assert_eq!(
        f.count(brokkr_operator::entity::stack_labels::Entity).await,
        0
    );
}

#[tokio::test]
async fn agent_hard_delete_removes_targets_events_labels_and_annotations() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, object) = f.stack(generator, "ns/app", "a: 1").await;
    let agent = f
        .store
        .sync_agent(&AgentSync {
            resource_uid: Uuid::new_v4(),
            name: "edge-1",
            cluster_name: "edge",
            is_suspended: false,
            labels: &["env=prod".to_owned()],
            annotations: &BTreeMap::from([("owner".to_owned(), "sre".to_owned())]),
        })
        .await
        .unwrap()
        .id;
    let survivor = f.agent("edge-2", "edge").await;
    f.target(stack, &[agent, survivor]).await;
    f.store
        .record_agent_events(agent, &[event(object, "Apply", "Success")])
        .await
        .unwrap();

    assert!(f.store.hard_delete_agent(agent).await.unwrap());

    assert!(f.store.find_agent(agent).await.unwrap().is_none());
    assert_eq!(
        f.store.stack_target_agent_ids(stack).await.unwrap(),
        BTreeSet::from([survivor])
    );
    assert_eq!(f.count(agent_events::Entity).await, 0);
    assert_eq!(
        f.count(brokkr_operator::entity::agent_labels::Entity).await,
        0
    );
    assert_eq!(
        f.count(brokkr_operator::entity::agent_annotations::Entity)
            .await,
        0
    );
}

#[tokio::test]
async fn generator_hard_delete_removes_everything_it_created() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, object) = f.stack(generator, "ns/app", "a: 1").await;
    let agent = f.agent("edge-1", "edge").await;
    f.target(stack, &[agent]).await;
    f.store
        .record_agent_events(agent, &[event(object, "Apply", "Success")])
        .await
        .unwrap();
    f.store.soft_delete_stack(stack).await.unwrap();

    assert!(f.store.hard_delete_generator(generator).await.unwrap());

    assert_eq!(f.count(stacks::Entity).await, 0);
    assert_eq!(f.count(deployment_objects::Entity).await, 0);
    assert_eq!(f.count(agent_events::Entity).await, 0);
    assert_eq!(f.count(agent_targets::Entity).await, 0);
    assert!(
        f.store.find_agent(agent).await.unwrap().is_some(),
        "agents are not the generator's"
    );
}

#[tokio::test]
async fn a_deleted_stacks_name_can_be_used_again() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (old, _) = f.stack(generator, "ns/app", "a: 1").await;
    f.store.soft_delete_stack(old).await.unwrap();
    let (new, object) = f.stack(generator, "ns/app", "a: 1").await;
    assert_ne!(old, new);
    let current = f
        .store
        .current_deployment_object(new)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(current.id, object);
    assert!(!current.is_deletion_marker);
}

#[tokio::test]
async fn a_recreated_resource_never_adopts_the_rows_of_its_predecessor() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    // The first resource's stack was never cleaned up (its finalizer was removed by hand).
    let (old, _) = f.stack(generator, "ns/app", "a: 1").await;
    let (new, _) = f.stack(generator, "ns/app", "a: 1").await;
    assert_ne!(old, new);
    let old_row = f.store.find_stack(old).await.unwrap().unwrap();
    assert!(old_row.deleted_at.is_some(), "the stale row is retired");
    assert!(
        f.store
            .current_deployment_object(old)
            .await
            .unwrap()
            .unwrap()
            .is_deletion_marker,
        "and its agents are told to remove what it held"
    );
}

#[tokio::test]
async fn live_names_are_unique_with_typed_conflicts() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    f.stack(generator, "ns/app", "a: 1").await;
    let err = f
        .exec(&format!(
            "INSERT INTO stacks (id, name, generator_id) VALUES (gen_random_uuid(), 'ns/app', '{generator}')"
        ))
        .await
        .unwrap_err();
    match StoreError::from(err) {
        StoreError::Conflict { constraint, what } => {
            assert_eq!(constraint, "stacks_name_live_key");
            assert!(what.contains("stack"));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }

    f.agent("edge-1", "edge").await;
    f.agent("edge-1", "other-cluster").await; // same name in another cluster is fine
    let err = f
        .exec("INSERT INTO agents (id, name, cluster_name) VALUES (gen_random_uuid(), 'edge-1', 'edge')")
        .await
        .unwrap_err();
    assert!(matches!(
        StoreError::from(err),
        StoreError::Conflict { constraint, .. } if constraint == "agents_name_cluster_live_key"
    ));

    let err = f
        .exec("INSERT INTO generators (id, name) VALUES (gen_random_uuid(), 'gen')")
        .await
        .unwrap_err();
    assert!(matches!(
        StoreError::from(err),
        StoreError::Conflict { constraint, .. } if constraint == "generators_name_live_key"
    ));
}

#[tokio::test]
async fn values_past_column_sizes_are_refused_naming_the_field() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let long_label = format!("team={}", "x".repeat(60));
    let err = f
        .store
        .sync_stack(&StackSync {
            resource_uid: Uuid::new_v4(),
            name: "ns/app",
            description: None,
            generator_id: generator,
            labels: Some(&[long_label]),
            annotations: None,
            content: None,
            author: None,
            progressive: false,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLong {
                field: "label",
                limit: 64,
                actual: 65
            }
        ),
        "{err:?}"
    );
    assert_eq!(f.count(stacks::Entity).await, 0, "nothing was written");

    let err = f
        .store
        .sync_agent(&AgentSync {
            resource_uid: Uuid::new_v4(),
            name: &"a".repeat(256),
            cluster_name: "edge",
            is_suspended: false,
            labels: &[],
            annotations: &BTreeMap::new(),
        })
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::TooLong {
            field: "agent name",
            limit: 255,
            ..
        }
    ));

    let err = f
        .store
        .replace_stack_annotations(
            Uuid::new_v4(),
            &BTreeMap::from([("k".to_owned(), "v".repeat(65))]),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::TooLong {
            field: "annotation value",
            limit: 64,
            ..
        }
    ));

    let (stack, object) = f.stack(generator, "ns/app", "a: 1").await;
    let agent = f.agent("edge-1", "edge").await;
    f.target(stack, &[agent]).await;
    let mut report = event(object, "Apply", "Success");
    report.status = "Succeeded!!".to_owned();
    let err = f
        .store
        .record_agent_events(agent, &[report])
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::TooLong {
            field: "event status",
            limit: 10,
            ..
        }
    ));
    assert_eq!(f.count(agent_events::Entity).await, 0);
}

#[tokio::test]
async fn labels_and_annotations_are_replaced_as_sets() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, _) = f.stack(generator, "ns/app", "a: 1").await;
    f.store
        .replace_stack_labels(stack, &["a=1".to_owned(), "b=2".to_owned()])
        .await
        .unwrap();
    f.store
        .replace_stack_labels(stack, &["b=2".to_owned(), "c=3".to_owned()])
        .await
        .unwrap();
    let labels: BTreeSet<String> = brokkr_operator::entity::stack_labels::Entity::find()
        .all(f.db.conn())
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.label)
        .collect();
    assert_eq!(labels, BTreeSet::from(["b=2".to_owned(), "c=3".to_owned()]));

    f.store
        .replace_stack_annotations(
            stack,
            &BTreeMap::from([
                ("x".to_owned(), "1".to_owned()),
                ("y".to_owned(), "2".to_owned()),
            ]),
        )
        .await
        .unwrap();
    f.store
        .replace_stack_annotations(
            stack,
            &BTreeMap::from([
                ("y".to_owned(), "3".to_owned()),
                ("z".to_owned(), "4".to_owned()),
            ]),
        )
        .await
        .unwrap();
    let annotations: BTreeMap<String, String> =
        brokkr_operator::entity::stack_annotations::Entity::find()
            .all(f.db.conn())
            .await
            .unwrap()
            .into_iter()
            .map(|a| (a.key, a.value))
            .collect();
    assert_eq!(
        annotations,
        BTreeMap::from([
            ("y".to_owned(), "3".to_owned()),
            ("z".to_owned(), "4".to_owned())
        ])
    );
}

#[tokio::test]
async fn a_deployment_object_is_recorded_only_when_the_checksum_changes() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, first) = f.stack(generator, "ns/app", "a: 1").await;
    let again = f.new_version(stack, "a: 1").await;
    assert_eq!(again.id, first, "same content returns the existing object");
    let changed = f.new_version(stack, "a: 2").await;
    assert_ne!(changed.id, first);
    let back = f.new_version(stack, "a: 1").await;
    assert_ne!(
        back.id, first,
        "returning to earlier content is a new version"
    );
    assert!(back.sequence_id > changed.sequence_id);
    assert_eq!(f.count(deployment_objects::Entity).await, 3);
}

#[tokio::test]
async fn concurrent_writers_of_the_same_content_record_it_once() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, _) = f.stack(generator, "ns/app", "a: 1").await;
    let writers = (0..8).map(|_| {
        let store = f.store.clone();
        tokio::spawn(async move {
            store
                .record_deployment_object(
                    stack,
                    StackContent {
                        yaml: "a: 2",
                        checksum: &checksum("a: 2"),
                    },
                )
                .await
                .unwrap()
        })
    });
    let results = futures::future::join_all(writers).await;
    let created = results.iter().filter(|r| r.as_ref().unwrap().1).count();
    assert_eq!(created, 1);
    assert_eq!(f.count(deployment_objects::Entity).await, 2);
}

#[tokio::test]
async fn invalid_content_keeps_serving_the_last_good_object() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let resource_uid = Uuid::new_v4();
    let sync = |content| StackSync {
        resource_uid,
        name: "ns/app",
        description: None,
        generator_id: generator,
        labels: Some(&[]),
        annotations: Some(&EMPTY),
        content,
        author: None,
        progressive: false,
    };
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    let sum = checksum("a: 1");
    let good = f
        .store
        .sync_stack(&sync(Some(StackContent {
            yaml: "a: 1",
            checksum: &sum,
        })))
        .await
        .unwrap();
    let after_bad = f.store.sync_stack(&sync(None)).await.unwrap();
    assert_eq!(after_bad.stack.id, good.stack.id);
    assert!(!after_bad.created_deployment_object);
    assert_eq!(
        after_bad.deployment_object.unwrap().id,
        good.deployment_object.unwrap().id
    );
}

#[tokio::test]
async fn replacing_targets_reports_what_changed() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, _) = f.stack(generator, "ns/app", "a: 1").await;
    let [a, b, c] = [
        f.agent("a", "x").await,
        f.agent("b", "x").await,
        f.agent("c", "x").await,
    ];
    let changed = f
        .store
        .replace_stack_targets(stack, &BTreeSet::from([a, b]))
        .await
        .unwrap();
    assert_eq!(changed.added.len(), 2);
    let changed = f
        .store
        .replace_stack_targets(stack, &BTreeSet::from([b, c]))
        .await
        .unwrap();
    assert_eq!(changed.added, vec![c]);
    assert_eq!(changed.removed, vec![a]);
    assert!(
        f.store
            .replace_stack_targets(stack, &BTreeSet::from([b, c]))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn events_are_idempotent_by_their_client_made_id() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, object) = f.stack(generator, "ns/app", "a: 1").await;
    let agent = f.agent("edge-1", "edge").await;
    f.target(stack, &[agent]).await;
    let batch = vec![
        event(object, "Apply", "Success"),
        event(object, "Health", "Success"),
    ];
    let first = f.store.record_agent_events(agent, &batch).await.unwrap();
    assert_eq!((first.inserted, first.duplicates), (2, 0));
    let retry = f.store.record_agent_events(agent, &batch).await.unwrap();
    assert_eq!((retry.inserted, retry.duplicates), (0, 2));
    assert_eq!(f.count(agent_events::Entity).await, 2);
}

#[tokio::test]
async fn events_about_objects_not_targeted_at_the_agent_are_refused() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, object) = f.stack(generator, "ns/app", "a: 1").await;
    let (_, foreign) = f.stack(generator, "ns/other", "o: 1").await;
    let agent = f.agent("edge-1", "edge").await;
    f.target(stack, &[agent]).await;
    let err = f
        .store
        .record_agent_events(
            agent,
            &[
                event(object, "Apply", "Success"),
                event(foreign, "Apply", "Success"),
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotTargeted { deployment_object_ids } if deployment_object_ids == &vec![foreign]),
        "{err:?}"
    );
    assert_eq!(
        f.count(agent_events::Entity).await,
        0,
        "the batch is refused whole"
    );
}

#[tokio::test]
async fn desired_state_holds_the_latest_live_object_per_targeted_stack() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (web, _) = f.stack(generator, "ns/web", "web: 1").await;
    let web_v2 = f.new_version(web, "web: 2").await;
    let (db, db_v1) = f.stack(generator, "ns/db", "db: 1").await;
    let (cache, _) = f.stack(generator, "ns/cache", "cache: 1").await;
    let (untargeted, _) = f.stack(generator, "ns/untargeted", "u: 1").await;
    let edge1 = f.agent("edge-1", "edge").await;
    let edge2 = f.agent("edge-2", "edge").await;
    f.target(web, &[edge1, edge2]).await;
    f.target(db, &[edge1]).await;
    f.target(cache, &[edge2]).await;
    let _ = untargeted;

    let desired = f.store.desired_for_agent(edge1, 0).await.unwrap();
    let held: BTreeMap<Uuid, (Uuid, bool)> = desired
        .entries
        .iter()
        .map(|e| (e.stack_id, (e.deployment_object_id, e.is_deletion_marker)))
        .collect();
    assert_eq!(
        held,
        BTreeMap::from([(web, (web_v2.id, false)), (db, (db_v1, false))])
    );
    assert_eq!(
        desired.max_sequence,
        web_v2.sequence_id.max(
            desired.entries[0]
                .sequence_id
                .max(desired.entries[1].sequence_id)
        )
    );
    let names: BTreeSet<&str> = desired
        .entries
        .iter()
        .map(|e| e.stack_name.as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["ns/web", "ns/db"]));

    let edge2_stacks: BTreeSet<Uuid> = f
        .store
        .desired_for_agent(edge2, 0)
        .await
        .unwrap()
        .entries
        .iter()
        .map(|e| e.stack_id)
        .collect();
    assert_eq!(edge2_stacks, BTreeSet::from([web, cache]));
}

#[tokio::test]
async fn a_deletion_marker_stays_in_each_agents_desired_state_until_that_agent_reports_the_removal()
{
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (web, _) = f.stack(generator, "ns/web", "web: 1").await;
    let (db, _) = f.stack(generator, "ns/db", "db: 1").await;
    let online = f.agent("edge-1", "edge").await;
    // Offline (or busy, or restarting) while the stack is deleted.
    let offline = f.agent("edge-2", "edge").await;
    f.target(web, &[online, offline]).await;
    f.target(db, &[online, offline]).await;
    let before = f.store.desired_for_agent(online, 0).await.unwrap();

    let marker = f.store.soft_delete_stack(db).await.unwrap().unwrap();

    let holds_marker = |state: &brokkr_operator::store::DesiredRows| {
        state
            .entries
            .iter()
            .find(|e| e.stack_id == db)
            .is_some_and(|e| e.is_deletion_marker && e.deployment_object_id == marker.id)
    };
    let after = f
        .store
        .desired_for_agent(online, before.max_sequence)
        .await
        .unwrap();
    assert!(holds_marker(&after));
    assert_eq!(after.max_sequence, marker.sequence_id);
    // A cursor past the marker does not make it go away: it is state, not an edge.
    let past = f
        .store
        .desired_for_agent(online, after.max_sequence + 100)
        .await
        .unwrap();
    assert!(
        holds_marker(&past),
        "still there past the marker's sequence"
    );
    // A failed removal keeps it too.
    f.store
        .record_agent_events(online, &[event(marker.id, "Delete", "Failure")])
        .await
        .unwrap();
    assert!(holds_marker(
        &f.store
            .desired_for_agent(online, after.max_sequence)
            .await
            .unwrap()
    ));

    f.store
        .record_agent_events(online, &[event(marker.id, "Delete", "Success")])
        .await
        .unwrap();
    let reported = f
        .store
        .desired_for_agent(online, after.max_sequence)
        .await
        .unwrap();
    assert_eq!(
        reported
            .entries
            .iter()
            .map(|e| e.stack_id)
            .collect::<Vec<_>>(),
        vec![web],
        "the reporting agent's marker is gone"
    );

    // The agent that was away comes back, from whatever cursor it kept (or none).
    for cursor in [0, before.max_sequence, marker.sequence_id] {
        let back = f.store.desired_for_agent(offline, cursor).await.unwrap();
        assert!(holds_marker(&back), "from cursor {cursor}");
    }
    f.store
        .record_agent_events(offline, &[event(marker.id, "Delete", "Success")])
        .await
        .unwrap();
    let back = f.store.desired_for_agent(offline, 0).await.unwrap();
    assert!(!holds_marker(&back));
    assert_eq!(back.entries.len(), 1);
}

#[tokio::test]
async fn every_connection_of_the_hub_has_tcp_keepalive() {
    let f = Fixture::new().await;
    let setting = "SELECT setting FROM pg_settings WHERE name = 'tcp_keepalives_idle'";
    let pool = sea_orm::Database::connect(brokkr_operator::store::connect_options(f.db.url()))
        .await
        .unwrap();
    let row = pool
        .query_one_raw(Statement::from_string(DbBackend::Postgres, setting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.try_get::<String>("", "setting").unwrap(), "30");

    let mut listener = brokkr_operator::store::listen(f.db.url(), &["brokkr_test"])
        .await
        .unwrap();
    let on_listener: String = sea_orm::sqlx::query_scalar(setting)
        .fetch_one(&mut listener)
        .await
        .unwrap();
    assert_eq!(on_listener, "30");
    brokkr_operator::store::check_listener(&mut listener, std::time::Duration::from_secs(5))
        .await
        .expect("a live LISTEN connection passes its check");
}

#[tokio::test]
async fn targeting_is_checked_per_agent_and_stack() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, object) = f.stack(generator, "ns/app", "a: 1").await;
    let targeted = f.agent("edge-1", "edge").await;
    let stranger = f.agent("edge-2", "edge").await;
    f.target(stack, &[targeted]).await;
    assert!(f.store.is_targeted(targeted, stack).await.unwrap());
    assert!(!f.store.is_targeted(stranger, stack).await.unwrap());
    let found = f.store.deployment_object(object).await.unwrap().unwrap();
    assert_eq!(
        (found.stack_id, found.yaml_content.as_str()),
        (stack, "a: 1")
    );
    assert!(
        f.store
            .deployment_object(Uuid::now_v7())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn stack_heads_agree_with_every_agents_desired_state() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (web, _) = f.stack(generator, "ns/web", "web: 1").await;
    let web_v2 = f.new_version(web, "web: 2").await;
    let (db, _) = f.stack(generator, "ns/db", "db: 1").await;
    let (edge1, edge2) = (
        f.agent("edge-1", "edge").await,
        f.agent("edge-2", "edge").await,
    );
    f.target(web, &[edge1, edge2]).await;
    f.target(db, &[edge1]).await;
    let marker = f.store.soft_delete_stack(db).await.unwrap().unwrap();
    let vanished = Uuid::now_v7();

    let heads = f.store.stack_heads(&[web, db, vanished]).await.unwrap();

    assert_eq!(
        heads.iter().map(|h| h.stack_id).collect::<Vec<_>>(),
        [web, db, vanished],
        "one head per asked stack, in order"
    );
    let web_head = heads[0].head.as_ref().unwrap();
    assert_eq!(web_head.deployment_object_id, web_v2.id);
    assert_eq!(heads[0].agents, HashSet::from([edge1, edge2]));
    assert!(!heads[0].stack_deleted);
    let db_head = heads[1].head.as_ref().unwrap();
    assert!(heads[1].stack_deleted && db_head.is_deletion_marker);
    assert_eq!(db_head.deployment_object_id, marker.id);
    assert_eq!(heads[1].agents, HashSet::from([edge1]));
    assert!(heads[1].removal_reported.is_empty());
    assert!(heads[2].head.is_none() && heads[2].agents.is_empty());

    // What the heads say edge-1 should hold is what its own query says.
    let desired = f.store.desired_for_agent(edge1, 0).await.unwrap();
    for entry in &desired.entries {
        let head = heads.iter().find(|h| h.stack_id == entry.stack_id).unwrap();
        let object = head.head.as_ref().unwrap();
        assert_eq!(
            (
                object.deployment_object_id,
                object.sequence_id,
                &object.yaml_checksum,
                object.is_deletion_marker,
                head.stack_deleted,
                &head.stack_name,
            ),
            (
                entry.deployment_object_id,
                entry.sequence_id,
                &entry.yaml_checksum,
                entry.is_deletion_marker,
                entry.stack_deleted,
                &entry.stack_name,
            )
        );
    }
    assert_eq!(desired.entries.len(), 2);

    // After edge-1 reports the removal, its heads and its query both leave the marker out.
    f.store
        .record_agent_events(edge1, &[event(marker.id, "Delete", "Success")])
        .await
        .unwrap();
    let heads = f.store.stack_heads(&[db]).await.unwrap();
    assert_eq!(heads[0].removal_reported, HashSet::from([edge1]));
    let desired = f.store.desired_for_agent(edge1, 0).await.unwrap();
    assert!(desired.entries.iter().all(|e| e.stack_id != db));
}

#[tokio::test]
async fn heartbeat_marks_the_agent_online_with_its_version() {
    let f = Fixture::new().await;
    let agent = f.agent("edge-1", "edge").await;
    let before = f.store.find_agent(agent).await.unwrap().unwrap();
    assert_eq!(before.status, "Pending");
    assert!(before.last_heartbeat.is_none());
    let after = f.store.heartbeat(agent, Some("0.1.0")).await.unwrap();
    assert_eq!(after.status, "Online");
    assert_eq!(after.agent_version.as_deref(), Some("0.1.0"));
    assert!(after.last_heartbeat.is_some());
    f.store.soft_delete_agent(agent).await.unwrap();
    assert!(matches!(
        f.store.heartbeat(agent, None).await,
        Err(StoreError::NotFound { .. })
    ));
}

/// A heartbeat of an agent that works, at `version`.
fn ready(version: &str) -> brokkr_operator::store::HeartbeatReport {
    brokkr_operator::store::HeartbeatReport {
        version: version.to_owned(),
        state: "Ready".to_owned(),
        message: None,
    }
}

#[tokio::test]
async fn batched_heartbeats_mark_live_agents_online_and_skip_deleted_ones() {
    let f = Fixture::new().await;
    let (edge1, edge2, gone) = (
        f.agent("edge-1", "edge").await,
        f.agent("edge-2", "edge").await,
        f.agent("edge-3", "edge").await,
    );
    f.store.soft_delete_agent(gone).await.unwrap();
    let updated = f
        .store
        .record_heartbeats(&[
            (edge1, ready("1.0.0")),
            (edge2, ready("1.1.0")),
            (gone, ready("1.0.0")),
        ])
        .await
        .unwrap();
    assert_eq!(updated, 2);
    for (agent, version) in [(edge1, "1.0.0"), (edge2, "1.1.0")] {
        let row = f.store.find_agent(agent).await.unwrap().unwrap();
        assert_eq!(row.status, "Online");
        assert_eq!(row.agent_version.as_deref(), Some(version));
        assert!(row.last_heartbeat.is_some());
    }
    let row = f.store.find_agent(gone).await.unwrap().unwrap();
    assert!(row.last_heartbeat.is_none());
    assert!(matches!(
        f.store
            .record_heartbeats(&[(edge1, ready(&"v".repeat(65)))])
            .await,
        Err(StoreError::TooLong { .. })
    ));
}

#[tokio::test]
async fn agent_keys_are_found_by_prefix_and_only_hashes_are_stored() {
    let f = Fixture::new().await;
    let agent = f.agent("edge-1", "edge").await;
    let key = AgentKey {
        prefix: "abcd1234".to_owned(),
        hash: checksum("brokkr_abcd1234_secret"),
    };
    f.store.set_agent_key(agent, &key).await.unwrap();
    let found = f
        .store
        .find_agent_by_key_prefix("abcd1234")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, agent);
    let stored = f.store.find_api_key("abcd1234").await.unwrap().unwrap();
    assert_eq!(stored.key_hash, key.hash);
    assert!(
        f.store
            .find_agent_by_key_prefix("other")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn status_shows_each_targeted_agents_latest_event_for_the_current_object() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let (stack, v1) = f.stack(generator, "ns/app", "a: 1").await;
    let ok = f.agent("edge-ok", "edge").await;
    let failing = f.agent("edge-failing", "edge").await;
    let silent = f.agent("edge-silent", "edge").await;
    f.target(stack, &[ok, failing, silent]).await;
    f.store
        .record_agent_events(failing, &[event(v1, "Apply", "Success")])
        .await
        .unwrap();
    let v2 = f.new_version(stack, "a: 2").await.id;
    f.store
        .record_agent_events(
            ok,
            &[
                event(v2, "Apply", "Success"),
                event(v2, "Health", "Success"),
            ],
        )
        .await
        .unwrap();
    f.store
        .record_agent_events(failing, &[event(v2, "Apply", "Success")])
        .await
        .unwrap();
    let mut failure = event(v2, "Apply", "Failure");
    failure.message = Some("admission webhook denied".to_owned());
    f.store
        .record_agent_events(failing, &[failure])
        .await
        .unwrap();
    // Drift reports are their own kind: the latest one counts, outcomes are untouched.
    f.store
        .record_agent_events(ok, &[event(v2, "Drift", "Failure")])
        .await
        .unwrap();
    f.store
        .record_agent_events(failing, &[event(v1, "Drift", "Failure")])
        .await
        .unwrap();

    let status = f.store.stack_status(stack, v2).await.unwrap();
    let by_name: BTreeMap<&str, _> = status.iter().map(|s| (s.agent_name.as_str(), s)).collect();
    assert_eq!(by_name.len(), 3);
    let ok_status = by_name["edge-ok"];
    assert_eq!(ok_status.outcome.as_ref().unwrap().status, "Success");
    assert_eq!(ok_status.health.as_ref().unwrap().status, "Success");
    let failing_status = by_name["edge-failing"];
    let outcome = failing_status.outcome.as_ref().unwrap();
    assert_eq!(outcome.status, "Failure", "the latest event wins");
    assert_eq!(outcome.message.as_deref(), Some("admission webhook denied"));
    assert!(by_name["edge-silent"].outcome.is_none());
    assert!(by_name["edge-silent"].health.is_none());
    let drift = ok_status.drift.as_ref().unwrap();
    assert_eq!(
        (drift.event_type.as_str(), drift.status.as_str()),
        ("Drift", "Failure")
    );
    assert_eq!(ok_status.outcome.as_ref().unwrap().event_type, "Apply");
    assert!(
        failing_status.drift.is_none(),
        "drift about an older version does not count"
    );
}

#[tokio::test]
async fn upserting_the_same_resource_updates_its_row() {
    let f = Fixture::new().await;
    let uid = Uuid::new_v4();
    let first = f
        .store
        .upsert_generator(&GeneratorSync {
            resource_uid: uid,
            name: "ns/gen",
            description: None,
            is_active: true,
        })
        .await
        .unwrap();
    let second = f
        .store
        .upsert_generator(&GeneratorSync {
            resource_uid: uid,
            name: "ns/gen",
            description: Some("ci pipeline"),
            is_active: false,
        })
        .await
        .unwrap();
    assert_eq!(first.id, second.id);
    assert_eq!(second.description.as_deref(), Some("ci pipeline"));
    assert!(!second.is_active);
    assert_eq!(
        f.count(brokkr_operator::entity::generators::Entity).await,
        1
    );
}

/// One agent targeted by 1,000 stacks of 10 versions each: the desired-state query
/// must probe the latest-live index per target rather than scan history.
#[tokio::test]
async fn desired_state_query_uses_the_latest_live_index_at_scale() {
    let f = Fixture::new().await;
    let generator = f.generator("gen").await;
    let agent = f.agent("edge-1", "edge").await;
    f.exec(&format!(
        "INSERT INTO stacks (id, name, generator_id)
             SELECT uuid_generate_v7(), 'ns/stack-' || i, '{generator}' FROM generate_series(1, 1000) i;
         INSERT INTO deployment_objects (id, stack_id, yaml_content, yaml_checksum, generator_id)
             SELECT uuid_generate_v7(), s.id, 'v: ' || v, md5(s.id::text || v), '{generator}'
             FROM stacks s, generate_series(1, 10) v ORDER BY v;
         UPDATE deployment_objects d SET deleted_at = now()
             WHERE sequence_id < (SELECT max(sequence_id) FROM deployment_objects WHERE stack_id = d.stack_id);
         INSERT INTO agent_targets (id, agent_id, stack_id)
             SELECT uuid_generate_v7(), '{agent}', id FROM stacks;
         ANALYZE;"
    ))
    .await
    .unwrap();

    let desired = f.store.desired_for_agent(agent, 0).await.unwrap();
    assert_eq!(desired.entries.len(), 1000);
    assert!(desired.entries.iter().all(|e| !e.is_deletion_marker));

    let plan = f.store.explain_desired_for_agent(agent).await.unwrap();
    println!("{plan}");
    assert!(
        plan.contains("deployment_objects_stack_latest_live_idx"),
        "the latest live object comes from its index:\n{plan}"
    );
}

#[tokio::test]
async fn content_targets_and_deletion_are_audited_with_the_change_that_made_them() {
    let f = Fixture::new().await;
    let generator = f.generator("team-a/ci").await;
    let resource_uid = Uuid::new_v4();
    let sync = |yaml: &'static str| StackSync {
        resource_uid,
        name: "team-a/web",
        description: None,
        generator_id: generator,
        labels: Some(&[]),
        annotations: None,
        content: Some(StackContent {
            yaml,
            checksum: Box::leak(checksum(yaml).into_boxed_str()),
        }),
        author: Some(ContentAuthor {
            field_manager: "kubectl-client-side-apply",
            generator: "ci",
        }),
        progressive: false,
    };
    let first = f.store.sync_stack(&sync("a: 1")).await.unwrap();
    // The same content again records nothing, so audits nothing.
    f.store.sync_stack(&sync("a: 1")).await.unwrap();
    let second = f.store.sync_stack(&sync("a: 2")).await.unwrap();
    let stack = first.stack.id;
    let [edge1, edge2] = [f.agent("edge-1", "x").await, f.agent("edge-2", "x").await];
    f.target(stack, &[edge1, edge2]).await;
    f.target(stack, &[edge2]).await;
    f.target(stack, &[edge2]).await;
    f.store.soft_delete_stack(stack).await.unwrap();

    let rows = f.store.audit_entries(&AuditQuery::default()).await.unwrap();
    let actions: Vec<&str> = rows.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "DeploymentObjectRecorded",
            "DeploymentObjectRecorded",
            "TargetsChanged",
            "TargetsChanged",
            "StackDeleted"
        ]
    );
    for row in &rows {
        assert_eq!(
            (
                row.resource_kind.as_str(),
                row.resource_namespace.as_deref(),
                row.resource_name.as_str(),
                row.resource_id
            ),
            ("Stack", Some("team-a"), "web", Some(first.stack.id))
        );
    }
    assert_eq!(rows[0].actor, "kubectl-client-side-apply");
    assert_eq!(rows[0].details["generator"], "ci");
    let second_object = second.deployment_object.unwrap();
    assert_eq!(rows[1].details["sequence"], second_object.sequence_id);
    assert_eq!(rows[1].details["checksum"], second_object.yaml_checksum);
    assert!(
        !rows[1].details.to_string().contains("a: 2"),
        "content never goes into the audit log"
    );
    assert_eq!(
        rows[2].details["added"]["items"],
        serde_json::json!(["edge-1", "edge-2"])
    );
    assert_eq!(
        rows[3].details["removed"]["items"],
        serde_json::json!(["edge-1"])
    );
    assert_eq!(rows[3].details["added"]["count"], 0);
    assert_eq!(rows[4].actor, "brokkr.io/operator");

    // Filters: by resource, by time, newest N.
    let by_resource = |kind: &str, namespace: Option<&str>, name: Option<&str>| AuditQuery {
        kind: Some(kind.into()),
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        ..AuditQuery::default()
    };
    let store = &f.store;
    let found = |query: AuditQuery| async move { store.audit_entries(&query).await.unwrap().len() };
    assert_eq!(
        found(by_resource("stack", Some("team-a"), Some("web"))).await,
        5
    );
    assert_eq!(
        found(by_resource("Stack", Some("team-b"), Some("web"))).await,
        0
    );
    assert_eq!(found(by_resource("agent", None, None)).await, 0);
    let newest = f
        .store
        .audit_entries(&AuditQuery {
            limit: Some(2),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        newest.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(),
        ["TargetsChanged", "StackDeleted"],
        "the newest rows, oldest first"
    );
    let future = AuditQuery {
        since: Some(chrono::Utc::now() + chrono::Duration::minutes(1)),
        ..AuditQuery::default()
    };
    assert_eq!(found(future).await, 0);
}

#[tokio::test]
async fn a_failed_change_leaves_no_audit_row_and_pruning_goes_in_batches() {
    let f = Fixture::new().await;
    let generator = f.generator("ci").await;
    let (stack, _) = f.stack(generator, "ns/app", "a: 1").await;
    // A target on an agent that does not exist fails the whole transaction.
    let missing = Uuid::now_v7();
    assert!(
        f.store
            .replace_stack_targets(stack, &BTreeSet::from([missing]))
            .await
            .is_err()
    );
    let rows = f.store.audit_entries(&AuditQuery::default()).await.unwrap();
    assert_eq!(rows.len(), 1, "only the recorded content: {rows:?}");

    f.exec(
        "INSERT INTO audit_log (at, actor, action, resource_kind, resource_name) \
         SELECT now() - interval '100 days', 'old', 'KeyIssued', 'Agent', 'edge-' || n \
         FROM generate_series(1, 2500) n",
    )
    .await
    .unwrap();
    let pruned =
        brokkr_operator::audit::prune(&f.store, std::time::Duration::from_secs(90 * 86_400))
            .await
            .unwrap();
    assert_eq!(pruned, 2500);
    let left = f.store.audit_entries(&AuditQuery::default()).await.unwrap();
    assert_eq!(left.len(), 1, "recent rows stay");
}

#[tokio::test]
async fn revisions_know_their_parent_and_author_and_cannot_be_rewritten() {
    let f = Fixture::new().await;
    let generator = f.generator("ci").await;
    let resource_uid = Uuid::new_v4();
    let sync = |yaml: &'static str, manager: &'static str| StackSync {
        resource_uid,
        name: "ns/app",
        description: None,
        generator_id: generator,
        labels: None,
        annotations: None,
        content: Some(StackContent {
            yaml,
            checksum: Box::leak(checksum(yaml).into_boxed_str()),
        }),
        author: Some(ContentAuthor {
            field_manager: manager,
            generator: "ci",
        }),
        progressive: false,
    };
    let first = f.store.sync_stack(&sync("a: 1", "kubectl")).await.unwrap();
    let second = f.store.sync_stack(&sync("a: 2", "helm")).await.unwrap();
    let [first, second] = [first, second].map(|s| s.deployment_object.unwrap());
    assert_eq!(
        (first.parent_id, first.recorded_by.as_deref()),
        (None, Some("kubectl"))
    );
    assert_eq!(
        (second.parent_id, second.recorded_by.as_deref()),
        (Some(first.id), Some("helm"))
    );
    // The deletion marker starts no lineage of its own.
    let marker = f
        .store
        .soft_delete_stack(first.stack_id)
        .await
        .unwrap()
        .unwrap();
    assert!(marker.is_deletion_marker);
    assert_eq!(marker.parent_id, None);

    for column in ["parent_id = NULL", "recorded_by = 'someone else'"] {
        let err = f
            .exec(&format!(
                "UPDATE deployment_objects SET {column} WHERE id = '{}'",
                second.id
            ))
            .await
            .expect_err("history is immutable");
        assert!(err.to_string().contains("immutable"), "{column}: {err}");
    }
}
