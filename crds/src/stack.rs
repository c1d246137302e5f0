//! `Stack`: a set of Kubernetes objects to deliver to the agents its AgentTargets select.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{
    NAME_MAX_LEN, SpecError, validate_annotations, validate_name, validate_storable,
};

/// Most agents listed in `status.agents`. The operator lists failing agents first and
/// drops the rest; the counts in the status always cover every targeted agent.
pub const MAX_AGENTS_IN_STATUS: usize = 50;
/// Most revisions kept in `status.history`.
pub const MAX_HISTORY_IN_STATUS: usize = 10;

/// What a Stack delivers: Kubernetes objects, given either as a list (`resources`) or as
/// multi-document YAML (`manifests`), exactly one of the two. Every change of content is
/// recorded as a new, numbered deployment object; AgentTargets choose which agents receive it.
// clippy reads repeated `type_ = ...` in separate printcolumn(...) groups as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "brokkr.io",
    version = "v1alpha1",
    kind = "Stack",
    namespaced,
    status = "StackStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "stk",
    category = "brokkr",
    doc = "A Stack is a set of Kubernetes objects that Brokkr delivers to spoke clusters. \
           Give the objects as spec.resources or spec.manifests; AgentTargets choose the agents \
           that receive them.",
    printcolumn(
        name = "Generator",
        type_ = "string",
        json_path = ".spec.generatorRef.name",
        description = "Generator this Stack belongs to"
    ),
    printcolumn(
        name = "Targets",
        type_ = "integer",
        json_path = ".status.targetedAgents",
        description = "Number of agents this Stack is delivered to"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Healthy agents / targeted agents"
    ),
    printcolumn(
        name = "Revision",
        type_ = "integer",
        json_path = ".status.deploymentObject.sequence",
        description = "Sequence number of the revision being delivered"
    ),
    printcolumn(
        name = "Pinned",
        type_ = "integer",
        json_path = ".spec.pinnedRevision",
        description = "The revision spec.pinnedRevision holds every agent at"
    ),
    printcolumn(
        name = "Rollout",
        type_ = "string",
        json_path = ".status.rollout.summary",
        description = "Healthy agents per wave of the rollout in progress"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.resources) != has(self.manifests)",
    "message": "set exactly one of spec.resources or spec.manifests",
}]))]
pub struct StackSpec {
    /// The Generator this Stack belongs to, in the same namespace. Required. Deleting the
    /// Generator deletes the Stack.
    pub generator_ref: GeneratorRef,

    /// Free-text description of the Stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,

    /// The Kubernetes objects to deliver, each a complete object with `apiVersion`, `kind`
    /// and `metadata`. Set exactly one of `resources` and `manifests`.
    // Not nullable, like `manifests`: the CEL rule on the spec tests their presence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::embedded_resources")]
    pub resources: Option<Vec<serde_json::Value>>,

    /// The Kubernetes objects to deliver, as YAML documents separated by `---` lines
    /// (the format `kubectl apply -f` reads). Set exactly one of `resources` and `manifests`.
    /// When the YAML does not parse, the Stack's `Accepted` condition turns False with the
    /// parser's message and agents keep the last good content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::non_nullable::<String>")]
    pub manifests: Option<String>,

    /// Key/value pairs recorded with the Stack in Brokkr's database, for inventory and
    /// search. Keys are 1 to 64 characters, values at most 64 characters, at most 64
    /// entries. They are not added to the delivered objects.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::schema::annotations")]
    pub annotations: BTreeMap<String, String>,

    /// Pauses delivery. While true, changes to the content are not recorded and agents
    /// keep what they applied last. Defaults to false.
    #[serde(default)]
    pub suspend: bool,

    /// Lets agents take over objects that already exist on their spoke clusters and that no
    /// Stack manages. Without it an agent refuses such an object (an Apply failure: "exists
    /// and is not managed by Brokkr") and leaves it untouched. An object another Stack
    /// manages is never taken over. Defaults to false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt_existing: bool,

    /// What agents do with this Stack's objects when the Stack is deleted or no longer
    /// targeted at them: `Delete` (the default) deletes them; `Orphan` leaves them in place
    /// with Brokkr's `brokkr.io/*` labels and annotations removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<crate::DeletionPolicy>,

    /// What agents do when an object they applied is changed or deleted on the spoke:
    /// `Correct` (the default) puts it back; `Detect` never writes because of drift and only
    /// reports it (new versions of the Stack are still applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_policy: Option<crate::DriftPolicy>,

    /// Fields that agents neither compare nor apply, per group and kind (and optionally name
    /// and namespace), as JSON pointers, e.g. `{group: apps, kind: Deployment, jsonPointers:
    /// [/spec/replicas]}` for Deployments scaled by a HorizontalPodAutoscaler.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore_differences: Vec<crate::IgnoreDifference>,

