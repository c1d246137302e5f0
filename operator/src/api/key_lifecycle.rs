//! Keys over the agent API: an agent renews its own key (`POST /api/v1/agent/key`), and
//! the use of every key is recorded (`last_used_at`) at most once a minute per key, in one
//! statement a second for all of them, never a write per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use brokkr_crds::Agent;
use brokkr_crds::wire::RotatedKey;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, Resource};
use tracing::{info, warn};
use uuid::Uuid;

use super::{ApiError, ApiState, AuthenticatedAgent, lock};
use crate::controllers::error_chain;
use crate::controllers::key_secrets::{agent_secret_name, write_key_secret};
use crate::keys::issue_key;
use crate::status::to_time;
use crate::store::audit::{AuditEntry, AuditResource, actions};
use crate::store::{KeyHolder, KeyOwner, NewKey, Revoke, Store};

/// The hub cluster, for the API calls that change resources: agents renewing their keys
/// (the Agents' `keyPolicy`, the key Secrets in `namespace`, the operator's) and
/// generators pushing Stacks.
#[derive(Clone)]
pub struct ClusterAccess {
    pub client: Client,
    /// The operator's namespace, where `brokkr-agent-<name>` Secrets live.
    pub namespace: String,
}

/// `POST /api/v1/agent/key`: a new key for the calling agent, valid for its Agent's
/// `keyPolicy.lifetime`; the key it called with stays valid for `keyPolicy.overlap`. The
/// hub's Secret `brokkr-agent-<name>` is written before the change commits, so the database
/// and the Secret change together or not at all.
pub(super) async fn rotate(
    agent: AuthenticatedAgent,
    State(state): State<ApiState>,
) -> Result<Json<RotatedKey>, ApiError> {
    let Some(access) = state.cluster_access.as_deref() else {
        return Err(ApiError::NotImplemented(
            "this hub keeps no key Secrets (no Kubernetes client); it cannot rotate keys".into(),
        ));
    };
    let unavailable = |err: kube::Error| ApiError::Unavailable(Box::new(err));
    let resource = Api::<Agent>::all(access.client.clone())
        .get_opt(&agent.name)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            ApiError::Forbidden(format!("agent {} has no Agent resource", agent.name))
        })?;
    let policy = resource.spec.key_policy();
    let (lifetime, overlap) = policy
        .validate()
        .and_then(|()| Ok((policy.lifetime()?, policy.overlap()?)))
        .map_err(|err| ApiError::Unprocessable(format!("the Agent's {err}")))?;
    let owner_ref = resource
        .controller_owner_ref(&())
        .ok_or_else(|| ApiError::Forbidden(format!("agent {} has no uid yet", agent.name)))?;

    let issued = issue_key();
    let pending = state
        .store
        .begin_key_change(
            KeyOwner::Agent(agent.id),
            NewKey {
                prefix: &issued.prefix,
                hash: &issued.hash,
                lifetime,
            },
            Revoke::After {
                key_id: agent.key.id,
                overlap,
            },
        )
        .await?;
    let secrets: Api<Secret> = Api::namespaced(access.client.clone(), &access.namespace);
    let secret = agent_secret_name(&agent.name);
    write_key_secret(&secrets, &secret, owner_ref, &issued.key)
        .await
        .map_err(unavailable)?;
    let audit = AuditEntry {
        actor: format!("agent/{}", agent.name),
        action: actions::KEY_ROTATED,
        resource: AuditResource {
            kind: "Agent",
            namespace: None,
            name: agent.name.clone(),
            id: Some(agent.id),
        },
        details: serde_json::json!({
            "prefix": pending.issued.prefix,
            "previousPrefix": agent.key.prefix,
            "expiresAt": pending.issued.expires_at,
            "previousValidUntil": pending
                .revoked
                .iter()
                .find(|k| k.id == agent.key.id)
                .and_then(|k| k.revoked_at),
            "unreceivedRetired": pending
                .revoked
                .iter()
                .filter(|k| k.id != agent.key.id)
                .map(|k| k.prefix.as_str())
                .collect::<Vec<_>>(),
            "secret": format!("{}/{secret}", access.namespace),
        }),
    };
    let previous_valid_until = pending
        .revoked
        .iter()
        .find(|k| k.id == agent.key.id)
        .and_then(|k| k.revoked_at);
    let (row, _) = pending.commit(&[audit]).await?;
    info!(agent = %agent.name, prefix = %row.prefix, previous = %agent.key.prefix, "agent rotated its key");
    let time = |at| {
        to_time(at)
            .ok_or_else(|| ApiError::Unprocessable("the key's times are out of range".into()))
    };
    Ok(Json(RotatedKey {
        key: issued.key,
        prefix: row.prefix,
        issued_at: time(row.created_at)?,
        expires_at: time(row.expires_at)?,
        previous_key_valid_until: previous_valid_until.and_then(to_time),
    }))
}

