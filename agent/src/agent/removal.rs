//! Removing what an inventory lists: the one routine ([`Worker::remove_listed`]) behind every
//! deletion path — pruning, a deletion marker, a stack that left the desired set, and the
//! start-up sweep of inventories whose stack the hub no longer lists. An object is deleted
//! (or orphaned) only when the inventory lists it and its live uid is the recorded one
//! ([`inventory::verdict`]); it leaves the inventory once it is confirmed gone.

use std::collections::BTreeSet;
use std::time::Duration;

use brokkr_crds::DeletionPolicy;
use brokkr_crds::wire::{EventStatus, EventType};
use kube::ResourceExt;
use tokio::time::Instant;
use uuid::Uuid;

use super::Worker;
use super::sync::StackState;
use crate::apply::{ObjectFailure, Resolved};
use crate::inventory::{self, Inventory, Live, Verdict};
use crate::manifest::{ObjectKey, sort_for_delete};

/// How long a removal waits for the objects it deleted to be gone before it reports what is
/// left (and retries later).
const CONFIRM_ROUNDS: u32 = 10;
const CONFIRM_PAUSE: Duration = Duration::from_millis(200);

/// A stack that left the desired set and still has objects to remove.
pub(super) struct Removal {
    pub(super) retry_at: Instant,
    pub(super) attempt: u32,
}

/// What one removal came to.
#[derive(Debug, Default)]
pub(super) struct Removed {
    /// Confirmed gone (deleted now, or already).
    pub(super) gone: Vec<ObjectKey>,
    /// Left in place without Brokkr's labels and annotations.
    pub(super) orphaned: Vec<ObjectKey>,
    /// Dropped from the inventory untouched: what is there is not the object the agent
    /// applied (re-created by someone else, or never confirmed).
    pub(super) released: Vec<ObjectKey>,
    /// Still there, and why.
    pub(super) left: Vec<ObjectFailure>,
}

fn plural(count: usize) -> &'static str {
    if count == 1 { "object" } else { "objects" }
}

/// The `Delete` event of a deletion marker: success only when nothing the inventory listed
/// is left. `removed` counts the objects removed over every attempt.
pub(super) fn deletion_report(
    policy: DeletionPolicy,
    removed: usize,
    released: usize,
    left: &[ObjectFailure],
) -> (EventStatus, String) {
    if !left.is_empty() {
        let details: Vec<String> = left.iter().map(ObjectFailure::summary).collect();
        let count = left.len();
        let verb = match policy {
            DeletionPolicy::Delete => "delete",
            DeletionPolicy::Orphan => "orphan",
        };
        return (
            EventStatus::Failure,
            format!(
                "failed to {verb} {count} {}: {}",
                plural(count),
                details.join("; ")
            ),
        );
    }
    let mut message = match policy {
        DeletionPolicy::Delete => format!("deleted {removed} {}", plural(removed)),
        DeletionPolicy::Orphan => format!(
            "orphaned {removed} {}: left in place without brokkr.io labels and annotations",
            plural(removed)
        ),
    };
    if released > 0 {
        message.push_str(&format!(
            "; left {released} {} alone that had been replaced by someone else",
            plural(released)
        ));
    }
    (EventStatus::Success, message)
}

