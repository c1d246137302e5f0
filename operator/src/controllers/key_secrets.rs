//! The Secrets that hold agent and generator keys. The plain key lives only there;
//! the database keeps its hash.

use std::collections::BTreeMap;
use std::time::Duration;

use brokkr_crds::conditions::{new_condition, reasons, types};
use brokkr_crds::{KeyStatus, OPERATOR_FIELD_MANAGER, REVOKE_KEY_ANNOTATION};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference};
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource};

use super::{Context, Result, publish};
use crate::entity::api_keys;
use crate::keys::{issue_key, key_matches};
use crate::status::to_time;
use crate::store::audit::{AuditEntry, AuditResource, OPERATOR_ACTOR, actions, bounded_list};
use crate::store::{KeyOwner, NewKey, Revoke, Store};

/// Data key of the Secret entry holding a key.
pub const SECRET_KEY: &str = "pak";

/// Name of the hub Secret holding Agent `name`'s key (in the operator's namespace).
pub fn agent_secret_name(name: &str) -> String {
    format!("brokkr-agent-{name}")
}

/// Name of the Secret holding Generator `name`'s key (in the Generator's namespace).
pub fn generator_secret_name(name: &str) -> String {
    format!("brokkr-generator-{name}")
}

/// The key Secret `name` holds, if it exists and holds one.
pub async fn read_key_secret(api: &Api<Secret>, name: &str) -> Result<Option<String>> {
    Ok(api.get_opt(name).await?.and_then(|secret| {
        secret
            .data
            .as_ref()
            .and_then(|data| data.get(SECRET_KEY))
            .and_then(|value| std::str::from_utf8(&value.0).ok())
            .map(str::to_owned)
    }))
}

/// Writes `key` into Secret `name` (server-side apply, owned by `owner`).
pub async fn write_key_secret(
    api: &Api<Secret>,
    name: &str,
    owner: OwnerReference,
    key: &str,
) -> kube::Result<()> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            owner_references: Some(vec![owner]),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "brokkr".to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            SECRET_KEY.to_owned(),
            ByteString(key.as_bytes().to_vec()),
        )])),
        ..Default::default()
    };
    let mut patch = serde_json::to_value(&secret).unwrap_or_default();
    patch["apiVersion"] = "v1".into();
    patch["kind"] = "Secret".into();
    api.patch(
        name,
        &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// What the key step of an Agent's or Generator's reconcile works on.
pub struct KeyStep<'a, K> {
    /// The resource, to remove the revoke annotation from.
    pub api: &'a Api<K>,
    pub object: &'a K,
    /// Its `KeyExpiring` condition so far.
    pub previous_conditions: &'a [Condition],
    /// How to get a new key, for the `KeyExpiring` message.
    pub recover: String,
    /// Appended to the revocation Event (who needs the new key).
    pub revoked_note: &'a str,
    /// Where the key Secret lives: `secrets` of namespace `secret_namespace`.
    pub secrets: &'a Api<Secret>,
    pub secret_namespace: &'a str,
    pub secret: &'a str,
    /// Owner reference of the Secret (the resource).
    pub owner_ref: OwnerReference,
    pub owner: KeyOwner,
    pub lifetime: Duration,
    /// The resource asks for its keys to be revoked (`brokkr.io/revoke-key`), by whom.
    pub revoke_requested_by: Option<String>,
    /// The resource, for audit rows.
    pub resource: AuditResource,
}

/// What the key step found: for the resource's status, and when to look again.
pub struct KeyReport {
    pub status: KeyStatus,
    pub condition: Condition,
    /// When `KeyExpiring` changes next, if it still will.
    pub recheck: Option<Duration>,
}

