use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sea_orm::{EntityTrait, FromQueryResult, Set, TransactionTrait};
use uuid::Uuid;

use super::{Store, StoreError, StoreResult, check_len, limits, statement};
use crate::entity::agent_events;

/// One event an agent reports. `id` is made by the agent, so a retried report is
/// recognised and stored once.
#[derive(Clone, Debug)]
pub struct EventReport {
    pub id: Uuid,
    pub deployment_object_id: Uuid,
    pub event_type: String,
    pub status: String,
    pub message: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordedEvents {
    pub inserted: u64,
    /// Events already stored by an earlier delivery of the same report.
    pub duplicates: u64,
}

/// An agent's latest event of one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSummary {
    pub event_type: String,
    pub status: String,
    pub message: Option<String>,
    pub at: DateTime<Utc>,
}

/// One targeted agent's view of a deployment object: its latest `Apply`/`Delete`
/// outcome, and its latest `Health` and `Drift` reports for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentStackStatus {
    pub agent_id: Uuid,
    pub agent_name: String,
    pub cluster_name: String,
    pub agent_status: String,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub outcome: Option<EventSummary>,
    pub health: Option<EventSummary>,
    pub drift: Option<EventSummary>,
    /// The agent's rollout assignment, while the stack rolls out progressively: the
    /// reports above are about it.
    pub assignment: Option<Assignment>,
}

/// The revision a progressive rollout assigned an agent, and since when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub deployment_object_id: Uuid,
    pub sequence_id: i64,
    /// Reports made before it are about an earlier assignment of the same revision (before
    /// a pin, say) and do not count.
    pub assigned_at: DateTime<Utc>,
    /// When its health timeout started (a resumed rollout restarts it).
    pub health_clock_at: DateTime<Utc>,
}

const TARGETED_OBJECTS: &str = r#"
SELECT d.id
FROM deployment_objects d
JOIN agent_targets t ON t.stack_id = d.stack_id AND t.agent_id = $1
WHERE d.id IN (SELECT jsonb_array_elements_text($2::jsonb)::uuid)
"#;

/// Each agent is judged on what it is served: its rollout assignment while the stack rolls
/// out progressively (`$2`, the stack's revision, until its wave is reached), else `$2`.
const STACK_STATUS: &str = r#"
SELECT a.id AS agent_id, a.name AS agent_name, a.cluster_name, a.status AS agent_status,
       a.last_heartbeat,
       ra.deployment_object_id AS assigned_object_id, ad.sequence_id AS assigned_sequence,
       ra.assigned_at, ra.health_clock_at,
       o.event_type AS outcome_type, o.status AS outcome_status,
       o.message AS outcome_message, o.created_at AS outcome_at,
       h.status AS health_status, h.message AS health_message, h.created_at AS health_at,
       r.status AS drift_status, r.message AS drift_message, r.created_at AS drift_at
FROM agent_targets t
JOIN agents a ON a.id = t.agent_id AND a.deleted_at IS NULL
JOIN stacks s ON s.id = t.stack_id
LEFT JOIN rollout_assignments ra
    ON ra.agent_id = t.agent_id AND ra.stack_id = t.stack_id
   AND s.progressive AND s.deleted_at IS NULL
LEFT JOIN deployment_objects ad ON ad.id = ra.deployment_object_id
CROSS JOIN LATERAL (SELECT COALESCE(ra.deployment_object_id, $2) AS object_id) x
LEFT JOIN LATERAL (
    SELECT event_type, status, message, created_at FROM agent_events
    WHERE deployment_object_id = x.object_id AND agent_id = t.agent_id AND deleted_at IS NULL
      AND event_type IN ('Apply', 'Delete')
    ORDER BY created_at DESC, id DESC
    LIMIT 1
) o ON TRUE
LEFT JOIN LATERAL (
    SELECT status, message, created_at FROM agent_events
    WHERE deployment_object_id = x.object_id AND agent_id = t.agent_id AND deleted_at IS NULL
      AND event_type = 'Health'
    ORDER BY created_at DESC, id DESC
    LIMIT 1
) h ON TRUE
LEFT JOIN LATERAL (
    SELECT status, message, created_at FROM agent_events
    WHERE deployment_object_id = x.object_id AND agent_id = t.agent_id AND deleted_at IS NULL
      AND event_type = 'Drift'
    ORDER BY created_at DESC, id DESC
    LIMIT 1
) r ON TRUE
WHERE t.stack_id = $1
ORDER BY a.name, a.cluster_name
"#;

#[derive(FromQueryResult)]
struct TargetedObject {
    id: Uuid,
}

