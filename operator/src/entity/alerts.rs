//! `alerts` rows: one firing or resolved episode of an AlertRule's condition on one subject.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "alerts")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// `metadata.uid` of the AlertRule.
    pub rule_uid: Uuid,
    pub rule_namespace: String,
    pub rule_name: String,
    /// The AlertRule condition type (`AgentOffline`, ...).
    pub condition: String,
    /// `Agent` or `Stack`.
    pub subject_kind: String,
    /// `metadata.uid` of the Agent or Stack.
    pub subject_uid: Uuid,
    pub subject_namespace: Option<String>,
    pub subject_name: String,
    pub severity: String,
    /// `firing` or `resolved`.
    pub state: String,
    pub message: String,
    pub started_at: DateTimeUtc,
    pub fired_at: DateTimeUtc,
    pub resolved_at: Option<DateTimeUtc>,
    pub last_notified_at: Option<DateTimeUtc>,
    pub delivery_attempts: i32,
    pub reminded_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
