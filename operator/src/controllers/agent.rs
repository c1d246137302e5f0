//! Agent (cluster-scoped) → `agents` row, labels, annotations, and the agent's key
//! Secret in the operator's namespace.

use std::sync::Arc;
use std::time::Duration;

use brokkr_crds::conditions::{new_condition, reasons, set_condition, types};
use brokkr_crds::validation::check_labels;
use brokkr_crds::{Agent, AgentPhase, AgentStatus, REVOKE_KEY_ANNOTATION, SecretRef};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use tracing::instrument;

use super::key_secrets::{KeyStep, agent_secret_name, reconcile_key, revoke_requested_by};
use super::{
    Context, Error, Result, label_strings, publish, resource_uid, spec_field_manager,
    with_finalizer, write_status,
};
use crate::status::{now, to_time};
use crate::store::audit::{AuditEntry, AuditResource, actions};
use crate::store::{AgentSync, KeyOwner, StoreError};

#[instrument(skip_all, fields(agent = %agent.name_any()))]
pub async fn reconcile(agent: Arc<Agent>, ctx: Arc<Context>) -> Result<Action> {
    let api: Api<Agent> = Api::all(ctx.client.clone());
    with_finalizer(
        &ctx,
        "agent",
        api.clone(),
        agent,
        |agent| apply(agent, &ctx, api.clone()),
        |agent| cleanup(agent, &ctx),
    )
    .await
}

pub fn secret_name(agent: &Agent) -> String {
    agent_secret_name(&agent.name_any())
}

/// Heartbeat times are refreshed this often; Online/Offline flips come at once, and
/// `KeyExpiring` flips on time.
const REFRESH: Duration = Duration::from_secs(60);

/// Why an Agent's spec or labels cannot be recorded: pure.
pub fn validate(agent: &Agent, labels: &[String]) -> Option<String> {
    if let Err(err) = agent.spec.validate() {
        return Some(err.to_string());
    }
    check_labels(labels).err().map(|err| err.to_string())
}

async fn apply(agent: Arc<Agent>, ctx: &Context, api: Api<Agent>) -> Result<Action> {
    let labels = label_strings(&*agent);
    let previous = agent.status.clone().unwrap_or_default();
    let mut status = previous.clone();
    status.observed_generation = agent.metadata.generation;

    if let Some(message) = validate(&agent, &labels) {
        refuse(ctx, &agent, &api, &previous, status, message).await?;
        return Ok(Action::await_change());
    }
    let synced = ctx
        .store
        .sync_agent(&AgentSync {
            resource_uid: resource_uid(&*agent)?,
            name: &agent.name_any(),
            cluster_name: &agent.spec.cluster_name,
            is_suspended: agent.spec.suspend,
            labels: &labels,
            annotations: &agent.spec.annotations,
        })
        .await;
    let row = match synced {
        Ok(row) => row,
        Err(err @ (StoreError::TooLong { .. } | StoreError::Conflict { .. })) => {
            refuse(ctx, &agent, &api, &previous, status, err.to_string()).await?;
            return Ok(Action::await_change());
        }
        Err(err) => return Err(err.into()),
    };

    audit_suspension(ctx, &agent, &previous, row.id).await?;

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let owner_ref = agent
        .controller_owner_ref(&())
        .ok_or(Error::MissingMetadata("uid"))?;
    let name = agent.name_any();
    let secret = secret_name(&agent);
    let secret_path = format!("{}/{secret}", ctx.config.namespace);
    // Validated above, with the rest of the spec.
    let lifetime = agent
        .spec
        .key_policy()
        .lifetime()
        .unwrap_or(brokkr_crds::access::DEFAULT_KEY_LIFETIME);
    let key = reconcile_key(
        ctx,
        KeyStep {
            api: &api,
            object: &*agent,
            previous_conditions: &previous.conditions,
            recover: format!(
                "to recover, run `kubectl annotate agent {name} {REVOKE_KEY_ANNOTATION}=now` and install the new key from Secret {secret_path} in the spoke"
            ),
            revoked_note: ": give it to the agent",
            secrets: &secrets,
            secret_namespace: &ctx.config.namespace,
            secret: &secret,
            owner_ref,
            owner: KeyOwner::Agent(row.id),
            lifetime,
            revoke_requested_by: revoke_requested_by(&agent.metadata),
            resource: AuditResource {
                kind: "Agent",
                namespace: None,
                name: name.clone(),
                id: Some(row.id),
            },
        },
    )
    .await?;
    set_condition(&mut status.conditions, key.condition);
    status.key = Some(key.status);
    let requeue = key.recheck.map_or(REFRESH, |wait| wait.min(REFRESH));

    status.agent_id = Some(row.id.to_string());
    status.key_secret = Some(SecretRef {
        name: secret.clone(),
        namespace: ctx.config.namespace.clone(),
    });
    status.version = row.agent_version.clone();
    status.last_heartbeat = row.last_heartbeat.and_then(to_time);
    status.phase = Some(if agent.spec.suspend {
        AgentPhase::Suspended
    } else {
        match row.status.as_str() {
            "Online" => AgentPhase::Online,
            "Offline" => AgentPhase::Offline,
            _ => AgentPhase::Pending,
        }
    });
    let ready = if agent.spec.suspend {
        new_condition(
            types::READY,
            true,
            reasons::SUSPENDED,
            "registered and suspended: the hub refuses its requests",
            agent.metadata.generation,
            now(),
        )
    } else {
        new_condition(
            types::READY,
            true,
            reasons::RECONCILED,
            format!(
                "registered; its key is in Secret {}/{secret}",
                ctx.config.namespace
            ),
            agent.metadata.generation,
            now(),
        )
    };
    set_condition(&mut status.conditions, ready);
    let online = match status.phase {
        Some(AgentPhase::Online) => (true, reasons::HEARTBEAT, "heartbeats arrive on time"),
        Some(AgentPhase::Offline) => (
            false,
            reasons::HEARTBEAT_MISSED,
            "missed three heartbeats; what it applied stays as it was",
        ),
        _ if row.last_heartbeat.is_none() => (
            false,
            reasons::NEVER_CONNECTED,
            "no heartbeat yet: install brokkr-agent in the spoke with this agent's key",
        ),
        _ => (false, reasons::SUSPENDED, "suspended"),
    };
    set_condition(
        &mut status.conditions,
        new_condition(
            types::ONLINE,
            online.0,
            online.1,
            online.2,
            agent.metadata.generation,
            now(),
        ),
    );
    write_status(&api, &*agent, Some(&previous), &status).await?;
    Ok(Action::requeue(requeue))
}

