//! Brokkr's public Kubernetes API: the custom resource kinds of group `brokkr.io`,
//! version `v1alpha1`, their status and condition types, the constants every
//! Brokkr component shares, and the generated CustomResourceDefinitions.
//!
//! | kind | scope | short name |
//! | --- | --- | --- |
//! | [`Generator`] | namespaced | `gen` |
//! | [`Stack`] | namespaced | `stk` |
//! | [`AgentTarget`] | namespaced | `at` |
//! | [`Agent`] | cluster | `agt` |
//! | [`NotificationChannel`] | namespaced | `nch` |
//! | [`AlertRule`] | namespaced | `alr` |
//!
//! All kinds are in the `brokkr` category, so `kubectl get brokkr` lists them.
//!
//! Doc comments on the spec and status types become the descriptions that
//! `kubectl explain` prints, so they are written for users. Notes for developers
//! are `//` comments.

pub mod access;
pub mod agent;
pub mod agent_target;
pub mod alerting;
pub mod conditions;
mod crdgen;
pub mod generator;
pub mod identity;
pub mod policy;
pub mod rollout;
mod schema;
pub mod stack;
pub mod validation;
pub mod wire;

pub use access::{KeyPolicy, KeyStatus, REVOKE_KEY_ANNOTATION, TargetableFrom};
pub use agent::{Agent, AgentPhase, AgentSpec, AgentStatus, SecretRef};
pub use agent_target::{
    AgentTarget, AgentTargetSpec, AgentTargetStatus, MAX_AGENT_NAMES_IN_STATUS, StackRef,
};
pub use alerting::{
    AlertCondition, AlertConditionType, AlertNotification, AlertRule, AlertRuleSpec,
    AlertRuleStatus, AlertState, AlertSubject, ChannelType, FiringAlert, NotificationChannel,
    NotificationChannelSpec, NotificationChannelStatus, SecretKeySelector, Severity,
};
pub use crdgen::{
    CHART_CRDS_DIR, all_crds, crd_file_name, crds_yaml, rendered_crd_files, write_crd_files,
};
pub use generator::{Generator, GeneratorSpec, GeneratorStatus};
pub use identity::ObjectKey;
pub use policy::{DeletionPolicy, DriftPolicy, IgnoreDifference, StackPolicy};
pub use rollout::{MaxUnavailable, RolloutSpec, RolloutStatus, RolloutWave};
pub use stack::{
    AgentDeployState, AgentHealth, DeploymentObjectRef, GeneratorRef, MAX_AGENTS_IN_STATUS,
    MAX_HISTORY_IN_STATUS, Stack, StackAgentStatus, StackRevision, StackSpec, StackStatus,
    ready_ratio,
};
pub use validation::{
    ANNOTATION_KEY_MAX_LEN, ANNOTATION_VALUE_MAX_LEN, MAX_ANNOTATIONS, SpecError,
};

// Re-exported so users of this crate name the same types the CRDs embed.
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, LabelSelector, LabelSelectorRequirement, Time,
};

/// API group of every Brokkr kind.
pub const GROUP: &str = "brokkr.io";
/// API version of every Brokkr kind.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every Brokkr kind (`brokkr.io/v1alpha1`).
pub const API_VERSION: &str = "brokkr.io/v1alpha1";
/// `kubectl get brokkr` lists every kind in this category.
pub const CATEGORY: &str = "brokkr";

/// Finalizer the operator puts on the kinds that own database rows.
pub const FINALIZER: &str = "brokkr.io/cleanup";
/// Server-side apply field manager of the hub operator.
pub const OPERATOR_FIELD_MANAGER: &str = "brokkr.io/operator";
/// Server-side apply field manager of the spoke agent.
pub const AGENT_FIELD_MANAGER: &str = "brokkr.io/agent";

/// Label on every object an agent applies: the Stack it came from.
// The value format is the operator's and agent's choice; label values are at most 63
// characters and may not contain `/`, so `<namespace>/<name>` does not fit as is.
pub const STACK_LABEL: &str = "brokkr.io/stack";
/// Label on every object an agent applies: the Agent that applied it.
pub const AGENT_LABEL: &str = "brokkr.io/agent";
/// Annotation on every object an agent applies: the id of the deployment object it came from.
pub const DEPLOYMENT_OBJECT_ANNOTATION: &str = "brokkr.io/deployment-object";
/// Annotation on every object an agent applies: the checksum of the deployment object it came from.
pub const CHECKSUM_ANNOTATION: &str = "brokkr.io/checksum";
/// Label of an agent's inventory of a stack (a ConfigMap in the agent's namespace), beside
/// [`STACK_LABEL`] and [`AGENT_LABEL`].
pub const INVENTORY_LABEL: &str = "brokkr.io/inventory";
/// Prefix of every label and annotation Brokkr puts on spoke objects.
pub const LABEL_PREFIX: &str = "brokkr.io/";

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn api_version_is_group_slash_version_for_every_kind() {
        assert_eq!(API_VERSION, format!("{GROUP}/{VERSION}"));
        assert_eq!(Generator::api_version(&()), API_VERSION);
        assert_eq!(Stack::api_version(&()), API_VERSION);
        assert_eq!(AgentTarget::api_version(&()), API_VERSION);
        assert_eq!(Agent::api_version(&()), API_VERSION);
        assert_eq!(NotificationChannel::api_version(&()), API_VERSION);
        assert_eq!(AlertRule::api_version(&()), API_VERSION);
    }
}