impl Worker {
    /// Deletes (or, with `Orphan`, releases) the inventory's objects `keys` (`None`: all of
    /// them, after which the inventory itself is deleted), ordinary objects first, then CRDs,
    /// then Namespaces, and records what is left.
    pub(super) async fn remove_listed(
        &mut self,
        mut inventory: Inventory,
        keys: Option<&BTreeSet<ObjectKey>>,
        policy: DeletionPolicy,
    ) -> Removed {
        let stack_id = inventory.stack_id;
        let agent = self.config.agent_name.clone();
        let mut removed = Removed::default();
        let mut order: Vec<ObjectKey> = inventory
            .entries
            .keys()
            .filter(|key| keys.is_none_or(|keys| keys.contains(*key)))
            .cloned()
            .collect();
        sort_for_delete(&mut order);
        let mut deleting: Vec<(ObjectKey, Resolved, String)> = Vec::new();
        let fail = |key: &ObjectKey, message: String| ObjectFailure {
            object: key.to_string(),
            message,
        };
        for key in order {
            let Some(entry) = inventory.entries.get(&key).cloned() else {
                continue;
            };
            // Outside the agent's scope now: neither read nor deleted, and kept in the
            // inventory (the failure names it), until the scope allows it again.
            if let Err(message) = self.config.scope.check(&key) {
                removed.left.push(fail(&key, message));
                continue;
            }
            let resolved = match self.applier.lookup(&entry.gvk()).await {
                Ok(Some(resolved)) => resolved,
                // The kind is not served (its CRD is gone): so are its objects.
                Ok(None) => {
                    inventory.entries.remove(&key);
                    removed.gone.push(key);
                    continue;
                }
                Err(message) => {
                    removed.left.push(fail(&key, message));
                    continue;
                }
            };
            let object = match self.applier.get_object(&key, &resolved).await {
                Ok(object) => object,
                Err(message) => {
                    removed
                        .left
                        .push(fail(&key, format!("failed to read: {message}")));
                    continue;
                }
            };
            let live = object.as_ref().map(Live::of);
            match inventory::verdict(&entry, live.as_ref(), stack_id, &agent, policy) {
                Verdict::Gone => {
                    inventory.entries.remove(&key);
                    removed.gone.push(key);
                }
                Verdict::NotOurs => {
                    tracing::warn!(object = %key, "not deleting an object the agent did not apply (its uid is not the recorded one)");
                    inventory.entries.remove(&key);
                    removed.released.push(key);
                }
                Verdict::Terminating => {
                    removed
                        .left
                        .push(fail(&key, "still being deleted".to_owned()));
                }
                Verdict::Delete { uid } => {
                    match self.applier.delete_exact(&key, &resolved, &uid).await {
                        Ok(deleted) => {
                            if deleted {
                                self.metrics.prune_deletes.inc();
                            }
                            deleting.push((key, resolved, uid));
                        }
                        Err(message) => removed.left.push(fail(&key, message)),
                    }
                }
                Verdict::Orphan { .. } => {
                    let Some(object) = object else { continue };
                    let patch = inventory::strip_patch(&object);
                    match self.applier.merge_patch(&key, &resolved, &patch).await {
                        Ok(()) => {
                            tracing::info!(object = %key, "orphaned: left in place without Brokkr's labels");
                            inventory.entries.remove(&key);
                            removed.orphaned.push(key);
                        }
                        Err(message) => removed.left.push(fail(&key, message)),
                    }
                }
            }
        }
        // Confirm: an object leaves the inventory only once it is gone.
        for round in 0..CONFIRM_ROUNDS {
            if deleting.is_empty() {
                break;
            }
            if round > 0 {
                tokio::time::sleep(CONFIRM_PAUSE).await;
            }
            let mut still = Vec::new();
            for (key, resolved, uid) in deleting {
                match self.applier.get_object(&key, &resolved).await {
                    Ok(Some(object)) if object.uid().as_deref() == Some(uid.as_str()) => {
                        still.push((key, resolved, uid));
                    }
                    Ok(_) => {
                        inventory.entries.remove(&key);
                        removed.gone.push(key);
                    }
                    Err(_) => still.push((key, resolved, uid)),
                }
            }
            deleting = still;
        }
        for (key, _, _) in deleting {
            removed
                .left
                .push(fail(&key, "still being deleted".to_owned()));
        }
        let whole = keys.is_none();
        let result = if whole && inventory.entries.is_empty() {
            self.drop_inventory(stack_id).await
        } else {
            self.save_inventory(&inventory).await
        };
        if let Err(message) = result {
            removed.left.push(ObjectFailure {
                object: inventory::name_of(stack_id),
                message,
            });
        }
        removed
    }

    /// Carries out a deletion marker: removes everything the stack's inventory lists, as
    /// the marker's deletion policy says, and reports `Delete`.
    pub(super) async fn delete_stack(&mut self, stack: &mut StackState) {
        let done = stack.deleted_for == Some(stack.desired.deployment_object_id);
        if done && !self.inventories.contains_key(&stack.desired.stack_id) {
            // Carried out, and nothing recorded since: nothing to look at.
            return;
        }
        if !self.fetch_content(stack).await {
            return;
        }
        let policy = stack
            .content
            .as_ref()
            .map(|c| c.policy.deletion_policy)
            .unwrap_or_default();
        let stack_id = stack.desired.stack_id;
        let inventory = self
            .inventories
            .get(&stack_id)
            .cloned()
            .unwrap_or_else(|| Inventory::new(stack_id, &stack.desired.stack_name));
        let removed = self.remove_listed(inventory, None, policy).await;
        stack.removed += removed.gone.len() + removed.orphaned.len();
        let (status, message) =
            deletion_report(policy, stack.removed, removed.released.len(), &removed.left);
        if status == EventStatus::Success {
            stack.applied.clear();
            stack.failed = 0;
            stack.attempt = 0;
            let first_time = stack.deleted_for != Some(stack.desired.deployment_object_id);
            stack.deleted_for = Some(stack.desired.deployment_object_id);
            if first_time {
                stack.report(&self.reporter, EventType::Delete, status, message);
            }
        } else {
            stack.failed = u32::try_from(removed.left.len()).unwrap_or(u32::MAX);
            stack.report(&self.reporter, EventType::Delete, status, message);
            let delay = self.config.retry_backoff.jittered(stack.attempt);
            stack.schedule_retry(delay);
        }
    }

