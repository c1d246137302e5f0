//! Stack → `stacks` row, labels, annotations and deployment objects; status from the
//! agents' reports; deletion held by the finalizer until the agents report removal.
//!
//! A reconcile, in order:
//! 0. a new Stack takes the finalizer and its Generator's owner reference in one
//!    metadata patch ([`adopt`]) and is applied in the same reconcile;
//! 1. finds the Generator and its live row; without them nothing is written but the
//!    status (`GeneratorNotFound`);
//! 2. makes the Stack a dependent of the Generator when it is not yet (`patch_metadata`),
//!    an API write made before, and outside, the database transaction;
//! 3. validates and renders the spec ([`plan`], pure); while the Generator is suspended,
//!    valid content is held back (`Accepted` reason `GeneratorSuspended`);
//! 4. writes the row, labels, annotations and, when the spec is accepted and its
//!    checksum is new, a deployment object in one transaction (`Store::sync_stack`); a
//!    refused spec keeps the last labels, annotations and content;
//! 5. computes the status from the agents' reports and writes it when more than
//!    timestamps changed; a new row asks for its Generator's (batched) recount.
//!
//! Deletion waits until every targeted agent reported the removal, or until the
//! deletion timeout; past it the Stack is released, with or without the database.

use std::sync::Arc;

use brokkr_crds::conditions::{find_condition, new_condition, reasons, set_condition, types};
use brokkr_crds::validation::check_labels;
use brokkr_crds::wire::EventStatus;
use brokkr_crds::{API_VERSION, Generator, OPERATOR_FIELD_MANAGER, Stack, StackStatus};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use tracing::{info, instrument};

use super::{
    Context, Error, Result, apply_status, label_strings, publish, resource_uid, spec_field_manager,
    with_finalizer_prepared, write_status,
};
use crate::entity::deployment_objects;
use crate::render::{Rendered, render_manifests, render_resources};
use crate::rollout::{RolloutAgent, RolloutInput, RolloutPlan, plan_rollout};
use crate::status::{Acceptance, StackStatusInput, now, stack_history, stack_status};
use crate::store::audit::{OPERATOR_ACTOR, actions, bounded_list};
use crate::store::{
    AgentStackStatus, AuditEntry, AuditResource, ContentAuthor, Serving, ServingChanged,
    StackContent, StackSync, StoreError,
};
use serde_json::json;

#[instrument(skip_all, fields(stack = %stack.name_any(), namespace = stack.namespace().unwrap_or_default()))]
pub async fn reconcile(stack: Arc<Stack>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = stack
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<Stack> = Api::namespaced(ctx.client.clone(), &namespace);
    with_finalizer_prepared(
        &ctx,
        "stack",
        api.clone(),
        stack,
        |stack| adopt(stack, &ctx, &api),
        |stack| apply(stack, &ctx, api.clone()),
        |stack| cleanup(stack, &ctx),
    )
    .await
}

/// A new Stack takes the finalizer and its Generator's owner reference in one metadata
/// patch, before anything is written to the database, and is returned as patched, so
/// that the rest of this reconcile applies it (kube's helper would add the finalizer
/// alone and leave the apply to the next reconcile). Without its Generator, or once
/// deleting, the Stack is left to the finalizer helper as it is.
async fn adopt(stack: Arc<Stack>, ctx: &Context, api: &Api<Stack>) -> Result<Arc<Stack>> {
    let has_finalizer = stack
        .finalizers()
        .iter()
        .any(|f| f == brokkr_crds::FINALIZER);
    if has_finalizer || stack.metadata.deletion_timestamp.is_some() {
        return Ok(stack);
    }
    let namespace = stack
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let Some(generator) = ctx
        .generator(&namespace, &stack.spec.generator_ref.name)
        .await?
    else {
        return Ok(stack);
    };
    Ok(Arc::new(patch_metadata(&stack, &generator, api).await?))
}

