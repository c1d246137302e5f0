//! What an AlertRule sees now: pure functions from the rule and the Agents and Stacks the
//! leader watches to the conditions that hold, with when each began.
//!
//! The subjects' own status is the source: an Agent's `status.phase` and conditions, a
//! Stack's conditions. So an alert says what `kubectl get` shows, and its start time is
//! the moment the status changed (an Agent's last heartbeat for `AgentOffline`).

use std::collections::BTreeMap;
use std::time::Duration;

use brokkr_crds::conditions::{STATUS_FALSE, STATUS_TRUE, find_condition, reasons, types};
use brokkr_crds::{
    Agent, AgentPhase, AlertConditionType, AlertRule, AlertSubject, Condition, LabelSelector, Stack,
};
use chrono::{DateTime, Utc};
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use uuid::Uuid;

use crate::store::alerts::ActiveCondition;

/// The conditions of `rule` that hold now among `agents` (those its namespace may target)
/// and `stacks` (any; only those of the rule's namespace are considered), each marked due
/// once it has held for the condition's `for`. Conditions or selectors that do not parse
/// are skipped (the rule's spec is refused before this is called).
pub fn observe(
    rule: &AlertRule,
    agents: &[&Agent],
    stacks: &[&Stack],
    now: DateTime<Utc>,
) -> Vec<ActiveCondition> {
    let namespace = rule.namespace().unwrap_or_default();
    let agent_selector = selector(rule.spec.agent_selector.as_ref());
    let stack_selector = selector(rule.spec.stack_selector.as_ref());
    let mut active = Vec::new();
    for condition in &rule.spec.conditions {
        let Ok(hold_for) = condition.hold_for() else {
            continue;
        };
        let kind = condition.type_;
        if kind.watches_agents() {
            let Some(selector) = &agent_selector else {
                continue;
            };
            for agent in agents.iter().filter(|a| selector.matches(a.labels())) {
                if let Some(found) = agent_condition(kind, agent) {
                    active.extend(found.into_active(
                        kind,
                        agent_subject(agent),
                        *agent,
                        hold_for,
                        now,
                    ));
                }
            }
        } else {
            let Some(selector) = &stack_selector else {
                continue;
            };
            let stacks = stacks.iter().filter(|s| {
                s.namespace().as_deref() == Some(namespace.as_str())
                    && s.metadata.deletion_timestamp.is_none()
                    && selector.matches(s.labels())
            });
            for stack in stacks {
                if let Some(found) = stack_condition(kind, stack) {
                    active.extend(found.into_active(
                        kind,
                        stack_subject(stack),
                        *stack,
                        hold_for,
                        now,
                    ));
                }
            }
        }
    }
    active
}

fn selector(selector: Option<&LabelSelector>) -> Option<Selector> {
    selector.cloned().and_then(|s| Selector::try_from(s).ok())
}

/// A condition found on one subject.
struct Found {
    since: Option<DateTime<Utc>>,
    message: String,
}

impl Found {
    fn into_active<K: kube::Resource>(
        self,
        kind: AlertConditionType,
        subject: AlertSubject,
        object: &K,
        hold_for: Duration,
        now: DateTime<Utc>,
    ) -> Option<ActiveCondition> {
        let subject_uid = object
            .meta()
            .uid
            .as_deref()
            .and_then(|u| Uuid::parse_str(u).ok())?;
        // A subject without a start time (status written by an older operator) holds
        // from now on.
        let since = self.since.unwrap_or(now).min(now);
        let held = (now - since).to_std().unwrap_or_default();
        Some(ActiveCondition {
            condition: kind,
            subject,
            subject_uid,
            since,
            message: self.message,
            due: held >= hold_for,
        })
    }
}

fn agent_subject(agent: &Agent) -> AlertSubject {
    AlertSubject {
        kind: "Agent".into(),
        name: agent.name_any(),
        namespace: None,
    }
}

fn stack_subject(stack: &Stack) -> AlertSubject {
    AlertSubject {
        kind: "Stack".into(),
        name: stack.name_any(),
        namespace: stack.namespace(),
    }
}

fn time_of(time: &brokkr_crds::Time) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(time.0.as_microsecond())
}

fn condition_found(condition: &Condition) -> Found {
    Found {
        since: time_of(&condition.last_transition_time),
        message: condition.message.clone(),
    }
}

