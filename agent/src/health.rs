//! Health of applied objects: one rule per kind, and the roll-up per stack. Pure functions
//! over the live objects as JSON.
//!
//! | kind | healthy | progressing | degraded |
//! | --- | --- | --- | --- |
//! | `apps/Deployment` | all replicas updated and available | rollout not observed yet, replicas not updated or not available, old replicas still running | `Progressing=False` with `ProgressDeadlineExceeded` |
//! | `apps/StatefulSet` | all replicas ready (and updated, for `RollingUpdate`) | otherwise | — |
//! | `apps/DaemonSet` | `numberReady` and `updatedNumberScheduled` reach `desiredNumberScheduled` | otherwise | — |
//! | `batch/Job` | `Complete=True` | otherwise | `Failed=True` |
//! | anything with a `Ready` condition | `Ready=True` | `Ready=Unknown` | `Ready=False` |
//! | anything else | once it exists | — | — |
//!
//! A stack's health is the worst of its objects' (degraded > progressing > unknown > healthy).
//! A stack with no applied objects is `unknown`: having applied nothing (yet) is no evidence
//! of health.

use brokkr_crds::wire::Health;
use serde_json::Value;

/// The health of one object and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectHealth {
    /// `Kind namespace/name`.
    pub object: String,
    pub health: Health,
    /// Why, when not plainly healthy, e.g. `1/3 available`.
    pub detail: String,
}

/// How bad a health is, for "worst wins".
pub fn severity(health: Health) -> u8 {
    match health {
        Health::Healthy => 0,
        Health::Unknown => 1,
        Health::Progressing => 2,
        Health::Degraded => 3,
    }
}

/// The health of a live object of `group`/`kind`.
pub fn evaluate(group: &str, kind: &str, object: &Value) -> (Health, String) {
    match (group, kind) {
        ("apps", "Deployment") => deployment(object),
        ("apps", "StatefulSet") => stateful_set(object),
        ("apps", "DaemonSet") => daemon_set(object),
        ("batch", "Job") => job(object),
        _ => match condition(object, "Ready") {
            Some(c) => match c.status {
                "True" => (Health::Healthy, String::new()),
                "False" => (Health::Degraded, c.explain("not ready")),
                _ => (Health::Progressing, c.explain("readiness unknown")),
            },
            None => (Health::Healthy, String::new()),
        },
    }
}

/// Rolls object healths up to the stack's: the worst wins, and the detail names the first
/// object with that health.
pub fn roll_up(objects: &[ObjectHealth]) -> (Health, String) {
    let Some(worst) = objects.iter().max_by_key(|o| severity(o.health)) else {
        return (Health::Unknown, "no objects applied".to_owned());
    };
    if worst.health == Health::Healthy {
        let n = objects.len();
        let plural = if n == 1 { "object" } else { "objects" };
        return (Health::Healthy, format!("{n} {plural} healthy"));
    }
    // `max_by_key` returns the last maximum; the message names the first.
    let first = objects
        .iter()
        .find(|o| o.health == worst.health)
        .unwrap_or(worst);
    let detail = if first.detail.is_empty() {
        first.object.clone()
    } else {
        format!("{}: {}", first.object, first.detail)
    };
    (worst.health, detail)
}

struct Condition<'a> {
    status: &'a str,
    reason: &'a str,
    message: &'a str,
}

impl Condition<'_> {
    /// The condition's message, else its reason, else `fallback`.
    fn explain(&self, fallback: &str) -> String {
        [self.message, self.reason]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or(fallback)
            .to_owned()
    }
}

fn condition<'a>(object: &'a Value, kind: &str) -> Option<Condition<'a>> {
    let found = object
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))?;
    let text = |field: &str| found.get(field).and_then(Value::as_str).unwrap_or_default();
    Some(Condition {
        status: text("status"),
        reason: text("reason"),
        message: text("message"),
    })
}

fn int(object: &Value, pointer: &str) -> Option<i64> {
    object.pointer(pointer).and_then(Value::as_i64)
}