/// What the Stack's spec asks to record, decided without touching anything.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    Record(Rendered),
    Suspended,
    GeneratorSuspended,
    Refuse {
        reason: &'static str,
        message: String,
    },
}

/// Validates and renders the spec: pure.
pub fn plan(stack: &Stack, labels: &[String]) -> Plan {
    if let Err(err) = stack.spec.validate() {
        return Plan::Refuse {
            reason: reasons::INVALID_SPEC,
            message: err.to_string(),
        };
    }
    if let Err(err) = check_labels(labels) {
        return Plan::Refuse {
            reason: reasons::INVALID_SPEC,
            message: err.to_string(),
        };
    }
    if stack.spec.suspend {
        return Plan::Suspended;
    }
    let rendered = match (&stack.spec.resources, &stack.spec.manifests) {
        (Some(resources), None) => render_resources(resources),
        (None, Some(manifests)) => render_manifests(manifests),
        // validate() has refused the other combinations.
        _ => return Plan::Suspended,
    };
    match rendered {
        // The agents' policy is part of the content, so that changing it is a new revision.
        Ok(rendered) => Plan::Record(rendered.with_policy(&stack.spec.policy())),
        Err(err) => Plan::Refuse {
            reason: reasons::INVALID_MANIFEST,
            message: err.to_string(),
        },
    }
}

