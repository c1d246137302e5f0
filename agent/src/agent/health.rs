//! Health of what a stack applied: read every applied object, roll up, report changes.

use brokkr_crds::wire::{EventType, Health, health_message};
use uuid::Uuid;

use super::Worker;
use super::sync::StackState;
use crate::health::ObjectHealth;

impl Worker {
    pub(super) async fn evaluate_all_health(&mut self) {
        let ids: Vec<Uuid> = self.stacks.keys().copied().collect();
        for id in ids {
            if let Some(mut stack) = self.stacks.remove(&id) {
                self.evaluate_health(&mut stack).await;
                self.stacks.insert(id, stack);
            }
        }
    }

    /// Reads every applied object of the stack, rolls up their health, and reports a
    /// `Health` event when it changed (or the deployment object did).
    pub(super) async fn evaluate_health(&mut self, stack: &mut StackState) {
        let current = stack
            .content
            .as_ref()
            .is_some_and(|c| c.id == stack.desired.deployment_object_id && c.manifests.is_ok());
        if stack.desired.deletion || !current {
            return;
        }
        let mut objects = Vec::with_capacity(stack.applied.len());
        for (key, applied) in &stack.applied {
            let (health, detail) = match self.applier.get(key, &applied.resource).await {
                Ok(Some(live)) => crate::health::evaluate(&key.group, &key.kind, &live),
                Ok(None) => (Health::Progressing, "missing: being re-applied".to_owned()),
                Err(message) => (Health::Unknown, format!("failed to read: {message}")),
            };
            objects.push(ObjectHealth {
                object: key.to_string(),
                health,
                detail,
            });
        }
        let (health, detail) = crate::health::roll_up(&objects);
        stack.health = health;
        let now = (stack.desired.deployment_object_id, health);
        if stack.last_health != Some(now) {
            tracing::info!(health = health.as_str(), %detail, "health changed");
            self.reporter.report(
                stack.desired.deployment_object_id,
                EventType::Health,
                health.event_status(),
                Some(health_message(health, &detail)),
            );
            stack.last_health = Some(now);
        }
    }
}
