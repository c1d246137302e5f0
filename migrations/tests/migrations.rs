//! Every migration applies and rolls back cleanly, also with data in the tables.

use brokkr_migrations::{Migrator, MigratorTrait};
use brokkr_testdb::TestDb;
use sea_orm::{ConnectionTrait, DbBackend, Statement};

const TABLES: [&str; 15] = [
    "alert_notifications",
    "alerts",
    "api_keys",
    "rollout_assignments",
    "audit_log",
    "generators",
    "stacks",
    "agents",
    "deployment_objects",
    "agent_events",
    "agent_targets",
    "stack_labels",
    "stack_annotations",
    "agent_labels",
    "agent_annotations",
];

async fn tables(db: &TestDb) -> Vec<String> {
    db.conn()
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT table_name::text AS t FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_name <> 'seaql_migrations' ORDER BY 1",
        ))
        .await
        .expect("list tables")
        .into_iter()
        .map(|row| row.try_get::<String>("", "t").expect("name"))
        .collect()
}

async fn functions(db: &TestDb) -> i64 {
    let row = db
        .conn()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'public'",
        ))
        .await
        .expect("count functions")
        .expect("a row");
    row.try_get("", "n").expect("count")
}

/// A little of everything, through the triggers too.
const POPULATE: &str = r#"
INSERT INTO generators (id, name) VALUES ('00000000-0000-7000-8000-000000000001', 'ns/gen');
INSERT INTO stacks (id, name, generator_id)
    VALUES ('00000000-0000-7000-8000-000000000002', 'ns/app', '00000000-0000-7000-8000-000000000001');
INSERT INTO agents (id, name, cluster_name) VALUES ('00000000-0000-7000-8000-000000000003', 'edge', 'eu');
INSERT INTO deployment_objects (id, stack_id, yaml_content, yaml_checksum, generator_id)
    VALUES ('00000000-0000-7000-8000-000000000004', '00000000-0000-7000-8000-000000000002', 'a: 1', 'c',
            '00000000-0000-7000-8000-000000000001');
INSERT INTO agent_targets (id, agent_id, stack_id)
    VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000003', '00000000-0000-7000-8000-000000000002');
INSERT INTO agent_events (id, agent_id, deployment_object_id, event_type, status)
    VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000003', '00000000-0000-7000-8000-000000000004',
            'Apply', 'Success');
INSERT INTO stack_labels (id, stack_id, label) VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000002', 'a=b');
INSERT INTO stack_annotations (id, stack_id, key, value) VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000002', 'k', 'v');
INSERT INTO agent_labels (id, agent_id, label) VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000003', 'env=prod');
INSERT INTO agent_annotations (id, agent_id, key, value) VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000003', 'k', 'v');
INSERT INTO rollout_assignments (agent_id, stack_id, deployment_object_id)
    VALUES ('00000000-0000-7000-8000-000000000003', '00000000-0000-7000-8000-000000000002',
            '00000000-0000-7000-8000-000000000004');
UPDATE stacks SET pinned_object_id = '00000000-0000-7000-8000-000000000004', progressive = TRUE;
UPDATE stacks SET deleted_at = now();
INSERT INTO alerts (id, rule_uid, rule_namespace, rule_name, condition, subject_kind, subject_uid,
                    subject_name, severity, state, message, started_at)
    VALUES ('00000000-0000-7000-8000-000000000005', gen_random_uuid(), 'ns', 'edge-down', 'AgentOffline',
            'Agent', gen_random_uuid(), 'edge', 'critical', 'firing', 'Agent edge is Offline', now());
INSERT INTO alert_notifications (id, alert_id, channel_namespace, channel_name, body)
    VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000005', 'ns', 'ops', '{"state": "firing"}');
INSERT INTO audit_log (actor, action, resource_kind, resource_namespace, resource_name, details)
    VALUES ('kubectl', 'DeploymentObjectRecorded', 'Stack', 'ns', 'app', '{"sequence": 1}');
"#;

