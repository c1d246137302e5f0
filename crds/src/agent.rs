//! `Agent`: a spoke cluster's agent, registered with the hub.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::access::{KeyPolicy, KeyStatus, TargetableFrom};
use crate::validation::{CLUSTER_NAME_MAX_LEN, SpecError, validate_annotations, validate_name};

/// Registration of one spoke cluster's brokkr-agent. The operator creates the agent's key
/// and stores it in the Secret named in `status.keySecret`; install the agent in the spoke
/// cluster with that key. The Agent's `metadata.labels` are what AgentTargets'
/// `agentSelector` matches.
// clippy reads repeated `type_ = ...` in separate printcolumn(...) groups as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "brokkr.io",
    version = "v1alpha1",
    kind = "Agent",
    status = "AgentStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "agt",
    category = "brokkr",
    doc = "An Agent registers one spoke cluster's brokkr-agent with the hub. Its labels are \
           what AgentTargets' spec.agentSelector matches; status.keySecret names the Secret \
           holding the key the agent authenticates with.",
    printcolumn(
        name = "Cluster",
        type_ = "string",
        json_path = ".spec.clusterName",
        description = "Spoke cluster the agent runs in"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Online, Error, Offline or Suspended"
    ),
    printcolumn(
        name = "Last-Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeat",
        description = "When the agent last sent a heartbeat"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Name of the spoke cluster the agent runs in, 1 to 255 characters. Required.
    #[schemars(length(min = 1, max = 255))]
    pub cluster_name: String,

    /// Key/value pairs recorded with the Agent in Brokkr's database, for inventory and
    /// search. Keys are 1 to 64 characters, values at most 64 characters, at most 64
    /// entries. Use `metadata.labels` for what AgentTargets select on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::schema::annotations")]
    pub annotations: BTreeMap<String, String>,

    /// Pauses the agent. While true, the hub sends it no new content; what it applied
    /// stays in place. Defaults to false.
    #[serde(default)]
    pub suspend: bool,

    /// Which hub namespaces' AgentTargets may deliver to this agent. Without it, only
    /// AgentTargets in the operator's own namespace may; an AgentTarget elsewhere that
    /// selects this Agent is refused for it (`Ready=False`, reason `NotPermitted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targetable_from: Option<TargetableFrom>,

    /// How long the agent's key lives and how long a replaced key stays valid. The agent
    /// renews its key by itself when 2/3 of the lifetime has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_policy: Option<KeyPolicy>,
}

impl AgentSpec {
    /// Checks the rules the CRD states: a cluster name of 1 to 255 characters, the
    /// annotation limits, a valid namespace selector and key durations.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name("spec.clusterName", &self.cluster_name, CLUSTER_NAME_MAX_LEN)?;
        validate_annotations(&self.annotations)?;
        if let Some(from) = &self.targetable_from {
            from.validate()?;
        }
        self.key_policy().validate()
    }

    /// The key policy, defaulted.
    pub fn key_policy(&self) -> KeyPolicy {
        self.key_policy.clone().unwrap_or_default()
    }
}

/// Observed state of an Agent, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The `metadata.generation` this status describes. When it is lower than
    /// `metadata.generation`, the operator has not yet acted on the latest spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions: `Ready` (registered, key issued, not suspended), `Online`
    /// (heartbeats arrive in time) and `Healthy` (the agent reports it can do its job on
    /// the spoke; `False` with reason `AgentError` and the agent's own message when it
    /// cannot, and while no heartbeat arrives).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,

    /// Id of the Agent in Brokkr's database (a UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,

    /// `Pending` until the first heartbeat, then `Online`, `Error` (heartbeats arrive but
    /// the agent reports it cannot do its job; the `Healthy` condition says why) or
    /// `Offline` (heartbeats stopped); `Suspended` while `spec.suspend` is true.
    // Not through the derived `Option` schema: kube's OptionalEnum transform would replace
    // this description with the enum type's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::non_nullable::<AgentPhase>")]
    pub phase: Option<AgentPhase>,

    /// When the agent last sent a heartbeat, to within five minutes: it is rewritten when
    /// that stale or with any other change of the status, not on every heartbeat. The
    /// `Online` condition says at once whether heartbeats arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,

    /// Version of brokkr-agent the agent reported in its last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,

    /// The Secret holding the agent's key (data key chosen by the operator and the agent chart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret: Option<SecretRef>,

    /// The agent's current key: prefix, issue and expiry times (never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyStatus>,
}

