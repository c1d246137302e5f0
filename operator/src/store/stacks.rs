use std::collections::{BTreeMap, BTreeSet};

use sea_orm::sea_query::{Expr, LockType};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect, Set, TransactionTrait,
};
use uuid::Uuid;

use super::audit::{self, AuditEntry, AuditResource, actions};
use super::metadata::{
    Owner, check_annotations, check_labels, replace_annotations, replace_labels,
};
use super::{Store, StoreError, StoreResult, check_len, limits};
use crate::entity::{agent_targets, agents, deployment_objects, stacks};

/// Everything the database keeps of one Stack resource, written in one transaction.
#[derive(Clone, Debug)]
pub struct StackSync<'a> {
    /// `metadata.uid` of the Stack resource.
    pub resource_uid: Uuid,
    /// `<namespace>/<name>`.
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub generator_id: Uuid,
    /// `key=value` strings; `None` keeps the recorded ones.
    pub labels: Option<&'a [String]>,
    /// `None` keeps the recorded ones.
    pub annotations: Option<&'a BTreeMap<String, String>>,
    /// The rendered desired state; `None` keeps serving the last recorded one (used
    /// when the resource's content is invalid).
    pub content: Option<StackContent<'a>>,
    /// Who changed the content, for the audit log; `None` records it as unknown.
    pub author: Option<ContentAuthor<'a>>,
    /// Whether a stack created by this call rolls out progressively from its first
    /// revision on (`spec.rollout`); an existing stack changes through
    /// [`Store::set_serving`].
    pub progressive: bool,
}

/// Who a new deployment object comes from: the field manager that last changed the
/// Stack's spec (`kubectl-client-side-apply`, `helm`, `argocd-controller`...) and the
/// Stack's Generator.
#[derive(Clone, Copy, Debug)]
pub struct ContentAuthor<'a> {
    pub field_manager: &'a str,
    pub generator: &'a str,
}

#[derive(Clone, Copy, Debug)]
pub struct StackContent<'a> {
    pub yaml: &'a str,
    pub checksum: &'a str,
}

#[derive(Clone, Debug)]
pub struct StackSynced {
    pub stack: stacks::Model,
    /// The stack's current deployment object, if it has one.
    pub deployment_object: Option<deployment_objects::Model>,
    /// Whether this call wrote a new deployment object.
    pub created_deployment_object: bool,
}

/// One recorded revision of a stack, as [`Store::stack_history`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult)]
pub struct Revision {
    pub sequence_id: i64,
    pub yaml_checksum: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub recorded_by: Option<String>,
    /// The generator's database name, `<namespace>/<name>`.
    pub generator: Option<String>,
}

/// What [`Store::replace_stack_targets`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetsChanged {
    pub added: Vec<Uuid>,
    pub removed: Vec<Uuid>,
}

impl TargetsChanged {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

impl Store {
    /// Creates or updates a stack from its resource, replaces its labels and
    /// annotations, and records its content as a new deployment object when the
    /// checksum differs from the current one — all in one transaction.
    pub async fn sync_stack(&self, input: &StackSync<'_>) -> StoreResult<StackSynced> {
        check_len("stack name", input.name, limits::NAME)?;
        if let Some(labels) = input.labels {
            check_labels(labels)?;
        }
        if let Some(annotations) = input.annotations {
            check_annotations(annotations)?;
        }

        let txn = self.db.begin().await?;
        let stack = upsert_stack(&txn, input).await?;
        if let Some(labels) = input.labels {
            replace_labels(&txn, Owner::Stack(stack.id), labels).await?;
        }
        if let Some(annotations) = input.annotations {
            replace_annotations(&txn, Owner::Stack(stack.id), annotations).await?;
        }
        let (deployment_object, created_deployment_object) = match input.content {
            Some(content) => {
                let recorded_by = input.author.map(|author| author.field_manager);
                let (object, created) =
                    record_deployment_object(&txn, &stack, content, recorded_by).await?;
                if created {
                    audit::insert(&txn, &[content_recorded(input, &object)]).await?;
                }
                (Some(object), created)
            }
            None => (latest_live_deployment_object(&txn, stack.id).await?, false),
        };
        txn.commit().await?;
        Ok(StackSynced {
            stack,
            deployment_object,
            created_deployment_object,
        })
    }

    /// Records `content` as the stack's new desired state, unless it already is: the
    /// existing deployment object comes back when the checksum is unchanged.
    #[cfg(any(test, feature = "testing"))]
    pub async fn record_deployment_object(
        &self,
        stack_id: Uuid,
        content: StackContent<'_>,
    ) -> StoreResult<(deployment_objects::Model, bool)> {
        let txn = self.db.begin().await?;
        let stack = stacks::Entity::find_by_id(stack_id)
            .filter(stacks::Column::DeletedAt.is_null())
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found(format!("live stack {stack_id}")))?;
        let recorded = record_deployment_object(&txn, &stack, content, None).await?;
        txn.commit().await?;
        Ok(recorded)
    }