#[tokio::test]
async fn up_down_up_on_a_populated_database() {
    let db = TestDb::empty().await;
    Migrator::up(db.conn(), None).await.expect("up");
    let mut expected: Vec<String> = TABLES.iter().map(|t| t.to_string()).collect();
    expected.sort();
    assert_eq!(tables(&db).await, expected);
    db.conn()
        .execute_unprepared(POPULATE)
        .await
        .expect("populate");

    Migrator::down(db.conn(), None)
        .await
        .expect("down with data in every table");
    assert!(tables(&db).await.is_empty(), "down removes every table");
    assert_eq!(functions(&db).await, 0, "down removes every function");

    Migrator::up(db.conn(), None).await.expect("up again");
    assert_eq!(tables(&db).await, expected);
    db.conn()
        .execute_unprepared(POPULATE)
        .await
        .expect("populate again");
}

/// The deletion marker of a stack whose last content carries the agents' policy line
/// carries that line too (and only then).
#[tokio::test]
async fn a_deletion_marker_carries_the_last_policy_line() {
    let db = TestDb::empty().await;
    Migrator::up(db.conn(), None).await.expect("up");
    let policy = "# brokkr.io/policy: {\"deletionPolicy\":\"Orphan\"}\n";
    let setup = format!(
        r#"
INSERT INTO generators (id, name) VALUES ('00000000-0000-7000-8000-000000000001', 'ns/gen');
INSERT INTO stacks (id, name, generator_id) VALUES
    ('00000000-0000-7000-8000-000000000002', 'ns/orphan', '00000000-0000-7000-8000-000000000001'),
    ('00000000-0000-7000-8000-000000000003', 'ns/plain', '00000000-0000-7000-8000-000000000001');
INSERT INTO deployment_objects (id, stack_id, yaml_content, yaml_checksum, generator_id) VALUES
    ('00000000-0000-7000-8000-000000000004', '00000000-0000-7000-8000-000000000002',
     'kind: Old', 'c1', '00000000-0000-7000-8000-000000000001'),
    ('00000000-0000-7000-8000-000000000005', '00000000-0000-7000-8000-000000000002',
     E'{}kind: New', 'c2', '00000000-0000-7000-8000-000000000001'),
    ('00000000-0000-7000-8000-000000000006', '00000000-0000-7000-8000-000000000003',
     'kind: Plain', 'c3', '00000000-0000-7000-8000-000000000001');
UPDATE stacks SET deleted_at = now();
"#,
        policy.replace('\n', "\\n")
    );
    db.conn().execute_unprepared(&setup).await.expect("setup");
    let marker = |stack: &'static str| {
        let db = &db;
        async move {
            db.conn()
                .query_one_raw(Statement::from_string(
                    DbBackend::Postgres,
                    format!(
                        "SELECT yaml_content FROM deployment_objects \
                         WHERE stack_id = '{stack}' AND is_deletion_marker"
                    ),
                ))
                .await
                .expect("query")
                .expect("a marker")
                .try_get::<String>("", "yaml_content")
                .expect("content")
        }
    };
    assert_eq!(marker("00000000-0000-7000-8000-000000000002").await, policy);
    assert_eq!(marker("00000000-0000-7000-8000-000000000003").await, "");
    // Deployment objects stay immutable.
    let changed = db
        .conn()
        .execute_unprepared(
            "UPDATE deployment_objects SET yaml_content = 'x' \
             WHERE id = '00000000-0000-7000-8000-000000000005'",
        )
        .await;
    assert!(changed.is_err());
}

#[tokio::test]
async fn each_migration_rolls_back_one_step_at_a_time() {
    let db = TestDb::empty().await;
    Migrator::up(db.conn(), None).await.expect("up");
    let total = Migrator::migrations().len();
    for remaining in (0..total).rev() {
        Migrator::down(db.conn(), Some(1))
            .await
            .expect("one step down");
        let applied = Migrator::get_applied_migrations(db.conn())
            .await
            .expect("status");
        assert_eq!(applied.len(), remaining);
    }
    Migrator::up(db.conn(), None)
        .await
        .expect("up from nothing");
}

