use std::collections::{HashMap, HashSet};

use sea_orm::{ColumnTrait, EntityTrait, FromQueryResult, QueryFilter};
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
    /// The stack is deleted: the entry is its deletion marker, held in the agent's set
    /// until the agent reports the removal (a `Delete` `Success` event for the marker).
    pub stack_deleted: bool,
    /// Grows with every change of what the stack serves this agent (a new revision, a pin,
    /// an assignment), even when the served sequence goes down (a pin to an older one).
    pub stamp: i64,
}

/// The desired state of one agent as the database holds it (the API sends it as
/// `wire::DesiredState`): per targeted live stack its newest live deployment
/// object, plus the deletion markers of deleted stacks whose removal the agent has not
/// reported yet. Deletion is state, not an edge: an agent that was busy, offline or
/// restarted when the stack was deleted still finds the marker in its set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredRows {
    /// Ordered by stack id.
    pub entries: Vec<DesiredEntry>,
    /// The highest sequence among `entries` (or the caller's cursor, if higher).
    pub max_sequence: i64,
}

/// The newest live deployment object of stack `s`: one probe of
/// `deployment_objects_stack_latest_live_idx`, whatever the history's length.
macro_rules! latest_live_object_of_s {
    () => {
        r#"LATERAL (
    SELECT id, sequence_id, yaml_checksum, is_deletion_marker
    FROM deployment_objects
    WHERE stack_id = s.id AND deleted_at IS NULL
    ORDER BY sequence_id DESC
    LIMIT 1
) d"#
    };
}

/// The deployment object of live stack `s` whose id is `$id` (SQL), as a branch of a
/// `UNION ALL`. Probes by id leave `deleted_at` out (a live stack's objects are live): with
/// it, the planner may walk the stack's history in the partial index instead of probing
/// the key.
macro_rules! object_of_live_s_by_id {
    ($id:literal) => {
        concat!(
            "(SELECT id, sequence_id, yaml_checksum, is_deletion_marker FROM deployment_objects\n",
            "     WHERE id = ",
            $id,
            " AND s.deleted_at IS NULL)"
        )
    };
}

/// The newest live deployment object of stack `s` when `$when` (SQL) holds, as a branch of
/// a `UNION ALL`: one probe of `deployment_objects_stack_latest_live_idx`.
macro_rules! newest_object_of_s_when {
    ($when:literal) => {
        concat!(
            "(SELECT id, sequence_id, yaml_checksum, is_deletion_marker FROM deployment_objects\n",
            "     WHERE stack_id = s.id AND deleted_at IS NULL AND ",
            $when,
            "\n     ORDER BY sequence_id DESC\n     LIMIT 1)"
        )
    };
}

/// What live stack `s` serves every agent unless it rolls out progressively: its pinned
/// revision, else its newest live deployment object (a deleted stack: its deletion
/// marker). At most two index probes; the first branch that yields a row ends the scan.
macro_rules! head_of_s {
    () => {
        concat!(
            "LATERAL (\n    ",
            object_of_live_s_by_id!("s.pinned_object_id"),
            "\n    UNION ALL\n    ",
            newest_object_of_s_when!("TRUE"),
            "\n    LIMIT 1\n) d"
        )
    };
}

/// What stack `s` serves agent `t.agent_id`, whose assignment (for a progressive stack)
/// is `ra`: the pinned revision, else the assigned one, else (unless the stack rolls out
/// progressively) the newest; a deleted stack serves its deletion marker. Index probes
/// only, whatever the history's length.
macro_rules! served_object_of_s {
    () => {
        concat!(
            "LATERAL (\n    ",
            object_of_live_s_by_id!("s.pinned_object_id"),
            "\n    UNION ALL\n    ",
            object_of_live_s_by_id!("ra.deployment_object_id"),
            "\n    UNION ALL\n    ",
            newest_object_of_s_when!("NOT (s.progressive AND s.deleted_at IS NULL)"),
            "\n    LIMIT 1\n) d"
        )
    };
}

/// Whether agent `t.agent_id` reported removing the stack whose deletion marker is `d`.
macro_rules! removal_reported_by_t {
    () => {
        r#"EXISTS (
    SELECT 1 FROM agent_events e
    WHERE e.deployment_object_id = d.id AND e.agent_id = t.agent_id
      AND e.event_type = 'Delete' AND e.status = 'Success' AND e.deleted_at IS NULL
)"#
    };
}