async fn apply(stack: Arc<Stack>, ctx: &Context, api: Api<Stack>) -> Result<Action> {
    let namespace = stack
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let generator_name = &stack.spec.generator_ref.name;
    let generator = ctx.generator(&namespace, generator_name).await?;
    let generator_row = match &generator {
        Some(generator) => {
            ctx.store
                .find_live_generator_by_resource(resource_uid(&**generator)?)
                .await?
        }
        None => None,
    };
    let (Some(generator), Some(generator_row)) = (generator, generator_row) else {
        let message = format!("Generator {generator_name:?} not found in namespace {namespace}");
        refuse_without_row(&stack, ctx, &api, reasons::GENERATOR_NOT_FOUND, message).await?;
        // The Generator watch brings it back as soon as the Generator appears.
        return Ok(Action::requeue(ctx.config.status_refresh));
    };
    if !owned_by(&stack, &generator) {
        patch_metadata(&stack, &generator, &api).await?;
    }

    let labels = label_strings(&*stack);
    let plan = match plan(&stack, &labels) {
        // A suspended Generator records nothing new, but a refused spec is still said.
        Plan::Record(_) if generator.spec.suspend => Plan::GeneratorSuspended,
        plan => plan,
    };
    let pin = resolve_pin(&stack, ctx).await?;
    // An unknown pinned revision changes nothing: no content, no pin, no rollout step.
    let plan = match &pin {
        Err(message) => Plan::Refuse {
            reason: reasons::UNKNOWN_REVISION,
            message: message.clone(),
        },
        Ok(_) => plan,
    };
    let name = format!("{namespace}/{}", stack.name_any());
    let (content, acceptance) = match &plan {
        Plan::Record(rendered) => (
            Some(StackContent {
                yaml: &rendered.yaml,
                checksum: &rendered.checksum,
            }),
            Acceptance::Recorded,
        ),
        Plan::Suspended => (None, Acceptance::Suspended),
        Plan::GeneratorSuspended => (None, Acceptance::GeneratorSuspended),
        Plan::Refuse { reason, message } => (
            None,
            Acceptance::Refused {
                reason,
                message: message.clone(),
            },
        ),
    };
    let refused_metadata =
        matches!(&plan, Plan::Refuse { reason, .. } if *reason == reasons::INVALID_SPEC);
    let field_manager = spec_field_manager(&*stack);
    let synced = ctx
        .store
        .sync_stack(&StackSync {
            resource_uid: resource_uid(&*stack)?,
            name: &name,
            description: stack.spec.description.as_deref(),
            generator_id: generator_row.id,
            // A refused spec keeps the labels and annotations last recorded.
            labels: (!refused_metadata).then_some(labels.as_slice()),
            annotations: (!refused_metadata).then_some(&stack.spec.annotations),
            content,
            author: Some(ContentAuthor {
                field_manager: field_manager.as_deref().unwrap_or("unknown"),
                generator: generator_name,
            }),
            progressive: stack.spec.rollout.is_some(),
        })
        .await;
    let synced = match synced {
        Ok(synced) => synced,
        Err(err @ (StoreError::TooLong { .. } | StoreError::Conflict { .. })) => {
            let message = err.to_string();
            refuse_without_row(&stack, ctx, &api, reasons::INVALID_SPEC, message).await?;
            return Ok(Action::requeue(ctx.config.status_refresh));
        }
        Err(err) => return Err(err.into()),
    };
    let reference = stack.object_ref(&());
    if synced.created_deployment_object
        && let Some(object) = &synced.deployment_object
    {
        info!(
            sequence = object.sequence_id,
            "recorded a new deployment object"
        );
        publish(
            ctx,
            &reference,
            EventType::Normal,
            "Recorded",
            "Record",
            format!(
                "recorded deployment object sequence {} ({} objects)",
                object.sequence_id,
                match &plan {
                    Plan::Record(r) => r.objects,
                    _ => 0,
                }
            ),
        )
        .await;
    }

    let stack_id = synced.stack.id;
    // The pin and the rollout mode change only with a valid spec (content that does not
    // render does not stop a rollback).
    let spec_refused = matches!(&plan, Plan::Refuse { reason, .. }
        if *reason == reasons::INVALID_SPEC || *reason == reasons::UNKNOWN_REVISION);
    // What the stack serves now: as the spec says, or as it was when the spec is refused.
    let mut serving = Serving {
        pinned: synced.stack.pinned_object_id,
        progressive: synced.stack.progressive,
    };
    if let (Ok(pinned), false) = (&pin, spec_refused) {
        let wanted = Serving {
            pinned: pinned.as_ref().map(|object| object.id),
            progressive: stack.spec.rollout.is_some(),
        };
        // A pinned progressive stack also assigns the pin to agents targeted since.
        if wanted != serving || (wanted.pinned.is_some() && wanted.progressive) {
            let changed = ctx.store.set_serving(stack_id, wanted).await?;
            announce_pin(ctx, &reference, &changed).await;
        }
        serving = wanted;
    }
    // Served: the newest revision, which the sync returned, or the pin (read only when
    // the spec did not just resolve it).
    let served = match serving.pinned {
        None => synced.deployment_object.clone(),
        Some(pinned) => match &pin {
            Ok(Some(object)) if object.id == pinned => Some(object.clone()),
            _ => ctx.store.deployment_object(pinned).await?,
        },
    };
    let newest = synced.deployment_object.as_ref().map(|o| o.sequence_id);
    let mut agents = match &served {
        Some(object) => ctx.store.stack_status(stack_id, object.id).await?,
        None => Vec::new(),
    };
    let previous = ctx.stack_status_shown(&stack, resource_uid(&*stack)?);
    if previous.as_ref().and_then(|p| p.stack_id.as_deref()) != Some(&stack_id.to_string()) {
        // A new row: its Generator counts one Stack more.
        ctx.recount(ObjectRef::from_obj(&generator));
    }
    let pinned = served
        .as_ref()
        .filter(|_| serving.pinned.is_some())
        .map(|object| object.sequence_id);
    let rollout = match (&stack.spec.rollout, &served) {
        (Some(spec), Some(revision))
            if serving.progressive && pinned.is_none() && !revision.is_deletion_marker =>
        {
            let step = RolloutStep {
                stack_id,
                spec,
                revision,
                previous: previous.as_ref(),
            };
            Some(step.take(ctx, &mut agents).await?)
        }
        _ => None,
    };
    // The history changes only with a new revision: read it when the newest one shown is
    // not the newest recorded, not on every status refresh.
    let shown_head = previous
        .as_ref()
        .and_then(|status| status.history.first())
        .map(|revision| revision.sequence);
    let history = if shown_head == newest {
        None
    } else {
        Some(
            ctx.store
                .stack_history(stack_id, brokkr_crds::MAX_HISTORY_IN_STATUS as u64)
                .await?,
        )
    };
    let now = now();
    let mut status = stack_status(StackStatusInput {
        generation: stack.metadata.generation,
        stack_id: Some(stack_id.to_string()),
        deployment_object: served.as_ref(),
        newest_sequence: newest,
        acceptance: acceptance.clone(),
        agents: &agents,
        previous: previous.as_ref(),
        now: now.clone(),
    });
    if let Some(history) = &history {
        status.history = stack_history(history);
    }
    set_pinned_condition(&mut status, &stack, pinned, newest, now.clone());
    let requeue = match &rollout {
        Some(plan) => {
            set_rollout_status(&mut status, &stack, plan, now);
            announce_halt(ctx, &reference, previous.as_ref(), plan).await;
            plan.next_deadline
                .map_or(ctx.config.status_refresh, |deadline| {
                    deadline.min(ctx.config.status_refresh)
                })
        }
        None => {
            status.rollout = None;
            status
                .conditions
                .retain(|condition| condition.type_ != types::ROLLOUT_HALTED);
            ctx.config.status_refresh
        }
    };
    announce_refusal(ctx, &reference, previous.as_ref(), &status).await;
    write_status(&api, &stack, previous.as_ref(), &status).await?;
    ctx.stack_status_written(&stack, resource_uid(&*stack)?, &status);
    Ok(Action::requeue(requeue))
}

