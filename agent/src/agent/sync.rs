//! Bringing one stack to its desired state: fetch the deployment object when it changed,
//! decide per object whether the stack may apply it (the inventory, [`inventory::claim`]),
//! record the intent, apply in phases (Namespaces, CRDs and the wait for them to be
//! Established, the rest), record the uids, prune what the inventory lists and the new
//! version dropped, and report.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use brokkr_common::error_sources;
use brokkr_crds::wire::{DeploymentObject, DesiredStack, EventStatus, EventType, Health};
use brokkr_crds::{DEPLOYMENT_OBJECT_ANNOTATION, DriftPolicy, StackPolicy};
use futures::future::join_all;
use kube::ResourceExt;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::Worker;
use super::drift::{Change, DriftMemory};
use crate::apply::{AppliedObject, Applier, FRESH_KIND_ATTEMPTS, KindKey, ObjectFailure};
use crate::hub::Endpoint;
use crate::inventory::{self, Claim, Entry, Inventory, Live};
use crate::manifest::{self, Manifest, ObjectKey, Ownership, Phase};
use crate::reporter::Reporter;

/// The content of a deployment object, as fetched or carried inline.
pub(super) struct Content {
    pub(super) id: Uuid,
    /// The parsed objects, or why they could not be parsed.
    pub(super) manifests: Result<Vec<Manifest>, String>,
    /// The deletion and adoption policy it carries.
    pub(super) policy: StackPolicy,
}

impl Content {
    /// The parsed content of `object`.
    fn of(object: &DeploymentObject) -> Content {
        let (manifests, policy) = match StackPolicy::from_yaml(&object.yaml) {
            Ok(policy) => (
                manifest::parse(&object.yaml).map_err(|e| e.to_string()),
                policy,
            ),
            Err(message) => (Err(message), StackPolicy::default()),
        };
        Content {
            id: object.id,
            manifests,
            policy,
        }
    }
}

/// (deployment object, event type, status, message) of the last report, to report changes only.
type Report = (Uuid, EventType, EventStatus, Option<String>);

pub(super) struct StackState {
    pub(super) desired: DesiredStack,
    pub(super) content: Option<Content>,
    pub(super) applied: BTreeMap<ObjectKey, AppliedObject>,
    /// Objects that failed in the last attempt.
    pub(super) failed: u32,
    pub(super) health: Health,
    pub(super) last_report: Option<Report>,
    pub(super) last_health: Option<(Uuid, Health)>,
    /// The deletion marker this state has carried out.
    pub(super) deleted_for: Option<Uuid>,
    pub(super) retry_at: Option<Instant>,
    pub(super) attempt: u32,
    /// Objects removed so far by the deletion under way (it may take several attempts).
    pub(super) removed: usize,
    /// The deployment object last applied in this process.
    pub(super) applied_for: Option<Uuid>,
    /// The drift the last sync found.
    pub(super) drift: DriftMemory,
}

impl StackState {
    pub(super) fn new(desired: DesiredStack) -> StackState {
        StackState {
            desired,
            content: None,
            applied: BTreeMap::new(),
            failed: 0,
            health: Health::Unknown,
            last_report: None,
            last_health: None,
            deleted_for: None,
            retry_at: None,
            attempt: 0,
            removed: 0,
            applied_for: None,
            drift: DriftMemory::default(),
        }
    }

    pub(super) fn ownership(&self, agent_name: &str) -> Ownership {
        Ownership {
            stack_id: self.desired.stack_id,
            agent_name: agent_name.to_owned(),
            deployment_object_id: self.desired.deployment_object_id,
            checksum: self.desired.checksum.clone(),
        }
    }

    /// Queues an event unless it repeats the last one.
    pub(super) fn report(
        &mut self,
        reporter: &Reporter,
        event_type: EventType,
        status: EventStatus,
        message: String,
    ) {
        let report = (
            self.desired.deployment_object_id,
            event_type,
            status,
            Some(message),
        );
        if self.last_report.as_ref() == Some(&report) {
            return;
        }
        tracing::info!(
            event = event_type.as_str(),
            status = status.as_str(),
            message = report.3.as_deref().unwrap_or_default(),
            "reporting"
        );
        reporter.report(report.0, event_type, status, report.3.clone());
        self.last_report = Some(report);
    }

