//! `AgentTarget`: which agents receive a Stack.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{NAME_MAX_LEN, SpecError, validate_name};

/// Most agent names listed in `status.agentNames`; `status.matchedAgents` counts them all.
pub const MAX_AGENT_NAMES_IN_STATUS: usize = 50;

/// Which Stack to deliver, and to which agents: the ones named in `agents`, the ones whose
/// labels match `agentSelector`, or both. A Stack may have several AgentTargets; it goes to
/// every agent any of them selects.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "brokkr.io",
    version = "v1alpha1",
    kind = "AgentTarget",
    namespaced,
    status = "AgentTargetStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "at",
    category = "brokkr",
    doc = "An AgentTarget delivers a Stack to agents: those named in spec.agents, those whose \
           labels match spec.agentSelector, or both.",
    printcolumn(
        name = "Stack",
        type_ = "string",
        json_path = ".spec.stackRef.name",
        description = "Stack delivered to the selected agents"
    ),
    printcolumn(
        name = "Agents",
        type_ = "integer",
        json_path = ".status.matchedAgents",
        description = "Number of agents selected"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.agentSelector) || (has(self.agents) && size(self.agents) > 0)",
    "message": "set spec.agents, spec.agentSelector, or both",
}]))]
pub struct AgentTargetSpec {
    /// The Stack to deliver, in the same namespace. Required.
    pub stack_ref: StackRef,

    /// Names of Agents to deliver the Stack to. A name that matches no Agent is reported
    /// in the `Ready` condition (reason `AgentNotFound`). Set this, `agentSelector`, or both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 253)))]
    pub agents: Vec<String>,

    /// Delivers the Stack to every Agent whose labels match. `{}` matches every Agent.
    /// Set this, `agents`, or both.
    // Not nullable: the CEL rule on the spec tests its presence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::non_nullable::<LabelSelector>")]
    pub agent_selector: Option<LabelSelector>,
}

/// Reference to a Stack in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StackRef {
    /// Name of the Stack.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl AgentTargetSpec {
    /// Checks the rules the CRD states, for apiservers (and simulators) that do not
    /// evaluate CEL: a stack name, at least one of `agents` and `agentSelector`, no empty
    /// agent names, and a well-formed selector.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name("spec.stackRef.name", &self.stack_ref.name, NAME_MAX_LEN)?;
        if self.agents.is_empty() && self.agent_selector.is_none() {
            return Err(SpecError::NoAgentsOrSelector);
        }
        for (index, name) in self.agents.iter().enumerate() {
            if name.is_empty() {
                return Err(SpecError::EmptyAgentName { index });
            }
        }
        if let Some(selector) = &self.agent_selector {
            validate_selector(selector)?;
        }
        Ok(())
    }
}

/// The rules Kubernetes applies to a label selector's expressions.
fn validate_selector(selector: &LabelSelector) -> Result<(), SpecError> {
    for (index, requirement) in selector.match_expressions.iter().flatten().enumerate() {
        let invalid = |reason: String| SpecError::InvalidSelector { index, reason };
        if requirement.key.is_empty() {
            return Err(invalid("key must not be empty".into()));
        }
        let has_values = requirement.values.as_ref().is_some_and(|v| !v.is_empty());
        match requirement.operator.as_str() {
            "In" | "NotIn" if !has_values => {
                return Err(invalid(format!(
                    "operator {} needs at least one value",
                    requirement.operator
                )));
            }
            "Exists" | "DoesNotExist" if has_values => {
                return Err(invalid(format!(
                    "operator {} takes no values",
                    requirement.operator
                )));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(invalid(format!(
                    "operator {other:?} is not one of In, NotIn, Exists, DoesNotExist"
                )));
            }
        }
    }
    Ok(())
}

/// Observed state of an AgentTarget, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentTargetStatus {
    /// The `metadata.generation` this status describes. When it is lower than
    /// `metadata.generation`, the operator has not yet acted on the latest spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions. `Ready` is True (reason `Matched`) when the Stack exists and
    /// at least one agent is selected; otherwise False with reason `StackNotFound`,
    /// `NoAgentsMatched`, `AgentNotFound` or `NotPermitted` (a selected Agent does not
    /// accept targets from this namespace: see the Agent's `spec.targetableFrom`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,

    /// Number of agents selected.
    #[serde(default)]
    pub matched_agents: i32,

    /// Names of the selected agents, sorted, at most the first 50; `matchedAgents` counts them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_names: Vec<String>,

    /// Names of the agents this AgentTarget selects but may not deliver to (their
    /// `spec.targetableFrom` does not admit this namespace), sorted, at most the first 50.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_agents: Vec<String>,
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn parse(yaml: &str) -> AgentTargetSpec {
        serde_yaml::from_str::<AgentTarget>(yaml).unwrap().spec
    }

    const BY_NAME: &str = r#"
