use std::collections::{BTreeMap, BTreeSet};

use brokkr_crds::wire;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Set, TransactionTrait,
};
use uuid::Uuid;

use super::metadata::{
    Owner, check_annotations, check_labels, replace_annotations, replace_labels,
};
use super::{KeyOwner, NewKey, Revoke, Store, StoreError, StoreResult, check_len, limits};
use crate::entity::agents;

/// Everything the database keeps of one Agent resource, written in one transaction.
#[derive(Clone, Debug)]
pub struct AgentSync<'a> {
    /// `metadata.uid` of the Agent resource.
    pub resource_uid: Uuid,
    pub name: &'a str,
    pub cluster_name: &'a str,
    pub is_suspended: bool,
    /// `key=value` strings.
    pub labels: &'a [String],
    pub annotations: &'a BTreeMap<String, String>,
}

/// What one heartbeat says about its agent (the wire [`wire::Heartbeat`] without the
/// stacks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeartbeatReport {
    pub version: String,
    /// `Ready`, `Syncing`, ... or [`wire::STATE_ERROR`].
    pub state: String,
    /// The agent's reason; kept only with [`wire::STATE_ERROR`].
    pub message: Option<String>,
}

impl HeartbeatReport {
    /// The `agents.status` the heartbeat sets: `Error` when the agent reports it cannot
    /// work, else `Online`.
    pub fn status(&self) -> &'static str {
        if self.state == wire::STATE_ERROR {
            ERROR
        } else {
            ONLINE
        }
    }

    /// The `agents.state_message` the heartbeat sets: the reason of an `Error`, else none.
    pub fn state_message(&self) -> Option<&str> {
        if self.state == wire::STATE_ERROR {
            self.message.as_deref()
        } else {
            None
        }
    }
}

impl From<wire::Heartbeat> for HeartbeatReport {
    fn from(beat: wire::Heartbeat) -> HeartbeatReport {
        HeartbeatReport {
            version: beat.version,
            state: beat.state,
            message: beat.message,
        }
    }
}

/// `agents.status` of an agent whose heartbeats arrive and who reports it works.
const ONLINE: &str = "Online";
/// `agents.status` of an agent whose heartbeats arrive and who reports it cannot work.
const ERROR: &str = "Error";
/// `state_since` of a row becoming `Online`: moves only when it was not already.
const STATE_SINCE_WHEN_NOT_ONLINE: &str =
    "CASE WHEN status IS DISTINCT FROM 'Online' THEN now() ELSE state_since END";

/// The stored half of an agent's key: the public prefix and the SHA-256 of the whole key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentKey {
    pub prefix: String,
    pub hash: String,
}

impl Store {
    /// Creates or updates an agent from its resource (keyed by `metadata.uid`) with its
    /// labels and annotations.
    pub async fn sync_agent(&self, input: &AgentSync<'_>) -> StoreResult<agents::Model> {
        check_len("agent name", input.name, limits::NAME)?;
        check_len("cluster name", input.cluster_name, limits::CLUSTER_NAME)?;
        check_labels(input.labels)?;
        check_annotations(input.annotations)?;
        let txn = self.db.begin().await?;
        let agent = upsert_agent(&txn, input).await?;
        replace_labels(&txn, Owner::Agent(agent.id), input.labels).await?;
        replace_annotations(&txn, Owner::Agent(agent.id), input.annotations).await?;
        txn.commit().await?;
        Ok(agent)
    }

    /// Stores the prefix and hash of a newly issued agent key with the default lifetime,
    /// revoking every earlier key of the agent at once.
    pub async fn set_agent_key(&self, agent_id: Uuid, key: &AgentKey) -> StoreResult<()> {
        if self.find_live_agent(agent_id).await?.is_none() {
            return Err(StoreError::not_found(format!("agent {agent_id}")));
        }
        self.change_key(
            KeyOwner::Agent(agent_id),
            NewKey {
                prefix: &key.prefix,
                hash: &key.hash,
                lifetime: brokkr_crds::access::DEFAULT_KEY_LIFETIME,
            },
            Revoke::AllNow,
        )
        .await?;
        Ok(())
    }