    /// Replaces a stack's labels (`key=value` strings).
    #[cfg(any(test, feature = "testing"))]
    pub async fn replace_stack_labels(&self, stack_id: Uuid, labels: &[String]) -> StoreResult<()> {
        check_labels(labels)?;
        let txn = self.db.begin().await?;
        replace_labels(&txn, Owner::Stack(stack_id), labels).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Replaces a stack's annotations.
    #[cfg(any(test, feature = "testing"))]
    pub async fn replace_stack_annotations(
        &self,
        stack_id: Uuid,
        annotations: &BTreeMap<String, String>,
    ) -> StoreResult<()> {
        check_annotations(annotations)?;
        let txn = self.db.begin().await?;
        replace_annotations(&txn, Owner::Stack(stack_id), annotations).await?;
        txn.commit().await?;
        Ok(())
    }

    pub async fn find_live_stack_by_resource(
        &self,
        resource_uid: Uuid,
    ) -> StoreResult<Option<stacks::Model>> {
        Ok(stacks::Entity::find()
            .filter(stacks::Column::ResourceUid.eq(resource_uid))
            .filter(stacks::Column::DeletedAt.is_null())
            .one(&self.db)
            .await?)
    }

    /// The newest row of a resource, deleted or not: a Stack being deleted may find
    /// its row already retired by its generator's deletion.
    pub async fn find_newest_stack_by_resource(
        &self,
        resource_uid: Uuid,
    ) -> StoreResult<Option<stacks::Model>> {
        Ok(stacks::Entity::find()
            .filter(stacks::Column::ResourceUid.eq(resource_uid))
            .order_by_desc(stacks::Column::CreatedAt)
            .one(&self.db)
            .await?)
    }

    #[cfg(any(test, feature = "testing"))]
    pub async fn find_stack(&self, stack_id: Uuid) -> StoreResult<Option<stacks::Model>> {
        Ok(stacks::Entity::find_by_id(stack_id).one(&self.db).await?)
    }

    /// The stack's newest live deployment object (a deletion marker once it is deleted).
    pub async fn current_deployment_object(
        &self,
        stack_id: Uuid,
    ) -> StoreResult<Option<deployment_objects::Model>> {
        latest_live_deployment_object(&self.db, stack_id).await
    }

    /// Soft-deletes a stack: its deployment objects are retired and a deletion marker
    /// is appended (database trigger). Returns the deletion marker, or `None` when
    /// the stack was already deleted.
    pub async fn soft_delete_stack(
        &self,
        stack_id: Uuid,
    ) -> StoreResult<Option<deployment_objects::Model>> {
        let txn = self.db.begin().await?;
        let updated = stacks::Entity::update_many()
            .col_expr(stacks::Column::DeletedAt, Expr::current_timestamp())
            .filter(stacks::Column::Id.eq(stack_id))
            .filter(stacks::Column::DeletedAt.is_null())
            .exec(&txn)
            .await?;
        let marker = if updated.rows_affected > 0 {
            latest_live_deployment_object(&txn, stack_id).await?
        } else {
            None
        };
        if updated.rows_affected > 0
            && let Some(stack) = stacks::Entity::find_by_id(stack_id).one(&txn).await?
        {
            let entry = AuditEntry {
                actor: audit::OPERATOR_ACTOR.to_owned(),
                action: actions::STACK_DELETED,
                resource: stack_resource(&stack.name, stack.id),
                details: serde_json::json!({
                    "stackId": stack.id,
                    "deletionMarkerId": marker.as_ref().map(|m| m.id),
                }),
            };
            audit::insert(&txn, &[entry]).await?;
        }
        txn.commit().await?;
        Ok(marker)
    }

    /// Removes a stack with its targets, deployment objects and their events.
    #[cfg(any(test, feature = "testing"))]
    pub async fn hard_delete_stack(&self, stack_id: Uuid) -> StoreResult<bool> {
        let txn = self.db.begin().await?;
        let deleted = stacks::Entity::delete_by_id(stack_id).exec(&txn).await?;
        txn.commit().await?;
        Ok(deleted.rows_affected > 0)
    }

    /// Makes `agent_ids` the exact set of agents targeted at the stack.
    pub async fn replace_stack_targets(
        &self,
        stack_id: Uuid,
        agent_ids: &BTreeSet<Uuid>,
    ) -> StoreResult<TargetsChanged> {
        let txn = self.db.begin().await?;
        // Serialises concurrent replacements of the same stack's set.
        let stack = stacks::Entity::find_by_id(stack_id)
            .lock(LockType::Update)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found(format!("stack {stack_id}")))?;
        let current: BTreeSet<Uuid> = agent_targets::Entity::find()
            .filter(agent_targets::Column::StackId.eq(stack_id))
            .all(&txn)
            .await?
            .into_iter()
            .map(|t| t.agent_id)
            .collect();
        let changed = TargetsChanged {
            added: agent_ids.difference(&current).copied().collect(),
            removed: current.difference(agent_ids).copied().collect(),
        };
        if !changed.removed.is_empty() {
            // An agent targeted again later starts from its wave, not from where it was.
            txn.execute_raw(super::statement(
                "DELETE FROM rollout_assignments \
                 WHERE stack_id = $1 AND agent_id IN (SELECT jsonb_array_elements_text($2::jsonb)::uuid)",
                [stack_id.into(), sea_orm::Value::from(serde_json::json!(changed.removed))],
            ))
            .await?;
            agent_targets::Entity::delete_many()
                .filter(agent_targets::Column::StackId.eq(stack_id))
                .filter(agent_targets::Column::AgentId.is_in(changed.removed.iter().copied()))
                .exec(&txn)
                .await?;
        }
        if !changed.added.is_empty() {
            agent_targets::Entity::insert_many(changed.added.iter().map(|agent_id| {
                agent_targets::ActiveModel {
                    id: Set(Uuid::now_v7()),
                    agent_id: Set(*agent_id),
                    stack_id: Set(stack_id),
                }
            }))
            .exec_without_returning(&txn)
            .await?;
        }
        if !changed.is_empty() {
            audit::insert(&txn, &[targets_changed(&txn, &stack, &changed).await?]).await?;
        }
        txn.commit().await?;
        Ok(changed)
    }

