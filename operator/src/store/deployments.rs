use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter};
use uuid::Uuid;

use super::{Store, StoreResult, statement};
use crate::entity::deployment_objects;

/// What one agent should hold for one stack.
#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult)]
pub struct DesiredEntry {
    pub stack_id: Uuid,
    pub stack_name: String,
    pub deployment_object_id: Uuid,
    pub sequence_id: i64,
    pub yaml_checksum: String,
    pub is_deletion_marker: bool,
}

/// The desired state of one agent: per targeted live stack its newest live deployment
/// object, plus the deletion markers of deleted stacks written after the caller's cursor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Ordered by stack id.
    pub entries: Vec<DesiredEntry>,
    /// The highest sequence among `entries` (or the caller's cursor, if higher).
    pub max_sequence: i64,
}

/// One index probe per target (`deployment_objects_stack_latest_live_idx`), so the cost
/// grows with the agent's targets, never with history.
const DESIRED_FOR_AGENT: &str = r#"
SELECT t.stack_id, s.name AS stack_name, d.id AS deployment_object_id, d.sequence_id,
       d.yaml_checksum, d.is_deletion_marker
FROM agent_targets t
JOIN stacks s ON s.id = t.stack_id
CROSS JOIN LATERAL (
    SELECT id, sequence_id, yaml_checksum, is_deletion_marker
    FROM deployment_objects
    WHERE stack_id = t.stack_id AND deleted_at IS NULL
    ORDER BY sequence_id DESC
    LIMIT 1
) d
WHERE t.agent_id = $1
  AND (s.deleted_at IS NULL OR (d.is_deletion_marker AND d.sequence_id > $2))
ORDER BY t.stack_id
"#;

impl Store {
    /// What `agent_id` should hold now. `deletions_after` is the agent's cursor:
    /// deletion markers at or below it were already delivered and are left out.
    pub async fn desired_for_agent(
        &self,
        agent_id: Uuid,
        deletions_after: i64,
    ) -> StoreResult<DesiredState> {
        let entries = DesiredEntry::find_by_statement(statement(
            DESIRED_FOR_AGENT,
            [agent_id.into(), deletions_after.into()],
        ))
        .all(&self.db)
        .await?;
        let max_sequence = entries
            .iter()
            .map(|e| e.sequence_id)
            .fold(deletions_after, i64::max);
        Ok(DesiredState {
            entries,
            max_sequence,
        })
    }

    /// A deployment object, only if it belongs to a stack targeted at `agent_id`.
    pub async fn deployment_object_for_agent(
        &self,
        agent_id: Uuid,
        deployment_object_id: Uuid,
    ) -> StoreResult<Option<deployment_objects::Model>> {
        Ok(deployment_objects::Entity::find_by_id(deployment_object_id)
            .filter(
                deployment_objects::Column::StackId.in_subquery(
                    sea_orm::sea_query::Query::select()
                        .column(crate::entity::agent_targets::Column::StackId)
                        .from(crate::entity::agent_targets::Entity)
                        .and_where(crate::entity::agent_targets::Column::AgentId.eq(agent_id))
                        .to_owned(),
                ),
            )
            .one(&self.db)
            .await?)
    }

    /// Explains the desired-state query's plan for `agent_id` (EXPLAIN ANALYZE), for
    /// benchmarks and the closing notes of performance work.
    pub async fn explain_desired_for_agent(&self, agent_id: Uuid) -> StoreResult<String> {
        let rows = self
            .db
            .query_all_raw(statement(
                &format!("EXPLAIN (ANALYZE, BUFFERS) {DESIRED_FOR_AGENT}"),
                [agent_id.into(), 0i64.into()],
            ))
            .await?;
        let mut plan = String::new();
        for row in rows {
            let line: String = row.try_get_by_index(0)?;
            plan.push_str(&line);
            plan.push('\n');
        }
        Ok(plan)
    }
}
