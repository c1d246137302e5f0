//! `spec.rollout` of a Stack: new revisions reach agents wave by wave, each wave gated on
//! the health of the ones before, instead of every targeted agent at once.

use std::time::Duration;

use schemars::{Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::LabelSelector;
use crate::validation::{NAME_MAX_LEN, SpecError, validate_name};

/// Most waves a rollout may declare.
pub const MAX_WAVES: usize = 20;
/// The name of the wave formed by the targeted agents no declared wave selects.
pub const REMAINING_WAVE: &str = "remaining";
/// `healthTimeout` when it is not set.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// How a new revision of the Stack reaches its agents: wave after wave, each wave starting
/// only when every agent of the earlier waves reports the new revision healthy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// The waves, in order. An agent belongs to the first wave whose selector matches its
    /// labels; agents that no wave selects form a last, implicit wave named `remaining`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub waves: Vec<RolloutWave>,

    /// How many agents of a wave update at once: a number (`1`) or a percentage of the
    /// wave (`"25%"`, rounded down, at least one agent). Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "int_or_string")]
    pub max_unavailable: Option<MaxUnavailable>,

    /// How long an agent may take to report a new revision healthy, such as `10m` or
    /// `90s`. An agent that is not healthy by then halts the rollout. Defaults to 10m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_timeout: Option<String>,

    /// Moves no further agent while true. Setting it back to false resumes a halted
    /// rollout and gives the agents being updated a new `healthTimeout`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// One wave of a rollout.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutWave {
    /// Name of the wave, shown in the Stack's status (`canary`, `eu`, ...).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The Agents in this wave, by their labels.
    pub agent_selector: LabelSelector,
}

/// `maxUnavailable`: a count of agents or a percentage of the wave.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum MaxUnavailable {
    Count(i64),
    Percent(String),
}

fn int_or_string(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "x-kubernetes-int-or-string": true })
}

impl RolloutSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.waves.len() > MAX_WAVES {
            return Err(SpecError::Invalid {
                field: "spec.rollout.waves".into(),
                reason: format!(
                    "{} waves; at most {MAX_WAVES} are allowed",
                    self.waves.len()
                ),
            });
        }
        for (index, wave) in self.waves.iter().enumerate() {
            validate_name("spec.rollout.waves[].name", &wave.name, NAME_MAX_LEN)?;
            if wave.name == REMAINING_WAVE {
                return Err(SpecError::Invalid {
                    field: format!("spec.rollout.waves[{index}].name"),
                    reason: format!("{REMAINING_WAVE:?} names the implicit last wave"),
                });
            }
            if self.waves[..index].iter().any(|w| w.name == wave.name) {
                return Err(SpecError::Invalid {
                    field: format!("spec.rollout.waves[{index}].name"),
                    reason: format!("{:?} names two waves", wave.name),
                });
            }
            kube::core::Selector::try_from(wave.agent_selector.clone()).map_err(|err| {
                SpecError::Invalid {
                    field: format!("spec.rollout.waves[{index}].agentSelector"),
                    reason: err.to_string(),
                }
            })?;
        }
        self.max_unavailable_of(1)?;
        self.health_timeout()?;
        Ok(())
    }

    /// How many agents of a wave of `size` agents may update at once (at least one).
    pub fn max_unavailable_of(&self, size: usize) -> Result<usize, SpecError> {
        let invalid = |reason: String| SpecError::Invalid {
            field: "spec.rollout.maxUnavailable".into(),
            reason,
        };
        let count = match &self.max_unavailable {
            None => 1,
            Some(MaxUnavailable::Count(count)) if *count >= 1 => *count as usize,
            Some(MaxUnavailable::Count(count)) => {
                return Err(invalid(format!(
                    "{count} is not a positive number of agents"
                )));
            }
            Some(MaxUnavailable::Percent(text)) => {
                let percent = text
                    .strip_suffix('%')
                    .and_then(|digits| digits.parse::<u32>().ok())
                    .filter(|percent| (1..=100).contains(percent))
                    .ok_or_else(|| {
                        invalid(format!(
                            "{text:?} is neither a number of agents nor a percentage from 1% to 100%"
                        ))
                    })?;
                size * percent as usize / 100
            }
        };
        Ok(count.max(1))
    }

    pub fn health_timeout(&self) -> Result<Duration, SpecError> {
        match &self.health_timeout {
            None => Ok(DEFAULT_HEALTH_TIMEOUT),
            Some(text) => {
                brokkr_common::parse_interval(text).map_err(|reason| SpecError::Invalid {
                    field: "spec.rollout.healthTimeout".into(),
                    reason,
                })
            }
        }
    }
}

/// Where the rollout of the newest revision stands.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The sequence of the revision being rolled out.
    pub revision: i64,
    /// The wave being updated, or the last wave once every agent is updated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<String>,
    /// Agents that report the revision healthy.
    #[serde(default)]
    pub updated: i32,
    /// Agents that do not have the revision yet.
    #[serde(default)]
    pub pending: i32,
    /// Why the rollout stopped moving agents, naming the agent; absent while it proceeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted: Option<String>,
    /// Whether `spec.rollout.paused` was true when this status was written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Healthy agents per wave up to the current one, e.g. `canary 1/1 → eu 2/5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(yaml: &str) -> RolloutSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn max_unavailable_is_a_count_or_a_percentage_of_the_wave_and_at_least_one() {
        assert_eq!(rollout("{}").max_unavailable_of(8).unwrap(), 1);
        assert_eq!(
            rollout("maxUnavailable: 3").max_unavailable_of(8).unwrap(),
            3
        );
        let quarter = rollout("maxUnavailable: 25%");
        assert_eq!(quarter.max_unavailable_of(8).unwrap(), 2);
        assert_eq!(quarter.max_unavailable_of(3).unwrap(), 1);
        for bad in [
            "maxUnavailable: 0",
            "maxUnavailable: 150%",
            "maxUnavailable: half",
        ] {
            assert!(rollout(bad).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn waves_need_distinct_names_other_than_the_implicit_one_and_valid_selectors() {
        let two = "waves: [{name: canary, agentSelector: {matchLabels: {ring: canary}}}, \
                   {name: eu, agentSelector: {matchLabels: {region: eu}}}]";
        assert!(rollout(two).validate().is_ok());
        let twice = "waves: [{name: a, agentSelector: {}}, {name: a, agentSelector: {}}]";
        assert!(
            rollout(twice)
                .validate()
                .unwrap_err()
                .to_string()
                .contains("two waves")
        );
        let implicit = "waves: [{name: remaining, agentSelector: {}}]";
        assert!(rollout(implicit).validate().is_err());
        let bad_selector = "waves: [{name: a, agentSelector: {matchExpressions: \
                            [{key: k, operator: In}]}}]";
        assert!(rollout(bad_selector).validate().is_err());
        assert!(rollout("healthTimeout: soon").validate().is_err());
        assert_eq!(
            rollout("healthTimeout: 90s").health_timeout().unwrap(),
            Duration::from_secs(90)
        );
    }
}
