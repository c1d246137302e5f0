//! Spec validation the operator runs itself.
//!
//! The CRDs carry the same rules as schema constraints and CEL rules, but not every
//! apiserver evaluates CEL (and our test simulator evaluates none), so the operator
//! calls `validate()` on every spec before it acts and reports a failure as a
//! condition. Each `validate()` is pure: no client, no clock.

use std::collections::BTreeMap;

use thiserror::Error;

/// Column sizes of the hub's database schema, in characters (as `VARCHAR(n)` counts them).
/// The hub checks every value against them before it writes, and the spec checks below use
/// the same numbers, so nothing the operator accepts is truncated or refused later.
pub mod limits {
    pub const NAME: usize = 255;
    pub const CLUSTER_NAME: usize = 255;
    pub const AGENT_STATUS: usize = 50;
    pub const EVENT_TYPE: usize = 50;
    pub const EVENT_STATUS: usize = 10;
    /// A label as the hub stores it: `key=value`.
    pub const LABEL: usize = 64;
    pub const ANNOTATION_KEY: usize = 64;
    pub const ANNOTATION_VALUE: usize = 64;
    pub const PAK_PREFIX: usize = 32;
    pub const AGENT_VERSION: usize = 64;
    /// `agent_events.message` is TEXT; the bound keeps one chatty agent from filling
    /// the database with a single report.
    pub const EVENT_MESSAGE: usize = 4096;
}

/// Longest annotation key accepted in `spec.annotations` (the database column is `VARCHAR(64)`).
pub const ANNOTATION_KEY_MAX_LEN: usize = limits::ANNOTATION_KEY;
/// Longest annotation value accepted in `spec.annotations` (the database column is `VARCHAR(64)`).
pub const ANNOTATION_VALUE_MAX_LEN: usize = limits::ANNOTATION_VALUE;
/// Most entries accepted in `spec.annotations`.
pub const MAX_ANNOTATIONS: usize = 64;
/// Longest name accepted in a reference or list of names (Kubernetes object names are at
/// most 253 characters).
pub const NAME_MAX_LEN: usize = 253;
/// Longest `spec.clusterName` of an Agent (the database column is `VARCHAR(255)`).
pub const CLUSTER_NAME_MAX_LEN: usize = limits::CLUSTER_NAME;

/// The length of `value` in characters when it is longer than `max`, else `None`. Lengths
/// are counted in characters, as PostgreSQL's `VARCHAR(n)`, the apiserver's `maxLength` and
/// CEL's `size()` count them, not in bytes.
pub fn length_over(value: &str, max: usize) -> Option<usize> {
    // A string of at most `max` bytes has at most `max` characters: skip the count.
    if value.len() <= max {
        return None;
    }
    let len = value.chars().count();
    (len > max).then_some(len)
}

/// A label longer than the hub stores ([`limits::LABEL`] characters as `key=value`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "label {label:?} is {len} characters as key=value; at most {max} are allowed",
    max = limits::LABEL
)]
pub struct LabelTooLong {
    /// The label as `key=value`.
    pub label: String,
    /// Its length in characters.
    pub len: usize,
}

/// Refuses the first of `labels` (each `key=value`) longer than [`limits::LABEL`] characters.
pub fn check_labels<S: AsRef<str>>(labels: &[S]) -> Result<(), LabelTooLong> {
    for label in labels {
        let label = label.as_ref();
        if let Some(len) = length_over(label, limits::LABEL) {
            return Err(LabelTooLong {
                label: label.to_owned(),
                len,
            });
        }
    }
    Ok(())
}

/// Why a spec is refused. The message is written for the user: it names the field and
/// says what to change.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpecError {
    #[error("set exactly one of spec.resources or spec.manifests, not both")]
    BothResourcesAndManifests,
    #[error("set exactly one of spec.resources or spec.manifests; neither is set")]
    NeitherResourcesNorManifests,
    #[error("spec.resources[{index}] is not a Kubernetes object: {reason}")]
    InvalidResource { index: usize, reason: String },
    #[error("{field} must not be empty")]
    EmptyField { field: &'static str },
    #[error("{field} is {len} characters long; at most {max} are allowed")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("set spec.agents, spec.agentSelector, or both")]
    NoAgentsOrSelector,
    #[error("spec.agents[{index}] must not be empty")]
    EmptyAgentName { index: usize },
    #[error("spec.agentSelector.matchExpressions[{index}] is invalid: {reason}")]
    InvalidSelector { index: usize, reason: String },
    #[error("spec.annotations has {count} entries; at most {max} are allowed", max = MAX_ANNOTATIONS)]
    TooManyAnnotations { count: usize },
    #[error("spec.annotations has an empty key")]
    EmptyAnnotationKey,
    #[error(
        "spec.annotations key {key:?} is {len} characters long; at most {max} are allowed",
        max = ANNOTATION_KEY_MAX_LEN
    )]
    AnnotationKeyTooLong { key: String, len: usize },
    #[error(
        "spec.annotations[{key:?}] value is {len} characters long; at most {max} are allowed",
        max = ANNOTATION_VALUE_MAX_LEN
    )]
    AnnotationValueTooLong { key: String, len: usize },
    #[error("{field} is invalid: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{field} contains a NUL character (\\u0000), which cannot be stored")]
    NulCharacter { field: String },
}

/// Refuses text the database cannot store (PostgreSQL `text` holds no NUL).
pub(crate) fn validate_storable(
    field: impl FnOnce() -> String,
    value: &str,
) -> Result<(), SpecError> {
    crate::wire::check_storable(field, value)
        .map_err(|err| SpecError::NulCharacter { field: err.field })
}