    /// The live agent whose key has this public prefix.
    #[cfg(any(test, feature = "testing"))]
    pub async fn find_agent_by_key_prefix(
        &self,
        prefix: &str,
    ) -> StoreResult<Option<agents::Model>> {
        let Some(agent_id) = self.find_api_key(prefix).await?.and_then(|k| k.agent_id) else {
            return Ok(None);
        };
        self.find_live_agent(agent_id).await
    }

    async fn find_live_agent(&self, agent_id: Uuid) -> StoreResult<Option<agents::Model>> {
        Ok(agents::Entity::find_by_id(agent_id)
            .filter(agents::Column::DeletedAt.is_null())
            .one(&self.db)
            .await?)
    }

    pub async fn find_agent(&self, agent_id: Uuid) -> StoreResult<Option<agents::Model>> {
        Ok(agents::Entity::find_by_id(agent_id).one(&self.db).await?)
    }

    pub async fn find_live_agent_by_resource(
        &self,
        resource_uid: Uuid,
    ) -> StoreResult<Option<agents::Model>> {
        Ok(agents::Entity::find()
            .filter(agents::Column::ResourceUid.eq(resource_uid))
            .filter(agents::Column::DeletedAt.is_null())
            .one(&self.db)
            .await?)
    }

    /// Live agent rows of the given resources, for expanding targets.
    pub async fn live_agents_by_resources(
        &self,
        resource_uids: &BTreeSet<Uuid>,
    ) -> StoreResult<Vec<agents::Model>> {
        if resource_uids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(agents::Entity::find()
            .filter(agents::Column::ResourceUid.is_in(resource_uids.iter().copied()))
            .filter(agents::Column::DeletedAt.is_null())
            .all(&self.db)
            .await?)
    }

    /// Records a heartbeat: the agent is `Online` as of now, at `version`, with no
    /// reason of an earlier `Error` left.
    pub async fn heartbeat(
        &self,
        agent_id: Uuid,
        version: Option<&str>,
    ) -> StoreResult<agents::Model> {
        if let Some(version) = version {
            check_agent_version(version)?;
        }
        agents::Entity::update_many()
            .col_expr(agents::Column::LastHeartbeat, Expr::current_timestamp())
            .col_expr(
                agents::Column::StateSince,
                Expr::cust(STATE_SINCE_WHEN_NOT_ONLINE),
            )
            .col_expr(agents::Column::Status, Expr::value(ONLINE))
            .col_expr(agents::Column::StateMessage, Expr::value(None::<String>))
            .col_expr(
                agents::Column::AgentVersion,
                Expr::value(version.map(str::to_owned)),
            )
            .filter(agents::Column::Id.eq(agent_id))
            .filter(agents::Column::DeletedAt.is_null())
            .exec_with_returning(&self.db)
            .await?
            .pop()
            .ok_or_else(|| StoreError::not_found(format!("live agent {agent_id}")))
    }

    /// Records the heartbeats of many agents, as of now, in one statement: `Error` with
    /// the agent's reason when it reports [`wire::STATE_ERROR`], else `Online`;
    /// `state_since` moves when the status changes. Deleted agents are skipped.
    pub async fn record_heartbeats(&self, beats: &[(Uuid, HeartbeatReport)]) -> StoreResult<u64> {
        let mut rows = Vec::with_capacity(beats.len());
        for (agent_id, beat) in beats {
            check_agent_version(&beat.version)?;
            rows.push(serde_json::json!({
                "id": agent_id,
                "version": beat.version,
                "status": beat.status(),
                "message": beat.state_message(),
            }));
        }
        let result = self
            .db
            .execute_raw(super::statement(
                "UPDATE agents a SET last_heartbeat = now(), status = v.status, \
                 state_message = v.message, \
                 state_since = CASE WHEN a.status IS DISTINCT FROM v.status \
                                    THEN now() ELSE a.state_since END, \
                 agent_version = v.version \
                 FROM jsonb_to_recordset($1::jsonb) \
                      AS v(id uuid, version varchar, status varchar, message text) \
                 WHERE a.id = v.id AND a.deleted_at IS NULL",
                [serde_json::Value::Array(rows).into()],
            ))
            .await?;
        Ok(result.rows_affected())
    }

