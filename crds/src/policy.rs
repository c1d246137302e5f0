//! How an agent treats a Stack's objects on the spoke: whether it may take over objects that
//! already exist (`spec.adoptExisting`), what happens to its objects when the Stack is
//! deleted or no longer targeted (`spec.deletionPolicy`), whether drift is corrected or only
//! reported (`spec.driftPolicy`), and which fields it leaves alone (`spec.ignoreDifferences`).
//!
//! The policy travels with the desired state it belongs to: the hub writes it as the first
//! line of a deployment object's YAML (`# brokkr.io/policy: {json}`), only when it differs
//! from the defaults. So a policy change is a new checksum and a new deployment object, the
//! deletion marker carries the last policy (the database copies the line into it), and hubs
//! and agents of either version work together: an older agent reads the line as a YAML
//! comment, an older hub never writes it and an agent then uses the defaults.
// Why a header and not a field of the wire `DeploymentObject`: the field would need the
// agent API's response builder changed as well; the header needs no API change at all and
// is covered by the checksum and the immutability of deployment objects for free. The
// rendered YAML is canonical (re-serialised), so a user's own comment can never be taken
// for the header.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The start of the policy line of a deployment object's YAML.
pub const POLICY_HEADER: &str = "# brokkr.io/policy: ";

/// What happens to a Stack's objects on a spoke when the Stack is deleted or no longer
/// targeted at that spoke's agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// The agent deletes every object it applied for the Stack.
    #[default]
    Delete,
    /// The agent leaves the objects in place, removes its `brokkr.io/*` labels and
    /// annotations from them, and forgets them.
    Orphan,
}

impl DeletionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionPolicy::Delete => "Delete",
            DeletionPolicy::Orphan => "Orphan",
        }
    }
}

/// What agents do when an applied object no longer holds what they applied (it was edited
/// or deleted on the spoke).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DriftPolicy {
    /// Put the object back (re-apply) and report the drift as corrected.
    #[default]
    Correct,
    /// Never write because of drift; report it (a `Drift` event, not corrected). New
    /// versions of the Stack are still applied.
    Detect,
}

impl DriftPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftPolicy::Correct => "Correct",
            DriftPolicy::Detect => "Detect",
        }
    }
}

/// Fields of matching objects that agents neither compare nor apply (as in Argo CD), e.g.
/// `/spec/replicas` of a Deployment scaled by a HorizontalPodAutoscaler.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IgnoreDifference {
    /// API group of the objects (empty for the core group, e.g. ConfigMap).
    #[serde(default)]
    pub group: String,
    /// Kind of the objects, e.g. `Deployment`.
    pub kind: String,
    /// Only the object of this name; all of the kind when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Only objects in this namespace; any namespace when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// JSON pointers (RFC 6901) of the fields to leave alone, e.g. `/spec/replicas`.
    #[serde(default)]
    pub json_pointers: Vec<String>,
}

impl IgnoreDifference {
    /// Whether the rule covers the object `group`/`kind` `namespace`/`name`.
    pub fn matches(&self, group: &str, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        self.group == group
            && self.kind == kind
            && self.name.as_deref().is_none_or(|n| n == name)
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| namespace == Some(ns))
    }
}

/// The part of a Stack's spec the agent acts on, besides the objects themselves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StackPolicy {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt_existing: bool,
    #[serde(default, skip_serializing_if = "is_default_deletion")]
    pub deletion_policy: DeletionPolicy,
    #[serde(default, skip_serializing_if = "is_default_drift")]
    pub drift_policy: DriftPolicy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore_differences: Vec<IgnoreDifference>,
}

fn is_default_drift(policy: &DriftPolicy) -> bool {
    *policy == DriftPolicy::Correct
}

fn is_default_deletion(policy: &DeletionPolicy) -> bool {
    *policy == DeletionPolicy::Delete
}

impl StackPolicy {
    pub fn is_default(&self) -> bool {
        *self == StackPolicy::default()
    }

