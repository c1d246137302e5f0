//! Status of Stacks and AgentTargets computed from plain data: what the store knows
//! about each targeted agent, and whether the Stack's content was accepted.

use brokkr_crds::conditions::{new_condition, reasons, set_condition, types};
use brokkr_crds::wire::{EventStatus, Health, parse_health_message};
use brokkr_crds::{
    AgentDeployState, AgentHealth, AgentStatus, AgentTargetStatus, Condition, DeploymentObjectRef,
    GeneratorStatus, MAX_AGENT_NAMES_IN_STATUS, MAX_AGENTS_IN_STATUS, StackAgentStatus,
    StackStatus, Time, ready_ratio,
};

use crate::entity::deployment_objects;
use crate::store::AgentStackStatus;

/// `status.history` from the store's revisions, newest first.
pub fn stack_history(revisions: &[crate::store::Revision]) -> Vec<brokkr_crds::StackRevision> {
    revisions
        .iter()
        .take(brokkr_crds::MAX_HISTORY_IN_STATUS)
        .map(|revision| brokkr_crds::StackRevision {
            sequence: revision.sequence_id,
            checksum: revision.yaml_checksum.chars().take(12).collect(),
            recorded_at: to_time(revision.created_at),
            recorded_by: revision.recorded_by.clone(),
            generator: revision
                .generator
                .as_deref()
                .map(|name| name.rsplit('/').next().unwrap_or(name).to_owned()),
        })
        .collect()
}

/// Whether the Stack's current spec could be recorded, and if not why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acceptance {
    /// The content is recorded as the current deployment object.
    Recorded,
    /// `spec.suspend`: nothing new is recorded; agents keep the last content.
    Suspended,
    /// The Stack's Generator is suspended: nothing new is recorded until it resumes.
    GeneratorSuspended,
    /// Refused; the last good deployment object keeps being served.
    Refused {
        reason: &'static str,
        message: String,
    },
}

pub struct StackStatusInput<'a> {
    pub generation: Option<i64>,
    pub stack_id: Option<String>,
    /// What the Stack delivers: its pinned revision, else its newest.
    pub deployment_object: Option<&'a deployment_objects::Model>,
    /// The newest recorded revision, when it is not `deployment_object` (a pin).
    pub newest_sequence: Option<i64>,
    pub acceptance: Acceptance,
    pub agents: &'a [AgentStackStatus],
    pub previous: Option<&'a StackStatus>,
    pub now: Time,
}