/// How often a key's `last_used_at` is written at most.
pub const KEY_USE_RESOLUTION: Duration = Duration::from_secs(60);

const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Beyond this many remembered keys, those not used for a minute are forgotten.
const MAX_REMEMBERED: usize = 100_000;

struct Used {
    owner: KeyOwner,
    name: String,
    prefix: String,
}

#[derive(Default)]
struct UseState {
    /// When each key's use was last queued for writing.
    queued_at: HashMap<Uuid, Instant>,
    pending: HashMap<Uuid, Used>,
}

/// Uses of keys not written yet, at most one per key a minute.
#[derive(Default)]
pub struct KeyUse {
    state: Mutex<UseState>,
    flusher: OnceLock<()>,
}

impl KeyUse {
    /// Notes that `holder`'s key authenticated a request; the first use in a minute is
    /// written within a second, by a writer that ends when the API owning `self` is dropped.
    pub fn used(
        self: &Arc<Self>,
        store: &Store,
        holder: &KeyHolder,
        owner: KeyOwner,
        now: Instant,
    ) {
        {
            let mut state = lock(&self.state);
            if state
                .queued_at
                .get(&holder.key_id)
                .is_some_and(|at| now.saturating_duration_since(*at) < KEY_USE_RESOLUTION)
            {
                return;
            }
            if state.queued_at.len() >= MAX_REMEMBERED {
                state
                    .queued_at
                    .retain(|_, at| now.saturating_duration_since(*at) < KEY_USE_RESOLUTION);
            }
            state.queued_at.insert(holder.key_id, now);
            state.pending.insert(
                holder.key_id,
                Used {
                    owner,
                    name: holder.owner_name.clone(),
                    prefix: holder.prefix.clone(),
                },
            );
        }
        self.flusher.get_or_init(|| {
            tokio::spawn(flush_until_dropped(Arc::downgrade(self), store.clone()));
        });
    }

    /// Lets the next use of these keys be queued again (their write failed).
    fn forget(&self, ids: &[Uuid]) {
        let mut state = lock(&self.state);
        for id in ids {
            state.queued_at.remove(id);
        }
    }
}

async fn flush_until_dropped(key_use: Weak<KeyUse>, store: Store) {
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        let Some(key_use) = key_use.upgrade() else {
            return;
        };
        let batch: HashMap<Uuid, Used> = lock(&key_use.state).pending.drain().collect();
        if batch.is_empty() {
            continue;
        }
        let ids: Vec<Uuid> = batch.keys().copied().collect();
        match store.record_key_use(&ids).await {
            Ok(first) => {
                let entries: Vec<AuditEntry> = first
                    .iter()
                    .filter_map(|used| batch.get(&used.id))
                    .map(first_use)
                    .collect();
                if let Err(err) = store.record_audit(&entries).await {
                    warn!(error = %error_chain(&err), keys = entries.len(), "could not record the first use of keys");
                }
            }
            Err(err) => {
                warn!(error = %error_chain(&err), keys = ids.len(), "could not record when keys were used; retrying with their next use");
                key_use.forget(&ids);
            }
        }
    }
}

fn first_use(used: &Used) -> AuditEntry {
    let (kind, actor) = match used.owner {
        KeyOwner::Agent(_) => ("Agent", format!("agent/{}", used.name)),
        KeyOwner::Generator(_) => ("Generator", format!("generator/{}", used.name)),
    };
    // A generator's database name is `<namespace>/<name>`.
    let (namespace, name) = match used.name.split_once('/') {
        Some((namespace, name)) if kind == "Generator" => {
            (Some(namespace.to_owned()), name.to_owned())
        }
        _ => (None, used.name.clone()),
    };
    AuditEntry {
        actor,
        action: actions::KEY_FIRST_USED,
        resource: AuditResource {
            kind,
            namespace,
            name,
            id: Some(used.owner.id()),
        },
        details: serde_json::json!({"prefix": used.prefix}),
    }
}