    /// Delivers this recorded revision (a sequence from `status.history`) to every targeted
    /// agent at once instead of the newest: a rollback in one step. Changes to the content
    /// are still recorded while it is set, but not delivered; removing it delivers the
    /// newest revision. A sequence that is not a revision of this Stack is refused
    /// (`Accepted=False`, reason `UnknownRevision`) and changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub pinned_revision: Option<i64>,

    /// Delivers new revisions wave by wave, each wave gated on the health of the earlier
    /// ones, instead of to every targeted agent at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::RolloutSpec>,
}

impl StackSpec {
    /// The policy agents apply this Stack's content with.
    pub fn policy(&self) -> crate::StackPolicy {
        crate::StackPolicy {
            adopt_existing: self.adopt_existing,
            deletion_policy: self.deletion_policy.unwrap_or_default(),
            drift_policy: self.drift_policy.unwrap_or_default(),
            ignore_differences: self.ignore_differences.clone(),
        }
    }
}

/// Reference to a Generator in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GeneratorRef {
    /// Name of the Generator.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl StackSpec {
    /// Checks the rules the CRD states, for apiservers (and simulators) that do not
    /// evaluate CEL: a generator name, exactly one of `resources` and `manifests`, each
    /// resource an object with `apiVersion` and `kind`, and annotation limits.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name(
            "spec.generatorRef.name",
            &self.generator_ref.name,
            NAME_MAX_LEN,
        )?;
        match (&self.resources, &self.manifests) {
            (Some(_), Some(_)) => return Err(SpecError::BothResourcesAndManifests),
            (None, None) => return Err(SpecError::NeitherResourcesNorManifests),
            (Some(resources), None) => {
                for (index, resource) in resources.iter().enumerate() {
                    validate_resource(resource)
                        .map_err(|reason| SpecError::InvalidResource { index, reason })?;
                }
            }
            (None, Some(_)) => {}
        }
        if let Some(description) = &self.description {
            validate_storable(|| "spec.description".to_owned(), description)?;
        }
        if let Some(revision) = self.pinned_revision
            && revision < 1
        {
            return Err(SpecError::Invalid {
                field: "spec.pinnedRevision".into(),
                reason: format!("{revision} is not a revision sequence (they start at 1)"),
            });
        }
        if let Some(rollout) = &self.rollout {
            rollout.validate()?;
        }
        validate_annotations(&self.annotations)
    }
}

/// What the apiserver checks for an embedded resource, for when it did not.
fn validate_resource(resource: &serde_json::Value) -> Result<(), String> {
    let Some(object) = resource.as_object() else {
        return Err("expected a mapping with apiVersion, kind and metadata".into());
    };
    for field in ["apiVersion", "kind"] {
        match object.get(field) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => {}
            Some(_) => return Err(format!("{field} must be a non-empty string")),
            None => return Err(format!("{field} is missing")),
        }
    }
    Ok(())
}

/// Observed state of a Stack, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StackStatus {
    /// The `metadata.generation` this status describes. When it is lower than
    /// `metadata.generation`, the operator has not yet acted on the latest spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions: `Accepted` (the spec is valid and its content recorded),
    /// `Applied` (every targeted agent applied the current content), `Ready` (every
    /// targeted agent reports it healthy) and `Degraded` (some agent failed or is unhealthy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,

    /// Id of the Stack in Brokkr's database (a UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_id: Option<String>,

    /// The current deployment object: the recorded content agents are asked to apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_object: Option<DeploymentObjectRef>,

    /// Number of agents this Stack is delivered to.
    #[serde(default)]
    pub targeted_agents: i32,

    /// Number of targeted agents that applied the current deployment object.
    #[serde(default)]
    pub applied_agents: i32,

    /// Number of targeted agents that report the current deployment object healthy.
    #[serde(default)]
    pub healthy_agents: i32,

    /// Number of targeted agents that failed to apply the current deployment object.
    #[serde(default)]
    pub failed_agents: i32,

    /// Healthy agents out of targeted agents, e.g. `3/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// Per-agent state, failing agents first, at most 50 entries; the counts above
    /// cover every agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<StackAgentStatus>,

    /// The last revisions recorded (at most 10), newest first: what `kubectl get stack -o
    /// yaml` shows of the Stack's history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<StackRevision>,

    /// Where the rollout of the newest revision stands (with `spec.rollout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::RolloutStatus>,
}

/// One recorded revision of a Stack's content.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StackRevision {
    /// The revision's sequence: the deployment object's position in the fleet-wide order.
    pub sequence: i64,
    /// The first 12 hex digits of the content's SHA-256.
    pub checksum: String,
    /// When it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_at: Option<Time>,
    /// Who changed the content: the field manager of the spec change (`kubectl-client-side-apply`,
    /// `helm`, `brokkr.io/generator/ci`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_by: Option<String>,
    /// The Generator the Stack belonged to then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator: Option<String>,
}