/// The key step of an Agent's or Generator's reconcile: [`ensure_key`], then an Event for
/// what it did (and the revoke annotation removed once carried out), the key's status and
/// its `KeyExpiring` condition (an expiry is recorded in the audit log once).
pub async fn reconcile_key<K>(ctx: &Context, step: KeyStep<'_, K>) -> Result<KeyReport>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let reference = step.object.object_ref(&());
    let name = step.object.meta().name.clone().unwrap_or_default();
    let generation = step.object.meta().generation;
    let secret_path = format!("{}/{}", step.secret_namespace, step.secret);
    let (api, previous, recover, revoked_note) = (
        step.api,
        step.previous_conditions,
        step.recover.clone(),
        step.revoked_note,
    );
    let resource = step.resource.clone();
    let (outcome, key) = ensure_key(&ctx.store, step).await?;
    match &outcome {
        KeyOutcome::Unchanged => {}
        KeyOutcome::Issued { prefix } => {
            let note = format!("issued key {prefix} into Secret {secret_path}");
            publish(
                ctx,
                &reference,
                EventType::Normal,
                "KeyIssued",
                "IssueKey",
                note,
            )
            .await;
        }
        KeyOutcome::Revoked { revoked, prefix } => {
            remove_revoke_annotation(api, &name).await?;
            let note = format!(
                "revoked {} key(s) ({}) as {REVOKE_KEY_ANNOTATION} asked; issued key {prefix} into Secret {secret_path}{revoked_note}",
                revoked.len(),
                revoked.join(", ")
            );
            publish(
                ctx,
                &reference,
                EventType::Normal,
                "KeyRevoked",
                "RevokeKey",
                note,
            )
            .await;
        }
    }
    let now = chrono::Utc::now();
    let (expiring, reason, message) = key_condition(&key, now, &recover);
    let was_expired = previous
        .iter()
        .any(|c| c.type_ == types::KEY_EXPIRING && c.reason == reasons::KEY_EXPIRED);
    if reason == reasons::KEY_EXPIRED && !was_expired {
        let entry = AuditEntry {
            actor: OPERATOR_ACTOR.to_owned(),
            action: actions::KEY_EXPIRED,
            resource,
            details: serde_json::json!({"prefix": key.prefix, "expiresAt": key.expires_at}),
        };
        if let Err(err) = ctx.store.record_audit(&[entry]).await {
            tracing::warn!(error = %super::error_chain(&err), "failed to record a key's expiry");
        }
    }
    Ok(KeyReport {
        status: key_status(&key),
        condition: new_condition(
            types::KEY_EXPIRING,
            expiring,
            reason,
            message,
            generation,
            crate::status::now(),
        ),
        recheck: until_key_condition_changes(&key, now),
    })
}

/// What the key step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyOutcome {
    /// The Secret holds a key the database knows and has not revoked.
    Unchanged,
    /// A new key was issued into the Secret (first key, or the Secret's key is unknown
    /// or revoked: deleted Secret, restored database).
    Issued { prefix: String },
    /// Every valid key was revoked and a new one issued into the Secret.
    Revoked {
        revoked: Vec<String>,
        prefix: String,
    },
}

/// Makes sure the Secret holds a key of `step.owner` that is not revoked, revoking every
/// key first when asked. The database change commits only after the Secret is written.
/// Returns what was done and the Secret's key row.
pub async fn ensure_key<K>(
    store: &Store,
    step: KeyStep<'_, K>,
) -> Result<(KeyOutcome, api_keys::Model)> {
    let revoke_all = step.revoke_requested_by.is_some();
    if !revoke_all {
        let keys = store.api_keys_of(step.owner).await?;
        if let Some(key) = read_key_secret(step.secrets, step.secret).await? {
            let now = chrono::Utc::now();
            let prefix = crate::keys::key_prefix(&key);
            let current = keys.into_iter().find(|k| {
                Some(k.prefix.as_str()) == prefix
                    && k.revoked_at.is_none_or(|revoked| now < revoked)
                    && key_matches(&key, &k.key_hash)
            });
            if let Some(current) = current {
                return Ok((KeyOutcome::Unchanged, current));
            }
        }
    }
    let issued = issue_key();
    let pending = store
        .begin_key_change(
            step.owner,
            NewKey {
                prefix: &issued.prefix,
                hash: &issued.hash,
                lifetime: step.lifetime,
            },
            if revoke_all {
                Revoke::AllNow
            } else {
                Revoke::Nothing
            },
        )
        .await?;
    write_key_secret(step.secrets, step.secret, step.owner_ref, &issued.key).await?;
    let actor = step
        .revoke_requested_by
        .clone()
        .unwrap_or_else(|| OPERATOR_ACTOR.to_owned());
    let revoked: Vec<String> = pending.revoked.iter().map(|k| k.prefix.clone()).collect();
    let mut audit = Vec::new();
    if revoke_all {
        audit.push(AuditEntry {
            actor: actor.clone(),
            action: actions::KEY_REVOKED,
            resource: step.resource.clone(),
            details: serde_json::json!({
                "prefixes": bounded_list(&revoked),
                "annotation": REVOKE_KEY_ANNOTATION,
            }),
        });
    }
    audit.push(AuditEntry {
        actor,
        action: actions::KEY_ISSUED,
        resource: step.resource,
        details: serde_json::json!({
            "prefix": pending.issued.prefix,
            "expiresAt": pending.issued.expires_at,
            "secret": step.secret,
        }),
    });
    let (row, _) = pending.commit(&audit).await?;
    let outcome = if revoke_all {
        KeyOutcome::Revoked {
            revoked,
            prefix: row.prefix.clone(),
        }
    } else {
        KeyOutcome::Issued {
            prefix: row.prefix.clone(),
        }
    };
    Ok((outcome, row))
}

/// Who set the revoke annotation on `object`: the field manager owning it, else the
/// operator (an annotation set with a plain update has no finer owner).
pub fn revoke_requested_by(meta: &ObjectMeta) -> Option<String> {
    meta.annotations.as_ref()?.get(REVOKE_KEY_ANNOTATION)?;
    let field = format!("\"f:{REVOKE_KEY_ANNOTATION}\"");
    let manager = meta.managed_fields.iter().flatten().find_map(|entry| {
        let fields = serde_json::to_string(&entry.fields_v1).ok()?;
        fields
            .contains(&field)
            .then(|| entry.manager.clone())
            .flatten()
    });
    Some(manager.unwrap_or_else(|| OPERATOR_ACTOR.to_owned()))
}