    /// The stack's last `limit` revisions (live, non-marker deployment objects), newest
    /// first, with the name of the generator each was recorded for.
    pub async fn stack_history(&self, stack_id: Uuid, limit: u64) -> StoreResult<Vec<Revision>> {
        const HISTORY: &str = r#"
SELECT d.sequence_id, d.yaml_checksum, d.created_at, d.recorded_by, g.name AS generator
FROM deployment_objects d
LEFT JOIN generators g ON g.id = d.generator_id
WHERE d.stack_id = $1 AND d.deleted_at IS NULL AND NOT d.is_deletion_marker
ORDER BY d.sequence_id DESC
LIMIT $2
"#;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(
            Revision::find_by_statement(super::statement(HISTORY, [stack_id.into(), limit.into()]))
                .all(&self.db)
                .await?,
        )
    }

    /// Agents currently targeted at a stack.
    pub async fn stack_target_agent_ids(&self, stack_id: Uuid) -> StoreResult<BTreeSet<Uuid>> {
        Ok(agent_targets::Entity::find()
            .filter(agent_targets::Column::StackId.eq(stack_id))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|t| t.agent_id)
            .collect())
    }
}

async fn upsert_stack(
    db: &impl ConnectionTrait,
    input: &StackSync<'_>,
) -> StoreResult<stacks::Model> {
    let existing = stacks::Entity::find()
        .filter(stacks::Column::ResourceUid.eq(input.resource_uid))
        .filter(stacks::Column::DeletedAt.is_null())
        .lock(LockType::Update)
        .one(db)
        .await?;
    match existing {
        Some(row)
            if row.name == input.name
                && row.description.as_deref() == input.description
                && row.generator_id == input.generator_id =>
        {
            Ok(row)
        }
        Some(row) => {
            let mut active: stacks::ActiveModel = row.into();
            active.name = Set(input.name.to_owned());
            active.description = Set(input.description.map(str::to_owned));
            active.generator_id = Set(input.generator_id);
            Ok(active.update(db).await?)
        }
        None => {
            // A live row with this name belongs to an earlier resource of the same name,
            // which Kubernetes no longer has: retire it (writing its deletion marker).
            stacks::Entity::update_many()
                .col_expr(stacks::Column::DeletedAt, Expr::current_timestamp())
                .filter(stacks::Column::Name.eq(input.name))
                .filter(stacks::Column::DeletedAt.is_null())
                .exec(db)
                .await?;
            Ok(stacks::ActiveModel {
                id: Set(Uuid::now_v7()),
                name: Set(input.name.to_owned()),
                description: Set(input.description.map(str::to_owned)),
                generator_id: Set(input.generator_id),
                resource_uid: Set(Some(input.resource_uid)),
                progressive: Set(input.progressive),
                ..Default::default()
            }
            .insert(db)
            .await?)
        }
    }
}

