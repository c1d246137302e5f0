//! `stack_annotations` rows.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "stack_annotations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub stack_id: Uuid,
    pub key: String,
    pub value: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::stacks::Entity",
        from = "Column::StackId",
        to = "super::stacks::Column::Id"
    )]
    Stack,
}

impl ActiveModelBehavior for ActiveModel {}
