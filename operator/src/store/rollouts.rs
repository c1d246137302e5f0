//! What a stack serves when it is not simply its newest revision: a pinned revision
//! (`spec.pinnedRevision`), or per agent the revision a progressive rollout assigned it
//! (`spec.rollout`). The desired-state query reads both ([`super::deployments`]).

use chrono::{DateTime, Utc};
use sea_orm::sea_query::LockType;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect, TransactionTrait,
};
use uuid::Uuid;

use super::audit::{self, AuditEntry, actions};
use super::stacks::{latest_live_deployment_object, stack_resource};
use super::{Store, StoreError, StoreResult, statement};
use crate::entity::{deployment_objects, stacks};

/// How a stack is to serve its agents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Serving {
    /// The pinned revision (a live, non-marker deployment object of the stack).
    pub pinned: Option<Uuid>,
    /// Whether new revisions reach agents through their rollout assignments.
    pub progressive: bool,
}

/// What [`Store::set_serving`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServingChanged {
    /// The stack is now pinned to this revision (sequence).
    pub pinned: Option<i64>,
    /// The stack was pinned to this revision (sequence) and no longer is.
    pub unpinned: Option<i64>,
    /// `progressive` changed.
    pub progressive: bool,
}

/// Seeds the assignments of a stack that turns progressive (or is unpinned): every
/// targeted agent without one keeps what it is served now, so nothing moves (and nothing
/// is removed) until its wave.
const SEED_ASSIGNMENTS: &str = r#"
INSERT INTO rollout_assignments (agent_id, stack_id, deployment_object_id)
SELECT t.agent_id, t.stack_id, $2 FROM agent_targets t WHERE t.stack_id = $1
ON CONFLICT (agent_id, stack_id) DO NOTHING
"#;

/// Assigns `$3` to the agents `$2` of stack `$1` that do not hold it yet; their reports
/// count from now, and their health clock starts.
const ASSIGN: &str = r#"
INSERT INTO rollout_assignments (agent_id, stack_id, deployment_object_id)
SELECT agent_id::uuid, $1, $3 FROM jsonb_array_elements_text($2::jsonb) AS agent_id
ON CONFLICT (agent_id, stack_id) DO UPDATE
    SET deployment_object_id = EXCLUDED.deployment_object_id, assigned_at = now(),
        health_clock_at = now()
    WHERE rollout_assignments.deployment_object_id IS DISTINCT FROM EXCLUDED.deployment_object_id
"#;

/// Assigns `$2` to every agent targeted at stack `$1` (a pin).
const ASSIGN_ALL: &str = r#"
INSERT INTO rollout_assignments (agent_id, stack_id, deployment_object_id)
SELECT t.agent_id, t.stack_id, $2 FROM agent_targets t WHERE t.stack_id = $1
ON CONFLICT (agent_id, stack_id) DO UPDATE
    SET deployment_object_id = EXCLUDED.deployment_object_id, assigned_at = now(),
        health_clock_at = now()
    WHERE rollout_assignments.deployment_object_id IS DISTINCT FROM EXCLUDED.deployment_object_id
"#;

impl Store {
    /// The live, non-marker deployment object of `stack_id` with sequence `sequence`.
    pub async fn find_revision(
        &self,
        stack_id: Uuid,
        sequence: i64,
    ) -> StoreResult<Option<deployment_objects::Model>> {
        Ok(deployment_objects::Entity::find()
            .filter(deployment_objects::Column::StackId.eq(stack_id))
            .filter(deployment_objects::Column::SequenceId.eq(sequence))
            .filter(deployment_objects::Column::DeletedAt.is_null())
            .filter(deployment_objects::Column::IsDeletionMarker.eq(false))
            .one(&self.db)
            .await?)
    }

    /// What the stack serves every agent it does not roll out to progressively: its
    /// pinned revision, else its newest live deployment object (once deleted, its
    /// deletion marker).
    pub async fn served_head(
        &self,
        stack_id: Uuid,
    ) -> StoreResult<Option<deployment_objects::Model>> {
        served_head(&self.db, stack_id).await
    }

