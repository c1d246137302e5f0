//! Progressive rollouts, decided from plain data: which agents move to the new revision
//! now, whether the rollout is halted, and how far it got. Pure; the Stack controller
//! reads the inputs and writes the assignments and the status.
//!
//! The rules (`spec.rollout`):
//! - An agent belongs to the first wave whose selector matches its labels; the rest form
//!   the last wave, `remaining`.
//! - A wave starts only when every agent of the earlier waves reports the new revision
//!   applied and healthy. Within a wave at most `maxUnavailable` agents are updating
//!   (assigned, not yet healthy) at once.
//! - An agent of a started wave that failed to apply the revision, reports it degraded, or
//!   is not healthy `healthTimeout` after it was assigned it halts the rollout: no further
//!   agent moves until a new revision, a recovery of that agent, or a pause and resume
//!   (which restarts the health clocks).

use std::collections::BTreeMap;
use std::time::Duration;

use brokkr_crds::conditions::reasons;
use brokkr_crds::rollout::REMAINING_WAVE;
use brokkr_crds::wire::{EventStatus, Health, parse_health_message};
use brokkr_crds::{RolloutSpec, RolloutStatus};
use chrono::{DateTime, Utc};
use kube::core::{Selector, SelectorExt};
use uuid::Uuid;

use crate::store::AgentStackStatus;

/// Longest agent message quoted in a halt.
const MAX_QUOTED_MESSAGE: usize = 200;

/// One targeted agent: its labels, and what it reported on what it is assigned.
pub struct RolloutAgent<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub report: &'a AgentStackStatus,
}

pub struct RolloutInput<'a> {
    pub spec: &'a RolloutSpec,
    /// The revision being rolled out: id and sequence.
    pub revision: (Uuid, i64),
    pub agents: &'a [RolloutAgent<'a>],
    pub now: DateTime<Utc>,
}