pub(super) async fn latest_live_deployment_object(
    db: &impl ConnectionTrait,
    stack_id: Uuid,
) -> StoreResult<Option<deployment_objects::Model>> {
    Ok(deployment_objects::Entity::find()
        .filter(deployment_objects::Column::StackId.eq(stack_id))
        .filter(deployment_objects::Column::DeletedAt.is_null())
        .order_by_desc(deployment_objects::Column::SequenceId)
        .one(db)
        .await?)
}

/// The audit row of a newly recorded deployment object.
fn content_recorded(input: &StackSync<'_>, object: &deployment_objects::Model) -> AuditEntry {
    let author = input.author.unwrap_or(ContentAuthor {
        field_manager: "unknown",
        generator: "",
    });
    AuditEntry {
        actor: author.field_manager.to_owned(),
        action: actions::DEPLOYMENT_RECORDED,
        resource: stack_resource(input.name, object.stack_id),
        details: serde_json::json!({
            "stackId": object.stack_id,
            "deploymentObjectId": object.id,
            "sequence": object.sequence_id,
            "checksum": object.yaml_checksum,
            "generator": author.generator,
            "generatorId": object.generator_id,
        }),
    }
}

/// The audit row of a target set change, naming the agents added and removed.
async fn targets_changed(
    db: &impl ConnectionTrait,
    stack: &stacks::Model,
    changed: &TargetsChanged,
) -> StoreResult<AuditEntry> {
    let listed = changed
        .added
        .iter()
        .take(audit::MAX_LISTED)
        .chain(changed.removed.iter().take(audit::MAX_LISTED))
        .copied();
    let names: BTreeMap<Uuid, String> = agents::Entity::find()
        .filter(agents::Column::Id.is_in(listed))
        .all(db)
        .await?
        .into_iter()
        .map(|agent| (agent.id, agent.name))
        .collect();
    let list = |ids: &[Uuid]| {
        let named: Vec<String> = ids
            .iter()
            .map(|id| names.get(id).cloned().unwrap_or_else(|| id.to_string()))
            .collect();
        audit::bounded_list(&named)
    };
    Ok(AuditEntry {
        actor: audit::OPERATOR_ACTOR.to_owned(),
        action: actions::TARGETS_CHANGED,
        resource: stack_resource(&stack.name, stack.id),
        details: serde_json::json!({
            "stackId": stack.id,
            "added": list(&changed.added),
            "removed": list(&changed.removed),
        }),
    })
}

/// A Stack in the audit log, from its database name `<namespace>/<name>` and row id (the
/// Stack's `status.stackId`).
pub(crate) fn stack_resource(name: &str, id: Uuid) -> AuditResource {
    let (namespace, name) = match name.split_once('/') {
        Some((namespace, name)) => (Some(namespace.to_owned()), name.to_owned()),
        None => (None, name.to_owned()),
    };
    AuditResource {
        kind: "Stack",
        namespace,
        name,
        id: Some(id),
    }
}

/// Inserts `content` unless the stack's current deployment object already has its
/// checksum. Callers hold the stack row (or run in the transaction that wrote it), so
/// two writers of one stack never both insert.
/// The new object's parent is the revision that was being delivered when it was recorded
/// (the version tree); `recorded_by` is who changed the content.
async fn record_deployment_object(
    db: &impl ConnectionTrait,
    stack: &stacks::Model,
    content: StackContent<'_>,
    recorded_by: Option<&str>,
) -> StoreResult<(deployment_objects::Model, bool)> {
    stacks::Entity::find_by_id(stack.id)
        .lock(LockType::Update)
        .one(db)
        .await?;
    let current = latest_live_deployment_object(db, stack.id).await?;
    if let Some(current) = &current
        && !current.is_deletion_marker
        && current.yaml_checksum == content.checksum
    {
        return Ok((current.clone(), false));
    }
    // While pinned, the revision being delivered is the pinned one.
    let delivered = match stack.pinned_object_id {
        Some(_) => super::rollouts::served_head(db, stack.id).await?,
        None => current,
    };
    if let Some(recorded_by) = recorded_by {
        check_len("recorded by", recorded_by, limits::NAME)?;
    }
    let created = deployment_objects::ActiveModel {
        parent_id: Set(delivered
            .filter(|delivered| !delivered.is_deletion_marker)
            .map(|delivered| delivered.id)),
        recorded_by: Set(recorded_by.map(str::to_owned)),
        id: Set(Uuid::now_v7()),
        stack_id: Set(stack.id),
        yaml_content: Set(content.yaml.to_owned()),
        yaml_checksum: Set(content.checksum.to_owned()),
        is_deletion_marker: Set(false),
        generator_id: Set(stack.generator_id),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok((created, true))
}