    /// Removes the objects of stacks that left the desired set (`all`: every one, else the
    /// ones whose retry is due), as their inventories' deletion policy says. No event: there
    /// is no deployment object to report on.
    pub(super) async fn process_removals(&mut self, all: bool) {
        let now = Instant::now();
        let due: Vec<Uuid> = self
            .removals
            .iter()
            .filter(|(_, r)| all || r.retry_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(mut removal) = self.removals.remove(&id) else {
                continue;
            };
            let Some(inventory) = self.inventories.get(&id).cloned() else {
                continue;
            };
            let policy = inventory.deletion_policy;
            let name = inventory.stack_name.clone();
            let removed = self.remove_listed(inventory, None, policy).await;
            if removed.left.is_empty() {
                match policy {
                    DeletionPolicy::Delete => {
                        tracing::info!(stack = %id, %name, deleted = removed.gone.len(), released = removed.released.len(), "removed a stack that left the desired set")
                    }
                    DeletionPolicy::Orphan => {
                        tracing::info!(stack = %id, %name, orphaned = removed.orphaned.len(), "orphaned the objects of a stack that left the desired set: left in place without brokkr.io labels and annotations")
                    }
                }
            } else {
                let delay = self.config.retry_backoff.jittered(removal.attempt);
                let left: Vec<String> = removed.left.iter().map(ObjectFailure::summary).collect();
                tracing::warn!(
                    stack = %id,
                    left = %left.join("; "),
                    retry_in = ?delay,
                    "failed to remove every object of a stack that left the desired set"
                );
                removal.retry_at = Instant::now() + delay;
                removal.attempt = removal.attempt.saturating_add(1);
                self.removals.insert(id, removal);
            }
        }
    }

    /// Queues the removal of every inventory whose stack the hub no longer lists (it left
    /// while the agent was not running, or its removal was interrupted).
    pub(super) fn sweep_inventories(&mut self) {
        let Some(state) = &self.desired else {
            return;
        };
        let wanted: BTreeSet<Uuid> = state.stacks.iter().map(|s| s.stack_id).collect();
        let orphaned: Vec<Uuid> = self
            .inventories
            .keys()
            .filter(|id| !wanted.contains(*id) && !self.removals.contains_key(*id))
            .copied()
            .collect();
        for id in orphaned {
            tracing::info!(stack = %id, "the hub no longer lists this stack: removing what its inventory lists");
            self.removals.insert(
                id,
                Removal {
                    retry_at: Instant::now(),
                    attempt: 0,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn left(object: &str, message: &str) -> ObjectFailure {
        ObjectFailure {
            object: object.into(),
            message: message.into(),
        }
    }

    #[test]
    fn deletion_succeeds_only_when_nothing_is_left_and_names_what_is() {
        assert_eq!(
            deletion_report(DeletionPolicy::Delete, 5, 0, &[]),
            (EventStatus::Success, "deleted 5 objects".into())
        );
        assert_eq!(
            deletion_report(
                DeletionPolicy::Delete,
                3,
                0,
                &[left("Namespace shop", "still being deleted")]
            ),
            (
                EventStatus::Failure,
                "failed to delete 1 object: Namespace shop: still being deleted".into()
            )
        );
    }

    #[test]
    fn orphaning_and_replaced_objects_are_said_so() {
        assert_eq!(
            deletion_report(DeletionPolicy::Orphan, 1, 0, &[]).1,
            "orphaned 1 object: left in place without brokkr.io labels and annotations"
        );
        assert_eq!(
            deletion_report(DeletionPolicy::Delete, 2, 1, &[]).1,
            "deleted 2 objects; left 1 object alone that had been replaced by someone else"
        );
    }
}
