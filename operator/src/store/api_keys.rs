//! API keys of agents and generators (`api_keys`): issuing, rotating, revoking, finding
//! by prefix, and recording use. Only a key's SHA-256 is stored. Every change of an
//! agent's keys notifies `k:<agent id>` (trigger of migration 016), so every hub replica
//! drops what it cached of that agent.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, DatabaseTransaction, EntityTrait, FromQueryResult,
    QueryFilter, QueryOrder, Set, TransactionTrait,
};
use uuid::Uuid;

use super::audit::AuditEntry;
use super::{Store, StoreResult, check_len, limits, statement};
use crate::entity::api_keys;
use crate::keys::Scope;

/// Whose key it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyOwner {
    Agent(Uuid),
    Generator(Uuid),
}

impl KeyOwner {
    pub fn id(self) -> Uuid {
        match self {
            KeyOwner::Agent(id) | KeyOwner::Generator(id) => id,
        }
    }

    /// What a key of this owner may call.
    pub fn scope(self) -> Scope {
        match self {
            KeyOwner::Agent(_) => Scope::Agent,
            KeyOwner::Generator(_) => Scope::Generator,
        }
    }

    fn condition(self) -> Condition {
        match self {
            KeyOwner::Agent(id) => Condition::all().add(api_keys::Column::AgentId.eq(id)),
            KeyOwner::Generator(id) => Condition::all().add(api_keys::Column::GeneratorId.eq(id)),
        }
    }

    /// The owner of a key row.
    pub fn of(key: &api_keys::Model) -> Option<KeyOwner> {
        match (key.agent_id, key.generator_id) {
            (Some(id), None) => Some(KeyOwner::Agent(id)),
            (None, Some(id)) => Some(KeyOwner::Generator(id)),
            _ => None,
        }
    }
}

/// The stored half of a newly issued key and how long it lives. Never the key itself.
#[derive(Clone, Copy, Debug)]
pub struct NewKey<'a> {
    pub prefix: &'a str,
    pub hash: &'a str,
    pub lifetime: Duration,
}

/// A key found by its prefix, with what the API needs to know of its owner.
#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult)]
pub struct KeyHolder {
    pub key_id: Uuid,
    pub agent_id: Option<Uuid>,
    pub generator_id: Option<Uuid>,
    pub prefix: String,
    pub key_hash: String,
    pub scopes: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The agent's or generator's name.
    pub owner_name: String,
    /// The agent is suspended, or the generator inactive.
    pub suspended: bool,
    /// The owner's row is soft-deleted.
    pub deleted: bool,
}

/// A key used for the first time, as [`Store::record_key_use`] reports it.
#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult)]
pub struct FirstUse {
    pub id: Uuid,
    pub prefix: String,
    pub agent_id: Option<Uuid>,
    pub generator_id: Option<Uuid>,
}

/// A new key written and older keys revoked, not committed yet: the caller writes the key
/// to its Secret first, so the database and the Secret change together (a failed Secret
/// write drops the transaction and nothing changed).
pub struct PendingKeyChange {
    txn: DatabaseTransaction,
    /// The new key's row.
    pub issued: api_keys::Model,
    /// The keys whose `revoked_at` was set, as they are now.
    pub revoked: Vec<api_keys::Model>,
}

impl std::fmt::Debug for PendingKeyChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingKeyChange")
            .field("issued", &self.issued.prefix)
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

impl PendingKeyChange {
    /// Commits the change with `audit`, the rows that describe it.
    pub async fn commit(
        self,
        audit: &[AuditEntry],
    ) -> StoreResult<(api_keys::Model, Vec<api_keys::Model>)> {
        super::audit::insert(&self.txn, audit).await?;
        self.txn.commit().await?;
        Ok((self.issued, self.revoked))
    }
}

/// Which of an owner's other keys a new key revokes, and from when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revoke {
    /// None: the other keys stay as they are.
    Nothing,
    /// Every key of the owner still valid, at once.
    AllNow,
    /// This key, `overlap` from now (or earlier, if it was revoked earlier already), and
    /// the keys issued after it that were never used (renewals whose answer was lost).
    After { key_id: Uuid, overlap: Duration },
}