#[tokio::test]
async fn concurrent_migrators_take_turns() {
    let db = TestDb::empty().await;
    let runs = (0..4).map(|_| {
        let conn = db.conn().clone();
        tokio::spawn(async move { brokkr_migrations::migrate_with_lock(&conn).await })
    });
    for run in futures::future::join_all(runs).await {
        run.expect("task")
            .expect("every replica's migration succeeds");
    }
    let applied = Migrator::get_applied_migrations(db.conn())
        .await
        .expect("status");
    assert_eq!(applied.len(), Migrator::migrations().len());
}

#[tokio::test]
async fn audit_rows_are_append_only() {
    let db = TestDb::empty().await;
    Migrator::up(db.conn(), None).await.expect("up");
    db.conn()
        .execute_unprepared(POPULATE)
        .await
        .expect("populate");
    let err = db
        .conn()
        .execute_unprepared("UPDATE audit_log SET actor = 'someone else'")
        .await
        .expect_err("an audit row cannot be rewritten");
    assert!(err.to_string().contains("append-only"), "{err}");
    db.conn()
        .execute_unprepared("DELETE FROM audit_log WHERE at < now() + interval '1 minute'")
        .await
        .expect("pruning deletes");
}

async fn one_value(db: &TestDb, sql: &str) -> Option<String> {
    db.conn()
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .expect(sql)
        .and_then(|row| {
            row.try_get::<Option<String>>("", "v")
                .expect("a text column v")
        })
}

/// 016 moves agent keys into `api_keys` (valid for 90 days) and drops the old columns; its
/// down puts each owner's newest valid key back.
#[tokio::test]
async fn keys_move_into_api_keys_and_back() {
    let db = TestDb::empty().await;
    let before_016 = Migrator::migrations()
        .iter()
        .position(|m| m.name() == "m20261129_000016_api_keys")
        .map(|n| u32::try_from(n).unwrap())
        .expect("016 is listed");
    Migrator::up(db.conn(), Some(before_016))
        .await
        .expect("up to 015");
    db.conn()
        .execute_unprepared(
            r#"
INSERT INTO agents (id, name, cluster_name, pak_prefix, pak_hash)
    VALUES ('00000000-0000-7000-8000-000000000003', 'edge', 'eu', 'live1', 'hash-live');
INSERT INTO agents (id, name, cluster_name, pak_prefix, pak_hash, deleted_at)
    VALUES ('00000000-0000-7000-8000-000000000004', 'edge', 'eu', 'gone1', 'hash-gone', now());
INSERT INTO generators (id, name, api_key_hash)
    VALUES ('00000000-0000-7000-8000-000000000001', 'ns/gen', 'hash-gen');
"#,
        )
        .await
        .expect("rows with keys");
    Migrator::up(db.conn(), Some(1)).await.expect("016 up");

    let moved = one_value(
        &db,
        "SELECT string_agg(prefix || ':' || key_hash || ':' || scopes, ',' ORDER BY prefix) AS v \
         FROM api_keys WHERE expires_at BETWEEN now() + interval '89 days' AND now() + interval '91 days'",
    )
    .await;
    assert_eq!(
        moved.as_deref(),
        Some("gone1:hash-gone:agent,live1:hash-live:agent"),
        "agent keys move with a 90-day expiry; generator keys had no prefix and are reissued"
    );
    assert_eq!(
        one_value(
            &db,
            "SELECT string_agg(column_name::text, ',') AS v FROM information_schema.columns \
             WHERE column_name IN ('pak_prefix', 'pak_hash', 'api_key_hash')"
        )
        .await,
        None,
        "the old key columns are gone"
    );
    // A rotation: the old key is valid for an hour more, the new one is the newest. And a
    // generator key, and a key revoked already.
    db.conn()
        .execute_unprepared(
            r#"
UPDATE api_keys SET revoked_at = now() + interval '1 hour' WHERE prefix = 'live1';
INSERT INTO api_keys (id, agent_id, prefix, key_hash, scopes, expires_at, created_at) VALUES
    (gen_random_uuid(), '00000000-0000-7000-8000-000000000003', 'live2', 'hash-live2', 'agent',
     now() + interval '90 days', now() + interval '1 second');
INSERT INTO api_keys (id, generator_id, prefix, key_hash, scopes, expires_at, revoked_at) VALUES
    (gen_random_uuid(), '00000000-0000-7000-8000-000000000001', 'gen0', 'hash-gen0', 'generator',
     now() + interval '90 days', now() - interval '1 minute'),
    (gen_random_uuid(), '00000000-0000-7000-8000-000000000001', 'gen1', 'hash-gen1', 'generator',
     now() + interval '90 days', NULL);
"#,
        )
        .await
        .expect("more keys");
    let refused = db
        .conn()
        .execute_unprepared(
            "INSERT INTO api_keys (id, agent_id, prefix, key_hash, scopes, expires_at) VALUES \
             (gen_random_uuid(), '00000000-0000-7000-8000-000000000003', 'x', 'h', 'admin', now())",
        )
        .await;
    assert!(refused.is_err(), "unknown scopes are refused");

    Migrator::down(db.conn(), Some(1)).await.expect("016 down");
    assert_eq!(
        one_value(
            &db,
            "SELECT pak_prefix || ':' || pak_hash AS v FROM agents \
             WHERE id = '00000000-0000-7000-8000-000000000003'"
        )
        .await
        .as_deref(),
        Some("live2:hash-live2")
    );
    assert_eq!(
        one_value(&db, "SELECT api_key_hash AS v FROM generators")
            .await
            .as_deref(),
        Some("hash-gen1")
    );
    assert!(!tables(&db).await.contains(&"api_keys".to_owned()));
    Migrator::up(db.conn(), Some(1))
        .await
        .expect("016 up again");
}

