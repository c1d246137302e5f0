//! `Generator`: a source of Stacks (a team, a pipeline, a GitOps repository).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::access::{KeyPolicy, KeyStatus};
use crate::validation::SpecError;

/// Settings of a Generator: a source of Stacks. The operator creates an API key for each
/// Generator and stores it in the Secret named in `status.apiKeySecret`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "brokkr.io",
    version = "v1alpha1",
    kind = "Generator",
    namespaced,
    status = "GeneratorStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "gen",
    category = "brokkr",
    doc = "A Generator is a source of Stacks: a team, a CI pipeline or a GitOps repository. \
           Stacks name their Generator in spec.generatorRef; deleting a Generator deletes its Stacks.",
    printcolumn(
        name = "Stacks",
        type_ = "integer",
        json_path = ".status.stacks",
        description = "Number of live Stacks of this Generator"
    ),
    printcolumn(
        name = "Active",
        type_ = "boolean",
        json_path = ".status.active",
        description = "Whether the Generator is active (not suspended and registered)"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GeneratorSpec {
    /// Free-text description of the Generator, shown to people browsing the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,

    /// Pauses the Generator. While true, the operator records no new content for the
    /// Generator's Stacks; what agents already applied stays in place. Defaults to false.
    #[serde(default)]
    pub suspend: bool,

    /// How long the Generator's API key lives and how long a replaced key stays valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_policy: Option<KeyPolicy>,
}

impl GeneratorSpec {
    /// Checks the key durations.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.key_policy().validate()
    }

    /// The key policy, defaulted.
    pub fn key_policy(&self) -> KeyPolicy {
        self.key_policy.clone().unwrap_or_default()
    }
}

/// Observed state of a Generator, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GeneratorStatus {
    /// The `metadata.generation` this status describes. When it is lower than
    /// `metadata.generation`, the operator has not yet acted on the latest spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions. `Ready` is True once the Generator is registered and has an API key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,

    /// Id of the Generator in Brokkr's database (a UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator_id: Option<String>,

    /// Number of live Stacks that name this Generator.
    #[serde(default)]
    pub stacks: i32,

    /// Whether the Generator is active: registered and not suspended.
    #[serde(default)]
    pub active: bool,

    /// Name of the Secret, in the Generator's namespace, that holds its API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<String>,

    /// When the Generator last called the hub's generator API (kept to the minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,

    /// The Generator's current API key: prefix, issue and expiry times (never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<KeyStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_generator_yaml_defaults_to_not_suspended() {
        let generator: Generator = serde_yaml::from_str(
            "apiVersion: brokkr.io/v1alpha1\nkind: Generator\nmetadata:\n  name: team-a\n  namespace: apps\nspec: {}\n",
        )
        .unwrap();
        assert_eq!(generator.spec, GeneratorSpec::default());
        assert!(!generator.spec.suspend);
        assert!(generator.status.is_none());
    }

    #[test]
    fn status_round_trips_in_camel_case() {
        let status = GeneratorStatus {
            observed_generation: Some(2),
            generator_id: Some("0190a0b4-0000-7000-8000-000000000001".into()),
            stacks: 3,
            active: true,
            api_key_secret: Some("team-a-api-key".into()),
            ..Default::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "observedGeneration": 2,
                "generatorId": "0190a0b4-0000-7000-8000-000000000001",
                "stacks": 3,
                "active": true,
                "apiKeySecret": "team-a-api-key",
            })
        );
        assert_eq!(
            serde_json::from_value::<GeneratorStatus>(json).unwrap(),
            status
        );
    }
}