/// The desired-state rows of the agents `t.agent_id` matches by `$agents` (SQL). One probe
/// per target, so the cost grows with the agents' targets, never with history.
macro_rules! desired_rows {
    ($agents:literal) => {
        concat!(
            r#"
SELECT t.agent_id, t.stack_id, s.name AS stack_name, d.id AS deployment_object_id,
       d.sequence_id, d.yaml_checksum, d.is_deletion_marker,
       s.deleted_at IS NOT NULL AS stack_deleted,
       GREATEST(d.sequence_id, s.serving_stamp, COALESCE(ra.serving_stamp, 0)) AS stamp
FROM agent_targets t
JOIN stacks s ON s.id = t.stack_id
LEFT JOIN rollout_assignments ra
    ON ra.agent_id = t.agent_id AND ra.stack_id = t.stack_id AND s.progressive
CROSS JOIN "#,
            served_object_of_s!(),
            "\nWHERE ",
            $agents,
            r#"
  AND (s.deleted_at IS NULL OR (d.is_deletion_marker AND NOT "#,
            removal_reported_by_t!(),
            r#"))
ORDER BY t.agent_id, t.stack_id
"#
        )
    };
}

const DESIRED_FOR_AGENT: &str = desired_rows!("t.agent_id = $1");

/// [`DESIRED_FOR_AGENT`] for a list of agents (first lookups in batches, and the periodic
/// re-validation of cached views).
const DESIRED_FOR_AGENTS: &str =
    desired_rows!("t.agent_id IN (SELECT jsonb_array_elements_text($1::jsonb)::uuid)");

#[derive(FromQueryResult)]
struct AgentDesiredRow {
    agent_id: Uuid,
    stack_id: Uuid,
    stack_name: String,
    deployment_object_id: Uuid,
    sequence_id: i64,
    yaml_checksum: String,
    is_deletion_marker: bool,
    stack_deleted: bool,
    stamp: i64,
}

/// A stack's newest live deployment object, and who it is for: what a change
/// notification about the stack means for every agent's desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackHead {
    pub stack_id: Uuid,
    pub stack_name: String,
    pub stack_deleted: bool,
    /// What the stack serves every targeted agent (its pinned or newest revision, or its
    /// deletion marker); `None` when it has no live deployment object.
    pub head: Option<HeadObject>,
    /// Grows with every change of `head` (see [`DesiredEntry::stamp`]).
    pub stamp: i64,
    /// For a stack rolling out progressively (live, not pinned): what each agent is
    /// assigned, which replaces `head`; an agent absent from it is served nothing yet.
    pub assigned: Option<HashMap<Uuid, HeadObject>>,
    /// The agents the stack is targeted at.
    pub agents: HashSet<Uuid>,
    /// Of `agents`, those that reported removing the deleted stack (a `Delete` `Success`
    /// event for its deletion marker): the marker has left their desired state.
    pub removal_reported: HashSet<Uuid>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadObject {
    pub deployment_object_id: Uuid,
    pub sequence_id: i64,
    pub yaml_checksum: String,
    pub is_deletion_marker: bool,
    /// See [`DesiredEntry::stamp`].
    pub stamp: i64,
}

#[derive(FromQueryResult)]
struct HeadRow {
    stack_id: Uuid,
    stack_name: String,
    stack_deleted: bool,
    per_agent: bool,
    stamp: i64,
    deployment_object_id: Option<Uuid>,
    sequence_id: Option<i64>,
    yaml_checksum: Option<String>,
    is_deletion_marker: Option<bool>,
}

#[derive(FromQueryResult)]
struct AssignmentRow {
    stack_id: Uuid,
    agent_id: Uuid,
    deployment_object_id: Uuid,
    sequence_id: i64,
    yaml_checksum: String,
    is_deletion_marker: bool,
    stamp: i64,
}

#[derive(FromQueryResult)]
struct TargetRow {
    stack_id: Uuid,
    agent_id: Uuid,
}

/// The same per-stack probes as [`DESIRED_FOR_AGENT`], for a list of stacks.
const STACK_HEADS: &str = concat!(
    r#"
SELECT s.id AS stack_id, s.name AS stack_name, s.deleted_at IS NOT NULL AS stack_deleted,
       (s.progressive AND s.deleted_at IS NULL AND s.pinned_object_id IS NULL) AS per_agent,
       GREATEST(COALESCE(d.sequence_id, 0), s.serving_stamp) AS stamp,
       d.id AS deployment_object_id, d.sequence_id, d.yaml_checksum, d.is_deletion_marker
FROM stacks s
LEFT JOIN "#,
    head_of_s!(),
    r#" ON TRUE
WHERE s.id IN (SELECT jsonb_array_elements_text($1::jsonb)::uuid)
"#
);

/// What each agent is assigned, for a list of stacks rolling out progressively.
const STACK_ASSIGNMENTS: &str = r#"
SELECT ra.stack_id, ra.agent_id, d.id AS deployment_object_id, d.sequence_id,
       d.yaml_checksum, d.is_deletion_marker,
       GREATEST(d.sequence_id, s.serving_stamp, ra.serving_stamp) AS stamp
FROM rollout_assignments ra
JOIN stacks s ON s.id = ra.stack_id
JOIN deployment_objects d ON d.id = ra.deployment_object_id AND d.deleted_at IS NULL
WHERE ra.stack_id IN (SELECT jsonb_array_elements_text($1::jsonb)::uuid)
"#;

const STACK_TARGETS: &str = "SELECT stack_id, agent_id FROM agent_targets \
     WHERE stack_id IN (SELECT jsonb_array_elements_text($1::jsonb)::uuid)";

/// The targeted agents that reported removing a deleted stack, for a list of stacks.
const REMOVALS_REPORTED: &str = concat!(
    r#"
SELECT t.stack_id, t.agent_id
FROM agent_targets t
JOIN stacks s ON s.id = t.stack_id AND s.deleted_at IS NOT NULL
CROSS JOIN "#,
    latest_live_object_of_s!(),
    r#"
WHERE t.stack_id IN (SELECT jsonb_array_elements_text($1::jsonb)::uuid)
  AND d.is_deletion_marker AND "#,
    removal_reported_by_t!(),
    "\n"
);

impl Store {
    /// The heads of `stack_ids` and their targets. Stacks that no longer exist come
    /// back without a head or agents.
    pub async fn stack_heads(&self, stack_ids: &[Uuid]) -> StoreResult<Vec<StackHead>> {
        let ids = || [sea_orm::Value::from(serde_json::json!(stack_ids))];
        let rows = HeadRow::find_by_statement(statement(STACK_HEADS, ids()))
            .all(&self.db)
            .await?;
        let targets = TargetRow::find_by_statement(statement(STACK_TARGETS, ids()))
            .all(&self.db)
            .await?;
        let deleted: Vec<Uuid> = rows
            .iter()
            .filter(|row| row.stack_deleted && row.is_deletion_marker == Some(true))
            .map(|row| row.stack_id)
            .collect();
        let progressive: Vec<Uuid> = rows
            .iter()
            .filter(|row| row.per_agent)
            .map(|row| row.stack_id)
            .collect();
        let assignments = if progressive.is_empty() {
            Vec::new()
        } else {
            AssignmentRow::find_by_statement(statement(
                STACK_ASSIGNMENTS,
                [sea_orm::Value::from(serde_json::json!(progressive))],
            ))
            .all(&self.db)
            .await?
        };
        let removals = if deleted.is_empty() {
            Vec::new()
        } else {
            TargetRow::find_by_statement(statement(
                REMOVALS_REPORTED,
                [sea_orm::Value::from(serde_json::json!(deleted))],
            ))
            .all(&self.db)
            .await?
        };
        let mut heads: HashMap<Uuid, StackHead> = rows
            .into_iter()
            .map(|row| {
                let head = match (
                    row.deployment_object_id,
                    row.sequence_id,
                    row.yaml_checksum,
                    row.is_deletion_marker,
                ) {
                    (Some(id), Some(sequence_id), Some(yaml_checksum), Some(deletion)) => {
                        Some(HeadObject {
                            deployment_object_id: id,
                            sequence_id,
                            yaml_checksum,
                            is_deletion_marker: deletion,
                            stamp: row.stamp,
                        })
                    }
                    _ => None,
                };
                let stack = StackHead {
                    stack_id: row.stack_id,
                    stack_name: row.stack_name,
                    stack_deleted: row.stack_deleted,
                    head,
                    stamp: row.stamp,
                    assigned: row.per_agent.then(HashMap::new),
                    agents: HashSet::new(),
                    removal_reported: HashSet::new(),
                };
                (row.stack_id, stack)
            })
            .collect();
        for target in targets {
            if let Some(head) = heads.get_mut(&target.stack_id) {
                head.agents.insert(target.agent_id);
            }
        }
        for assignment in assignments {
            if let Some(assigned) = heads
                .get_mut(&assignment.stack_id)
                .and_then(|head| head.assigned.as_mut())
            {
                assigned.insert(
                    assignment.agent_id,
                    HeadObject {
                        deployment_object_id: assignment.deployment_object_id,
                        sequence_id: assignment.sequence_id,
                        yaml_checksum: assignment.yaml_checksum,
                        is_deletion_marker: assignment.is_deletion_marker,
                        stamp: assignment.stamp,
                    },
                );
            }
        }
        for removal in removals {
            if let Some(head) = heads.get_mut(&removal.stack_id) {
                head.removal_reported.insert(removal.agent_id);
            }
        }
        Ok(stack_ids
            .iter()
            .map(|id| {
                heads.remove(id).unwrap_or_else(|| StackHead {
                    stack_id: *id,
                    stack_name: String::new(),
                    stack_deleted: true,
                    head: None,
                    stamp: 0,
                    assigned: None,
                    agents: HashSet::new(),
                    removal_reported: HashSet::new(),
                })
            })
            .collect())
    }

    /// A deployment object by id, whoever it is for.
    pub async fn deployment_object(
        &self,
        deployment_object_id: Uuid,
    ) -> StoreResult<Option<deployment_objects::Model>> {
        Ok(deployment_objects::Entity::find_by_id(deployment_object_id)
            .one(&self.db)
            .await?)
    }

    /// Whether `stack_id` is targeted at `agent_id`.
    pub async fn is_targeted(&self, agent_id: Uuid, stack_id: Uuid) -> StoreResult<bool> {
        use crate::entity::agent_targets;
        Ok(agent_targets::Entity::find()
            .filter(agent_targets::Column::AgentId.eq(agent_id))
            .filter(agent_targets::Column::StackId.eq(stack_id))
            .one(&self.db)
            .await?
            .is_some())
    }

    /// What `agent_id` should hold now, whatever its cursor: a deleted stack's marker
    /// stays until the agent reports the removal. `since` (the agent's cursor) only
    /// floors `max_sequence`.
    pub async fn desired_for_agent(&self, agent_id: Uuid, since: i64) -> StoreResult<DesiredRows> {
        let entries =
            DesiredEntry::find_by_statement(statement(DESIRED_FOR_AGENT, [agent_id.into()]))
                .all(&self.db)
                .await?;
        let max_sequence = entries.iter().map(|e| e.sequence_id).fold(since, i64::max);
        Ok(DesiredRows {
            entries,
            max_sequence,
        })
    }

    /// What each of `agent_ids` should hold now (as [`Store::desired_for_agent`]), in one
    /// query. Agents without targets are absent from the map.
    pub async fn desired_for_agents(
        &self,
        agent_ids: &[Uuid],
    ) -> StoreResult<HashMap<Uuid, Vec<DesiredEntry>>> {
        let rows = AgentDesiredRow::find_by_statement(statement(
            DESIRED_FOR_AGENTS,
            [sea_orm::Value::from(serde_json::json!(agent_ids))],
        ))
        .all(&self.db)
        .await?;
        let mut desired: HashMap<Uuid, Vec<DesiredEntry>> = HashMap::new();
        for row in rows {
            desired.entry(row.agent_id).or_default().push(DesiredEntry {
                stack_id: row.stack_id,
                stack_name: row.stack_name,
                deployment_object_id: row.deployment_object_id,
                sequence_id: row.sequence_id,
                yaml_checksum: row.yaml_checksum,
                is_deletion_marker: row.is_deletion_marker,
                stack_deleted: row.stack_deleted,
                stamp: row.stamp,
            });
        }
        Ok(desired)
    }

    /// Explains the desired-state query's plan for `agent_id` (EXPLAIN ANALYZE), for
    /// benchmarks and the closing notes of performance work.
    #[cfg(any(test, feature = "testing"))]
    pub async fn explain_desired_for_agent(&self, agent_id: Uuid) -> StoreResult<String> {
        use sea_orm::ConnectionTrait;
        let rows = self
            .db
            .query_all_raw(statement(
                &format!("EXPLAIN (ANALYZE, BUFFERS) {DESIRED_FOR_AGENT}"),
                [agent_id.into()],
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
