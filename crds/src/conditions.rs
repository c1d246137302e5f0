//! Standard status conditions: the condition types and reasons Brokkr uses, and pure
//! helpers to update a condition list without churning timestamps.
//!
//! Rules the helpers keep:
//! - one condition per `type`;
//! - `lastTransitionTime` moves only when `status` flips;
//! - a status patch is needed only when something other than a timestamp changed
//!   ([`set_condition`] returns whether it did, [`conditions_eq_ignoring_time`] compares lists).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// `status` value of a condition that holds.
pub const STATUS_TRUE: &str = "True";
/// `status` value of a condition that does not hold.
pub const STATUS_FALSE: &str = "False";
/// `status` value of a condition whose state is not known yet.
pub const STATUS_UNKNOWN: &str = "Unknown";

/// Condition types.
pub mod types {
    /// Stack: the spec is valid, its generator exists, and its content was recorded.
    pub const ACCEPTED: &str = "Accepted";
    /// Stack: every targeted agent applied the current deployment object.
    pub const APPLIED: &str = "Applied";
    /// All kinds: the object is doing its job. Stack: every targeted agent reports the
    /// current deployment object healthy. AgentTarget: the stack exists and agents matched.
    /// Generator: its database row and API key exist. Agent: registered and not suspended.
    pub const READY: &str = "Ready";
    /// Stack: at least one targeted agent failed to apply or reports degraded health.
    pub const DEGRADED: &str = "Degraded";
    /// Agent: heartbeats arrive in time.
    pub const ONLINE: &str = "Online";
    /// Agent: the agent reports that it can do its job on the spoke (`True`, reason
    /// `AgentReady`). `False` with reason `AgentError` and the agent's message when it
    /// reports it cannot (its phase is `Error`, `Online` stays `True`); `False` with
    /// `HeartbeatMissed`, `NeverConnected` or `Suspended` when no report arrives, since an
    /// agent that is not heard from is not known to work.
    pub const HEALTHY: &str = "Healthy";
    /// Stack: at least one targeted agent reports drift it did not correct
    /// (`driftPolicy: Detect`).
    pub const DRIFTED: &str = "Drifted";
    /// Agent and Generator: less than 10 % of the current key's lifetime is left.
    pub const KEY_EXPIRING: &str = "KeyExpiring";
    /// Stack: `spec.pinnedRevision` holds every agent at a recorded revision.
    pub const PINNED: &str = "Pinned";
    /// Stack: the rollout stopped moving agents (an agent failed, is degraded or did not
    /// become healthy in time).
    pub const ROLLOUT_HALTED: &str = "RolloutHalted";
}

/// Condition reasons (CamelCase, as Kubernetes expects).
pub mod reasons {
    // Shared.
    /// The spec breaks a rule (the message names the field).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// `spec.suspend` is true.
    pub const SUSPENDED: &str = "Suspended";
    /// The operator could not reach its database or the API server; it retries.
    pub const RECONCILE_ERROR: &str = "ReconcileError";
    /// The operator has not finished its first reconcile of the object.
    pub const PENDING: &str = "Pending";
    /// Everything is as desired.
    pub const RECONCILED: &str = "Reconciled";

    // Stack.
    /// `spec.generatorRef` names a Generator that does not exist in the namespace.
    pub const GENERATOR_NOT_FOUND: &str = "GeneratorNotFound";
    /// The Stack's Generator has `spec.suspend: true`: nothing new is recorded.
    pub const GENERATOR_SUSPENDED: &str = "GeneratorSuspended";
    /// `spec.manifests` or `spec.resources` could not be parsed or rendered.
    pub const INVALID_MANIFEST: &str = "InvalidManifest";
    /// The content was recorded as a deployment object.
    pub const RECORDED: &str = "Recorded";
    /// The deleted Stack was released after `--deletion-timeout` without every removal
    /// report (agents silent, or the database unreachable).
    pub const DELETION_TIMED_OUT: &str = "DeletionTimedOut";
    /// No agent is targeted by any AgentTarget.
    pub const NO_TARGETS: &str = "NoTargets";
    /// Some targeted agents have not applied the current deployment object yet.
    pub const PROGRESSING: &str = "Progressing";
    /// Every targeted agent applied the current deployment object.
    pub const ALL_APPLIED: &str = "AllApplied";
    /// Every targeted agent reports the current deployment object healthy.
    pub const ALL_HEALTHY: &str = "AllHealthy";
    /// Some targeted agents failed to apply the current deployment object.
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// Some targeted agents report degraded health.
    pub const UNHEALTHY: &str = "Unhealthy";
    /// Some targeted agents report drift they did not correct.
    pub const DRIFT_NOT_CORRECTED: &str = "DriftNotCorrected";
    /// No targeted agent reports drift it did not correct.
    pub const NO_DRIFT: &str = "NoDrift";