/// The revision `spec.pinnedRevision` names: `Ok(None)` without a pin, `Err` with the
/// refusal's message when the Stack has no such revision.
async fn resolve_pin(
    stack: &Stack,
    ctx: &Context,
) -> Result<std::result::Result<Option<deployment_objects::Model>, String>> {
    let Some(sequence) = stack.spec.pinned_revision else {
        return Ok(Ok(None));
    };
    let row = ctx
        .store
        .find_live_stack_by_resource(resource_uid(stack)?)
        .await?;
    let revision = match row {
        Some(row) => ctx.store.find_revision(row.id, sequence).await?,
        None => None,
    };
    Ok(revision.map(Some).ok_or_else(|| {
        format!(
            "spec.pinnedRevision {sequence} is not a recorded revision of this Stack \
             (status.history lists the recent ones); nothing was changed"
        )
    }))
}

/// One step of a progressive rollout: moves the agents whose turn it is and says where
/// the rollout stands.
struct RolloutStep<'a> {
    stack_id: uuid::Uuid,
    spec: &'a brokkr_crds::RolloutSpec,
    revision: &'a deployment_objects::Model,
    previous: Option<&'a StackStatus>,
}

impl RolloutStep<'_> {
    async fn take(&self, ctx: &Context, agents: &mut Vec<AgentStackStatus>) -> Result<RolloutPlan> {
        let was_paused = self
            .previous
            .and_then(|status| status.rollout.as_ref())
            .is_some_and(|rollout| rollout.paused && rollout.revision == self.revision.sequence_id);
        if was_paused && !self.spec.paused {
            // A resume gives the agents being updated a new health timeout.
            ctx.store
                .restart_health_clocks(self.stack_id, self.revision.id, chrono::Utc::now())
                .await?;
            *agents = ctx
                .store
                .stack_status(self.stack_id, self.revision.id)
                .await?;
        }
        let plan = self.plan(ctx, agents);
        if plan.assign.is_empty() {
            return Ok(plan);
        }
        let moved = ctx
            .store
            .assign_revision(self.stack_id, &plan.assign, self.revision.id)
            .await?;
        info!(
            sequence = self.revision.sequence_id,
            agents = moved,
            wave = plan.status.wave.as_deref().unwrap_or_default(),
            "rollout moved agents to the new revision"
        );
        *agents = ctx
            .store
            .stack_status(self.stack_id, self.revision.id)
            .await?;
        // Planned again from what the agents now hold, so the status counts them.
        let mut replanned = self.plan(ctx, agents);
        replanned.assign = plan.assign;
        Ok(replanned)
    }

    fn plan(&self, ctx: &Context, agents: &[AgentStackStatus]) -> RolloutPlan {
        let cached: Vec<Option<Arc<brokkr_crds::Agent>>> = agents
            .iter()
            .map(|agent| ctx.caches.agents.get(&ObjectRef::new(&agent.agent_name)))
            .collect();
        let no_labels = std::collections::BTreeMap::new();
        let rollout_agents: Vec<RolloutAgent<'_>> = agents
            .iter()
            .zip(&cached)
            .map(|(report, agent)| RolloutAgent {
                labels: agent.as_ref().map_or(&no_labels, |agent| agent.labels()),
                report,
            })
            .collect();
        plan_rollout(RolloutInput {
            spec: self.spec,
            revision: (self.revision.id, self.revision.sequence_id),
            agents: &rollout_agents,
            now: chrono::Utc::now(),
        })
    }
}