    /// The JSON pointers to leave alone on the object `group`/`kind` `namespace`/`name`.
    pub fn ignored_pointers(
        &self,
        group: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Vec<String> {
        self.ignore_differences
            .iter()
            .filter(|rule| rule.matches(group, kind, namespace, name))
            .flat_map(|rule| rule.json_pointers.iter().cloned())
            .collect()
    }

    /// The policy line to put first in a deployment object's YAML, `None` for the defaults
    /// (so stacks that do not use the policy keep their checksums).
    pub fn header(&self) -> Option<String> {
        if self.is_default() {
            return None;
        }
        let json = serde_json::to_string(self).ok()?;
        Some(format!("{POLICY_HEADER}{json}\n"))
    }

    /// The policy of a deployment object's YAML: its first line when that is a policy line,
    /// else the defaults. `Err` when the line is there but unreadable (a newer hub's format).
    pub fn from_yaml(yaml: &str) -> Result<StackPolicy, String> {
        let first = yaml.lines().next().unwrap_or_default();
        match first.strip_prefix(POLICY_HEADER) {
            Some(json) => serde_json::from_str(json)
                .map_err(|err| format!("failed to read the stack policy line: {err}")),
            None => Ok(StackPolicy::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_writes_no_line_and_a_missing_line_reads_as_the_default() {
        assert_eq!(StackPolicy::default().header(), None);
        assert_eq!(
            StackPolicy::from_yaml("apiVersion: v1\nkind: ConfigMap\n"),
            Ok(StackPolicy::default())
        );
        assert_eq!(StackPolicy::from_yaml(""), Ok(StackPolicy::default()));
    }

    #[test]
    fn a_policy_survives_the_header_line() {
        let policy = StackPolicy {
            adopt_existing: true,
            deletion_policy: DeletionPolicy::Orphan,
            ..StackPolicy::default()
        };
        let header = policy.header().unwrap();
        assert_eq!(
            header,
            "# brokkr.io/policy: {\"adoptExisting\":true,\"deletionPolicy\":\"Orphan\"}\n"
        );
        let yaml = format!("{header}apiVersion: v1\nkind: ConfigMap\n");
        assert_eq!(StackPolicy::from_yaml(&yaml), Ok(policy));
        // Still plain YAML to anyone who does not know the line.
        let value: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(value["kind"], "ConfigMap");
        let orphan_only = StackPolicy {
            deletion_policy: DeletionPolicy::Orphan,
            ..StackPolicy::default()
        };
        assert_eq!(
            StackPolicy::from_yaml(&orphan_only.header().unwrap()),
            Ok(orphan_only)
        );
    }

    #[test]
    fn drift_settings_survive_the_header_line_and_select_their_objects() {
        let policy = StackPolicy {
            drift_policy: DriftPolicy::Detect,
            ignore_differences: vec![
                IgnoreDifference {
                    group: "apps".into(),
                    kind: "Deployment".into(),
                    json_pointers: vec!["/spec/replicas".into()],
                    ..IgnoreDifference::default()
                },
                IgnoreDifference {
                    kind: "ConfigMap".into(),
                    name: Some("tuned".into()),
                    namespace: Some("shop".into()),
                    json_pointers: vec!["/data/level".into()],
                    ..IgnoreDifference::default()
                },
            ],
            ..StackPolicy::default()
        };
        assert_eq!(
            StackPolicy::from_yaml(&policy.header().unwrap()),
            Ok(policy.clone())
        );
        assert_eq!(
            policy.ignored_pointers("apps", "Deployment", Some("any"), "web"),
            ["/spec/replicas"]
        );
        assert_eq!(
            policy.ignored_pointers("", "ConfigMap", Some("shop"), "tuned"),
            ["/data/level"]
        );
        assert!(
            policy
                .ignored_pointers("", "ConfigMap", Some("other"), "tuned")
                .is_empty()
        );
        assert!(
            policy
                .ignored_pointers("", "ConfigMap", Some("shop"), "plain")
                .is_empty()
        );
        assert!(
            policy
                .ignored_pointers("", "Deployment", None, "web")
                .is_empty()
        );
    }

    #[test]
    fn an_unreadable_policy_line_is_an_error_not_the_defaults() {
        assert!(
            StackPolicy::from_yaml("# brokkr.io/policy: {\"deletionPolicy\":\"Shred\"}\n").is_err()
        );
    }
}