/// Why a rollout stopped moving agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Halt {
    pub agent: String,
    /// A `RolloutHalted` reason.
    pub reason: &'static str,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RolloutPlan {
    /// Agents to assign the revision now.
    pub assign: Vec<Uuid>,
    pub halt: Option<Halt>,
    /// Whether every agent reports the revision healthy.
    pub complete: bool,
    pub status: RolloutStatus,
    /// When the earliest health timeout of an updating agent falls, from `now`.
    pub next_deadline: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Progress {
    /// Not assigned the revision yet.
    Pending,
    /// Assigned it, not healthy yet; `Duration` left until its health timeout.
    Updating(Duration),
    Healthy,
    Halting(&'static str, String),
}

fn progress(
    agent: &AgentStackStatus,
    revision: (Uuid, i64),
    timeout: Duration,
    now: DateTime<Utc>,
) -> Progress {
    let Some(assignment) = agent
        .assignment
        .as_ref()
        .filter(|assignment| assignment.deployment_object_id == revision.0)
    else {
        return Progress::Pending;
    };
    let sequence = revision.1;
    let quoted = |message: &Option<String>| {
        let message = message.as_deref().unwrap_or_default();
        let mut quoted: String = message.chars().take(MAX_QUOTED_MESSAGE).collect();
        if quoted.len() < message.len() {
            quoted.push('…');
        }
        quoted
    };
    if let Some(outcome) = &agent.outcome
        && outcome.status == EventStatus::Failure.as_str()
    {
        return Progress::Halting(
            reasons::ROLLOUT_APPLY_FAILED,
            format!(
                "agent {} failed to apply revision {sequence}: {}",
                agent.agent_name,
                quoted(&outcome.message)
            ),
        );
    }
    let health = agent
        .health
        .as_ref()
        .map(|health| parse_health_message(health.message.as_deref().unwrap_or_default()));
    if health == Some(Health::Degraded) {
        return Progress::Halting(
            reasons::ROLLOUT_DEGRADED,
            format!(
                "agent {} reports revision {sequence} degraded: {}",
                agent.agent_name,
                quoted(&agent.health.as_ref().and_then(|h| h.message.clone()))
            ),
        );
    }
    let applied = agent
        .outcome
        .as_ref()
        .is_some_and(|outcome| outcome.status == EventStatus::Success.as_str());
    if applied && health == Some(Health::Healthy) {
        return Progress::Healthy;
    }
    let waited = (now - assignment.health_clock_at)
        .to_std()
        .unwrap_or_default();
    match timeout.checked_sub(waited) {
        Some(left) if !left.is_zero() => Progress::Updating(left),
        _ => Progress::Halting(
            reasons::HEALTH_TIMEOUT,
            format!(
                "agent {} did not report revision {sequence} healthy within {}",
                agent.agent_name,
                humantime::format_duration(timeout)
            ),
        ),
    }
}

/// The waves of `spec` over `agents`, in order, each with the indices of its agents
/// sorted by name; the implicit last wave only when it has agents.
fn waves<'a>(spec: &'a RolloutSpec, agents: &[RolloutAgent<'_>]) -> Vec<(&'a str, Vec<usize>)> {
    let selectors: Vec<Option<Selector>> = spec
        .waves
        .iter()
        .map(|wave| Selector::try_from(wave.agent_selector.clone()).ok())
        .collect();
    let mut waves: Vec<(&str, Vec<usize>)> = spec
        .waves
        .iter()
        .map(|wave| (wave.name.as_str(), Vec::new()))
        .chain(std::iter::once((REMAINING_WAVE, Vec::new())))
        .collect();
    let remaining = waves.len() - 1;
    for (index, agent) in agents.iter().enumerate() {
        let wave = selectors
            .iter()
            .position(|selector| selector.as_ref().is_some_and(|s| s.matches(agent.labels)))
            .unwrap_or(remaining);
        waves[wave].1.push(index);
    }
    for (_, members) in &mut waves {
        members.sort_by(|a, b| {
            agents[*a]
                .report
                .agent_name
                .cmp(&agents[*b].report.agent_name)
        });
    }
    if waves[remaining].1.is_empty() {
        waves.pop();
    }
    waves
}

/// Decides the next step of the rollout of `input.revision`.
pub fn plan_rollout(input: RolloutInput<'_>) -> RolloutPlan {
    let spec = input.spec;
    let timeout = spec
        .health_timeout()
        .unwrap_or(brokkr_crds::rollout::DEFAULT_HEALTH_TIMEOUT);
    let progress: Vec<Progress> = input
        .agents
        .iter()
        .map(|agent| progress(agent.report, input.revision, timeout, input.now))
        .collect();
    let waves = waves(spec, input.agents);

    let mut assign = Vec::new();
    let mut halt = None;
    let mut current = None;
    let mut summary = Vec::new();
    let mut next_deadline: Option<Duration> = None;
    for (name, members) in &waves {
        let healthy = members
            .iter()
            .filter(|i| progress[**i] == Progress::Healthy)
            .count();
        if members.is_empty() {
            continue;
        }
        summary.push(format!("{name} {healthy}/{}", members.len()));
        current = Some(*name);
        if let Some(index) = members
            .iter()
            .find(|i| matches!(progress[**i], Progress::Halting(..)))
            && let Progress::Halting(reason, message) = &progress[*index]
        {
            halt = Some(Halt {
                agent: input.agents[*index].report.agent_name.clone(),
                reason,
                message: message.clone(),
            });
            break;
        }
        if healthy == members.len() {
            continue;
        }
        let mut updating = 0;
        for index in members {
            if let Progress::Updating(left) = progress[*index] {
                updating += 1;
                next_deadline = Some(next_deadline.map_or(left, |next| next.min(left)));
            }
        }
        if !spec.paused {
            let limit = spec.max_unavailable_of(members.len()).unwrap_or(1);
            assign.extend(
                members
                    .iter()
                    .filter(|i| progress[**i] == Progress::Pending)
                    .take(limit.saturating_sub(updating))
                    .map(|i| input.agents[*i].report.agent_id),
            );
        }
        break;
    }
    let healthy = progress.iter().filter(|p| **p == Progress::Healthy).count();
    // No agent yet (targets not resolved): nothing is complete.
    let complete = !progress.is_empty() && healthy == progress.len();
    let pending = progress
        .iter()
        .filter(|p| **p == Progress::Pending)
        .count()
        .saturating_sub(assign.len());
    let mut summary = if summary.is_empty() {
        "no agents".to_owned()
    } else {
        summary.join(" → ")
    };
    if halt.is_some() {
        summary.push_str(" (halted)");
    } else if spec.paused && !complete {
        summary.push_str(" (paused)");
    }
    RolloutPlan {
        status: RolloutStatus {
            revision: input.revision.1,
            wave: current.map(str::to_owned),
            updated: healthy as i32,
            pending: pending as i32,
            halted: halt.as_ref().map(|halt| halt.message.clone()),
            paused: spec.paused,
            summary: Some(summary),
        },
        assign,
        halt,
        complete,
        next_deadline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Assignment, EventSummary};

    const NEW: (Uuid, i64) = (Uuid::from_u128(2), 2);
    const OLD: (Uuid, i64) = (Uuid::from_u128(1), 1);

    fn spec(yaml: &str) -> RolloutSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn two_waves(extra: &str) -> RolloutSpec {
        spec(&format!(
            "waves: [{{name: canary, agentSelector: {{matchLabels: {{ring: canary}}}}}}, \
             {{name: eu, agentSelector: {{matchLabels: {{region: eu}}}}}}]\n{extra}"
        ))
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    struct Fleet {
        labels: Vec<BTreeMap<String, String>>,
        reports: Vec<AgentStackStatus>,
    }

    impl Fleet {
        fn new(agents: &[(&str, &str)]) -> Fleet {
            let labels = agents
                .iter()
                .map(|(_, labels)| {
                    labels
                        .split(',')
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').unwrap();
                            (k.to_owned(), v.to_owned())
                        })
                        .collect()
                })
                .collect();
            let reports = agents
                .iter()
                .enumerate()
                .map(|(index, (name, _))| AgentStackStatus {
                    agent_id: Uuid::from_u128(100 + index as u128),
                    agent_name: (*name).to_owned(),
                    cluster_name: String::new(),
                    agent_status: "ACTIVE".into(),
                    last_heartbeat: None,
                    outcome: None,
                    health: None,
                    drift: None,
                    assignment: Some(Assignment {
                        deployment_object_id: OLD.0,
                        sequence_id: OLD.1,
                        assigned_at: now() - chrono::Duration::hours(1),
                        health_clock_at: now() - chrono::Duration::hours(1),
                    }),
                })
                .collect();
            Fleet { labels, reports }
        }

        fn agent(&mut self, name: &str) -> &mut AgentStackStatus {
            self.reports
                .iter_mut()
                .find(|r| r.agent_name == name)
                .unwrap()
        }

        fn assigned(&mut self, name: &str, minutes_ago: i64) -> &mut Self {
            self.agent(name).assignment = Some(Assignment {
                deployment_object_id: NEW.0,
                sequence_id: NEW.1,
                assigned_at: now() - chrono::Duration::minutes(minutes_ago),
                health_clock_at: now() - chrono::Duration::minutes(minutes_ago),
            });
            self
        }

        fn report(&mut self, name: &str, outcome: &str, health: &str) -> &mut Self {
            let event = |event_type: &str, status: &str, message: &str| EventSummary {
                event_type: event_type.into(),
                status: status.into(),
                message: Some(message.into()),
                at: now(),
            };
            let agent = self.agent(name);
            agent.outcome = Some(event("Apply", outcome, "the apiserver refused it"));
            let status = if health.starts_with("degraded") {
                "Failure"
            } else {
                "Success"
            };
            agent.health = Some(event("Health", status, health));
            self
        }

        fn plan(&self, spec: &RolloutSpec) -> RolloutPlan {
            let agents: Vec<RolloutAgent<'_>> = self
                .labels
                .iter()
                .zip(&self.reports)
                .map(|(labels, report)| RolloutAgent { labels, report })
                .collect();
            plan_rollout(RolloutInput {
                spec,
                revision: NEW,
                agents: &agents,
                now: now(),
            })
        }

        fn names(&self, ids: &[Uuid]) -> Vec<String> {
            ids.iter()
                .map(|id| {
                    let report = self.reports.iter().find(|r| r.agent_id == *id).unwrap();
                    report.agent_name.clone()
                })
                .collect()
        }
    }

    fn fleet() -> Fleet {
        Fleet::new(&[
            ("canary-1", "ring=canary,region=eu"),
            ("eu-1", "region=eu"),
            ("eu-2", "region=eu"),
            ("us-1", "region=us"),
        ])
    }

    #[test]
    fn the_first_wave_starts_alone_and_the_next_waits_for_its_health() {
        let spec = two_waves("");
        let mut fleet = fleet();
        let plan = fleet.plan(&spec);
        assert_eq!(fleet.names(&plan.assign), ["canary-1"]);
        assert_eq!(plan.status.summary.as_deref(), Some("canary 0/1"));
        assert_eq!(plan.status.pending, 3);

        fleet.assigned("canary-1", 1);
        let plan = fleet.plan(&spec);
        assert!(plan.assign.is_empty(), "canary not healthy yet");
        assert_eq!(plan.next_deadline, Some(Duration::from_secs(9 * 60)));

        fleet.report("canary-1", "Success", "progressing: 0/1 available");
        assert!(fleet.plan(&spec).assign.is_empty());

        fleet.report("canary-1", "Success", "healthy");
        let plan = fleet.plan(&spec);
        assert_eq!(fleet.names(&plan.assign), ["eu-1"], "maxUnavailable 1");
        assert_eq!(plan.status.summary.as_deref(), Some("canary 1/1 → eu 0/2"));
        assert_eq!(plan.status.wave.as_deref(), Some("eu"));
    }

    #[test]
    fn max_unavailable_bounds_the_agents_updating_at_once_and_the_rest_come_last() {
        let spec = two_waves("maxUnavailable: 100%");
        let mut fleet = fleet();
        fleet
            .assigned("canary-1", 1)
            .report("canary-1", "Success", "healthy");
        let plan = fleet.plan(&spec);
        assert_eq!(fleet.names(&plan.assign), ["eu-1", "eu-2"]);
        fleet
            .assigned("eu-1", 1)
            .report("eu-1", "Success", "healthy");
        fleet
            .assigned("eu-2", 1)
            .report("eu-2", "Success", "healthy");
        let plan = fleet.plan(&spec);
        assert_eq!(fleet.names(&plan.assign), ["us-1"]);
        assert_eq!(
            plan.status.summary.as_deref(),
            Some("canary 1/1 → eu 2/2 → remaining 0/1")
        );
        fleet
            .assigned("us-1", 1)
            .report("us-1", "Success", "healthy");
        let plan = fleet.plan(&spec);
        assert!(plan.complete && plan.assign.is_empty() && plan.halt.is_none());
        assert_eq!(plan.status.updated, 4);
    }

    #[test]
    fn a_failure_a_degraded_health_or_a_timeout_halts_and_moves_no_one() {
        let spec = two_waves("healthTimeout: 5m");
        let mut failed = fleet();
        failed
            .assigned("canary-1", 1)
            .report("canary-1", "Failure", "unknown");
        let plan = failed.plan(&spec);
        let halt = plan.halt.unwrap();
        assert_eq!(
            (halt.agent.as_str(), halt.reason),
            ("canary-1", "ApplyFailed")
        );
        assert!(
            halt.message.contains("the apiserver refused it"),
            "{}",
            halt.message
        );
        assert!(plan.assign.is_empty());
        assert_eq!(plan.status.summary.as_deref(), Some("canary 0/1 (halted)"));

        let mut degraded = fleet();
        degraded.assigned("canary-1", 1).report(
            "canary-1",
            "Success",
            "degraded: Deployment web 0/1 available",
        );
        assert_eq!(degraded.plan(&spec).halt.unwrap().reason, "Degraded");

        let mut slow = fleet();
        slow.assigned("canary-1", 6);
        let halt = slow.plan(&spec).halt.unwrap();
        assert_eq!(halt.reason, "HealthTimeout");
        assert!(halt.message.contains("within 5m"), "{}", halt.message);
    }

    #[test]
    fn without_agents_nothing_is_complete_and_empty_waves_are_not_listed() {
        let spec = two_waves("");
        let plan = Fleet::new(&[]).plan(&spec);
        assert!(!plan.complete && plan.assign.is_empty());
        assert_eq!(plan.status.summary.as_deref(), Some("no agents"));
        let us_only = Fleet::new(&[("us-1", "region=us")]);
        let plan = us_only.plan(&spec);
        assert_eq!(plan.status.summary.as_deref(), Some("remaining 0/1"));
        assert_eq!(us_only.names(&plan.assign), ["us-1"]);
    }

    #[test]
    fn a_paused_rollout_moves_no_one_and_says_so() {
        let spec = two_waves("paused: true");
        let fleet = fleet();
        let plan = fleet.plan(&spec);
        assert!(plan.assign.is_empty());
        assert_eq!(plan.status.summary.as_deref(), Some("canary 0/1 (paused)"));
    }

    #[test]
    fn an_agent_never_assigned_is_pending_and_without_waves_everyone_is_one_wave() {
        let spec = spec("maxUnavailable: 2");
        let mut fleet = fleet();
        fleet.agent("us-1").assignment = None;
        let plan = fleet.plan(&spec);
        assert_eq!(fleet.names(&plan.assign), ["canary-1", "eu-1"]);
        assert_eq!(plan.status.wave.as_deref(), Some("remaining"));
    }
}