/// `None` while the controller has not seen the newest spec.
fn observed(object: &Value) -> Option<(Health, String)> {
    let generation = int(object, "/metadata/generation")?;
    let observed = int(object, "/status/observedGeneration").unwrap_or(0);
    (observed < generation).then(|| {
        (
            Health::Progressing,
            "waiting for the controller to observe the new spec".to_owned(),
        )
    })
}

fn deployment(object: &Value) -> (Health, String) {
    if let Some(c) = condition(object, "Progressing")
        && c.status == "False"
        && c.reason == "ProgressDeadlineExceeded"
    {
        return (Health::Degraded, c.explain("progress deadline exceeded"));
    }
    if let Some(waiting) = observed(object) {
        return waiting;
    }
    let desired = int(object, "/spec/replicas").unwrap_or(1);
    let updated = int(object, "/status/updatedReplicas").unwrap_or(0);
    let total = int(object, "/status/replicas").unwrap_or(0);
    let available = int(object, "/status/availableReplicas").unwrap_or(0);
    if updated < desired {
        (
            Health::Progressing,
            format!("{updated}/{desired} replicas updated"),
        )
    } else if total > updated {
        (
            Health::Progressing,
            format!("{} old replicas pending termination", total - updated),
        )
    } else if available < desired {
        (
            Health::Progressing,
            format!("{available}/{desired} available"),
        )
    } else {
        (Health::Healthy, String::new())
    }
}

fn stateful_set(object: &Value) -> (Health, String) {
    if let Some(waiting) = observed(object) {
        return waiting;
    }
    let desired = int(object, "/spec/replicas").unwrap_or(1);
    let ready = int(object, "/status/readyReplicas").unwrap_or(0);
    let rolling = object
        .pointer("/spec/updateStrategy/type")
        .and_then(Value::as_str)
        .is_none_or(|t| t == "RollingUpdate");
    let updated = int(object, "/status/updatedReplicas").unwrap_or(0);
    if ready < desired {
        (Health::Progressing, format!("{ready}/{desired} ready"))
    } else if rolling && updated < desired {
        (
            Health::Progressing,
            format!("{updated}/{desired} replicas updated"),
        )
    } else {
        (Health::Healthy, String::new())
    }
}

fn daemon_set(object: &Value) -> (Health, String) {
    if let Some(waiting) = observed(object) {
        return waiting;
    }
    let desired = int(object, "/status/desiredNumberScheduled").unwrap_or(0);
    let ready = int(object, "/status/numberReady").unwrap_or(0);
    let rolling = object
        .pointer("/spec/updateStrategy/type")
        .and_then(Value::as_str)
        .is_none_or(|t| t == "RollingUpdate");
    let updated = int(object, "/status/updatedNumberScheduled").unwrap_or(0);
    if ready < desired {
        (Health::Progressing, format!("{ready}/{desired} ready"))
    } else if rolling && updated < desired {
        (
            Health::Progressing,
            format!("{updated}/{desired} pods updated"),
        )
    } else {
        (Health::Healthy, String::new())
    }
}