    // AgentTarget.
    /// `spec.stackRef` names a Stack that does not exist in the namespace.
    pub const STACK_NOT_FOUND: &str = "StackNotFound";
    /// Neither `spec.agents` nor `spec.agentSelector` matched any Agent.
    pub const NO_AGENTS_MATCHED: &str = "NoAgentsMatched";
    /// A name in `spec.agents` is not an existing Agent.
    pub const AGENT_NOT_FOUND: &str = "AgentNotFound";
    /// At least one agent matched and is targeted.
    pub const MATCHED: &str = "Matched";
    /// A selected Agent does not accept targets from the AgentTarget's namespace.
    pub const NOT_PERMITTED: &str = "NotPermitted";

    // Agent.
    /// The agent sent a heartbeat recently.
    pub const HEARTBEAT: &str = "Heartbeat";
    /// The agent's heartbeats stopped.
    pub const HEARTBEAT_MISSED: &str = "HeartbeatMissed";
    /// The agent never sent a heartbeat.
    pub const NEVER_CONNECTED: &str = "NeverConnected";
    /// `Healthy=True`: the agent's heartbeats report that it works.
    pub const AGENT_READY: &str = "AgentReady";
    /// `Healthy=False`: the agent's heartbeats report that it cannot work on the spoke; the
    /// message is the agent's reason.
    pub const AGENT_ERROR: &str = "AgentError";

    // Agent and Generator keys.
    /// Less than 10 % of the key's lifetime is left (`KeyExpiring=True`).
    pub const KEY_EXPIRES_SOON: &str = "KeyExpiresSoon";
    /// The key has most of its lifetime left (`KeyExpiring=False`).
    pub const KEY_VALID: &str = "KeyValid";
    /// The key expired before it was rotated.
    pub const KEY_EXPIRED: &str = "KeyExpired";

    // Stack revisions and rollouts.
    /// `spec.pinnedRevision` names no revision of the Stack (`Accepted=False`).
    pub const UNKNOWN_REVISION: &str = "UnknownRevision";
    /// `Pinned=True`: agents are held at the pinned revision.
    pub const PINNED: &str = "Pinned";
    /// `Pinned=False`: the pin was removed; the newest revision is delivered.
    pub const UNPINNED: &str = "Unpinned";
    /// `RolloutHalted=True`: an agent failed to apply the new revision.
    pub const ROLLOUT_APPLY_FAILED: &str = "ApplyFailed";
    /// `RolloutHalted=True`: an agent reports the new revision degraded.
    pub const ROLLOUT_DEGRADED: &str = "Degraded";
    /// `RolloutHalted=True`: an agent did not report the new revision healthy in time.
    pub const HEALTH_TIMEOUT: &str = "HealthTimeout";
    /// `RolloutHalted=False`: waves are being updated.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// `RolloutHalted=False`: every agent holds the newest revision, healthy.
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    /// `RolloutHalted=False`: `spec.rollout.paused` is true.
    pub const ROLLOUT_PAUSED: &str = "RolloutPaused";

    // NotificationChannel and AlertRule.
    /// `Ready=False`: a Secret or Secret key the channel names does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// `Ready=True`: the last notification was delivered.
    pub const DELIVERED: &str = "Delivered";
    /// `Ready=False`: the last delivery attempts failed; they are retried.
    pub const DELIVERY_FAILING: &str = "DeliveryFailing";
    /// `Ready=False`: a channel in `spec.channels` does not exist in the namespace.
    pub const CHANNEL_NOT_FOUND: &str = "ChannelNotFound";
}

/// Builds a condition. `now` is passed in so callers (and tests) own the clock.
pub fn new_condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { STATUS_TRUE } else { STATUS_FALSE }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Sets `new` in `conditions`, replacing the condition of the same type.
///
/// When that condition already has the same `status`, its `lastTransitionTime` is kept
/// (a condition only transitions when its status flips). Returns `true` when anything
/// other than `lastTransitionTime` changed, i.e. when a status patch is worth sending.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let changed = !condition_eq_ignoring_time(existing, &new);
            let last_transition_time = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *existing = Condition {
                last_transition_time,
                ..new
            };
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// The condition of type `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of type `type_` is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == STATUS_TRUE)
}

/// Whether two conditions say the same thing: equal in every field but `lastTransitionTime`.
pub fn condition_eq_ignoring_time(a: &Condition, b: &Condition) -> bool {
    a.type_ == b.type_
        && a.status == b.status
        && a.reason == b.reason
        && a.message == b.message
        && a.observed_generation == b.observed_generation
}

