//! Who may deliver to an Agent, and how long keys live: the parts of the Agent and
//! Generator specs that decide access, and the key facts their status shows.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::SpecError;

/// Annotation that revokes an Agent's or Generator's current key at once, on every hub
/// replica (`kubectl annotate agent edge-1 brokkr.io/revoke-key=now`). Any value works;
/// a new key is issued into the key Secret, and the annotation is removed once done.
pub const REVOKE_KEY_ANNOTATION: &str = "brokkr.io/revoke-key";

/// How long a key is valid when `keyPolicy.lifetime` is not set: 90 days.
pub const DEFAULT_KEY_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long the previous key stays valid after a rotation when `keyPolicy.overlap` is not
/// set: one hour.
pub const DEFAULT_KEY_OVERLAP: Duration = Duration::from_secs(3600);
/// The shortest lifetime a key may have: an agent rotates at 2/3 of it, so a minute
/// leaves it 20 s, more than a heartbeat interval, to do so. Lifetimes this short are for
/// trying rotation out; production keys live for days.
pub const MIN_KEY_LIFETIME: Duration = Duration::from_secs(60);

/// Which hub namespaces may deliver to an Agent: AgentTargets in a namespace listed in
/// `namespaces`, or in a namespace whose labels match `namespaceSelector`. Without this
/// field, only AgentTargets in the operator's own namespace may select the Agent.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetableFrom {
    /// Hub namespaces whose AgentTargets may select this Agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,

    /// Hub namespaces, by their labels, whose AgentTargets may select this Agent. An
    /// empty selector (`{}`) matches every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

impl TargetableFrom {
    /// Checks the namespace names and that the selector is a valid label selector.
    pub fn validate(&self) -> Result<(), SpecError> {
        for (index, namespace) in self.namespaces.iter().enumerate() {
            if namespace.is_empty() {
                return Err(SpecError::Invalid {
                    field: format!("spec.targetableFrom.namespaces[{index}]"),
                    reason: "must not be empty".into(),
                });
            }
            crate::validation::validate_storable(
                || format!("spec.targetableFrom.namespaces[{index}]"),
                namespace,
            )?;
        }
        if let Some(selector) = &self.namespace_selector {
            kube::core::Selector::try_from(selector.clone()).map_err(|err| SpecError::Invalid {
                field: "spec.targetableFrom.namespaceSelector".into(),
                reason: err.to_string(),
            })?;
        }
        Ok(())
    }
}

/// How long keys live. Keys are rotated by their holder (an agent renews its own key at
/// 2/3 of the lifetime) or by the operator; an expired key is refused with 401 `key_expired`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyPolicy {
    /// How long a key is valid after it is issued, such as `90d`, `720h` or `30m`; at
    /// least `1m`. Defaults to 90 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<String>,

    /// How long the previous key stays valid after a rotation, so that a holder can
    /// switch without a failed request, such as `1h`. Defaults to 1 hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<String>,
}

impl KeyPolicy {
    /// The lifetime of a newly issued key.
    pub fn lifetime(&self) -> Result<Duration, SpecError> {
        let Some(text) = &self.lifetime else {
            return Ok(DEFAULT_KEY_LIFETIME);
        };
        let lifetime = parse("spec.keyPolicy.lifetime", text)?;
        if lifetime < MIN_KEY_LIFETIME {
            return Err(SpecError::Invalid {
                field: "spec.keyPolicy.lifetime".into(),
                reason: format!("{text:?} is shorter than the minimum of 1m"),
            });
        }
        Ok(lifetime)
    }

    /// How long a replaced key stays valid.
    pub fn overlap(&self) -> Result<Duration, SpecError> {
        match &self.overlap {
            Some(text) => parse("spec.keyPolicy.overlap", text),
            None => Ok(DEFAULT_KEY_OVERLAP),
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let lifetime = self.lifetime()?;
        let overlap = self.overlap()?;
        if overlap >= lifetime {
            return Err(SpecError::Invalid {
                field: "spec.keyPolicy.overlap".into(),
                reason: "must be shorter than spec.keyPolicy.lifetime".into(),
            });
        }
        Ok(())
    }
}

fn parse(field: &str, text: &str) -> Result<Duration, SpecError> {
    brokkr_common::parse_interval(text).map_err(|reason| SpecError::Invalid {
        field: field.into(),
        reason,
    })
}

/// The current key of an Agent or Generator, as its status shows it. Never the key itself.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatus {
    /// The public prefix of the key (`brokkr_<prefix>_...`), as in the audit log.
    pub prefix: String,
    /// When the key was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    /// When the key expires unless it is rotated before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the key was last used (updated at most once a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Time>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lifetimes_default_parse_days_and_refuse_too_short() {
        let policy = KeyPolicy::default();
        assert_eq!(policy.lifetime(), Ok(DEFAULT_KEY_LIFETIME));
        assert_eq!(policy.overlap(), Ok(DEFAULT_KEY_OVERLAP));
        let policy = KeyPolicy {
            lifetime: Some("30d".into()),
            overlap: Some("15m".into()),
        };
        assert_eq!(policy.lifetime(), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(policy.overlap(), Ok(Duration::from_secs(900)));
        assert_eq!(policy.validate(), Ok(()));
        for bad in ["59s", "0", "soon", "d", "99999999999999999999d"] {
            let policy = KeyPolicy {
                lifetime: Some(bad.into()),
                overlap: None,
            };
            let err = policy.validate().unwrap_err().to_string();
            assert!(err.starts_with("spec.keyPolicy.lifetime"), "{bad}: {err}");
        }
        let policy = KeyPolicy {
            lifetime: Some("2m".into()),
            overlap: Some("3m".into()),
        };
        assert!(
            policy
                .validate()
                .unwrap_err()
                .to_string()
                .contains("shorter")
        );
    }

    #[test]
    fn targetable_from_refuses_invalid_selectors_and_empty_names() {
        let mut from: TargetableFrom = serde_json::from_value(serde_json::json!({
            "namespaces": ["team-a"],
            "namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]}]},
        }))
        .unwrap();
        assert_eq!(from.validate(), Ok(()));
        from.namespaces.push(String::new());
        assert!(
            from.validate()
                .unwrap_err()
                .to_string()
                .contains("namespaces[1]")
        );
        from.namespaces.pop();
        from.namespace_selector = serde_json::from_value(serde_json::json!(
            {"matchExpressions": [{"key": "tier", "operator": "In"}]}
        ))
        .unwrap();
        assert!(
            from.validate()
                .unwrap_err()
                .to_string()
                .starts_with("spec.targetableFrom.namespaceSelector")
        );
    }
}