/// Where an agent is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum AgentPhase {
    /// Registered; no heartbeat yet.
    #[default]
    Pending,
    /// Heartbeats arrive in time.
    Online,
    /// Heartbeats arrive but the agent reports it cannot work (e.g. the spoke API server is
    /// unreachable, or RBAC refuses a watch); the `Healthy` condition carries its reason.
    Error,
    /// Heartbeats stopped.
    Offline,
    /// `spec.suspend` is true.
    Suspended,
}

impl AgentPhase {
    /// The value as it appears in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Online => "Online",
            Self::Error => "Error",
            Self::Offline => "Offline",
            Self::Suspended => "Suspended",
        }
    }
}

impl std::fmt::Display for AgentPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Secret, by namespace and name.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    pub name: String,
    /// Namespace of the Secret.
    pub namespace: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = r#"
apiVersion: brokkr.io/v1alpha1
kind: Agent
metadata:
  name: edge-1
  labels: {env: prod, region: eu-west}
spec:
  clusterName: edge-cluster-1
  annotations: {rack: r12}
"#;

    #[test]
    fn agent_yaml_parses_and_is_valid() {
        let agent: Agent = serde_yaml::from_str(AGENT).unwrap();
        assert_eq!(agent.metadata.namespace, None, "Agent is cluster-scoped");
        assert_eq!(agent.spec.cluster_name, "edge-cluster-1");
        assert_eq!(agent.spec.annotations["rack"], "r12");
        assert!(!agent.spec.suspend);
        assert_eq!(agent.spec.validate(), Ok(()));
    }

    #[test]
    fn nul_characters_the_database_cannot_store_are_refused_by_field() {
        let mut spec: AgentSpec = serde_yaml::from_str::<Agent>(AGENT).unwrap().spec;
        spec.cluster_name = "edge\0".into();
        assert_eq!(
            spec.validate().unwrap_err().to_string(),
            "spec.clusterName contains a NUL character (\\u0000), which cannot be stored"
        );
        spec.cluster_name = "edge".into();
        spec.annotations.insert("owner".into(), "a\0b".into());
        assert_eq!(
            spec.validate(),
            Err(SpecError::NulCharacter {
                field: "spec.annotations[\"owner\"]".into()
            })
        );
    }

    #[test]
    fn empty_or_oversized_cluster_name_is_refused() {
        let mut spec: AgentSpec = serde_yaml::from_str::<Agent>(AGENT).unwrap().spec;
        spec.cluster_name.clear();
        assert_eq!(
            spec.validate(),
            Err(SpecError::EmptyField {
                field: "spec.clusterName"
            })
        );
        spec.cluster_name = "c".repeat(256);
        assert_eq!(
            spec.validate(),
            Err(SpecError::FieldTooLong {
                field: "spec.clusterName",
                len: 256,
                max: 255
            })
        );
    }

    #[test]
    fn oversized_annotation_key_is_refused() {
        let mut spec: AgentSpec = serde_yaml::from_str::<Agent>(AGENT).unwrap().spec;
        spec.annotations.insert("k".repeat(65), "v".into());
        assert!(matches!(
            spec.validate(),
            Err(SpecError::AnnotationKeyTooLong { len: 65, .. })
        ));
    }

    #[test]
    fn status_round_trips_with_phase_and_heartbeat() {
        let json = serde_json::json!({
            "observedGeneration": 1,
            "agentId": "0190a0b4-0000-7000-8000-000000000003",
            "phase": "Online",
            "lastHeartbeat": "2025-01-02T03:04:05Z",
            "version": "0.1.0",
            "keySecret": {"name": "edge-1-agent-key", "namespace": "brokkr-system"},
        });
        let status: AgentStatus = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(status.phase, Some(AgentPhase::Online));
        assert_eq!(status.phase.unwrap().to_string(), "Online");
        assert_eq!(
            status.key_secret.as_ref().unwrap().namespace,
            "brokkr-system"
        );
        assert_eq!(serde_json::to_value(&status).unwrap(), json);
    }

    #[test]
    fn the_error_phase_reads_as_error() {
        let status: AgentStatus =
            serde_json::from_value(serde_json::json!({"phase": "Error"})).unwrap();
        assert_eq!(status.phase, Some(AgentPhase::Error));
        assert_eq!(AgentPhase::Error.to_string(), "Error");
    }
}