    /// Pins or unpins the stack and turns progressive delivery on or off, in one
    /// transaction with the assignments that keep every agent where it is:
    /// - turning progressive on assigns every targeted agent what it is served now;
    /// - turning it off drops the assignments (everyone is served the newest revision);
    /// - a pin of a progressive stack assigns the pinned revision to every targeted agent,
    ///   so that unpinning rolls the newest revision out from there, wave by wave.
    pub async fn set_serving(
        &self,
        stack_id: Uuid,
        serving: Serving,
    ) -> StoreResult<ServingChanged> {
        let txn = self.db.begin().await?;
        let stack = stacks::Entity::find_by_id(stack_id)
            .lock(LockType::Update)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found(format!("stack {stack_id}")))?;
        let mut changed = ServingChanged::default();
        if stack.deleted_at.is_some() {
            return Ok(changed);
        }
        if stack.progressive != serving.progressive {
            changed.progressive = true;
            if serving.progressive {
                let served = match serving.pinned {
                    Some(pinned) => Some(pinned),
                    None => served_head(&txn, stack_id).await?.map(|object| object.id),
                };
                if let Some(served) = served {
                    txn.execute_raw(statement(
                        SEED_ASSIGNMENTS,
                        [stack_id.into(), served.into()],
                    ))
                    .await?;
                }
            } else {
                txn.execute_raw(statement(
                    "DELETE FROM rollout_assignments WHERE stack_id = $1",
                    [stack_id.into()],
                ))
                .await?;
            }
        }
        if let Some(pinned) = serving.pinned
            && serving.progressive
        {
            txn.execute_raw(statement(ASSIGN_ALL, [stack_id.into(), pinned.into()]))
                .await?;
        }
        // An agent targeted while the pin held it has no assignment yet: it keeps the
        // pinned revision until its wave, instead of being served nothing.
        if let (Some(was_pinned), None, true, true) = (
            stack.pinned_object_id,
            serving.pinned,
            stack.progressive,
            serving.progressive,
        ) {
            txn.execute_raw(statement(
                SEED_ASSIGNMENTS,
                [stack_id.into(), was_pinned.into()],
            ))
            .await?;
        }
        if stack.pinned_object_id != serving.pinned {
            let sequence_of = async |id: Option<Uuid>| -> StoreResult<Option<i64>> {
                Ok(match id {
                    Some(id) => deployment_objects::Entity::find_by_id(id)
                        .one(&txn)
                        .await?
                        .map(|object| object.sequence_id),
                    None => None,
                })
            };
            changed.pinned = sequence_of(serving.pinned).await?;
            if serving.pinned.is_none() {
                changed.unpinned = sequence_of(stack.pinned_object_id).await?;
            }
            let (action, sequence) = match changed.pinned {
                Some(sequence) => (actions::REVISION_PINNED, Some(sequence)),
                None => (actions::REVISION_UNPINNED, changed.unpinned),
            };
            audit::insert(
                &txn,
                &[AuditEntry {
                    actor: audit::OPERATOR_ACTOR.to_owned(),
                    action,
                    resource: stack_resource(&stack.name, stack.id),
                    details: serde_json::json!({ "stackId": stack.id, "sequence": sequence }),
                }],
            )
            .await?;
        }
        if changed.progressive || stack.pinned_object_id != serving.pinned {
            stacks::Entity::update_many()
                .col_expr(
                    stacks::Column::PinnedObjectId,
                    sea_orm::sea_query::Expr::value(serving.pinned),
                )
                .col_expr(
                    stacks::Column::Progressive,
                    sea_orm::sea_query::Expr::value(serving.progressive),
                )
                .filter(stacks::Column::Id.eq(stack_id))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(changed)
    }

    /// Assigns revision `deployment_object_id` to `agent_ids` of the stack (those that
    /// hold it already keep their health clock). Returns how many moved.
    pub async fn assign_revision(
        &self,
        stack_id: Uuid,
        agent_ids: &[Uuid],
        deployment_object_id: Uuid,
    ) -> StoreResult<u64> {
        if agent_ids.is_empty() {
            return Ok(0);
        }
        let result = self
            .db
            .execute_raw(statement(
                ASSIGN,
                [
                    stack_id.into(),
                    sea_orm::Value::from(serde_json::json!(agent_ids)),
                    deployment_object_id.into(),
                ],
            ))
            .await?;
        Ok(result.rows_affected())
    }

    /// Starts the health clock again for the agents assigned `deployment_object_id` (a
    /// rollout resumed after a pause).
    pub async fn restart_health_clocks(
        &self,
        stack_id: Uuid,
        deployment_object_id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        // The reports made so far still count (`assigned_at` stays). The stamp trigger
        // fires, but agents are served what they were.
        let result = self
            .db
            .execute_raw(statement(
                "UPDATE rollout_assignments SET health_clock_at = $3 \
                 WHERE stack_id = $1 AND deployment_object_id = $2",
                [stack_id.into(), deployment_object_id.into(), now.into()],
            ))
            .await?;
        Ok(result.rows_affected())
    }
}

pub(super) async fn served_head(
    db: &impl ConnectionTrait,
    stack_id: Uuid,
) -> StoreResult<Option<deployment_objects::Model>> {
    let stack = stacks::Entity::find_by_id(stack_id).one(db).await?;
    if let Some(pinned) = stack
        .filter(|stack| stack.deleted_at.is_none())
        .and_then(|stack| stack.pinned_object_id)
        && let Some(object) = deployment_objects::Entity::find_by_id(pinned)
            .filter(deployment_objects::Column::DeletedAt.is_null())
            .one(db)
            .await?
    {
        return Ok(Some(object));
    }
    latest_live_deployment_object(db, stack_id).await
}
