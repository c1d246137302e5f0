//! `deployment_objects` rows.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "deployment_objects")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub deleted_at: Option<DateTimeUtc>,
    pub sequence_id: i64,
    pub stack_id: Uuid,
    pub yaml_content: String,
    pub yaml_checksum: String,
    pub submitted_at: DateTimeUtc,
    pub is_deletion_marker: bool,
    pub generator_id: Uuid,
    /// The revision being delivered when this one was recorded (`None` for the first, and
    /// for deletion markers).
    pub parent_id: Option<Uuid>,
    /// The field manager that changed the Stack's content.
    pub recorded_by: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::stacks::Entity",
        from = "Column::StackId",
        to = "super::stacks::Column::Id"
    )]
    Stack,
    #[sea_orm(
        belongs_to = "super::generators::Entity",
        from = "Column::GeneratorId",
        to = "super::generators::Column::Id"
    )]
    Generator,
}

impl ActiveModelBehavior for ActiveModel {}