/// The Stack's status: per-agent states for the current deployment object, counts,
/// and the conditions `Accepted`, `Applied`, `Ready`, `Degraded` and `Drifted`.
pub fn stack_status(input: StackStatusInput<'_>) -> StackStatus {
    let delivered = input.deployment_object.map(|d| d.sequence_id);
    let mut agents: Vec<StackAgentStatus> = input
        .agents
        .iter()
        .map(|agent| agent_status(agent, delivered))
        .collect();
    let targeted = agents.len() as i32;
    let applied = count(&agents, |a| a.state == AgentDeployState::Applied);
    let healthy = count(&agents, |a| {
        a.state == AgentDeployState::Applied && a.health == AgentHealth::Healthy
    });
    let failed: Vec<String> = agents
        .iter()
        .filter(|a| a.state == AgentDeployState::Failed)
        .map(|a| a.name.clone())
        .collect();
    let degraded: Vec<String> = agents
        .iter()
        .filter(|a| a.health == AgentHealth::Degraded)
        .map(|a| a.name.clone())
        .collect();

    let generation = input.generation;
    let now = input.now;
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        new_condition(type_, ok, reason, message, generation, now.clone())
    };
    let sequence = input.deployment_object.map(|d| d.sequence_id);
    let recorded = input.newest_sequence.or(sequence);
    let accepted = match &input.acceptance {
        Acceptance::Recorded => condition(
            types::ACCEPTED,
            true,
            reasons::RECORDED,
            format!(
                "recorded as deployment object sequence {}",
                recorded.unwrap_or_default()
            ),
        ),
        Acceptance::Suspended => condition(
            types::ACCEPTED,
            true,
            reasons::SUSPENDED,
            "suspended: changes are not recorded; agents keep the last recorded content".into(),
        ),
        Acceptance::GeneratorSuspended => condition(
            types::ACCEPTED,
            true,
            reasons::GENERATOR_SUSPENDED,
            "its Generator is suspended: changes are not recorded until it resumes; agents \
             keep the last recorded content"
                .into(),
        ),
        Acceptance::Refused { reason, message } => condition(
            types::ACCEPTED,
            false,
            reason,
            match sequence {
                Some(seq) => format!("{message}; still serving deployment object sequence {seq}"),
                None => message.clone(),
            },
        ),
    };
    let is_deletion = input
        .deployment_object
        .is_some_and(|d| d.is_deletion_marker);
    let applied_condition = if targeted == 0 {
        condition(
            types::APPLIED,
            false,
            reasons::NO_TARGETS,
            "no agents target this Stack".into(),
        )
    } else if !failed.is_empty() {
        condition(
            types::APPLIED,
            false,
            reasons::APPLY_FAILED,
            format!("failed on {}", name_list(&failed)),
        )
    } else if applied == targeted {
        condition(
            types::APPLIED,
            true,
            reasons::ALL_APPLIED,
            format!("applied by all {targeted} targeted agents"),
        )
    } else {
        condition(
            types::APPLIED,
            false,
            reasons::PROGRESSING,
            format!("applied by {applied} of {targeted} targeted agents"),
        )
    };
    let ready_condition = if targeted == 0 {
        condition(
            types::READY,
            false,
            reasons::NO_TARGETS,
            "no agents target this Stack".into(),
        )
    } else if healthy == targeted && !is_deletion {
        condition(
            types::READY,
            true,
            reasons::ALL_HEALTHY,
            format!("healthy on all {targeted} targeted agents"),
        )
    } else if !failed.is_empty() || !degraded.is_empty() {
        condition(
            types::READY,
            false,
            reasons::UNHEALTHY,
            format!("healthy on {healthy} of {targeted} targeted agents"),
        )
    } else {
        condition(
            types::READY,
            false,
            reasons::PROGRESSING,
            format!("healthy on {healthy} of {targeted} targeted agents"),
        )
    };
    let degraded_condition = if !failed.is_empty() {
        condition(
            types::DEGRADED,
            true,
            reasons::APPLY_FAILED,
            format!("failed on {}", name_list(&failed)),
        )
    } else if !degraded.is_empty() {
        condition(
            types::DEGRADED,
            true,
            reasons::UNHEALTHY,
            format!("degraded on {}", name_list(&degraded)),
        )
    } else {
        condition(
            types::DEGRADED,
            false,
            reasons::RECONCILED,
            "no agent reports a failure".into(),
        )
    };

    let drifted_condition = drifted_condition(input.agents, generation, now.clone());

    let mut conditions = input
        .previous
        .map(|p| p.conditions.clone())
        .unwrap_or_default();
    for c in [
        accepted,
        applied_condition,
        ready_condition,
        degraded_condition,
        drifted_condition,
    ] {
        set_condition(&mut conditions, c);
    }

    // Failing agents first, so the bounded list always shows who needs attention.
    agents.sort_by_key(|a| (attention_rank(a), a.name.clone(), a.cluster_name.clone()));
    agents.truncate(MAX_AGENTS_IN_STATUS);

    StackStatus {
        observed_generation: generation,
        conditions,
        stack_id: input.stack_id,
        deployment_object: input.deployment_object.map(|d| DeploymentObjectRef {
            id: d.id.to_string(),
            sequence: d.sequence_id,
            checksum: d.yaml_checksum.clone(),
        }),
        targeted_agents: targeted,
        applied_agents: applied,
        healthy_agents: healthy,
        failed_agents: failed.len() as i32,
        ready: Some(ready_ratio(healthy, targeted)),
        agents,
        // The caller puts the store's history in; until then the last one shown stays.
        history: input
            .previous
            .map(|previous| previous.history.clone())
            .unwrap_or_default(),
        // The caller computes the rollout's progress.
        rollout: None,
    }
}