    pub(super) fn schedule_retry(&mut self, delay: Duration) {
        self.retry_at = Some(Instant::now() + delay);
        self.attempt = self.attempt.saturating_add(1);
    }

    pub(super) fn is_settled(&self) -> bool {
        self.retry_at.is_none()
            && self.failed == 0
            && self.content.as_ref().is_none_or(|c| c.manifests.is_ok())
    }
}

/// What applying one deployment object came to.
#[derive(Debug, Default)]
struct ApplyOutcome {
    applied: BTreeMap<ObjectKey, AppliedObject>,
    failures: Vec<ObjectFailure>,
    /// Every object of the deployment object whose kind resolved: what pruning keeps.
    desired: BTreeSet<ObjectKey>,
    /// Kinds that did not resolve: pruning leaves the inventory's objects of those kinds
    /// alone this round.
    unresolved: BTreeSet<KindKey>,
}

impl ApplyOutcome {
    fn fail(&mut self, object: String, message: String) {
        tracing::warn!(%object, %message, "failed to apply");
        self.failures.push(ObjectFailure { object, message });
    }
}

/// `M of N objects failed: A: why; B: why`.
pub(super) fn failure_message(failures: &[ObjectFailure], total: usize) -> String {
    let details: Vec<String> = failures.iter().map(ObjectFailure::summary).collect();
    format!(
        "{} of {total} objects failed: {}",
        failures.len(),
        details.join("; ")
    )
}

/// The inventory entry for `key` as applied from `manifest`.
fn entry_for(manifest: &Manifest, key: &ObjectKey, uid: Option<String>) -> Entry {
    Entry {
        group: key.group.clone(),
        version: manifest::split_api_version(&manifest.api_version)
            .1
            .to_owned(),
        kind: key.kind.clone(),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        uid,
    }
}

/// What pruning deletes: the inventory's objects the deployment object no longer holds,
/// except those of kinds that did not resolve this round.
fn prunable(
    inventory: &Inventory,
    desired: &BTreeSet<ObjectKey>,
    unresolved: &BTreeSet<KindKey>,
) -> BTreeSet<ObjectKey> {
    inventory
        .entries
        .keys()
        .filter(|key| {
            !desired.contains(*key) && !unresolved.contains(&(key.group.clone(), key.kind.clone()))
        })
        .cloned()
        .collect()
}

impl Worker {
    /// Brings one stack to its desired state: delete (deletion marker), or fetch (if its
    /// deployment object changed), apply, prune and report.
    pub(super) async fn sync_stack(&mut self, id: Uuid) {
        let Some(mut stack) = self.stacks.remove(&id) else {
            return;
        };
        let span = tracing::info_span!(
            "stack",
            stack = %id,
            name = %stack.desired.stack_name,
            deployment_object = %stack.desired.deployment_object_id
        );
        self.sync_stack_state(&mut stack).instrument(span).await;
        self.stacks.insert(id, stack);
    }

    async fn sync_stack_state(&mut self, stack: &mut StackState) {
        stack.retry_at = None;
        if !self.load_inventories().await {
            let delay = self.config.retry_backoff.jittered(stack.attempt);
            stack.schedule_retry(delay);
            return;
        }
        if stack.desired.deletion {
            // Done once; the periodic resync checks again that nothing is left.
            if self.resyncing || stack.deleted_for != Some(stack.desired.deployment_object_id) {
                self.delete_stack(stack).await;
            }
            return;
        }
        stack.deleted_for = None;
        stack.removed = 0;
        if !self.fetch_content(stack).await {
            return;
        }
        let (manifests, policy) = match stack.content.as_ref() {
            Some(Content {
                manifests: Ok(manifests),
                policy,
                ..
            }) => (manifests.clone(), policy.clone()),
            Some(Content {
                manifests: Err(message),
                ..
            }) => {
                // Nothing is applied or pruned: what is there stays until a good version.
                let message = format!("failed to parse the deployment object: {message}");
                stack.report(
                    &self.reporter,
                    EventType::Apply,
                    EventStatus::Failure,
                    message,
                );
                return;
            }
            None => return,
        };
        self.apply_and_prune(stack, &manifests, &policy).await;
        self.evaluate_health(stack).await;
    }

