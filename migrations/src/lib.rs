//! Brokkr's PostgreSQL schema: the ten tables of the seed data design, their triggers
//! and indexes, as `sea-orm-migration` migrations with working `down`s.
//!
//! The schema is plain SQL (in `sql/`) because most of it is triggers and partial
//! indexes, which read best as the SQL PostgreSQL runs.

pub use sea_orm_migration::prelude::*;

macro_rules! sql_migration {
    ($ty:ident, $name:literal, $file:literal) => {
        struct $ty;

        impl MigrationName for $ty {
            fn name(&self) -> &str {
                $name
            }
        }

        #[sea_orm_migration::async_trait::async_trait]
        impl MigrationTrait for $ty {
            async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
                let sql = include_str!(concat!("sql/", $file, "_up.sql"));
                manager.get_connection().execute_unprepared(sql).await?;
                Ok(())
            }

            async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
                let sql = include_str!(concat!("sql/", $file, "_down.sql"));
                manager.get_connection().execute_unprepared(sql).await?;
                Ok(())
            }
        }
    };
}

sql_migration!(Common, "m20261122_000001_common", "001_common");
sql_migration!(Generators, "m20261122_000002_generators", "002_generators");
sql_migration!(Agents, "m20261122_000003_agents", "003_agents");
sql_migration!(Stacks, "m20261122_000004_stacks", "004_stacks");
sql_migration!(
    DeploymentObjects,
    "m20261122_000005_deployment_objects",
    "005_deployment_objects"
);
sql_migration!(
    AgentEvents,
    "m20261122_000006_agent_events",
    "006_agent_events"
);
sql_migration!(
    AgentTargets,
    "m20261122_000007_agent_targets",
    "007_agent_targets"
);
sql_migration!(
    LabelsAnnotations,
    "m20261122_000008_labels_annotations",
    "008_labels_annotations"
);

sql_migration!(
    Notifications,
    "m20261122_000009_notifications",
    "009_notifications"
);

sql_migration!(
    AgentKeyIndex,
    "m20261122_000010_agent_key_index",
    "010_agent_key_index"
);

sql_migration!(
    AgentAccessNotifications,
    "m20261122_000011_agent_access_notifications",
    "011_agent_access_notifications"
);

sql_migration!(
    DeletionMarkerPolicy,
    "m20261129_000012_deletion_marker_policy",
    "012_deletion_marker_policy"
);

sql_migration!(
    RemovalReportNotifications,
    "m20261129_000013_removal_report_notifications",
    "013_removal_report_notifications"
);

sql_migration!(
    StatusNotificationsByUid,
    "m20261129_000014_status_notifications_by_uid",
    "014_status_notifications_by_uid"
);

sql_migration!(AuditLog, "m20261129_000015_audit_log", "015_audit_log");

sql_migration!(ApiKeys, "m20261129_000016_api_keys", "016_api_keys");

sql_migration!(
    GeneratorAccessNotifications,
    "m20261130_000017_generator_access_notifications",
    "017_generator_access_notifications"
);

sql_migration!(
    RevisionLineage,
    "m20261130_000018_revision_lineage",
    "018_revision_lineage"
);

sql_migration!(Rollouts, "m20261130_000019_rollouts", "019_rollouts");
sql_migration!(
    AgentState,
    "m20261130_000020_agent_state",
    "020_agent_state"
);

sql_migration!(Alerts, "m20261130_000021_alerts", "021_alerts");

/// All of Brokkr's migrations, oldest first.
pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(Common),
            Box::new(Generators),
            Box::new(Agents),
            Box::new(Stacks),
            Box::new(DeploymentObjects),
            Box::new(AgentEvents),
            Box::new(AgentTargets),
            Box::new(LabelsAnnotations),
            Box::new(Notifications),
            Box::new(AgentKeyIndex),
            Box::new(AgentAccessNotifications),
            Box::new(DeletionMarkerPolicy),
            Box::new(RemovalReportNotifications),
            Box::new(StatusNotificationsByUid),
            Box::new(AuditLog),
            Box::new(ApiKeys),
            Box::new(GeneratorAccessNotifications),
            Box::new(RevisionLineage),
            Box::new(Rollouts),
            Box::new(AgentState),
            Box::new(Alerts),
        ]
    }
}

/// Key of the PostgreSQL advisory lock held while migrating, so that several hub
/// replicas starting together never race ("brokkr" in ASCII).
pub const MIGRATION_LOCK_KEY: i64 = 0x6272_6f6b_6b72;

/// Applies every pending migration while holding [`MIGRATION_LOCK_KEY`], so that
/// replicas starting together run them one at a time: the first migrates, the others
/// wait and then find nothing pending. The lock is transaction-scoped, and PostgreSQL's
/// DDL is transactional, so a failed migration leaves nothing half-applied.
pub async fn migrate_with_lock(db: &sea_orm::DatabaseConnection) -> Result<(), DbErr> {
    use sea_orm::{ConnectionTrait, Statement, TransactionTrait};
    let txn = db.begin().await?;
    txn.execute_raw(Statement::from_sql_and_values(
        txn.get_database_backend(),
        "SELECT pg_advisory_xact_lock($1)",
        [MIGRATION_LOCK_KEY.into()],
    ))
    .await?;
    Migrator::up(&txn, None).await?;
    txn.commit().await
}
