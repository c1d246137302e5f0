//! The audit log: who changed desired state, targeting, keys and access, and what the hub
//! refused. Rows are append-only (the schema refuses updates) and pruned after the
//! retention period by [`Store::prune_audit`]. Details hold ids, names, prefixes, counts
//! and checksums — never a key or manifest content.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, FromQueryResult};
use serde::Serialize;
use uuid::Uuid;

use super::{Store, StoreResult, check_len, limits, statement};

/// What happened. PascalCase, as Kubernetes event reasons.
pub mod actions {
    /// A Stack's content was recorded as a new deployment object.
    pub const DEPLOYMENT_RECORDED: &str = "DeploymentObjectRecorded";
    /// A Stack was deleted: its deletion marker now goes to its agents.
    pub const STACK_DELETED: &str = "StackDeleted";
    /// Every targeted agent reported removing a deleted Stack.
    pub const STACK_REMOVAL_REPORTED: &str = "StackRemovalReported";
    /// A deleted Stack was released after the deletion timeout without every report.
    pub const STACK_DELETION_TIMED_OUT: &str = "StackDeletionTimedOut";
    /// `spec.pinnedRevision` now holds every agent of a Stack at a revision.
    pub const REVISION_PINNED: &str = "RevisionPinned";
    /// The pin was removed: the newest revision is delivered again.
    pub const REVISION_UNPINNED: &str = "RevisionUnpinned";
    /// Agents were added to or removed from a Stack's target set.
    pub const TARGETS_CHANGED: &str = "TargetsChanged";
    /// An AgentTarget selected Agents that do not accept targets from its namespace.
    pub const TARGETING_REFUSED: &str = "TargetingRefused";
    /// An Agent was suspended (`spec.suspend: true`).
    pub const AGENT_SUSPENDED: &str = "AgentSuspended";
    /// An Agent was resumed.
    pub const AGENT_RESUMED: &str = "AgentResumed";
    /// A key was issued (first key, or a replacement for a lost Secret).
    pub const KEY_ISSUED: &str = "KeyIssued";
    /// A key holder renewed its key.
    pub const KEY_ROTATED: &str = "KeyRotated";
    /// A key passed its expiry before it was rotated.
    pub const KEY_EXPIRED: &str = "KeyExpired";
    /// A key was revoked.
    pub const KEY_REVOKED: &str = "KeyRevoked";
    /// A key authenticated a request for the first time.
    pub const KEY_FIRST_USED: &str = "KeyFirstUsed";
    /// Requests failed authentication (aggregated per key prefix and source per minute).
    pub const AUTHENTICATION_FAILED: &str = "AuthenticationFailed";
}

/// The actor of what the operator does on its own (deletion outcomes, target expansion).
pub const OPERATOR_ACTOR: &str = brokkr_crds::OPERATOR_FIELD_MANAGER;

/// Most ids or names listed in one entry's details; the rest is counted.
pub const MAX_LISTED: usize = 50;

/// What an action was done to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditResource {
    /// `Stack`, `Agent`, `AgentTarget`, `Generator`, or `Key` for unattributed keys.
    pub kind: &'static str,
    pub namespace: Option<String>,
    pub name: String,
    /// The resource's row id in this database, when it has one.
    pub id: Option<Uuid>,
}

/// One row to record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditEntry {
    pub actor: String,
    pub action: &'static str,
    pub resource: AuditResource,
    pub details: serde_json::Value,
}

/// One recorded row.
#[derive(Clone, Debug, PartialEq, Serialize, FromQueryResult)]
pub struct AuditRecord {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub resource_kind: String,
    pub resource_namespace: Option<String>,
    pub resource_name: String,
    pub resource_id: Option<Uuid>,
    pub details: serde_json::Value,
}

/// Which rows [`Store::audit_entries`] returns, oldest first.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub since: Option<DateTime<Utc>>,
    /// Kind, case-insensitive (`stack`, `Stack`).
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The newest this many rows that match; `None`: every row.
    pub limit: Option<u64>,
}

/// `values` as a JSON list of at most [`MAX_LISTED`] items, and how many there were.
pub fn bounded_list<T: Serialize>(values: &[T]) -> serde_json::Value {
    serde_json::json!({
        "count": values.len(),
        "items": values.iter().take(MAX_LISTED).collect::<Vec<_>>(),
    })
}

const INSERT: &str = r#"
INSERT INTO audit_log (actor, action, resource_kind, resource_namespace, resource_name, resource_id, details)
SELECT actor, action, kind, namespace, name, id, details
FROM jsonb_to_recordset($1::jsonb)
    AS x(actor text, action text, kind text, namespace text, name text, id uuid, details jsonb)
"#;

/// Records `entries` on `conn`: inside a store transaction, they commit or roll back with
/// the change they describe.
pub(crate) async fn insert<C: ConnectionTrait>(
    conn: &C,
    entries: &[AuditEntry],
) -> StoreResult<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut rows = Vec::with_capacity(entries.len());
    for entry in entries {
        check_len("audit actor", &entry.actor, limits::NAME)?;
        check_len("audit resource name", &entry.resource.name, limits::NAME)?;
        rows.push(serde_json::json!({
            "actor": entry.actor,
            "action": entry.action,
            "kind": entry.resource.kind,
            "namespace": entry.resource.namespace,
            "name": entry.resource.name,
            "id": entry.resource.id,
            "details": entry.details,
        }));
    }
    conn.execute_raw(statement(INSERT, [serde_json::Value::Array(rows).into()]))
        .await?;
    Ok(())
}

impl Store {
    /// Records `entries` in one statement.
    pub async fn record_audit(&self, entries: &[AuditEntry]) -> StoreResult<()> {
        insert(&self.db, entries).await
    }

    /// The rows matching `query`, oldest first.
    pub async fn audit_entries(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
        const SELECT: &str = r#"
SELECT * FROM (
    SELECT id, at, actor, action, resource_kind, resource_namespace, resource_name,
           resource_id, details
    FROM audit_log
    WHERE ($1::timestamptz IS NULL OR at >= $1)
      AND ($2::text IS NULL OR lower(resource_kind) = lower($2))
      AND ($3::text IS NULL OR resource_namespace = $3)
      AND ($4::text IS NULL OR resource_name = $4)
    ORDER BY id DESC
    LIMIT $5
) newest
ORDER BY id
"#;
        let limit = query.limit.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        let rows = AuditRecord::find_by_statement(statement(
            SELECT,
            [
                query.since.into(),
                query.kind.clone().into(),
                query.namespace.clone().into(),
                query.name.clone().into(),
                limit.into(),
            ],
        ))
        .all(&self.db)
        .await?;
        Ok(rows)
    }

    /// Deletes up to `batch` rows recorded before `before`, oldest first; returns how many.
    /// Small batches keep each transaction short next to the hub's own writes.
    pub async fn prune_audit(&self, before: DateTime<Utc>, batch: u64) -> StoreResult<u64> {
        const PRUNE: &str = r#"
DELETE FROM audit_log
WHERE id IN (SELECT id FROM audit_log WHERE at < $1 ORDER BY id LIMIT $2)
"#;
        let batch = i64::try_from(batch).unwrap_or(i64::MAX);
        let result = self
            .db
            .execute_raw(statement(PRUNE, [before.into(), batch.into()]))
            .await?;
        Ok(result.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_bounded_and_counted() {
        let ids: Vec<u32> = (0..120).collect();
        let listed = bounded_list(&ids);
        assert_eq!(listed["count"], 120);
        assert_eq!(listed["items"].as_array().unwrap().len(), MAX_LISTED);
    }
}