/// 020 lets an agent be `Error` with a reason and a start time; its down maps `Error` back
/// to `Online` (heartbeats arrive) and drops both columns.
#[tokio::test]
async fn agents_may_be_in_error_with_a_reason_and_back() {
    let db = TestDb::empty().await;
    let before_020 = Migrator::migrations()
        .iter()
        .position(|m| m.name() == "m20261130_000020_agent_state")
        .map(|n| u32::try_from(n).unwrap())
        .expect("020 is listed");
    Migrator::up(db.conn(), Some(before_020))
        .await
        .expect("up to 019");
    db.conn()
        .execute_unprepared(
            "INSERT INTO agents (id, name, cluster_name, status, last_heartbeat) \
             VALUES ('00000000-0000-7000-8000-000000000003', 'edge', 'eu', 'Online', now())",
        )
        .await
        .expect("an online agent");
    Migrator::up(db.conn(), Some(1)).await.expect("020 up");
    db.conn()
        .execute_unprepared(
            "UPDATE agents SET status = 'Error', state_message = 'spoke API server unreachable', \
             state_since = now()",
        )
        .await
        .expect("an agent in Error");
    assert_eq!(
        one_value(
            &db,
            "SELECT status || ': ' || state_message AS v FROM agents"
        )
        .await
        .as_deref(),
        Some("Error: spoke API server unreachable")
    );

    Migrator::down(db.conn(), Some(1)).await.expect("020 down");
    assert_eq!(
        one_value(&db, "SELECT status AS v FROM agents")
            .await
            .as_deref(),
        Some("Online")
    );
    assert_eq!(
        one_value(
            &db,
            "SELECT string_agg(column_name::text, ',') AS v FROM information_schema.columns \
             WHERE table_name = 'agents' AND column_name IN ('state_message', 'state_since')"
        )
        .await,
        None,
        "the columns are gone"
    );
    Migrator::up(db.conn(), Some(1))
        .await
        .expect("020 up again");
}