/// The deployment object an agent is asked to apply: one recorded version of a Stack's content.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentObjectRef {
    /// Id of the deployment object in Brokkr's database (a UUID).
    pub id: String,
    /// Position of this deployment object in the fleet-wide order of desired states;
    /// a later change has a higher number.
    pub sequence: i64,
    /// SHA-256 of the content, hex encoded.
    pub checksum: String,
}

/// How one targeted agent is doing with this Stack.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StackAgentStatus {
    /// Name of the Agent.
    pub name: String,
    /// Name of the Agent's cluster.
    #[serde(default)]
    pub cluster_name: String,
    /// What the agent did with the current deployment object: `Pending` (not applied
    /// yet), `Applied`, `Failed`, or `Deleting` (removing the Stack's objects).
    #[serde(default)]
    pub state: AgentDeployState,
    /// Health of the applied objects: `healthy`, `progressing`, `degraded` or `unknown`.
    #[serde(default)]
    pub health: AgentHealth,
    /// The agent's last message about this Stack, e.g. the apply error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the agent last reported on this Stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_time: Option<Time>,
    /// The revision (sequence) the agent is asked to hold, when it differs from the
    /// Stack's `deploymentObject` during a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

/// What an agent did with a Stack's current deployment object.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum AgentDeployState {
    /// Not applied yet.
    #[default]
    Pending,
    /// Applied.
    Applied,
    /// Applying failed.
    Failed,
    /// The Stack is being removed from the agent's cluster.
    Deleting,
}

impl AgentDeployState {
    /// The value as it appears in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Applied => "Applied",
            Self::Failed => "Failed",
            Self::Deleting => "Deleting",
        }
    }
}

impl std::fmt::Display for AgentDeployState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Health of the objects an agent applied.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentHealth {
    /// Every object is ready (Deployments available, rollouts done, Jobs complete).
    Healthy,
    /// Objects are still rolling out.
    Progressing,
    /// Some object failed or is not ready.
    Degraded,
    /// Not reported yet, or the objects have no readiness signal.
    #[default]
    Unknown,
}