fn after(now: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(duration)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl Store {
    /// Writes `new` for `owner` and revokes what `revoke` says, in a transaction left open
    /// for the caller to write the Secret and then [`PendingKeyChange::commit`].
    pub async fn begin_key_change(
        &self,
        owner: KeyOwner,
        new: NewKey<'_>,
        revoke: Revoke,
    ) -> StoreResult<PendingKeyChange> {
        check_len("key prefix", new.prefix, limits::PAK_PREFIX)?;
        let now = Utc::now();
        let txn = self.db.begin().await?;
        let revoked = match revoke {
            Revoke::Nothing => Vec::new(),
            Revoke::AllNow => {
                api_keys::Entity::update_many()
                    .col_expr(api_keys::Column::RevokedAt, Expr::value(now))
                    .filter(owner.condition())
                    .filter(
                        Condition::any()
                            .add(api_keys::Column::RevokedAt.is_null())
                            .add(api_keys::Column::RevokedAt.gt(now)),
                    )
                    .filter(api_keys::Column::ExpiresAt.gt(now))
                    .exec_with_returning(&txn)
                    .await?
            }
            Revoke::After { key_id, overlap } => {
                let until = after(now, overlap);
                // The key itself, and the keys it was renewed into before whose answers
                // never arrived (never used): one renewal leaves at most two valid keys.
                let presented = api_keys::Entity::find_by_id(key_id)
                    .filter(owner.condition())
                    .one(&txn)
                    .await?
                    .ok_or_else(|| super::StoreError::not_found(format!("api key {key_id}")))?;
                api_keys::Entity::update_many()
                    .col_expr(api_keys::Column::RevokedAt, Expr::value(until))
                    .filter(owner.condition())
                    .filter(
                        Condition::any().add(api_keys::Column::Id.eq(key_id)).add(
                            Condition::all()
                                .add(api_keys::Column::CreatedAt.gt(presented.created_at))
                                .add(api_keys::Column::LastUsedAt.is_null()),
                        ),
                    )
                    .filter(
                        Condition::any()
                            .add(api_keys::Column::RevokedAt.is_null())
                            .add(api_keys::Column::RevokedAt.gt(until)),
                    )
                    .exec_with_returning(&txn)
                    .await?
            }
        };
        let (agent_id, generator_id) = match owner {
            KeyOwner::Agent(id) => (Some(id), None),
            KeyOwner::Generator(id) => (None, Some(id)),
        };
        let issued = api_keys::ActiveModel {
            id: Set(Uuid::now_v7()),
            created_at: Set(now),
            agent_id: Set(agent_id),
            generator_id: Set(generator_id),
            prefix: Set(new.prefix.to_owned()),
            key_hash: Set(new.hash.to_owned()),
            scopes: Set(owner.scope().as_str().to_owned()),
            expires_at: Set(after(now, new.lifetime)),
            last_used_at: Set(None),
            revoked_at: Set(None),
        }
        .insert(&txn)
        .await?;
        Ok(PendingKeyChange {
            txn,
            issued,
            revoked,
        })
    }

    /// [`Store::begin_key_change`] committed at once, without audit rows.
    pub async fn change_key(
        &self,
        owner: KeyOwner,
        new: NewKey<'_>,
        revoke: Revoke,
    ) -> StoreResult<(api_keys::Model, Vec<api_keys::Model>)> {
        self.begin_key_change(owner, new, revoke)
            .await?
            .commit(&[])
            .await
    }

    /// Every key of `owner`, newest first.
    pub async fn api_keys_of(&self, owner: KeyOwner) -> StoreResult<Vec<api_keys::Model>> {
        Ok(api_keys::Entity::find()
            .filter(owner.condition())
            .order_by_desc(api_keys::Column::CreatedAt)
            .all(&self.db)
            .await?)
    }

    /// The key with this prefix.
    pub async fn find_api_key(&self, prefix: &str) -> StoreResult<Option<api_keys::Model>> {
        Ok(api_keys::Entity::find()
            .filter(api_keys::Column::Prefix.eq(prefix))
            .one(&self.db)
            .await?)
    }

    pub async fn find_api_key_by_id(&self, id: Uuid) -> StoreResult<Option<api_keys::Model>> {
        Ok(api_keys::Entity::find_by_id(id).one(&self.db).await?)
    }

    /// The keys with these prefixes and their owners' state, by prefix, in one statement
    /// (a probe of the unique prefix index and one of the owner's primary key per prefix).
    /// Prefixes no key has are absent.
    pub async fn find_key_holders(
        &self,
        prefixes: &[String],
    ) -> StoreResult<HashMap<String, KeyHolder>> {
        if prefixes.is_empty() {
            return Ok(HashMap::new());
        }
        let holders = KeyHolder::find_by_statement(statement(
            "SELECT k.id AS key_id, k.agent_id, k.generator_id, k.prefix, k.key_hash, \
                    k.scopes, k.created_at AS issued_at, k.expires_at, k.revoked_at, \
                    COALESCE(a.name, g.name, '') AS owner_name, \
                    COALESCE(a.is_suspended, NOT g.is_active, FALSE) AS suspended, \
                    COALESCE(a.deleted_at, g.deleted_at) IS NOT NULL AS deleted \
             FROM api_keys k \
             LEFT JOIN agents a ON a.id = k.agent_id \
             LEFT JOIN generators g ON g.id = k.generator_id \
             WHERE k.prefix IN (SELECT jsonb_array_elements_text($1::jsonb))",
            [serde_json::json!(prefixes).into()],
        ))
        .all(&self.db)
        .await?;
        Ok(holders
            .into_iter()
            .map(|holder| (holder.prefix.clone(), holder))
            .collect())
    }

    /// Sets `last_used_at` of these keys to now, skipping keys used less than a minute ago
    /// (another replica may have written it), and `last_active_at` of the generators whose
    /// keys they are, in one statement. Returns the keys used for the first time.
    pub async fn record_key_use(&self, key_ids: &[Uuid]) -> StoreResult<Vec<FirstUse>> {
        if key_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::to_value(key_ids).unwrap_or_default();
        Ok(FirstUse::find_by_statement(statement(
            "WITH due AS ( \
                 SELECT id, last_used_at IS NULL AS first FROM api_keys \
                 WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb)::uuid) \
                   AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute') \
                 FOR UPDATE SKIP LOCKED) \
             , used AS ( \
                 UPDATE api_keys k SET last_used_at = now() FROM due WHERE k.id = due.id \
                 RETURNING k.id, k.prefix, k.agent_id, k.generator_id, due.first) \
             , active AS ( \
                 UPDATE generators SET last_active_at = now() \
                 WHERE id IN (SELECT generator_id FROM used WHERE generator_id IS NOT NULL)) \
             SELECT * FROM used",
            [ids.into()],
        ))
        .all(&self.db)
        .await?)
    }

    /// Moves a key's times, for tests that cannot wait hours: `issued` and `expires` as
    /// given, `revoked` too.
    #[cfg(any(test, feature = "testing"))]
    pub async fn set_api_key_times(
        &self,
        key_id: Uuid,
        issued: DateTime<Utc>,
        expires: DateTime<Utc>,
        revoked: Option<DateTime<Utc>>,
    ) -> StoreResult<()> {
        let updated = api_keys::Entity::update_many()
            .col_expr(api_keys::Column::CreatedAt, Expr::value(issued))
            .col_expr(api_keys::Column::ExpiresAt, Expr::value(expires))
            .col_expr(api_keys::Column::RevokedAt, Expr::value(revoked))
            .filter(api_keys::Column::Id.eq(key_id))
            .exec(&self.db)
            .await?;
        if updated.rows_affected == 0 {
            return Err(super::StoreError::not_found(format!("api key {key_id}")));
        }
        Ok(())
    }
}