/// Records a suspension or resumption the status does not show yet (a first registration
/// is neither). Written before the status, so a failure is retried, not lost.
async fn audit_suspension(
    ctx: &Context,
    agent: &Agent,
    previous: &AgentStatus,
    row_id: uuid::Uuid,
) -> Result<()> {
    let Some(phase) = previous.phase else {
        return Ok(());
    };
    let was_suspended = phase == AgentPhase::Suspended;
    if was_suspended == agent.spec.suspend {
        return Ok(());
    }
    let entry = AuditEntry {
        actor: spec_field_manager(agent).unwrap_or_else(|| "unknown".into()),
        action: if agent.spec.suspend {
            actions::AGENT_SUSPENDED
        } else {
            actions::AGENT_RESUMED
        },
        resource: AuditResource {
            kind: "Agent",
            namespace: None,
            name: agent.name_any(),
            id: Some(row_id),
        },
        details: serde_json::json!({ "clusterName": agent.spec.cluster_name }),
    };
    ctx.store.record_audit(&[entry]).await?;
    Ok(())
}

async fn refuse(
    ctx: &Context,
    agent: &Agent,
    api: &Api<Agent>,
    previous: &AgentStatus,
    mut status: AgentStatus,
    message: String,
) -> Result<()> {
    let changed = set_condition(
        &mut status.conditions,
        new_condition(
            types::READY,
            false,
            reasons::INVALID_SPEC,
            message.clone(),
            agent.metadata.generation,
            now(),
        ),
    );
    if changed {
        publish(
            ctx,
            &agent.object_ref(&()),
            EventType::Warning,
            reasons::INVALID_SPEC,
            "Register",
            message,
        )
        .await;
    }
    write_status(api, agent, Some(previous), &status).await
}

async fn cleanup(agent: Arc<Agent>, ctx: &Context) -> Result<Action> {
    // The key Secret goes with the Agent (owner reference); the row is retired, which
    // also retires its events, and its requests are refused from now on.
    if let Some(row) = ctx
        .store
        .find_live_agent_by_resource(resource_uid(&*agent)?)
        .await?
    {
        ctx.store.soft_delete_agent(row.id).await?;
    }
    Ok(Action::await_change())
}