/// Whether `kind` holds for `agent`, from its status. A suspended Agent holds none.
fn agent_condition(kind: AlertConditionType, agent: &Agent) -> Option<Found> {
    let status = agent.status.as_ref()?;
    if agent.spec.suspend {
        return None;
    }
    let conditions = &status.conditions;
    match kind {
        AlertConditionType::AgentOffline => {
            (status.phase == Some(AgentPhase::Offline)).then(|| Found {
                // Silent since its last heartbeat, not since the hub noticed.
                since: status
                    .last_heartbeat
                    .as_ref()
                    .and_then(time_of)
                    .or_else(|| {
                        find_condition(conditions, types::ONLINE)
                            .and_then(|c| time_of(&c.last_transition_time))
                    }),
                message: find_condition(conditions, types::ONLINE)
                    .map(|c| format!("Agent {} is Offline: {}", agent.name_any(), c.message))
                    .unwrap_or_else(|| format!("Agent {} is Offline", agent.name_any())),
            })
        }
        AlertConditionType::AgentError => {
            if status.phase != Some(AgentPhase::Error) {
                return None;
            }
            let condition = find_condition(conditions, types::HEALTHY);
            Some(Found {
                since: condition.and_then(|c| time_of(&c.last_transition_time)),
                message: format!(
                    "Agent {} reports an error: {}",
                    agent.name_any(),
                    condition
                        .map(|c| c.message.as_str())
                        .unwrap_or("no reason given")
                ),
            })
        }
        AlertConditionType::KeyExpiring => find_condition(conditions, types::KEY_EXPIRING)
            .filter(|c| c.status == STATUS_TRUE)
            .map(condition_found),
        _ => None,
    }
}

/// Whether `kind` holds for `stack`, from its conditions.
fn stack_condition(kind: AlertConditionType, stack: &Stack) -> Option<Found> {
    let conditions = &stack.status.as_ref()?.conditions;
    let (type_, status, reason) = match kind {
        AlertConditionType::StackDegraded => (types::DEGRADED, STATUS_TRUE, None),
        AlertConditionType::ApplyFailing => {
            (types::APPLIED, STATUS_FALSE, Some(reasons::APPLY_FAILED))
        }
        AlertConditionType::RolloutHalted => (types::ROLLOUT_HALTED, STATUS_TRUE, None),
        _ => return None,
    };
    find_condition(conditions, type_)
        .filter(|c| c.status == status && reason.is_none_or(|r| c.reason == r))
        .map(condition_found)
}

/// Agents by phase, and Stacks by (condition type, condition status).
pub type FleetCounts = (
    BTreeMap<&'static str, i64>,
    BTreeMap<(&'static str, &'static str), i64>,
);