/// `Pinned=True` while `spec.pinnedRevision` holds the agents; `False` once it is removed.
fn set_pinned_condition(
    status: &mut StackStatus,
    stack: &Stack,
    pinned: Option<i64>,
    newest: Option<i64>,
    now: brokkr_crds::Time,
) {
    let condition = match pinned {
        Some(pinned) => new_condition(
            types::PINNED,
            true,
            reasons::PINNED,
            match newest {
                Some(newest) if newest != pinned => format!(
                    "every agent is held at revision {pinned}; the newest recorded revision, \
                     {newest}, is not delivered until spec.pinnedRevision is removed"
                ),
                _ => format!("every agent is held at revision {pinned}"),
            },
            stack.metadata.generation,
            now,
        ),
        None if find_condition(&status.conditions, types::PINNED).is_some() => new_condition(
            types::PINNED,
            false,
            reasons::UNPINNED,
            "not pinned: the newest revision is delivered",
            stack.metadata.generation,
            now,
        ),
        None => return,
    };
    set_condition(&mut status.conditions, condition);
}

fn set_rollout_status(
    status: &mut StackStatus,
    stack: &Stack,
    plan: &RolloutPlan,
    now: brokkr_crds::Time,
) {
    let revision = plan.status.revision;
    let (halted, reason, message) = match &plan.halt {
        Some(halt) => (
            true,
            halt.reason,
            format!(
                "{}; no further agent is updated. Record a fixed revision, set \
                 spec.rollout.paused to true and back to false to retry, or set \
                 spec.pinnedRevision to roll every agent back",
                halt.message
            ),
        ),
        None if plan.complete => (
            false,
            reasons::ROLLOUT_COMPLETE,
            format!("every agent reports revision {revision} healthy"),
        ),
        None if plan.status.paused => (
            false,
            reasons::ROLLOUT_PAUSED,
            format!(
                "paused at wave {}",
                plan.status.wave.as_deref().unwrap_or_default()
            ),
        ),
        None => (
            false,
            reasons::ROLLING_OUT,
            match plan.status.wave.as_deref() {
                Some(wave) => format!("rolling revision {revision} out: wave {wave}"),
                None => format!("revision {revision} waits for agents to target"),
            },
        ),
    };
    set_condition(
        &mut status.conditions,
        new_condition(
            types::ROLLOUT_HALTED,
            halted,
            reason,
            message,
            stack.metadata.generation,
            now,
        ),
    );
    status.rollout = Some(plan.status.clone());
}

