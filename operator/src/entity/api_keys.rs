//! `api_keys` rows: one per key of an agent or a generator. Only the SHA-256 of a key is
//! stored; its public prefix finds the row.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub created_at: DateTimeUtc,
    pub agent_id: Option<Uuid>,
    pub generator_id: Option<Uuid>,
    pub prefix: String,
    pub key_hash: String,
    /// Space-separated: `agent`, `generator`.
    pub scopes: String,
    pub expires_at: DateTimeUtc,
    pub last_used_at: Option<DateTimeUtc>,
    pub revoked_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

impl Model {
    /// Whether the key is accepted at `now`: not expired and not (yet) revoked.
    pub fn is_valid_at(&self, now: DateTimeUtc) -> bool {
        now < self.expires_at && self.revoked_at.is_none_or(|revoked| now < revoked)
    }
}