#[derive(FromQueryResult)]
struct StackStatusRow {
    agent_id: Uuid,
    agent_name: String,
    cluster_name: String,
    agent_status: String,
    last_heartbeat: Option<DateTime<Utc>>,
    assigned_object_id: Option<Uuid>,
    assigned_sequence: Option<i64>,
    assigned_at: Option<DateTime<Utc>>,
    health_clock_at: Option<DateTime<Utc>>,
    outcome_type: Option<String>,
    outcome_status: Option<String>,
    outcome_message: Option<String>,
    outcome_at: Option<DateTime<Utc>>,
    health_status: Option<String>,
    health_message: Option<String>,
    health_at: Option<DateTime<Utc>>,
    drift_status: Option<String>,
    drift_message: Option<String>,
    drift_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Stores a batch of an agent's events in one transaction. Events whose id is
    /// already stored are skipped; events about deployment objects not targeted at the
    /// agent refuse the whole batch.
    pub async fn record_agent_events(
        &self,
        agent_id: Uuid,
        events: &[EventReport],
    ) -> StoreResult<RecordedEvents> {
        for event in events {
            check_len("event type", &event.event_type, limits::EVENT_TYPE)?;
            check_len("event status", &event.status, limits::EVENT_STATUS)?;
            if let Some(message) = &event.message {
                check_len("event message", message, limits::EVENT_MESSAGE)?;
            }
        }
        if events.is_empty() {
            return Ok(RecordedEvents::default());
        }
        let referenced: BTreeSet<Uuid> = events.iter().map(|e| e.deployment_object_id).collect();
        let txn = self.db.begin().await?;
        let targeted: BTreeSet<Uuid> = TargetedObject::find_by_statement(statement(
            TARGETED_OBJECTS,
            [agent_id.into(), serde_json::json!(referenced).into()],
        ))
        .all(&txn)
        .await?
        .into_iter()
        .map(|row| row.id)
        .collect();
        let foreign: Vec<Uuid> = referenced.difference(&targeted).copied().collect();
        if !foreign.is_empty() {
            return Err(StoreError::NotTargeted {
                deployment_object_ids: foreign,
            });
        }
        let inserted = agent_events::Entity::insert_many(events.iter().map(|event| {
            agent_events::ActiveModel {
                id: Set(event.id),
                agent_id: Set(agent_id),
                deployment_object_id: Set(event.deployment_object_id),
                event_type: Set(event.event_type.clone()),
                status: Set(event.status.clone()),
                message: Set(event.message.clone()),
                ..Default::default()
            }
        }))
        .on_conflict_do_nothing_on([agent_events::Column::Id])
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await?;
        let inserted = match inserted {
            sea_orm::TryInsertResult::Inserted(rows) => rows,
            _ => 0,
        };
        Ok(RecordedEvents {
            inserted,
            duplicates: events.len() as u64 - inserted,
        })
    }

    /// Per agent targeted at the stack, its latest outcome and health for
    /// `deployment_object_id` (the stack's current deployment object, or its
    /// deletion marker).
    pub async fn stack_status(
        &self,
        stack_id: Uuid,
        deployment_object_id: Uuid,
    ) -> StoreResult<Vec<AgentStackStatus>> {
        let rows = StackStatusRow::find_by_statement(statement(
            STACK_STATUS,
            [stack_id.into(), deployment_object_id.into()],
        ))
        .all(&self.db)
        .await?;
        Ok(rows.into_iter().map(AgentStackStatus::from).collect())
    }
}

impl From<StackStatusRow> for AgentStackStatus {
    fn from(row: StackStatusRow) -> AgentStackStatus {
        let outcome = match (row.outcome_type, row.outcome_status, row.outcome_at) {
            (Some(event_type), Some(status), Some(at)) => Some(EventSummary {
                event_type,
                status,
                message: row.outcome_message,
                at,
            }),
            _ => None,
        };
        let health = match (row.health_status, row.health_at) {
            (Some(status), Some(at)) => Some(EventSummary {
                event_type: "Health".to_owned(),
                status,
                message: row.health_message,
                at,
            }),
            _ => None,
        };
        let drift = match (row.drift_status, row.drift_at) {
            (Some(status), Some(at)) => Some(EventSummary {
                event_type: "Drift".to_owned(),
                status,
                message: row.drift_message,
                at,
            }),
            _ => None,
        };
        let assignment = match (
            row.assigned_object_id,
            row.assigned_sequence,
            row.assigned_at,
            row.health_clock_at,
        ) {
            (Some(deployment_object_id), Some(sequence_id), Some(assigned_at), Some(clock)) => {
                Some(Assignment {
                    deployment_object_id,
                    sequence_id,
                    assigned_at,
                    health_clock_at: clock,
                })
            }
            _ => None,
        };
        // An agent assigned the revision again (after a pin, say) has not reported on it
        // until it reports after the assignment.
        let since_assignment = |event: Option<EventSummary>| {
            event.filter(|event| {
                assignment
                    .as_ref()
                    .is_none_or(|a| event.at >= a.assigned_at)
            })
        };
        let (outcome, health, drift) = (
            since_assignment(outcome),
            since_assignment(health),
            since_assignment(drift),
        );
        AgentStackStatus {
            assignment,
            agent_id: row.agent_id,
            agent_name: row.agent_name,
            cluster_name: row.cluster_name,
            agent_status: row.agent_status,
            last_heartbeat: row.last_heartbeat,
            outcome,
            health,
            drift,
        }
    }
}