fn job(object: &Value) -> (Health, String) {
    if let Some(c) = condition(object, "Failed")
        && c.status == "True"
    {
        return (Health::Degraded, c.explain("job failed"));
    }
    if let Some(c) = condition(object, "Complete")
        && c.status == "True"
    {
        return (Health::Healthy, String::new());
    }
    let succeeded = int(object, "/status/succeeded").unwrap_or(0);
    let completions = int(object, "/spec/completions").unwrap_or(1);
    (
        Health::Progressing,
        format!("{succeeded}/{completions} completions"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Value {
        serde_yaml::from_str(text).unwrap()
    }

    fn of(group: &str, kind: &str, text: &str) -> Health {
        evaluate(group, kind, &yaml(text)).0
    }

    #[test]
    fn deployment_is_healthy_when_all_replicas_are_updated_and_available() {
        let available = r#"
metadata: {generation: 2}
spec: {replicas: 3}
status: {observedGeneration: 2, replicas: 3, updatedReplicas: 3, readyReplicas: 3, availableReplicas: 3}
"#;
        assert_eq!(of("apps", "Deployment", available), Health::Healthy);
    }

    #[test]
    fn deployment_rolling_out_is_progressing_with_counts() {
        let partly = r#"
metadata: {generation: 1}
spec: {replicas: 3}
status: {observedGeneration: 1, replicas: 3, updatedReplicas: 3, availableReplicas: 1}
"#;
        assert_eq!(
            evaluate("apps", "Deployment", &yaml(partly)),
            (Health::Progressing, "1/3 available".to_owned())
        );
        let unobserved = r#"
metadata: {generation: 5}
spec: {replicas: 1}
status: {observedGeneration: 4, replicas: 1, updatedReplicas: 1, availableReplicas: 1}
"#;
        assert_eq!(of("apps", "Deployment", unobserved), Health::Progressing);
        let old_pods = r#"
metadata: {generation: 1}
spec: {replicas: 2}
status: {observedGeneration: 1, replicas: 3, updatedReplicas: 2, availableReplicas: 2}
"#;
        assert_eq!(of("apps", "Deployment", old_pods), Health::Progressing);
        // Freshly created: no status at all.
        assert_eq!(
            of(
                "apps",
                "Deployment",
                "metadata: {generation: 1}\nspec: {replicas: 1}\n"
            ),
            Health::Progressing
        );
    }

    #[test]
    fn deployment_past_its_progress_deadline_is_degraded() {
        let stuck = r#"
metadata: {generation: 1}
spec: {replicas: 2}
status:
  observedGeneration: 1
  replicas: 2
  updatedReplicas: 2
  availableReplicas: 0
  conditions:
  - {type: Available, status: "False", reason: MinimumReplicasUnavailable}
  - {type: Progressing, status: "False", reason: ProgressDeadlineExceeded, message: 'ReplicaSet "web-7d4" has timed out progressing.'}
"#;
        assert_eq!(
            evaluate("apps", "Deployment", &yaml(stuck)),
            (
                Health::Degraded,
                "ReplicaSet \"web-7d4\" has timed out progressing.".to_owned()
            )
        );
    }

    #[test]
    fn scaled_to_zero_is_healthy() {
        let zero =
            "metadata: {generation: 1}\nspec: {replicas: 0}\nstatus: {observedGeneration: 1}\n";
        assert_eq!(of("apps", "Deployment", zero), Health::Healthy);
        assert_eq!(of("apps", "StatefulSet", zero), Health::Healthy);
    }

    #[test]
    fn stateful_set_needs_ready_and_updated_replicas() {
        let rolled = "spec: {replicas: 2}\nstatus: {readyReplicas: 2, updatedReplicas: 2}\n";
        assert_eq!(of("apps", "StatefulSet", rolled), Health::Healthy);
        let updating = "spec: {replicas: 2}\nstatus: {readyReplicas: 2, updatedReplicas: 1}\n";
        assert_eq!(of("apps", "StatefulSet", updating), Health::Progressing);
        let on_delete = "spec: {replicas: 2, updateStrategy: {type: OnDelete}}\nstatus: {readyReplicas: 2, updatedReplicas: 0}\n";
        assert_eq!(of("apps", "StatefulSet", on_delete), Health::Healthy);
        let starting = "spec: {replicas: 2}\nstatus: {readyReplicas: 1, updatedReplicas: 2}\n";
        assert_eq!(
            evaluate("apps", "StatefulSet", &yaml(starting)),
            (Health::Progressing, "1/2 ready".to_owned())
        );
    }

    #[test]
    fn daemon_set_needs_every_scheduled_pod_ready_and_updated() {
        let rolled =
            "status: {desiredNumberScheduled: 3, numberReady: 3, updatedNumberScheduled: 3}\n";
        assert_eq!(of("apps", "DaemonSet", rolled), Health::Healthy);
        let partial =
            "status: {desiredNumberScheduled: 3, numberReady: 2, updatedNumberScheduled: 3}\n";
        assert_eq!(of("apps", "DaemonSet", partial), Health::Progressing);
        let stale =
            "status: {desiredNumberScheduled: 3, numberReady: 3, updatedNumberScheduled: 1}\n";
        assert_eq!(of("apps", "DaemonSet", stale), Health::Progressing);
    }

    #[test]
    fn job_complete_is_healthy_and_failed_is_degraded() {
        let done = "status: {conditions: [{type: Complete, status: \"True\"}]}\n";
        assert_eq!(of("batch", "Job", done), Health::Healthy);
        let failed = "status: {conditions: [{type: Failed, status: \"True\", reason: BackoffLimitExceeded, message: Job has reached the specified backoff limit}]}\n";
        assert_eq!(
            evaluate("batch", "Job", &yaml(failed)),
            (
                Health::Degraded,
                "Job has reached the specified backoff limit".to_owned()
            )
        );
        assert_eq!(
            of("batch", "Job", "status: {active: 1}\n"),
            Health::Progressing
        );
    }

    #[test]
    fn other_kinds_follow_their_ready_condition_or_are_healthy_once_they_exist() {
        let ready = "status: {conditions: [{type: Ready, status: \"True\"}]}\n";
        assert_eq!(of("example.com", "Widget", ready), Health::Healthy);
        let not_ready =
            "status: {conditions: [{type: Ready, status: \"False\", reason: NoBackend}]}\n";
        assert_eq!(
            evaluate("example.com", "Widget", &yaml(not_ready)),
            (Health::Degraded, "NoBackend".to_owned())
        );
        let unknown = "status: {conditions: [{type: Ready, status: Unknown}]}\n";
        assert_eq!(of("example.com", "Widget", unknown), Health::Progressing);
        assert_eq!(of("", "ConfigMap", "data: {a: b}\n"), Health::Healthy);
    }

    fn object(name: &str, health: Health, detail: &str) -> ObjectHealth {
        ObjectHealth {
            object: name.into(),
            health,
            detail: detail.into(),
        }
    }

    #[test]
    fn the_worst_health_wins_and_names_the_first_such_object() {
        let objects = [
            object("ConfigMap a/c", Health::Healthy, ""),
            object("Deployment a/web", Health::Progressing, "1/3 available"),
            object("Job a/migrate", Health::Degraded, "backoff limit"),
            object("Job a/seed", Health::Degraded, "other"),
        ];
        assert_eq!(
            roll_up(&objects),
            (Health::Degraded, "Job a/migrate: backoff limit".to_owned())
        );
        assert_eq!(
            roll_up(&objects[..2]),
            (
                Health::Progressing,
                "Deployment a/web: 1/3 available".to_owned()
            )
        );
        let with_unknown = [
            object("ConfigMap a/c", Health::Healthy, ""),
            object("Widget a/w", Health::Unknown, ""),
        ];
        assert_eq!(
            roll_up(&with_unknown),
            (Health::Unknown, "Widget a/w".to_owned())
        );
    }

    #[test]
    fn all_healthy_counts_the_objects_and_nothing_applied_is_unknown() {
        let objects = [
            object("ConfigMap a/c", Health::Healthy, ""),
            object("Service a/s", Health::Healthy, ""),
        ];
        assert_eq!(
            roll_up(&objects),
            (Health::Healthy, "2 objects healthy".to_owned())
        );
        assert_eq!(
            roll_up(&[]),
            (Health::Unknown, "no objects applied".to_owned())
        );
    }

    #[test]
    fn severity_orders_degraded_over_progressing_over_unknown_over_healthy() {
        let mut all = [
            Health::Healthy,
            Health::Degraded,
            Health::Unknown,
            Health::Progressing,
        ];
        all.sort_by_key(|h| severity(*h));
        assert_eq!(
            all,
            [
                Health::Healthy,
                Health::Unknown,
                Health::Progressing,
                Health::Degraded
            ]
        );
    }
}
