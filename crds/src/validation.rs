//! Spec validation the operator runs itself.
//!
//! The CRDs carry the same rules as schema constraints and CEL rules, but not every
//! apiserver evaluates CEL (and our test simulator evaluates none), so the operator
//! calls `validate()` on every spec before it acts and reports a failure as a
//! condition. Each `validate()` is pure: no client, no clock.

use std::collections::BTreeMap;

use thiserror::Error;

/// Longest annotation key accepted in `spec.annotations` (the database column is `VARCHAR(64)`).
pub const ANNOTATION_KEY_MAX_LEN: usize = 64;
/// Longest annotation value accepted in `spec.annotations` (the database column is `VARCHAR(64)`).
pub const ANNOTATION_VALUE_MAX_LEN: usize = 64;
/// Most entries accepted in `spec.annotations`.
pub const MAX_ANNOTATIONS: usize = 64;
/// Longest name accepted in a reference or list of names (Kubernetes object names are at
/// most 253 characters).
pub const NAME_MAX_LEN: usize = 253;
/// Longest `spec.clusterName` of an Agent (the database column is `VARCHAR(255)`).
pub const CLUSTER_NAME_MAX_LEN: usize = 255;

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
    #[error("{field} contains a NUL character (\\u0000), which cannot be stored")]
    NulCharacter { field: String },
}

/// Refuses text the database cannot store (PostgreSQL `text` holds no NUL).
pub(crate) fn validate_storable(
    field: impl FnOnce() -> String,
    value: &str,
) -> Result<(), SpecError> {
    if value.contains('\0') {
        return Err(SpecError::NulCharacter { field: field() });
    }
    Ok(())
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
        // Lengths in characters, as the apiserver's maxLength and CEL's size() count them.
        let key_len = key.chars().count();
        if key_len == 0 {
            return Err(SpecError::EmptyAnnotationKey);
        }
        if key_len > ANNOTATION_KEY_MAX_LEN {
            return Err(SpecError::AnnotationKeyTooLong {
                key: shorten(key),
                len: key_len,
            });
        }
        let value_len = value.chars().count();
        if value_len > ANNOTATION_VALUE_MAX_LEN {
            return Err(SpecError::AnnotationValueTooLong {
                key: key.clone(),
                len: value_len,
            });
        }
    }
    Ok(())
}

/// Checks a required name-like field: not empty, not longer than `max` characters.
pub(crate) fn validate_name(field: &'static str, value: &str, max: usize) -> Result<(), SpecError> {
    validate_storable(|| field.to_owned(), value)?;
    let len = value.chars().count();
    if len == 0 {
        return Err(SpecError::EmptyField { field });
    }
    if len > max {
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