apiVersion: brokkr.io/v1alpha1
kind: AgentTarget
metadata: {name: web-edge, namespace: apps}
spec:
  stackRef: {name: web}
  agents: [edge-1, edge-2]
"#;

    const BY_SELECTOR: &str = r#"
apiVersion: brokkr.io/v1alpha1
kind: AgentTarget
metadata: {name: web-prod, namespace: apps}
spec:
  stackRef: {name: web}
  agentSelector:
    matchLabels: {env: prod}
    matchExpressions:
      - {key: region, operator: In, values: [eu-west, eu-north]}
      - {key: canary, operator: DoesNotExist}
"#;

    fn requirement(operator: &str, values: Option<Vec<&str>>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: "region".into(),
            operator: operator.into(),
            values: values.map(|v| v.into_iter().map(String::from).collect()),
        }
    }

    #[test]
    fn agents_by_name_are_accepted() {
        let spec = parse(BY_NAME);
        assert_eq!(spec.agents, ["edge-1", "edge-2"]);
        assert_eq!(spec.agent_selector, None);
        assert_eq!(spec.validate(), Ok(()));
    }

    #[test]
    fn agents_by_selector_are_accepted() {
        let spec = parse(BY_SELECTOR);
        assert!(spec.agents.is_empty());
        let selector = spec.agent_selector.as_ref().unwrap();
        assert_eq!(selector.match_labels.as_ref().unwrap()["env"], "prod");
        assert_eq!(selector.match_expressions.as_ref().unwrap().len(), 2);
        assert_eq!(spec.validate(), Ok(()));
        let json = serde_json::to_value(&spec).unwrap();
        assert!(json.get("agents").is_none(), "{json}");
    }

    #[test]
    fn empty_selector_counts_as_set_and_matches_everything() {
        let mut spec = parse(BY_NAME);
        spec.agents.clear();
        spec.agent_selector = Some(LabelSelector::default());
        assert_eq!(spec.validate(), Ok(()));
    }

    #[test]
    fn neither_agents_nor_selector_is_refused() {
        let mut spec = parse(BY_NAME);
        spec.agents.clear();
        let err = spec.validate().unwrap_err();
        assert_eq!(err, SpecError::NoAgentsOrSelector);
        assert_eq!(
            err.to_string(),
            "set spec.agents, spec.agentSelector, or both"
        );
    }

    #[test]
    fn empty_agent_name_is_refused_with_its_index() {
        let mut spec = parse(BY_NAME);
        spec.agents.push(String::new());
        assert_eq!(spec.validate(), Err(SpecError::EmptyAgentName { index: 2 }));
    }

    #[test]
    fn missing_stack_name_is_refused() {
        let mut spec = parse(BY_NAME);
        spec.stack_ref.name.clear();
        assert_eq!(
            spec.validate(),
            Err(SpecError::EmptyField {
                field: "spec.stackRef.name"
            })
        );
    }

    #[test]
    fn malformed_selector_expressions_are_refused() {
        let cases = [
            (
                requirement("In", None),
                "operator In needs at least one value",
            ),
            (
                requirement("NotIn", Some(vec![])),
                "operator NotIn needs at least one value",
            ),
            (
                requirement("Exists", Some(vec!["x"])),
                "operator Exists takes no values",
            ),
            (
                requirement("Equals", Some(vec!["x"])),
                "operator \"Equals\" is not one of In, NotIn, Exists, DoesNotExist",
            ),
        ];
        for (req, reason) in cases {
            let spec = AgentTargetSpec {
                stack_ref: StackRef { name: "web".into() },
                agents: vec![],
                agent_selector: Some(LabelSelector {
                    match_expressions: Some(vec![requirement("Exists", None), req]),
                    match_labels: None,
                }),
            };
            assert_eq!(
                spec.validate(),
                Err(SpecError::InvalidSelector {
                    index: 1,
                    reason: reason.into()
                })
            );
        }
    }

    #[test]
    fn selector_expression_without_key_is_refused() {
        let mut spec = parse(BY_SELECTOR);
        let selector = spec.agent_selector.as_mut().unwrap();
        selector.match_expressions.as_mut().unwrap()[0].key.clear();
        assert_eq!(
            spec.validate(),
            Err(SpecError::InvalidSelector {
                index: 0,
                reason: "key must not be empty".into()
            })
        );
    }

    #[test]
    fn status_round_trips_in_camel_case() {
        let status = AgentTargetStatus {
            observed_generation: Some(1),
            matched_agents: 2,
            agent_names: vec!["edge-1".into(), "edge-2".into()],
            ..Default::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"observedGeneration": 1, "matchedAgents": 2, "agentNames": ["edge-1", "edge-2"]})
        );
        assert_eq!(
            serde_json::from_value::<AgentTargetStatus>(json).unwrap(),
            status
        );
    }
}