/// Removes the revoke annotation, once its request is carried out.
pub async fn remove_revoke_annotation<K>(api: &Api<K>, name: &str) -> kube::Result<()>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({"metadata": {"annotations": {REVOKE_KEY_ANNOTATION: null}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// `KeyExpiring` of a key at `now`, as (status, reason, message): pure. `recover` says how
/// to get a new key.
pub fn key_condition(
    key: &api_keys::Model,
    now: chrono::DateTime<chrono::Utc>,
    recover: &str,
) -> (bool, &'static str, String) {
    let expires = key
        .expires_at
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if key.expires_at <= now {
        return (
            true,
            reasons::KEY_EXPIRED,
            format!(
                "key {} expired at {expires} and is refused; {recover}",
                key.prefix
            ),
        );
    }
    if now >= expiring_from(key) {
        return (
            true,
            reasons::KEY_EXPIRES_SOON,
            format!(
                "key {} expires at {expires}, with less than 10% of its lifetime left; an agent renews its key at 2/3 of its lifetime, so check that it runs, or {recover}",
                key.prefix
            ),
        );
    }
    (
        false,
        reasons::KEY_VALID,
        format!("key {} is valid until {expires}", key.prefix),
    )
}

/// When less than 10 % of the key's lifetime is left.
fn expiring_from(key: &api_keys::Model) -> chrono::DateTime<chrono::Utc> {
    let lifetime = key.expires_at - key.created_at;
    key.expires_at - lifetime / 10
}

/// How long until `KeyExpiring` of `key` next changes, if it still will.
pub fn until_key_condition_changes(
    key: &api_keys::Model,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<Duration> {
    [expiring_from(key), key.expires_at]
        .into_iter()
        .filter(|at| *at > now)
        .min()
        .and_then(|at| (at - now).to_std().ok())
        // A moment late rather than early, so the flip is seen.
        .map(|wait| wait + Duration::from_secs(1))
}

/// The status view of a key.
pub fn key_status(key: &api_keys::Model) -> KeyStatus {
    KeyStatus {
        prefix: key.prefix.clone(),
        issued_at: to_time(key.created_at),
        expires_at: to_time(key.expires_at),
        last_used_at: key.last_used_at.and_then(to_time),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(issued: chrono::DateTime<chrono::Utc>, lifetime_hours: i64) -> api_keys::Model {
        api_keys::Model {
            id: uuid::Uuid::now_v7(),
            created_at: issued,
            agent_id: Some(uuid::Uuid::now_v7()),
            generator_id: None,
            prefix: "abc".into(),
            key_hash: String::new(),
            scopes: "agent".into(),
            expires_at: issued + chrono::Duration::hours(lifetime_hours),
            last_used_at: None,
            revoked_at: None,
        }
    }

    #[test]
    fn key_expiring_flips_at_ten_percent_left_and_at_expiry() {
        let issued = chrono::Utc::now();
        let key = key(issued, 10);
        let at = |minutes| issued + chrono::Duration::minutes(minutes);
        assert_eq!(key_condition(&key, at(0), "x").1, reasons::KEY_VALID);
        assert!(!key_condition(&key, at(539), "x").0);
        let soon = key_condition(&key, at(541), "revoke it");
        assert_eq!((soon.0, soon.1), (true, reasons::KEY_EXPIRES_SOON));
        assert!(soon.2.contains("revoke it"));
        let expired = key_condition(&key, at(600), "annotate it");
        assert_eq!((expired.0, expired.1), (true, reasons::KEY_EXPIRED));
        assert!(expired.2.contains("annotate it"));

        assert_eq!(
            until_key_condition_changes(&key, at(0)),
            Some(Duration::from_secs(9 * 3600 + 1))
        );
        assert_eq!(
            until_key_condition_changes(&key, at(541)),
            Some(Duration::from_secs(59 * 60 + 1))
        );
        assert_eq!(until_key_condition_changes(&key, at(601)), None);
    }

    #[test]
    fn the_revoke_annotation_names_who_set_it() {
        let mut meta: ObjectMeta = serde_json::from_value(serde_json::json!({
            "name": "edge",
            "annotations": {REVOKE_KEY_ANNOTATION: "now"},
            "managedFields": [
                {"manager": "kubectl-client-side-apply", "operation": "Update", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:spec": {}}},
                {"manager": "kubectl-annotate", "operation": "Update", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:annotations": {"f:brokkr.io/revoke-key": {}}}}}
            ]
        }))
        .unwrap();
        assert_eq!(
            revoke_requested_by(&meta).as_deref(),
            Some("kubectl-annotate")
        );
        meta.managed_fields = None;
        assert_eq!(revoke_requested_by(&meta).as_deref(), Some(OPERATOR_ACTOR));
        meta.annotations = None;
        assert_eq!(revoke_requested_by(&meta), None);
    }
}