    /// Marks `Offline` every live agent heard from (`Online` or `Error`) whose last
    /// heartbeat is older than `silence`, returning their names. An `Error` agent's reason
    /// is kept: it is the last thing the agent said.
    pub async fn mark_silent_agents_offline(
        &self,
        silence: std::time::Duration,
    ) -> StoreResult<Vec<String>> {
        use sea_orm::FromQueryResult;
        #[derive(FromQueryResult)]
        struct Name {
            name: String,
        }
        let seconds = silence.as_secs_f64();
        let names = Name::find_by_statement(super::statement(
            "UPDATE agents SET status = 'Offline', state_since = now() \
             WHERE status IN ('Online', 'Error') AND deleted_at IS NULL \
               AND last_heartbeat < now() - make_interval(secs => $1) \
             RETURNING name",
            [seconds.into()],
        ))
        .all(&self.db)
        .await?;
        Ok(names.into_iter().map(|n| n.name).collect())
    }

    /// Soft-deletes an agent; its events follow (database trigger).
    pub async fn soft_delete_agent(&self, agent_id: Uuid) -> StoreResult<bool> {
        let updated = agents::Entity::update_many()
            .col_expr(agents::Column::DeletedAt, Expr::current_timestamp())
            .filter(agents::Column::Id.eq(agent_id))
            .filter(agents::Column::DeletedAt.is_null())
            .exec(&self.db)
            .await?;
        Ok(updated.rows_affected > 0)
    }

    /// Removes an agent with its targets, events, labels and annotations.
    #[cfg(any(test, feature = "testing"))]
    pub async fn hard_delete_agent(&self, agent_id: Uuid) -> StoreResult<bool> {
        let txn = self.db.begin().await?;
        let deleted = agents::Entity::delete_by_id(agent_id).exec(&txn).await?;
        txn.commit().await?;
        Ok(deleted.rows_affected > 0)
    }
}

/// Refuses a version longer than the `agent_version` column.
pub fn check_agent_version(version: &str) -> StoreResult<()> {
    check_len("agent version", version, limits::AGENT_VERSION)
}

async fn upsert_agent(
    db: &impl ConnectionTrait,
    input: &AgentSync<'_>,
) -> StoreResult<agents::Model> {
    let existing = agents::Entity::find()
        .filter(agents::Column::ResourceUid.eq(input.resource_uid))
        .filter(agents::Column::DeletedAt.is_null())
        .one(db)
        .await?;
    match existing {
        Some(row)
            if row.name == input.name
                && row.cluster_name == input.cluster_name
                && row.is_suspended == input.is_suspended =>
        {
            Ok(row)
        }
        Some(row) => {
            let mut active: agents::ActiveModel = row.into();
            active.name = Set(input.name.to_owned());
            active.cluster_name = Set(input.cluster_name.to_owned());
            active.is_suspended = Set(input.is_suspended);
            Ok(active.update(db).await?)
        }
        None => {
            // A live row with this name and cluster belongs to an earlier resource of
            // the same name, which Kubernetes no longer has.
            agents::Entity::update_many()
                .col_expr(agents::Column::DeletedAt, Expr::current_timestamp())
                .filter(agents::Column::Name.eq(input.name))
                .filter(agents::Column::ClusterName.eq(input.cluster_name))
                .filter(agents::Column::DeletedAt.is_null())
                .exec(db)
                .await?;
            Ok(agents::ActiveModel {
                id: Set(Uuid::now_v7()),
                name: Set(input.name.to_owned()),
                cluster_name: Set(input.cluster_name.to_owned()),
                is_suspended: Set(input.is_suspended),
                resource_uid: Set(Some(input.resource_uid)),
                ..Default::default()
            }
            .insert(db)
            .await?)
        }
    }
}
