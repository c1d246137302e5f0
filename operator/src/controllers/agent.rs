//! Agent (cluster-scoped) → `agents` row, labels, annotations, and the agent's key
//! Secret in the operator's namespace.

use std::sync::Arc;
use std::time::Duration;

use brokkr_crds::conditions::{find_condition, new_condition, reasons, set_condition, types};
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
use crate::entity::agents;
use crate::status::{now, status_changed, to_time, whole_seconds};
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

/// Heartbeat times are refreshed this often; Online/Error/Offline flips (and a new reason of
/// an Error) come at once, and
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
    status.last_heartbeat = row.last_heartbeat.and_then(to_time).map(whole_seconds);
    let presence = presence(agent.spec.suspend, &row);
    status.phase = Some(presence.phase);
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
    for (type_, (holds, reason, message)) in [
        (types::ONLINE, presence.online),
        (types::HEALTHY, presence.healthy),
    ] {
        set_condition(
            &mut status.conditions,
            new_condition(
                type_,
                holds,
                reason,
                message,
                agent.metadata.generation,
                now(),
            ),
        );
    }
    let was_error = find_condition(&previous.conditions, types::HEALTHY)
        .is_some_and(|c| c.reason == reasons::AGENT_ERROR);
    if presence.phase == AgentPhase::Error && !was_error {
        publish(
            ctx,
            &agent.object_ref(&()),
            EventType::Warning,
            reasons::AGENT_ERROR,
            "Heartbeat",
            event_note(row.state_message.as_deref().unwrap_or(NO_REASON)),
        )
        .await;
    }
    hold_heartbeat(&previous, &mut status);
    write_status(&api, &*agent, Some(&previous), &status).await?;
    Ok(Action::requeue(requeue))
}

/// How stale `status.lastHeartbeat` may get before it is written again. Heartbeats come
/// every 15 s: showing each would rewrite every Agent's status on every refresh (167
/// writes a second at 10,000 agents) and wake every watcher of Agents; whether heartbeats
/// arrive is the `Online` condition, written the moment it changes.
const HEARTBEAT_SHOWN_EVERY: Duration = Duration::from_secs(300);

/// Keeps the `lastHeartbeat` shown when it is all that changed and by less than
/// [`HEARTBEAT_SHOWN_EVERY`]; any other change shows the exact one with it.
fn hold_heartbeat(previous: &AgentStatus, status: &mut AgentStatus) {
    let (Some(shown), Some(heard)) = (&previous.last_heartbeat, &status.last_heartbeat) else {
        return;
    };
    let newer_by = heard.0.as_second() - shown.0.as_second();
    let heard = status.last_heartbeat.replace(shown.clone());
    let held = (0..HEARTBEAT_SHOWN_EVERY.as_secs() as i64).contains(&newer_by)
        && !status_changed(previous, status);
    if !held {
        status.last_heartbeat = heard;
    }
}

/// A condition's status, reason and message.
type ConditionState = (bool, &'static str, String);

/// What an Agent's status says of its agent, from its row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    pub phase: AgentPhase,
    /// `Online`: heartbeats arrive in time (also while the agent reports `Error`).
    pub online: ConditionState,
    /// `Healthy`: the agent reports it works. `False` whenever it is not heard from: an
    /// agent whose state is not known is not known to work, and `kubectl describe` then
    /// names why (`HeartbeatMissed`, `NeverConnected`, `Suspended`) rather than `Unknown`.
    pub healthy: ConditionState,
}

/// Shown when an agent reports `Error` without saying why.
const NO_REASON: &str = "the agent reports it cannot work and gave no reason";

/// The phase and the `Online` and `Healthy` conditions of an Agent whose row is `row`:
/// pure.
pub fn presence(suspended: bool, row: &agents::Model) -> Presence {
    let last_said = row
        .state_message
        .as_deref()
        .map(|message| format!("; it last reported: {message}"))
        .unwrap_or_default();
    let never = (
        false,
        reasons::NEVER_CONNECTED,
        "no heartbeat yet: install brokkr-agent in the spoke with this agent's key".to_owned(),
    );
    let (phase, online, healthy) = match row.status.as_str() {
        _ if suspended && row.last_heartbeat.is_none() => {
            (AgentPhase::Suspended, never.clone(), never)
        }
        _ if suspended => {
            let suspended = (false, reasons::SUSPENDED, "suspended".to_owned());
            (AgentPhase::Suspended, suspended.clone(), suspended)
        }
        "Online" => (
            AgentPhase::Online,
            (true, reasons::HEARTBEAT, HEARTBEATS_ARRIVE.to_owned()),
            (
                true,
                reasons::AGENT_READY,
                "the agent reports it works".to_owned(),
            ),
        ),
        "Error" => (
            AgentPhase::Error,
            (true, reasons::HEARTBEAT, HEARTBEATS_ARRIVE.to_owned()),
            (
                false,
                reasons::AGENT_ERROR,
                row.state_message
                    .clone()
                    .unwrap_or_else(|| NO_REASON.to_owned()),
            ),
        ),
        "Offline" => (
            AgentPhase::Offline,
            (
                false,
                reasons::HEARTBEAT_MISSED,
                "missed three heartbeats; what it applied stays as it was".to_owned(),
            ),
            (
                false,
                reasons::HEARTBEAT_MISSED,
                format!("no heartbeat, so whether it works is not known{last_said}"),
            ),
        ),
        _ => (AgentPhase::Pending, never.clone(), never),
    };
    Presence {
        phase,
        online,
        healthy,
    }
}