impl AgentHealth {
    /// The value as it appears in the API and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Progressing => "progressing",
            Self::Degraded => "degraded",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for AgentHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `status.ready` text: healthy agents out of targeted agents, e.g. `3/3`.
pub fn ready_ratio(healthy: i32, targeted: i32) -> String {
    format!("{healthy}/{targeted}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_MANIFESTS: &str = r#"
apiVersion: brokkr.io/v1alpha1
kind: Stack
metadata:
  name: web
  namespace: apps
spec:
  generatorRef:
    name: team-a
  description: The web tier
  manifests: |
    apiVersion: v1
    kind: Namespace
    metadata:
      name: web
    ---
    apiVersion: v1
    kind: ConfigMap
    metadata:
      name: web-config
      namespace: web
    data:
      color: blue
  annotations:
    owner: team-a
"#;

    const WITH_RESOURCES: &str = r#"
apiVersion: brokkr.io/v1alpha1
kind: Stack
metadata:
  name: web
  namespace: apps
spec:
  generatorRef:
    name: team-a
  resources:
    - apiVersion: v1
      kind: ConfigMap
      metadata:
        name: web-config
        namespace: web
      data:
        color: blue
  suspend: true
"#;

    fn spec(yaml: &str) -> StackSpec {
        serde_yaml::from_str::<Stack>(yaml).unwrap().spec
    }

    #[test]
    fn a_description_holding_nul_is_refused() {
        let spec: StackSpec = serde_yaml::from_str(
            "generatorRef: {name: ci}\nmanifests: \"a: 1\"\ndescription: \"web\\0\"\n",
        )
        .unwrap();
        assert_eq!(
            spec.validate(),
            Err(SpecError::NulCharacter {
                field: "spec.description".into()
            })
        );
    }

    #[test]
    fn stack_with_manifests_round_trips() {
        let stack: Stack = serde_yaml::from_str(WITH_MANIFESTS).unwrap();
        assert_eq!(stack.spec.generator_ref.name, "team-a");
        assert_eq!(stack.spec.description.as_deref(), Some("The web tier"));
        assert!(
            stack
                .spec
                .manifests
                .as_deref()
                .unwrap()
                .contains("---\napiVersion: v1\nkind: ConfigMap")
        );
        assert_eq!(stack.spec.resources, None);
        assert_eq!(
            stack.spec.annotations.get("owner").map(String::as_str),
            Some("team-a")
        );
        assert!(!stack.spec.suspend);
        assert_eq!(stack.spec.validate(), Ok(()));

        let back: Stack = serde_yaml::from_str(&serde_yaml::to_string(&stack).unwrap()).unwrap();
        assert_eq!(back, stack);
        // Unset optional fields stay out of what we write back.
        let json = serde_json::to_value(&stack.spec).unwrap();
        assert!(json.get("resources").is_none(), "{json}");
    }

    #[test]
    fn stack_with_resources_round_trips_keeping_every_field() {
        let stack: Stack = serde_yaml::from_str(WITH_RESOURCES).unwrap();
        let resources = stack.spec.resources.as_ref().unwrap();
        assert_eq!(resources.len(), 1);
        assert_eq!(resources[0]["kind"], "ConfigMap");
        assert_eq!(resources[0]["data"]["color"], "blue");
        assert!(stack.spec.suspend);
        assert_eq!(stack.spec.validate(), Ok(()));

        let back: Stack = serde_yaml::from_str(&serde_yaml::to_string(&stack).unwrap()).unwrap();
        assert_eq!(back, stack);
        let json = serde_json::to_value(&stack.spec).unwrap();
        assert!(json.get("manifests").is_none(), "{json}");
        assert!(json.get("annotations").is_none(), "{json}");
    }

    #[test]
    fn both_resources_and_manifests_is_refused() {
        let mut spec = spec(WITH_RESOURCES);
        spec.manifests = Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n".into());
        let err = spec.validate().unwrap_err();
        assert_eq!(err, SpecError::BothResourcesAndManifests);
        assert!(
            err.to_string()
                .contains("exactly one of spec.resources or spec.manifests")
        );
    }

    #[test]
    fn neither_resources_nor_manifests_is_refused() {
        let mut spec = spec(WITH_RESOURCES);
        spec.resources = None;
        assert_eq!(
            spec.validate(),
            Err(SpecError::NeitherResourcesNorManifests)
        );
    }

    #[test]
    fn empty_generator_name_is_refused() {
        let mut spec = spec(WITH_MANIFESTS);
        spec.generator_ref.name.clear();
        assert_eq!(
            spec.validate(),
            Err(SpecError::EmptyField {
                field: "spec.generatorRef.name"
            })
        );
    }

    #[test]
    fn resource_without_kind_is_refused_with_its_index() {
        let mut spec = spec(WITH_RESOURCES);
        spec.resources
            .as_mut()
            .unwrap()
            .push(serde_json::json!({"apiVersion": "v1", "metadata": {"name": "x"}}));
        let err = spec.validate().unwrap_err();
        assert_eq!(
            err,
            SpecError::InvalidResource {
                index: 1,
                reason: "kind is missing".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "spec.resources[1] is not a Kubernetes object: kind is missing"
        );
    }

    #[test]
    fn resource_that_is_not_a_mapping_is_refused() {
        let mut spec = spec(WITH_RESOURCES);
        spec.resources = Some(vec![serde_json::json!("kind: ConfigMap")]);
        assert!(matches!(
            spec.validate(),
            Err(SpecError::InvalidResource { index: 0, .. })
        ));
    }

    #[test]
    fn long_annotation_value_is_refused() {
        let mut spec = spec(WITH_MANIFESTS);
        spec.annotations.insert("owner".into(), "x".repeat(65));
        assert!(matches!(
            spec.validate(),
            Err(SpecError::AnnotationValueTooLong { .. })
        ));
    }

    #[test]
    fn status_uses_the_api_spelling_of_states_and_health() {
        let status = StackStatus {
            ready: Some(ready_ratio(2, 3)),
            targeted_agents: 3,
            deployment_object: Some(DeploymentObjectRef {
                id: "0190a0b4-0000-7000-8000-000000000002".into(),
                sequence: 42,
                checksum: "ab".repeat(32),
            }),
            agents: vec![StackAgentStatus {
                name: "edge-1".into(),
                cluster_name: "edge-1".into(),
                state: AgentDeployState::Failed,
                health: AgentHealth::Degraded,
                message: Some("failed to apply Deployment web/web".into()),
                last_event_time: None,
                revision: None,
            }],
            ..Default::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["ready"], "2/3");
        assert_eq!(json["deploymentObject"]["sequence"], 42);
        assert_eq!(json["agents"][0]["clusterName"], "edge-1");
        assert_eq!(json["agents"][0]["state"], "Failed");
        assert_eq!(json["agents"][0]["health"], "degraded");
        assert_eq!(serde_json::from_value::<StackStatus>(json).unwrap(), status);
    }

    #[test]
    fn enum_strings_match_serde() {
        for state in [
            AgentDeployState::Pending,
            AgentDeployState::Applied,
            AgentDeployState::Failed,
            AgentDeployState::Deleting,
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        for health in [
            AgentHealth::Healthy,
            AgentHealth::Progressing,
            AgentHealth::Degraded,
            AgentHealth::Unknown,
        ] {
            assert_eq!(serde_json::to_value(health).unwrap(), health.to_string());
        }
    }
}