/// Whether two condition lists say the same thing: the same types, each equal ignoring
/// `lastTransitionTime`, in any order.
pub fn conditions_eq_ignoring_time(a: &[Condition], b: &[Condition]) -> bool {
    let covered = |xs: &[Condition], ys: &[Condition]| {
        xs.iter()
            .all(|x| find_condition(ys, &x.type_).is_some_and(|y| condition_eq_ignoring_time(x, y)))
    };
    a.len() == b.len() && covered(a, b) && covered(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + seconds).unwrap())
    }

    fn ready(status: bool, reason: &str, message: &str, now: Time) -> Condition {
        new_condition(types::READY, status, reason, message, Some(1), now)
    }

    #[test]
    fn new_condition_spells_status_as_kubernetes_does() {
        let c = new_condition(types::READY, true, reasons::MATCHED, "ok", Some(3), at(0));
        assert_eq!(c.type_, "Ready");
        assert_eq!(c.status, "True");
        assert_eq!(c.reason, "Matched");
        assert_eq!(c.observed_generation, Some(3));
        assert_eq!(
            new_condition(types::READY, false, "R", "", None, at(0)).status,
            "False"
        );
    }

    #[test]
    fn set_condition_adds_a_missing_type() {
        let mut conditions = Vec::new();
        assert!(set_condition(
            &mut conditions,
            ready(true, "Matched", "2 agents", at(0))
        ));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, at(0));
    }

    #[test]
    fn same_status_keeps_last_transition_time_and_reports_no_change() {
        let mut conditions = vec![ready(true, "Matched", "2 agents", at(0))];
        let changed = set_condition(&mut conditions, ready(true, "Matched", "2 agents", at(60)));
        assert!(
            !changed,
            "only the timestamp differs, so no patch is needed"
        );
        assert_eq!(conditions[0].last_transition_time, at(0));
    }

    #[test]
    fn same_status_with_new_message_keeps_time_but_reports_change() {
        let mut conditions = vec![ready(true, "Matched", "2 agents", at(0))];
        assert!(set_condition(
            &mut conditions,
            ready(true, "Matched", "3 agents", at(60))
        ));
        assert_eq!(conditions[0].message, "3 agents");
        assert_eq!(conditions[0].last_transition_time, at(0));
    }

    #[test]
    fn status_flip_moves_last_transition_time() {
        let mut conditions = vec![ready(true, "Matched", "2 agents", at(0))];
        assert!(set_condition(
            &mut conditions,
            ready(false, "StackNotFound", "stack web not found", at(60))
        ));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].status, STATUS_FALSE);
        assert_eq!(conditions[0].reason, "StackNotFound");
        assert_eq!(conditions[0].last_transition_time, at(60));
    }

    #[test]
    fn set_condition_leaves_other_types_alone() {
        let online = new_condition(types::ONLINE, true, reasons::HEARTBEAT, "", Some(1), at(0));
        let mut conditions = vec![online.clone(), ready(true, "Reconciled", "", at(0))];
        set_condition(&mut conditions, ready(false, "Suspended", "", at(9)));
        assert_eq!(conditions[0], online);
        assert_eq!(conditions.len(), 2);
    }

    #[test]
    fn new_observed_generation_is_a_change() {
        let mut conditions = vec![ready(true, "Matched", "", at(0))];
        let mut newer = ready(true, "Matched", "", at(5));
        newer.observed_generation = Some(2);
        assert!(set_condition(&mut conditions, newer));
        assert_eq!(conditions[0].observed_generation, Some(2));
        assert_eq!(conditions[0].last_transition_time, at(0));
    }

    #[test]
    fn equality_ignores_only_the_timestamp() {
        let a = ready(true, "Matched", "m", at(0));
        assert!(condition_eq_ignoring_time(
            &a,
            &ready(true, "Matched", "m", at(99))
        ));
        assert!(!condition_eq_ignoring_time(
            &a,
            &ready(false, "Matched", "m", at(0))
        ));
        assert!(!condition_eq_ignoring_time(
            &a,
            &ready(true, "Other", "m", at(0))
        ));
        assert!(!condition_eq_ignoring_time(
            &a,
            &ready(true, "Matched", "n", at(0))
        ));
    }

    #[test]
    fn list_equality_ignores_order_and_timestamps() {
        let online = new_condition(types::ONLINE, true, reasons::HEARTBEAT, "", None, at(0));
        let a = vec![online.clone(), ready(true, "Matched", "", at(0))];
        let b = vec![ready(true, "Matched", "", at(7)), online.clone()];
        assert!(conditions_eq_ignoring_time(&a, &b));
        assert!(!conditions_eq_ignoring_time(&a, &[online]));
        assert!(!conditions_eq_ignoring_time(
            &a,
            &[
                ready(true, "Matched", "", at(0)),
                ready(true, "Matched", "", at(0))
            ]
        ));
    }

    #[test]
    fn find_and_is_true_look_up_by_type() {
        let conditions = vec![ready(true, "Matched", "", at(0))];
        assert!(is_condition_true(&conditions, types::READY));
        assert!(!is_condition_true(&conditions, types::ONLINE));
        assert!(find_condition(&conditions, types::ONLINE).is_none());
        let not_ready = vec![ready(false, "NoAgentsMatched", "", at(0))];
        assert!(!is_condition_true(&not_ready, types::READY));
    }
}