    /// Fetches the stack's deployment object unless it has it or the answer carried it
    /// inline (with the desired checksum); `false` (and a retry scheduled) when the hub
    /// could not be asked.
    pub(super) async fn fetch_content(&mut self, stack: &mut StackState) -> bool {
        let do_id = stack.desired.deployment_object_id;
        if stack.content.as_ref().map(|c| c.id) == Some(do_id) {
            return true;
        }
        let inline = self
            .inline
            .get(&do_id)
            .filter(|object| object.checksum == stack.desired.checksum);
        if let Some(object) = inline {
            tracing::debug!("the deployment object came inline; not fetching it");
            stack.content = Some(Content::of(object));
            return true;
        }
        match self.hub.deployment_object(do_id).await {
            Ok(object) => {
                if object.checksum != stack.desired.checksum {
                    tracing::warn!(
                        "the deployment object's checksum differs from the desired state's"
                    );
                }
                stack.content = Some(Content {
                    id: do_id,
                    ..Content::of(&object)
                });
                true
            }
            Err(err) => {
                self.metrics.hub_error(Endpoint::DeploymentObject);
                if stack.desired.deletion && err.status().map(|s| s.as_u16()) == Some(404) {
                    // A hub that does not serve deletion markers: the inventory's policy.
                    let policy = self
                        .inventories
                        .get(&stack.desired.stack_id)
                        .map(|i| StackPolicy {
                            deletion_policy: i.deletion_policy,
                            ..StackPolicy::default()
                        })
                        .unwrap_or_default();
                    stack.content = Some(Content {
                        id: do_id,
                        manifests: Ok(Vec::new()),
                        policy,
                    });
                    return true;
                }
                let delay = self.config.hub_backoff.jittered(stack.attempt);
                tracing::warn!(error = %err, source = %error_sources(&err), retry_in = ?delay, "failed to fetch the deployment object");
                stack.schedule_retry(delay);
                false
            }
        }
    }

    /// Another stack of this agent whose inventory lists `key`.
    fn owner_elsewhere(&self, stack_id: Uuid, key: &ObjectKey) -> Option<Uuid> {
        self.inventories
            .iter()
            .find(|(id, inventory)| **id != stack_id && inventory.entries.contains_key(key))
            .map(|(id, _)| *id)
    }