/// A Normal Event for each pin and unpin.
async fn announce_pin(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    changed: &ServingChanged,
) {
    let (reason, note) = match (changed.pinned, changed.unpinned) {
        (Some(pinned), _) => (
            reasons::PINNED,
            format!("pinned to revision {pinned}: every agent is delivered it"),
        ),
        (None, Some(unpinned)) => (
            reasons::UNPINNED,
            format!("unpinned from revision {unpinned}: the newest revision is delivered"),
        ),
        (None, None) => return,
    };
    publish(ctx, reference, EventType::Normal, reason, "Pin", note).await;
}

/// A Warning Event when the rollout halts, or halts for another agent or reason.
async fn announce_halt(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    previous: Option<&StackStatus>,
    plan: &RolloutPlan,
) {
    let Some(halt) = &plan.halt else { return };
    let before = previous
        .and_then(|p| p.rollout.as_ref())
        .and_then(|rollout| rollout.halted.as_deref());
    if before != Some(halt.message.as_str()) {
        publish(
            ctx,
            reference,
            EventType::Warning,
            "RolloutHalted",
            "Rollout",
            halt.message.clone(),
        )
        .await;
    }
}

/// Status for a Stack that cannot be recorded at all (no generator, name too long...).
async fn refuse_without_row(
    stack: &Stack,
    ctx: &Context,
    api: &Api<Stack>,
    reason: &'static str,
    message: String,
) -> Result<()> {
    let previous = stack.status.clone();
    let current = match previous.as_ref().and_then(|s| s.stack_id.as_deref()) {
        Some(id) => match uuid::Uuid::parse_str(id) {
            Ok(id) => ctx.store.served_head(id).await?,
            Err(_) => None,
        },
        None => None,
    };
    let status = stack_status(StackStatusInput {
        generation: stack.metadata.generation,
        stack_id: previous.as_ref().and_then(|s| s.stack_id.clone()),
        deployment_object: current.as_ref(),
        newest_sequence: None,
        acceptance: Acceptance::Refused { reason, message },
        agents: &[],
        previous: previous.as_ref(),
        now: now(),
    });
    announce_refusal(ctx, &stack.object_ref(&()), previous.as_ref(), &status).await;
    write_status(api, stack, previous.as_ref(), &status).await
}

/// A Warning Event when `Accepted` turns False or its reason or message changes.
async fn announce_refusal(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    previous: Option<&StackStatus>,
    status: &StackStatus,
) {
    let Some(accepted) = find_condition(&status.conditions, types::ACCEPTED) else {
        return;
    };
    if accepted.status != "False" {
        return;
    }
    let before = previous.and_then(|p| find_condition(&p.conditions, types::ACCEPTED));
    let unchanged = before.is_some_and(|b| {
        b.status == accepted.status && b.reason == accepted.reason && b.message == accepted.message
    });
    if !unchanged {
        publish(
            ctx,
            reference,
            EventType::Warning,
            &accepted.reason,
            "Record",
            accepted.message.clone(),
        )
        .await;
    }
}

/// Whether the Stack is already a dependent of `generator`.
fn owned_by(stack: &Stack, generator: &Generator) -> bool {
    let uid = generator.metadata.uid.as_deref();
    uid.is_some()
        && stack
            .owner_references()
            .iter()
            .any(|r| Some(r.uid.as_str()) == uid)
}

/// Makes the Stack a dependent of its Generator, so that Kubernetes' garbage
/// collector deletes it with the Generator, and holds its deletion with the
/// finalizer: one server-side apply of both, as the operator's field manager owns both
/// (an apply without the finalizer would remove it).
async fn patch_metadata(stack: &Stack, generator: &Generator, api: &Api<Stack>) -> Result<Stack> {
    let Some(owner) = generator.controller_owner_ref(&()) else {
        return Err(Error::MissingMetadata("uid"));
    };
    let patch = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": "Stack",
        "metadata": {
            "name": stack.name_any(),
            "finalizers": [brokkr_crds::FINALIZER],
            "ownerReferences": [owner],
        },
    });
    Ok(api
        .patch(
            &stack.name_any(),
            &PatchParams::apply(OPERATOR_FIELD_MANAGER),
            &Patch::Apply(&patch),
        )
        .await?)
}

