//! `agent_events` rows.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "agent_events")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub deleted_at: Option<DateTimeUtc>,
    pub agent_id: Uuid,
    pub deployment_object_id: Uuid,
    pub event_type: String,
    pub status: String,
    pub message: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::agents::Entity",
        from = "Column::AgentId",
        to = "super::agents::Column::Id"
    )]
    Agent,
    #[sea_orm(
        belongs_to = "super::deployment_objects::Entity",
        from = "Column::DeploymentObjectId",
        to = "super::deployment_objects::Column::Id"
    )]
    DeploymentObject,
}

impl ActiveModelBehavior for ActiveModel {}
