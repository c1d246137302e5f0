//! Label and annotation sets of stacks and agents, which are kept the same way.

use std::collections::BTreeMap;

use sea_orm::ConnectionTrait;
use uuid::Uuid;

use super::{StoreResult, check_len, limits, statement};

/// Whose labels and annotations: the tables and key column differ, nothing else.
#[derive(Clone, Copy, Debug)]
pub(super) enum Owner {
    Stack(Uuid),
    Agent(Uuid),
}

impl Owner {
    fn id(self) -> Uuid {
        match self {
            Owner::Stack(id) | Owner::Agent(id) => id,
        }
    }

    fn column(self) -> &'static str {
        match self {
            Owner::Stack(_) => "stack_id",
            Owner::Agent(_) => "agent_id",
        }
    }

    fn labels_table(self) -> &'static str {
        match self {
            Owner::Stack(_) => "stack_labels",
            Owner::Agent(_) => "agent_labels",
        }
    }

    fn annotations_table(self) -> &'static str {
        match self {
            Owner::Stack(_) => "stack_annotations",
            Owner::Agent(_) => "agent_annotations",
        }
    }
}

pub(super) fn check_labels(labels: &[String]) -> StoreResult<()> {
    labels
        .iter()
        .try_for_each(|label| check_len("label", label, limits::LABEL))
}

pub(super) fn check_annotations(annotations: &BTreeMap<String, String>) -> StoreResult<()> {
    annotations.iter().try_for_each(|(key, value)| {
        check_len("annotation key", key, limits::ANNOTATION_KEY)?;
        check_len("annotation value", value, limits::ANNOTATION_VALUE)
    })
}

/// Makes `labels` the owner's exact label set, touching only rows that change.
pub(super) async fn replace_labels(
    db: &impl ConnectionTrait,
    owner: Owner,
    labels: &[String],
) -> StoreResult<()> {
    let (table, column) = (owner.labels_table(), owner.column());
    let wanted = serde_json::json!(labels);
    db.execute_raw(statement(
        &format!(
            "DELETE FROM {table} WHERE {column} = $1 \
             AND label NOT IN (SELECT jsonb_array_elements_text($2::jsonb))"
        ),
        [owner.id().into(), wanted.clone().into()],
    ))
    .await?;
    db.execute_raw(statement(
        &format!(
            "INSERT INTO {table} (id, {column}, label) \
             SELECT uuid_generate_v7(), $1, l FROM jsonb_array_elements_text($2::jsonb) AS l \
             ON CONFLICT ({column}, label) DO NOTHING"
        ),
        [owner.id().into(), wanted.into()],
    ))
    .await?;
    Ok(())
}

/// Makes `annotations` the owner's exact annotation set, touching only rows that change.
pub(super) async fn replace_annotations(
    db: &impl ConnectionTrait,
    owner: Owner,
    annotations: &BTreeMap<String, String>,
) -> StoreResult<()> {
    let (table, column) = (owner.annotations_table(), owner.column());
    let wanted = serde_json::json!(annotations);
    db.execute_raw(statement(
        &format!("DELETE FROM {table} WHERE {column} = $1 AND key NOT IN (SELECT jsonb_object_keys($2::jsonb))"),
        [owner.id().into(), wanted.clone().into()],
    ))
    .await?;
    db.execute_raw(statement(
        &format!(
            "INSERT INTO {table} (id, {column}, key, value) \
             SELECT uuid_generate_v7(), $1, a.key, a.value FROM jsonb_each_text($2::jsonb) AS a \
             ON CONFLICT ({column}, key) DO UPDATE SET value = EXCLUDED.value \
             WHERE {table}.value IS DISTINCT FROM EXCLUDED.value"
        ),
        [owner.id().into(), wanted.into()],
    ))
    .await?;
    Ok(())
}