/// How long, once the deletion timeout is reached, the cleanup still waits for an
/// answer from the database before releasing the Stack without one.
const DATABASE_WAIT_AFTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

async fn cleanup(stack: Arc<Stack>, ctx: &Context) -> Result<Action> {
    let deleting_for = || {
        stack
            .metadata
            .deletion_timestamp
            .as_ref()
            .and_then(|t| {
                let elapsed = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
                std::time::Duration::try_from(elapsed).ok()
            })
            .unwrap_or_default()
    };
    // Whatever is down, the deletion ends after the timeout: the database is asked
    // first, but neither its failure nor its silence holds the release past then.
    let time_left = ctx.config.deletion_timeout.saturating_sub(deleting_for());
    let asked = tokio::time::timeout(
        time_left.max(DATABASE_WAIT_AFTER_TIMEOUT),
        agents_yet_to_remove(&stack, ctx),
    )
    .await;
    let waiting = match asked {
        Ok(Ok(waiting)) if waiting.is_empty() => {
            audit_deletion_outcome(&stack, ctx, actions::STACK_REMOVAL_REPORTED, json!({})).await;
            released(&stack, ctx);
            return Ok(Action::await_change());
        }
        Ok(Ok(waiting)) => Ok(waiting),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(Error::DatabaseTimeout),
    };
    if deleting_for() < ctx.config.deletion_timeout {
        return match waiting {
            Ok(waiting) => {
                tracing::debug!(waiting = ?waiting, "waiting for agents to remove the stack");
                Err(Error::DeletionPending)
            }
            Err(err) => Err(err),
        };
    }
    if waiting.is_err() {
        // Its row is retired (and the deletion marker written) once the database answers.
        if let Ok(resource_uid) = resource_uid(&*stack) {
            let _ = ctx.released_without_database.send(resource_uid);
        }
        tracing::warn!(
            "released a Stack without the database; its row is retired when the database answers again"
        );
    }
    let why = match &waiting {
        Ok(waiting) => format!("without a removal report from: {}", waiting.join(", ")),
        Err(err) => format!(
            "without knowing which agents removed it ({})",
            super::error_chain(err)
        ),
    };
    let message = format!(
        "released after {}s {why}",
        ctx.config.deletion_timeout.as_secs()
    );
    let details = match &waiting {
        Ok(waiting) => json!({ "notReportedBy": bounded_list(waiting) }),
        Err(_) => json!({ "databaseReachable": false }),
    };
    audit_deletion_outcome(&stack, ctx, actions::STACK_DELETION_TIMED_OUT, details).await;
    publish(
        ctx,
        &stack.object_ref(&()),
        EventType::Warning,
        reasons::DELETION_TIMED_OUT,
        "Delete",
        message.clone(),
    )
    .await;
    // Best effort: the Stack is gone a moment later, but watchers see why.
    let mut status = stack.status.clone().unwrap_or_default();
    let condition = brokkr_crds::conditions::new_condition(
        types::READY,
        false,
        reasons::DELETION_TIMED_OUT,
        message,
        stack.metadata.generation,
        now(),
    );
    if brokkr_crds::conditions::set_condition(&mut status.conditions, condition)
        && let Some(namespace) = stack.namespace()
    {
        let api: Api<Stack> = Api::namespaced(ctx.client.clone(), &namespace);
        if let Err(err) = apply_status(&api, &stack, &status).await {
            tracing::debug!(error = %super::error_chain(&err), "could not record the timed-out deletion");
        }
    }
    released(&stack, ctx);
    Ok(Action::await_change())
}

/// A Stack about to be released: its Generator counts one Stack less.
fn released(stack: &Stack, ctx: &Context) {
    if let Some(namespace) = stack.namespace() {
        ctx.recount(ObjectRef::new(&stack.spec.generator_ref.name).within(&namespace));
    }
    if let Ok(resource_uid) = resource_uid(stack) {
        ctx.stack_released(resource_uid);
    }
}