    async fn apply_and_prune(
        &mut self,
        stack: &mut StackState,
        manifests: &[Manifest],
        policy: &StackPolicy,
    ) {
        let stack_id = stack.desired.stack_id;
        let agent = self.config.agent_name.clone();
        let ownership = stack.ownership(&agent);
        let mut inventory = self
            .inventories
            .get(&stack_id)
            .cloned()
            .unwrap_or_else(|| Inventory::new(stack_id, &stack.desired.stack_name));
        inventory.stack_name = stack.desired.stack_name.clone();
        inventory.deletion_policy = policy.deletion_policy;
        let fresh_kinds: BTreeSet<KindKey> = manifests
            .iter()
            .filter_map(Manifest::defined_kind)
            .collect();
        let mut outcome = ApplyOutcome::default();
        let mut crds: Vec<ObjectKey> = Vec::new();
        let do_id = stack.desired.deployment_object_id;
        let detect = policy.drift_policy == DriftPolicy::Detect;
        // Drift found on the way (live objects that no longer hold what was applied), and
        // the objects only compared (Detect), which are not written.
        let mut found: BTreeMap<ObjectKey, Change> = BTreeMap::new();
        let mut compared: BTreeSet<ObjectKey> = BTreeSet::new();
        for phase in [Phase::Namespaces, Phase::Crds, Phase::Rest] {
            if phase == Phase::Rest {
                self.wait_for_crds(&crds, &mut outcome).await;
            }
            let mut planned: Vec<(&Manifest, crate::apply::Resolved, ObjectKey, Vec<String>)> =
                Vec::new();
            for manifest in manifests.iter().filter(|m| m.phase() == phase) {
                let kind = (manifest.group().to_owned(), manifest.kind.clone());
                let attempts = if fresh_kinds.contains(&kind) {
                    FRESH_KIND_ATTEMPTS
                } else {
                    1
                };
                let resolved = match self.applier.resolve(&manifest.gvk(), attempts).await {
                    Ok(resolved) => resolved,
                    Err(message) => {
                        outcome.unresolved.insert(kind);
                        outcome.fail(manifest.describe(), message);
                        continue;
                    }
                };
                let key = Applier::key_for(manifest, &resolved);
                // Desired even when refused below: pruning never deletes an object because
                // the agent's scope changed.
                outcome.desired.insert(key.clone());
                if let Err(message) = self.config.scope.check(&key) {
                    outcome.fail(key.to_string(), message);
                    continue;
                }
                let live = match self.applier.get_object(&key, &resolved).await {
                    Ok(live) => live,
                    Err(message) => {
                        outcome.fail(key.to_string(), format!("failed to read: {message}"));
                        continue;
                    }
                };
                let object = live;
                let live = object.as_ref().map(Live::of);
                let owner = self.owner_elsewhere(stack_id, &key);
                let ignored = policy.ignored_pointers(
                    &key.group,
                    &key.kind,
                    key.namespace.as_deref(),
                    &key.name,
                );
                match inventory::claim(
                    &key,
                    live.as_ref(),
                    &inventory,
                    &agent,
                    owner,
                    policy.adopt_existing,
                ) {
                    Claim::Create => {
                        let was_applied = stack.applied.contains_key(&key)
                            && inventory.entries.get(&key).is_some_and(|e| e.uid.is_some());
                        if was_applied {
                            found.insert(key.clone(), Change::Deleted);
                            if detect && stack.applied_for == Some(do_id) {
                                // Detect never writes: the object stays deleted (and is
                                // still what the stack holds).
                                if let Some(previous) = stack.applied.get(&key) {
                                    outcome.applied.insert(key.clone(), previous.clone());
                                    compared.insert(key);
                                }
                                continue;
                            }
                        }
                        inventory.intend(entry_for(manifest, &key, None));
                    }
                    Claim::Ours { uid } => {
                        let value = object
                            .as_ref()
                            .and_then(|o| serde_json::to_value(o).ok())
                            .unwrap_or_default();
                        if let Some(previous) = stack.applied.get(&key)
                            && !manifest::live_matches(&previous.desired, &value)
                        {
                            found.insert(key.clone(), Change::Changed);
                        }
                        let current = object.as_ref().is_some_and(|o| {
                            o.annotations().get(DEPLOYMENT_OBJECT_ANNOTATION)
                                == Some(&do_id.to_string())
                        });
                        inventory.intend(entry_for(manifest, &key, Some(uid)));
                        if detect && current {
                            // Already applied for this version: compare, never write.
                            let mut desired = manifest::prepare(
                                &manifest.object,
                                key.namespace.as_deref(),
                                &ownership,
                            );
                            manifest::strip_pointers(&mut desired, &ignored);
                            if !manifest::live_matches(&desired, &value) {
                                found.insert(key.clone(), Change::Changed);
                            }
                            compared.insert(key.clone());
                            outcome.applied.insert(
                                key,
                                AppliedObject {
                                    resource: resolved,
                                    desired,
                                },
                            );
                            continue;
                        }
                    }
                    Claim::Adopt { uid } => {
                        tracing::info!(object = %key, "taking over an existing object (adoptExisting)");
                        inventory.intend(entry_for(manifest, &key, Some(uid)));
                    }
                    Claim::Refuse(message) => {
                        outcome.fail(key.to_string(), message);
                        continue;
                    }
                }
                planned.push((manifest, resolved, key, ignored));
            }
            if planned.is_empty() {
                continue;
            }
            // The intent is recorded before anything is applied: an agent that stops in
            // between still finds what it may have created.
            if let Err(message) = self.save_inventory(&inventory).await {
                for (_, _, key, _) in planned {
                    outcome.fail(key.to_string(), message.clone());
                }
                continue;
            }
            for (manifest, resolved, key, ignored) in planned {
                match self
                    .applier
                    .apply_object(manifest, &resolved, &ownership, &ignored)
                    .await
                {
                    Ok((applied, object)) => {
                        inventory.set_uid(&key, object.uid());
                        if phase == Phase::Crds {
                            crds.push(key.clone());
                        }
                        outcome.applied.insert(key, applied);
                    }
                    Err(message) => outcome.fail(key.to_string(), message),
                }
            }
        }
        if let Err(message) = self.save_inventory(&inventory).await {
            outcome.fail(inventory::name_of(stack_id), message);
        }
        let written = outcome.applied.len() - compared.len();
        self.metrics.applies.inc_by(written as u64);
        let drift: BTreeMap<ObjectKey, (Change, bool)> = found
            .into_iter()
            .map(|(key, change)| {
                let corrected = outcome.applied.contains_key(&key) && !compared.contains(&key);
                (key, (change, corrected))
            })
            .collect();
        self.report_drift(stack, &drift);
        stack.applied_for = Some(do_id);
        self.metrics
            .apply_failures
            .inc_by(outcome.failures.len() as u64);

        let doomed = prunable(&inventory, &outcome.desired, &outcome.unresolved);
        let mut failures = outcome.failures;
        if !doomed.is_empty() {
            let removed = self
                .remove_listed(
                    inventory,
                    Some(&doomed),
                    brokkr_crds::DeletionPolicy::Delete,
                )
                .await;
            if !removed.gone.is_empty() {
                tracing::info!(
                    deleted = removed.gone.len(),
                    "pruned objects dropped from the stack"
                );
            }
            failures.extend(removed.left);
        }
        let applied = outcome.applied.len();
        stack.applied = outcome.applied;
        stack.failed = u32::try_from(failures.len()).unwrap_or(u32::MAX);
        if failures.is_empty() {
            stack.attempt = 0;
            let plural = if applied == 1 { "object" } else { "objects" };
            stack.report(
                &self.reporter,
                EventType::Apply,
                EventStatus::Success,
                format!("applied {applied} {plural}"),
            );
        } else {
            let message = failure_message(&failures, manifests.len());
            stack.report(
                &self.reporter,
                EventType::Apply,
                EventStatus::Failure,
                message,
            );
            let delay = self.config.retry_backoff.jittered(stack.attempt);
            tracing::info!(retry_in = ?delay, "will retry the stack");
            stack.schedule_retry(delay);
        }
    }