/// `Drifted`: True while any agent's latest `Drift` report about the current deployment
/// object is a failure (drift it did not correct), naming the agents and counting objects.
fn drifted_condition(agents: &[AgentStackStatus], generation: Option<i64>, now: Time) -> Condition {
    let mut names = Vec::new();
    let mut objects = 0u64;
    for agent in agents {
        let Some(drift) = &agent.drift else { continue };
        if drift.status != EventStatus::Failure.as_str() {
            continue;
        }
        names.push(agent.agent_name.clone());
        // "N objects drifted: ..." (the agent's message).
        objects += drift
            .message
            .as_deref()
            .and_then(|m| m.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(1);
    }
    if names.is_empty() {
        return new_condition(
            types::DRIFTED,
            false,
            reasons::NO_DRIFT,
            "no agent reports drift it did not correct",
            generation,
            now,
        );
    }
    let plural = if objects == 1 { "object" } else { "objects" };
    new_condition(
        types::DRIFTED,
        true,
        reasons::DRIFT_NOT_CORRECTED,
        format!(
            "{objects} {plural} drifted and not corrected on {}",
            name_list(&names)
        ),
        generation,
        now,
    )
}

fn count(agents: &[StackAgentStatus], pred: impl Fn(&StackAgentStatus) -> bool) -> i32 {
    agents.iter().filter(|a| pred(a)).count() as i32
}

fn attention_rank(agent: &StackAgentStatus) -> u8 {
    match (agent.state, agent.health) {
        (AgentDeployState::Failed, _) => 0,
        (_, AgentHealth::Degraded) => 1,
        (AgentDeployState::Pending | AgentDeployState::Deleting, _) => 2,
        (_, AgentHealth::Progressing | AgentHealth::Unknown) => 3,
        _ => 4,
    }
}

/// At most five names, then how many more.
fn name_list(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

/// `delivered`: the sequence the Stack delivers; an agent a rollout holds at another
/// revision shows its own.
fn agent_status(row: &AgentStackStatus, delivered: Option<i64>) -> StackAgentStatus {
    let held_at = row
        .assignment
        .as_ref()
        .map(|assignment| assignment.sequence_id)
        .filter(|sequence| Some(*sequence) != delivered);
    let state = match &row.outcome {
        // Held at an older revision by the rollout: it has yet to apply the delivered one,
        // so that `Ready` and `ready` count only agents healthy on it.
        _ if held_at.is_some() => AgentDeployState::Pending,
        None => AgentDeployState::Pending,
        Some(o) if o.event_type == "Delete" => AgentDeployState::Deleting,
        Some(o) if o.status == EventStatus::Failure.as_str() => AgentDeployState::Failed,
        Some(_) => AgentDeployState::Applied,
    };
    let health = match &row.health {
        Some(h) => match parse_health_message(h.message.as_deref().unwrap_or_default()) {
            Health::Healthy => AgentHealth::Healthy,
            Health::Progressing => AgentHealth::Progressing,
            Health::Degraded => AgentHealth::Degraded,
            Health::Unknown => AgentHealth::Unknown,
        },
        None => AgentHealth::Unknown,
    };
    let message = match (state, held_at) {
        (_, Some(held_at)) => Some(format!(
            "held at revision {held_at} until its wave of the rollout"
        )),
        (AgentDeployState::Failed, None) => row.outcome.as_ref().and_then(|o| o.message.clone()),
        _ => row.health.as_ref().and_then(|h| h.message.clone()),
    };
    let last = [row.outcome.as_ref(), row.health.as_ref()]
        .into_iter()
        .flatten()
        .map(|e| e.at)
        .max();
    StackAgentStatus {
        name: row.agent_name.clone(),
        cluster_name: row.cluster_name.clone(),
        state,
        health,
        message,
        last_event_time: last.and_then(to_time),
        revision: held_at,
    }
}

/// A Kubernetes timestamp for a database one.
pub fn to_time(at: chrono::DateTime<chrono::Utc>) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::from_microsecond(at.timestamp_micros())
        .ok()
        .map(Time)
}

/// `time` as the API server keeps it (`metav1.Time` has whole seconds), so that a
/// status compared with the one read back does not differ in a fraction of a second
/// and get written again on every reconcile.
pub fn whole_seconds(time: Time) -> Time {
    k8s_openapi::jiff::Timestamp::from_second(time.0.as_second())
        .map(Time)
        .unwrap_or(time)
}

pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Bounded, sorted names for an AgentTarget's status.
pub fn bounded_names(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names.dedup();
    names.truncate(MAX_AGENT_NAMES_IN_STATUS);
    names
}

/// Whether two condition lists differ in anything but timestamps.
pub fn conditions_changed(old: &[Condition], new: &[Condition]) -> bool {
    !brokkr_crds::conditions::conditions_eq_ignoring_time(old, new)
}

/// A resource status with standard conditions.
pub trait ConditionedStatus: Clone + PartialEq {
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
}

macro_rules! conditioned_status {
    ($($status:ty),*) => {
        $(impl ConditionedStatus for $status {
            fn conditions_mut(&mut self) -> &mut Vec<Condition> {
                &mut self.conditions
            }
        })*
    };
}

conditioned_status!(
    AgentStatus,
    AgentTargetStatus,
    GeneratorStatus,
    StackStatus,
    brokkr_crds::AlertRuleStatus,
    brokkr_crds::NotificationChannelStatus
);

/// Whether `new` differs from `old` in anything but condition timestamps: when it does
/// not, the status patch is skipped, so that a resync never loops on its own writes.
pub fn status_changed<S: ConditionedStatus>(old: &S, new: &S) -> bool {
    let (mut old_rest, mut new_rest) = (old.clone(), new.clone());
    let old_conditions = std::mem::take(old_rest.conditions_mut());
    let new_conditions = std::mem::take(new_rest.conditions_mut());
    old_rest != new_rest || conditions_changed(&old_conditions, &new_conditions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EventSummary;
    use chrono::Utc;
    use uuid::Uuid;

    fn object(seq: i64, marker: bool) -> deployment_objects::Model {
        deployment_objects::Model {
            id: Uuid::nil(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            deleted_at: None,
            sequence_id: seq,
            stack_id: Uuid::nil(),
            yaml_content: String::new(),
            yaml_checksum: "abc".into(),
            submitted_at: Utc::now(),
            is_deletion_marker: marker,
            generator_id: Uuid::nil(),
            parent_id: None,
            recorded_by: None,
        }
    }

    fn agent(
        name: &str,
        outcome: Option<(&str, &str, &str)>,
        health: Option<&str>,
    ) -> AgentStackStatus {
        AgentStackStatus {
            agent_id: Uuid::new_v4(),
            agent_name: name.into(),
            cluster_name: "c".into(),
            agent_status: "Online".into(),
            last_heartbeat: None,
            assignment: None,
            outcome: outcome.map(|(t, s, m)| EventSummary {
                event_type: t.into(),
                status: s.into(),
                message: Some(m.into()),
                at: Utc::now(),
            }),
            health: health.map(|m| EventSummary {
                event_type: "Health".into(),
                status: "Success".into(),
                message: Some(m.into()),
                at: Utc::now(),
            }),
            drift: None,
        }
    }

    fn status(agents: &[AgentStackStatus], acceptance: Acceptance) -> StackStatus {
        let object = object(42, false);
        stack_status(StackStatusInput {
            newest_sequence: None,
            generation: Some(3),
            stack_id: Some("id".into()),
            deployment_object: Some(&object),
            acceptance,
            agents,
            previous: None,
            now: now(),
        })
    }

    fn condition<'a>(status: &'a StackStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn an_agent_a_rollout_holds_at_an_older_revision_is_not_ready_on_the_delivered_one() {
        let mut held = agent("eu", Some(("Apply", "Success", "")), Some("healthy"));
        held.assignment = Some(crate::store::Assignment {
            deployment_object_id: Uuid::new_v4(),
            sequence_id: 40,
            assigned_at: Utc::now(),
            health_clock_at: Utc::now(),
        });
        let mut updated = agent("canary", Some(("Apply", "Success", "")), Some("healthy"));
        updated.assignment = Some(crate::store::Assignment {
            deployment_object_id: Uuid::new_v4(),
            sequence_id: 42,
            assigned_at: Utc::now(),
            health_clock_at: Utc::now(),
        });
        let s = status(&[held, updated], Acceptance::Recorded);
        assert_eq!(s.ready.as_deref(), Some("1/2"));
        assert_eq!(condition(&s, "Ready").status, "False");
        let eu = s.agents.iter().find(|a| a.name == "eu").unwrap();
        assert_eq!(
            (eu.state, eu.revision),
            (AgentDeployState::Pending, Some(40))
        );
        assert!(
            eu.message
                .as_deref()
                .unwrap()
                .contains("held at revision 40")
        );
        let canary = s.agents.iter().find(|a| a.name == "canary").unwrap();
        assert_eq!(
            (canary.state, canary.revision),
            (AgentDeployState::Applied, None)
        );
    }

    #[test]
    fn all_agents_applied_and_healthy_make_the_stack_ready() {
        let agents = [
            agent("a", Some(("Apply", "Success", "")), Some("healthy")),
            agent("b", Some(("Apply", "Success", "")), Some("healthy")),
        ];
        let s = status(&agents, Acceptance::Recorded);
        assert_eq!(s.ready.as_deref(), Some("2/2"));
        assert_eq!(
            (
                s.targeted_agents,
                s.applied_agents,
                s.healthy_agents,
                s.failed_agents
            ),
            (2, 2, 2, 0)
        );
        assert_eq!(condition(&s, "Ready").status, "True");
        assert_eq!(condition(&s, "Applied").status, "True");
        assert_eq!(condition(&s, "Degraded").status, "False");
        assert_eq!(condition(&s, "Ready").observed_generation, Some(3));
        assert_eq!(s.deployment_object.as_ref().unwrap().sequence, 42);
    }

    #[test]
    fn a_failing_agent_degrades_the_stack_and_is_listed_first_with_its_message() {
        let agents = [
            agent("a-ok", Some(("Apply", "Success", "")), Some("healthy")),
            agent(
                "z-bad",
                Some(("Apply", "Failure", "admission webhook denied")),
                None,
            ),
            agent("m-pending", None, None),
        ];
        let s = status(&agents, Acceptance::Recorded);
        assert_eq!(s.failed_agents, 1);
        assert_eq!(s.agents[0].name, "z-bad");
        assert_eq!(s.agents[0].state, AgentDeployState::Failed);
        assert_eq!(
            s.agents[0].message.as_deref(),
            Some("admission webhook denied")
        );
        assert_eq!(s.agents[1].name, "m-pending");
        let degraded = condition(&s, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "ApplyFailed")
        );
        assert!(degraded.message.contains("z-bad"));
        assert_eq!(condition(&s, "Applied").reason, "ApplyFailed");
        assert_eq!(condition(&s, "Ready").status, "False");
    }

    #[test]
    fn drift_an_agent_did_not_correct_makes_the_stack_drifted_until_it_reports_otherwise() {
        let drift = |status: &str, message: &str| {
            Some(EventSummary {
                event_type: "Drift".into(),
                status: status.into(),
                message: Some(message.into()),
                at: Utc::now(),
            })
        };
        let mut a = agent("a", Some(("Apply", "Success", "")), Some("healthy"));
        let mut b = agent("b", Some(("Apply", "Success", "")), Some("healthy"));
        let c = agent("c", Some(("Apply", "Success", "")), Some("healthy"));
        a.drift = drift(
            "Failure",
            "2 objects drifted: ConfigMap s/x (changed, not corrected); ConfigMap s/y (deleted, not corrected)",
        );
        b.drift = drift(
            "Failure",
            "1 object drifted: ConfigMap s/x (changed, not corrected)",
        );
        let s = status(&[a.clone(), b.clone(), c.clone()], Acceptance::Recorded);
        let drifted = condition(&s, "Drifted");
        assert_eq!(
            (
                drifted.status.as_str(),
                drifted.reason.as_str(),
                drifted.message.as_str()
            ),
            (
                "True",
                "DriftNotCorrected",
                "3 objects drifted and not corrected on a, b"
            )
        );
        // Corrected drift, or drift that went away, is not Drifted.
        a.drift = drift(
            "Success",
            "1 object drifted: ConfigMap s/x (changed, corrected)",
        );
        b.drift = drift("Success", "no drift: every object holds what was applied");
        let s = status(&[a, b, c], Acceptance::Recorded);
        let drifted = condition(&s, "Drifted");
        assert_eq!(
            (drifted.status.as_str(), drifted.reason.as_str()),
            ("False", "NoDrift")
        );
    }

    #[test]
    fn progressing_health_is_not_ready_yet() {
        let agents = [agent(
            "a",
            Some(("Apply", "Success", "")),
            Some("progressing: web 1/3"),
        )];
        let s = status(&agents, Acceptance::Recorded);
        assert_eq!(s.ready.as_deref(), Some("0/1"));
        assert_eq!(condition(&s, "Ready").reason, "Progressing");
        assert_eq!(s.agents[0].health, AgentHealth::Progressing);
    }

    #[test]
    fn no_targets_is_said_plainly() {
        let s = status(&[], Acceptance::Recorded);
        assert_eq!(s.ready.as_deref(), Some("0/0"));
        assert_eq!(condition(&s, "Applied").reason, "NoTargets");
        assert_eq!(condition(&s, "Ready").reason, "NoTargets");
    }

    #[test]
    fn refused_content_says_why_and_what_is_still_served() {
        let s = status(
            &[],
            Acceptance::Refused {
                reason: reasons::INVALID_MANIFEST,
                message: "document 2: missing kind".into(),
            },
        );
        let accepted = condition(&s, "Accepted");
        assert_eq!(accepted.status, "False");
        assert_eq!(accepted.reason, "InvalidManifest");
        assert_eq!(
            accepted.message,
            "document 2: missing kind; still serving deployment object sequence 42"
        );
    }

    #[test]
    fn transition_time_moves_only_when_a_condition_flips() {
        let agents = [agent("a", None, None)];
        let first = status(&agents, Acceptance::Recorded);
        let object = object(42, false);
        let later = stack_status(StackStatusInput {
            newest_sequence: None,
            generation: Some(3),
            stack_id: Some("id".into()),
            deployment_object: Some(&object),
            acceptance: Acceptance::Recorded,
            agents: &agents,
            previous: Some(&first),
            now: Time(
                k8s_openapi::jiff::Timestamp::now()
                    + k8s_openapi::jiff::SignedDuration::from_secs(60),
            ),
        });
        assert!(!conditions_changed(&first.conditions, &later.conditions));
        assert!(!status_changed(&first, &later), "only timestamps moved");
        let mut fewer = later.clone();
        fewer.failed_agents += 1;
        assert!(
            status_changed(&first, &fewer),
            "a field besides the conditions"
        );
        assert_eq!(
            condition(&first, "Ready").last_transition_time,
            condition(&later, "Ready").last_transition_time
        );
    }

    #[test]
    fn the_agent_list_is_bounded() {
        let agents: Vec<_> = (0..(MAX_AGENTS_IN_STATUS + 10))
            .map(|i| agent(&format!("a{i:03}"), None, None))
            .collect();
        let s = status(&agents, Acceptance::Recorded);
        assert_eq!(s.agents.len(), MAX_AGENTS_IN_STATUS);
        assert_eq!(s.targeted_agents as usize, MAX_AGENTS_IN_STATUS + 10);
    }
}