/// How many Agents are in each phase and Stacks in each state of the conditions the fleet
/// metrics show: pure.
pub fn fleet_counts(agents: &[&Agent], stacks: &[&Stack]) -> FleetCounts {
    let mut by_phase: BTreeMap<&'static str, i64> = [
        AgentPhase::Pending,
        AgentPhase::Online,
        AgentPhase::Offline,
        AgentPhase::Error,
        AgentPhase::Suspended,
    ]
    .into_iter()
    .map(|phase| (phase.as_str(), 0))
    .collect();
    for agent in agents {
        let phase = agent
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default();
        *by_phase.entry(phase.as_str()).or_default() += 1;
    }
    const CONDITIONS: [&str; 4] = [
        types::READY,
        types::DEGRADED,
        types::APPLIED,
        types::ROLLOUT_HALTED,
    ];
    let mut by_condition = BTreeMap::new();
    for condition in CONDITIONS {
        for status in [STATUS_TRUE, STATUS_FALSE, "Unknown"] {
            by_condition.insert((condition, status), 0);
        }
    }
    for stack in stacks {
        let conditions = stack
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
        for condition in CONDITIONS {
            let status = match find_condition(conditions, condition).map(|c| c.status.as_str()) {
                Some(STATUS_TRUE) => STATUS_TRUE,
                Some(STATUS_FALSE) => STATUS_FALSE,
                _ => "Unknown",
            };
            *by_condition.entry((condition, status)).or_default() += 1;
        }
    }
    (by_phase, by_condition)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-11-30T12:00:00Z";

    fn now() -> DateTime<Utc> {
        NOW.parse().unwrap()
    }

    fn rule(yaml: &str) -> AlertRule {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn agent(yaml: &str) -> Agent {
        serde_yaml::from_str(yaml).unwrap()
    }

    const RULE: &str = r#"
apiVersion: brokkr.io/v1alpha1
kind: AlertRule
metadata: {name: edge-down, namespace: team-a, uid: 00000000-0000-0000-0000-0000000000aa}
spec:
  agentSelector: {matchLabels: {env: prod}}
  stackSelector: {matchLabels: {tier: web}}
  conditions:
    - {type: AgentOffline, for: 30s}
    - {type: AgentError}
    - {type: StackDegraded, for: 10m}
    - {type: RolloutHalted}
  severity: critical
  channels: [ops]
"#;

    fn offline_agent(name: &str, uid: &str, env: &str, last_heartbeat: &str) -> Agent {
        agent(&format!(
            r#"
apiVersion: brokkr.io/v1alpha1
kind: Agent
metadata: {{name: {name}, uid: {uid}, labels: {{env: {env}}}}}
spec: {{clusterName: c}}
status:
  phase: Offline
  lastHeartbeat: "{last_heartbeat}"
  conditions:
    - {{type: Online, status: "False", reason: HeartbeatMissed, message: missed three heartbeats, lastTransitionTime: "2026-11-30T11:59:59Z"}}
"#
        ))
    }

    #[test]
    fn an_offline_agent_is_due_once_silent_for_the_rules_for_counted_from_its_last_heartbeat() {
        let rule = rule(RULE);
        let long = offline_agent(
            "edge-1",
            "00000000-0000-0000-0000-000000000001",
            "prod",
            "2026-11-30T11:59:00Z",
        );
        let short = offline_agent(
            "edge-2",
            "00000000-0000-0000-0000-000000000002",
            "prod",
            "2026-11-30T11:59:45Z",
        );
        let other_env = offline_agent(
            "edge-3",
            "00000000-0000-0000-0000-000000000003",
            "dev",
            "2026-11-30T11:00:00Z",
        );

        let active = observe(&rule, &[&long, &short, &other_env], &[], now());

        assert_eq!(active.len(), 2, "{active:?}");
        let long_active = &active[0];
        assert_eq!(long_active.subject.name, "edge-1");
        assert_eq!(long_active.condition, AlertConditionType::AgentOffline);
        assert!(long_active.due, "silent 60 s with for: 30s");
        assert_eq!(
            long_active.since,
            "2026-11-30T11:59:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(
            long_active.message,
            "Agent edge-1 is Offline: missed three heartbeats"
        );
        assert!(!active[1].due, "silent 15 s with for: 30s");
    }

    #[test]
    fn an_agent_in_error_fires_at_once_without_for_and_a_suspended_one_never() {
        let rule = rule(RULE);
        let broken = agent(
            r#"
apiVersion: brokkr.io/v1alpha1
kind: Agent
metadata: {name: edge-9, uid: 00000000-0000-0000-0000-000000000009, labels: {env: prod}}
spec: {clusterName: c}
status:
  phase: Error
  conditions:
    - {type: Healthy, status: "False", reason: AgentError, message: "spoke API server unreachable", lastTransitionTime: "2026-11-30T11:58:00Z"}
"#,
        );
        let mut suspended = broken.clone();
        suspended.spec.suspend = true;

        let active = observe(&rule, &[&broken], &[], now());
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].condition, AlertConditionType::AgentError);
        assert!(active[0].due);
        assert_eq!(
            active[0].message,
            "Agent edge-9 reports an error: spoke API server unreachable"
        );
        assert!(observe(&rule, &[&suspended], &[], now()).is_empty());
    }

    #[test]
    fn stacks_of_other_namespaces_or_labels_are_not_watched() {
        let rule = rule(RULE);
        let stack = |namespace: &str, tier: &str, degraded_since: &str| -> Stack {
            let uid = Uuid::new_v4();
            serde_yaml::from_str(&format!(
                r#"
apiVersion: brokkr.io/v1alpha1
kind: Stack
metadata: {{name: web, namespace: {namespace}, uid: {uid}, labels: {{tier: {tier}}}}}
spec: {{generatorRef: {{name: ci}}, resources: []}}
status:
  conditions:
    - {{type: Degraded, status: "True", reason: Unhealthy, message: "1 agent reports degraded health", lastTransitionTime: "{degraded_since}"}}
    - {{type: RolloutHalted, status: "False", reason: RollingOut, message: "", lastTransitionTime: "{degraded_since}"}}
"#
            ))
            .unwrap()
        };
        let ours = stack("team-a", "web", "2026-11-30T11:00:00Z");
        let recent = stack("team-a", "web", "2026-11-30T11:55:00Z");
        let theirs = stack("team-b", "web", "2026-11-30T11:00:00Z");
        let other_tier = stack("team-a", "db", "2026-11-30T11:00:00Z");

        let active = observe(&rule, &[], &[&ours, &theirs, &other_tier], now());
        assert_eq!(active.len(), 1, "{active:?}");
        assert_eq!(active[0].condition, AlertConditionType::StackDegraded);
        assert_eq!(active[0].subject.namespace.as_deref(), Some("team-a"));
        assert!(active[0].due, "degraded for an hour, for: 10m");
        let active = observe(&rule, &[], &[&recent], now());
        assert!(!active[0].due, "degraded for 5 minutes, for: 10m");
    }

    #[test]
    fn fleet_counts_cover_every_phase_and_condition_even_at_zero() {
        let a = offline_agent(
            "edge-1",
            "00000000-0000-0000-0000-000000000001",
            "prod",
            NOW,
        );
        let (phases, conditions) = fleet_counts(&[&a], &[]);
        assert_eq!(phases["Offline"], 1);
        assert_eq!(phases["Error"], 0);
        assert_eq!(conditions[&("Ready", "Unknown")], 0);
        assert_eq!(conditions.len(), 12);
    }
}