const HEARTBEATS_ARRIVE: &str = "heartbeats arrive on time";

/// `message` cut to fit an Event's note (at most 1 kB).
fn event_note(message: &str) -> String {
    brokkr_common::truncate_bytes(message, brokkr_common::error::MAX_ERROR_CHAIN).to_owned()
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

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn row(status: &str, message: Option<&str>, heard: bool) -> agents::Model {
        let at = chrono::DateTime::UNIX_EPOCH;
        agents::Model {
            id: uuid::Uuid::nil(),
            created_at: at,
            updated_at: at,
            deleted_at: None,
            name: "edge".into(),
            cluster_name: "eu".into(),
            last_heartbeat: heard.then_some(at),
            status: status.into(),
            state_message: message.map(str::to_owned),
            state_since: heard.then_some(at),
            is_suspended: false,
            agent_version: None,
            resource_uid: None,
        }
    }

    fn at(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(second).unwrap())
    }

    #[test]
    fn last_heartbeat_is_rewritten_only_with_another_change_or_once_it_is_minutes_stale() {
        let shown = AgentStatus {
            phase: Some(AgentPhase::Online),
            last_heartbeat: Some(at(1_000)),
            ..AgentStatus::default()
        };
        let shown_after = |heard: i64, phase: AgentPhase| {
            let mut status = AgentStatus {
                phase: Some(phase),
                last_heartbeat: Some(at(heard)),
                ..shown.clone()
            };
            hold_heartbeat(&shown, &mut status);
            status.last_heartbeat.unwrap().0.as_second()
        };
        assert_eq!(shown_after(1_015, AgentPhase::Online), 1_000, "held");
        assert_eq!(shown_after(1_299, AgentPhase::Online), 1_000, "held");
        assert_eq!(shown_after(1_300, AgentPhase::Online), 1_300, "stale");
        assert_eq!(
            shown_after(1_015, AgentPhase::Offline),
            1_015,
            "with a change"
        );
        assert_eq!(
            shown_after(900, AgentPhase::Online),
            900,
            "the row went back"
        );
    }

    #[test]
    fn an_agent_reporting_an_error_is_online_but_not_healthy_with_its_reason() {
        let error = presence(
            false,
            &row("Error", Some("spoke API server unreachable"), true),
        );
        assert_eq!(error.phase, AgentPhase::Error);
        assert!(error.online.0, "heartbeats arrive");
        assert_eq!(
            error.healthy,
            (
                false,
                reasons::AGENT_ERROR,
                "spoke API server unreachable".to_owned()
            )
        );
        let silent = presence(false, &row("Error", None, true));
        assert_eq!(silent.healthy.2, NO_REASON);

        let online = presence(false, &row("Online", None, true));
        assert_eq!(online.phase, AgentPhase::Online);
        assert_eq!((online.online.0, online.healthy.0), (true, true));
        assert_eq!(online.healthy.1, reasons::AGENT_READY);
    }

    #[test]
    fn an_agent_not_heard_from_is_not_known_to_be_healthy_and_says_why() {
        let offline = presence(
            false,
            &row("Offline", Some("RBAC refuses watching x"), true),
        );
        assert_eq!(offline.phase, AgentPhase::Offline);
        assert_eq!(offline.online.1, reasons::HEARTBEAT_MISSED);
        assert_eq!(offline.healthy.1, reasons::HEARTBEAT_MISSED);
        assert!(
            offline
                .healthy
                .2
                .ends_with("it last reported: RBAC refuses watching x")
        );
        let pending = presence(false, &row("Pending", None, false));
        assert_eq!(pending.phase, AgentPhase::Pending);
        assert_eq!(pending.healthy.1, reasons::NEVER_CONNECTED);
        let suspended = presence(true, &row("Error", Some("x"), true));
        assert_eq!(suspended.phase, AgentPhase::Suspended);
        assert_eq!(
            (suspended.online.1, suspended.healthy.1),
            (reasons::SUSPENDED, reasons::SUSPENDED)
        );
        assert!(!suspended.healthy.0);
    }

    #[test]
    fn event_notes_are_cut_on_a_character_boundary_under_one_kilobyte() {
        let note = event_note(&"é".repeat(1000));
        assert!(note.len() <= 1000);
        assert!(note.chars().all(|c| c == 'é'));
        assert_eq!(event_note("short"), "short");
    }
}