/// Checks `spec.annotations` against the limits the schema also states.
pub(crate) fn validate_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<(), SpecError> {
    if annotations.len() > MAX_ANNOTATIONS {
        return Err(SpecError::TooManyAnnotations {
            count: annotations.len(),
        });
    }
    for (key, value) in annotations {
        validate_storable(|| "spec.annotations key".to_owned(), key)?;
        validate_storable(|| format!("spec.annotations[{:?}]", shorten(key)), value)?;
        if key.is_empty() {
            return Err(SpecError::EmptyAnnotationKey);
        }
        if let Some(len) = length_over(key, ANNOTATION_KEY_MAX_LEN) {
            return Err(SpecError::AnnotationKeyTooLong {
                key: shorten(key),
                len,
            });
        }
        if let Some(len) = length_over(value, ANNOTATION_VALUE_MAX_LEN) {
            return Err(SpecError::AnnotationValueTooLong {
                key: key.clone(),
                len,
            });
        }
    }
    Ok(())
}

/// Checks a required name-like field: not empty, not longer than `max` characters.
pub(crate) fn validate_name(field: &'static str, value: &str, max: usize) -> Result<(), SpecError> {
    validate_storable(|| field.to_owned(), value)?;
    if value.is_empty() {
        return Err(SpecError::EmptyField { field });
    }
    if let Some(len) = length_over(value, max) {
        return Err(SpecError::FieldTooLong { field, len, max });
    }
    Ok(())
}

/// Keeps error messages bounded when a user pastes something huge into a key.
fn shorten(s: &str) -> String {
    const SHOWN: usize = ANNOTATION_KEY_MAX_LEN;
    if s.chars().count() <= SHOWN {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(SHOWN).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_at_the_limits_are_accepted() {
        let key = "k".repeat(ANNOTATION_KEY_MAX_LEN);
        let value = "v".repeat(ANNOTATION_VALUE_MAX_LEN);
        assert_eq!(
            validate_annotations(&annotations(&[(&key, &value)])),
            Ok(())
        );
        assert_eq!(validate_annotations(&BTreeMap::new()), Ok(()));
    }

    #[test]
    fn annotation_key_past_64_characters_is_refused_with_its_length() {
        let key = "k".repeat(ANNOTATION_KEY_MAX_LEN + 1);
        let err = validate_annotations(&annotations(&[(&key, "v")])).unwrap_err();
        assert!(
            matches!(err, SpecError::AnnotationKeyTooLong { len: 65, .. }),
            "{err:?}"
        );
        // The message shows a bounded part of the key, not the whole of it.
        assert!(err.to_string().contains("65 characters"), "{err}");
        assert!(err.to_string().contains('…'), "{err}");
    }

    #[test]
    fn annotation_value_past_64_characters_is_refused_naming_the_key() {
        let value = "é".repeat(ANNOTATION_VALUE_MAX_LEN + 1);
        let err = validate_annotations(&annotations(&[("team", &value)])).unwrap_err();
        assert_eq!(
            err,
            SpecError::AnnotationValueTooLong {
                key: "team".into(),
                len: 65
            }
        );
        assert_eq!(
            err.to_string(),
            "spec.annotations[\"team\"] value is 65 characters long; at most 64 are allowed"
        );
    }

    #[test]
    fn lengths_are_counted_in_characters_not_bytes() {
        // 64 two-byte characters are 128 bytes but within the 64-character limit.
        let value = "é".repeat(ANNOTATION_VALUE_MAX_LEN);
        assert_eq!(
            validate_annotations(&annotations(&[("team", &value)])),
            Ok(())
        );
    }

    #[test]
    fn empty_annotation_key_is_refused() {
        assert_eq!(
            validate_annotations(&annotations(&[("", "v")])),
            Err(SpecError::EmptyAnnotationKey)
        );
    }

    #[test]
    fn too_many_annotations_are_refused() {
        let many: BTreeMap<String, String> = (0..=MAX_ANNOTATIONS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert_eq!(
            validate_annotations(&many),
            Err(SpecError::TooManyAnnotations {
                count: MAX_ANNOTATIONS + 1
            })
        );
    }

    #[test]
    fn labels_past_64_characters_as_key_value_are_refused_with_their_length() {
        let fits = format!("team={}", "é".repeat(limits::LABEL - 5));
        assert_eq!(check_labels(&[fits]), Ok(()));
        let long = format!("team={}", "é".repeat(limits::LABEL - 4));
        let err = check_labels(&["a=b".to_owned(), long.clone()]).unwrap_err();
        assert_eq!(
            err,
            LabelTooLong {
                label: long,
                len: 65
            }
        );
        assert!(
            err.to_string()
                .ends_with("is 65 characters as key=value; at most 64 are allowed"),
            "{err}"
        );
    }

    #[test]
    fn length_over_counts_characters() {
        assert_eq!(length_over(&"é".repeat(64), 64), None);
        assert_eq!(length_over(&"é".repeat(65), 64), Some(65));
        assert_eq!(length_over("", 0), None);
    }

    #[test]
    fn names_must_be_present_and_bounded() {
        assert_eq!(validate_name("spec.x", "a", 3), Ok(()));
        assert_eq!(
            validate_name("spec.x", "", 3),
            Err(SpecError::EmptyField { field: "spec.x" })
        );
        assert_eq!(
            validate_name("spec.x", "abcd", 3),
            Err(SpecError::FieldTooLong {
                field: "spec.x",
                len: 4,
                max: 3
            })
        );
    }
}
