//! `agents` rows.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "agents")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub deleted_at: Option<DateTimeUtc>,
    pub name: String,
    pub cluster_name: String,
    pub last_heartbeat: Option<DateTimeUtc>,
    /// `Pending`, `Online`, `Error` (heartbeats arrive, the agent reports it cannot work)
    /// or `Offline`.
    pub status: String,
    /// The agent's reason while `status` is `Error`.
    pub state_message: Option<String>,
    /// When the current `status` began.
    pub state_since: Option<DateTimeUtc>,
    pub is_suspended: bool,
    pub agent_version: Option<String>,
    pub resource_uid: Option<Uuid>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