/// Records how a deletion ended; best effort, as the Stack is released either way (a
/// database that is down cannot take the row).
async fn audit_deletion_outcome(
    stack: &Stack,
    ctx: &Context,
    action: &'static str,
    details: serde_json::Value,
) {
    let entry = AuditEntry {
        actor: OPERATOR_ACTOR.to_owned(),
        action,
        resource: AuditResource {
            kind: "Stack",
            namespace: stack.namespace(),
            name: stack.name_any(),
            id: stack
                .status
                .as_ref()
                .and_then(|status| status.stack_id.as_deref())
                .and_then(|id| uuid::Uuid::parse_str(id).ok()),
        },
        details,
    };
    let recorded = tokio::time::timeout(
        DATABASE_WAIT_AFTER_TIMEOUT,
        ctx.store.record_audit(&[entry]),
    )
    .await;
    if !matches!(recorded, Ok(Ok(()))) {
        tracing::debug!("could not record the deletion's outcome in the audit log");
    }
}

/// Names of the targeted agents that have not reported removing the deleted Stack;
/// soft-deletes its row (which writes the deletion marker) on the way.
async fn agents_yet_to_remove(stack: &Stack, ctx: &Context) -> Result<Vec<String>> {
    let Some(row) = ctx
        .store
        .find_newest_stack_by_resource(resource_uid(stack)?)
        .await?
    else {
        return Ok(Vec::new());
    };
    if row.deleted_at.is_none() {
        ctx.store.soft_delete_stack(row.id).await?;
    }
    let Some(marker) = ctx.store.current_deployment_object(row.id).await? else {
        return Ok(Vec::new());
    };
    let agents = ctx.store.stack_status(row.id, marker.id).await?;
    Ok(agents
        .into_iter()
        .filter(|a| {
            !a.outcome.as_ref().is_some_and(|o| {
                o.event_type == "Delete" && o.status == EventStatus::Success.as_str()
            })
        })
        .map(|a| a.agent_name)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use brokkr_crds::StackSpec;

    fn stack(yaml: &str) -> Stack {
        let spec: StackSpec = serde_yaml::from_str(yaml).unwrap();
        Stack::new("app", spec)
    }

    #[test]
    fn valid_manifests_plan_a_recording() {
        let s = stack(
            "generatorRef: {name: gen}\nmanifests: |\n  apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: a}\n",
        );
        assert!(matches!(plan(&s, &[]), Plan::Record(r) if r.objects == 1));
    }

    #[test]
    fn broken_manifests_plan_a_refusal_with_the_parser_message() {
        let s = stack("generatorRef: {name: gen}\nmanifests: \"kind: [\"\n");
        match plan(&s, &[]) {
            Plan::Refuse { reason, message } => {
                assert_eq!(reason, "InvalidManifest");
                assert!(message.starts_with("document 1: invalid YAML"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_spec_with_both_sources_is_refused() {
        let s = stack(
            "generatorRef: {name: gen}\nmanifests: \"a: 1\"\nresources: [{apiVersion: v1, kind: ConfigMap, metadata: {name: a}}]\n",
        );
        assert!(matches!(
            plan(&s, &[]),
            Plan::Refuse {
                reason: "InvalidSpec",
                ..
            }
        ));
    }

    #[test]
    fn long_labels_are_refused_not_truncated() {
        let s = stack(
            "generatorRef: {name: gen}\nmanifests: |\n  apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: a}\n",
        );
        let label = format!("team={}", "x".repeat(60));
        match plan(&s, &[label]) {
            Plan::Refuse { reason, message } => {
                assert_eq!(reason, "InvalidSpec");
                assert!(message.contains("65 characters"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_suspended_stack_records_nothing() {
        let s = stack(
            "generatorRef: {name: gen}\nsuspend: true\nmanifests: |\n  apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: a}\n",
        );
        assert_eq!(plan(&s, &[]), Plan::Suspended);
    }
}
