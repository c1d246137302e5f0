//! `stacks` rows.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "stacks")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub deleted_at: Option<DateTimeUtc>,
    pub name: String,
    pub description: Option<String>,
    pub generator_id: Uuid,
    pub resource_uid: Option<Uuid>,
    /// `spec.pinnedRevision`, resolved: the deployment object every agent is served.
    pub pinned_object_id: Option<Uuid>,
    /// `spec.rollout` is set: agents are served their `rollout_assignments` row.
    pub progressive: bool,
    /// Grows whenever the two above change (set by a trigger).
    pub serving_stamp: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::generators::Entity",
        from = "Column::GeneratorId",
        to = "super::generators::Column::Id"
    )]
    Generator,
}

impl ActiveModelBehavior for ActiveModel {}