    /// Waits for the CRDs applied this round to be Established; one that is not counts as
    /// failed.
    async fn wait_for_crds(&self, crds: &[ObjectKey], outcome: &mut ApplyOutcome) {
        let waits = crds
            .iter()
            .map(|key| async move { (key, self.applier.wait_established(&key.name).await) });
        for (key, result) in join_all(waits).await {
            if let Err(message) = result {
                tracing::warn!(object = %key, %message, "CRD not established");
                outcome.applied.remove(key);
                outcome.failures.push(ObjectFailure {
                    object: key.to_string(),
                    message,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: &str, name: &str) -> ObjectKey {
        ObjectKey {
            group: if kind == "Widget" {
                "example.com".into()
            } else {
                String::new()
            },
            kind: kind.into(),
            namespace: Some("shop".into()),
            name: name.into(),
        }
    }

    #[test]
    fn failure_messages_count_and_name_each_object() {
        let failures = [
            ObjectFailure {
                object: "Widget shop/w1".into(),
                message: "spec.size: Invalid value".into(),
            },
            ObjectFailure {
                object: "Gadget shop/g".into(),
                message: "no matches for kind".into(),
            },
        ];
        assert_eq!(
            failure_message(&failures, 5),
            "2 of 5 objects failed: Widget shop/w1: spec.size: Invalid value; Gadget shop/g: no matches for kind"
        );
    }

    #[test]
    fn pruning_takes_what_the_inventory_lists_and_the_new_version_dropped() {
        let mut inventory = Inventory::new(Uuid::nil(), "shop/web");
        for (kind, name) in [
            ("ConfigMap", "kept"),
            ("ConfigMap", "dropped"),
            ("Widget", "w1"),
        ] {
            let k = key(kind, name);
            inventory.intend(Entry {
                group: k.group.clone(),
                version: "v1".into(),
                kind: k.kind.clone(),
                namespace: k.namespace.clone(),
                name: k.name.clone(),
                uid: Some(format!("uid-{name}")),
            });
        }
        let desired: BTreeSet<ObjectKey> = [key("ConfigMap", "kept")].into();
        // The Widget kind did not resolve this round: its objects wait.
        let unresolved: BTreeSet<KindKey> =
            [("example.com".to_owned(), "Widget".to_owned())].into();
        assert_eq!(
            prunable(&inventory, &desired, &unresolved),
            [key("ConfigMap", "dropped")].into()
        );
        assert_eq!(
            prunable(&inventory, &desired, &BTreeSet::new()),
            [key("ConfigMap", "dropped"), key("Widget", "w1")].into()
        );
    }
}
