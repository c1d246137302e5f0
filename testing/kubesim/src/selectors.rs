//! Label and field selectors in the string syntax the apiserver accepts
//! (`a=b,c!=d,e in (f,g),h notin (i),j,!k`).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(input: &str) -> Result<Self, String> {
        if input.trim().is_empty() {
            return Ok(Self::default());
        }
        split_top_level(input)?
            .into_iter()
            .map(|part| parse_requirement(part.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map(LabelSelector)
    }

    /// `labels` is the object's `metadata.labels` (absent and `null` mean no labels).
    pub fn matches(&self, labels: Option<&Value>) -> bool {
        let get = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::DoesNotExist(k) => get(k).is_none(),
            Requirement::GreaterThan(k, n) => get(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l > *n),
            Requirement::LessThan(k, n) => get(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l < *n),
        })
    }
}

/// Splits on commas that are not inside a `(...)` value list.
fn split_top_level(input: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if depth < 0 {
            return Err(format!(
                "unable to parse requirement: unexpected ')' in {input:?}"
            ));
        }
    }
    if depth != 0 {
        return Err(format!(
            "unable to parse requirement: unbalanced parentheses in {input:?}"
        ));
    }
    parts.push(&input[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    let bad = || format!("unable to parse requirement: {part:?}");
    if part.is_empty() {
        return Err("unable to parse requirement: found '', expected: identifier".into());
    }
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(
            label_key(key.trim()).ok_or_else(bad)?,
        ));
    }
    if let Some(open) = part.find('(') {
        let mut head = part[..open].split_whitespace();
        let (key, op) = (head.next().ok_or_else(bad)?, head.next().ok_or_else(bad)?);
        let values = part[open + 1..].strip_suffix(')').ok_or_else(bad)?;
        if head.next().is_some() {
            return Err(bad());
        }
        let key = label_key(key).ok_or_else(bad)?;
        let values: Vec<String> = values
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        return match op {
            "in" => Ok(Requirement::In(key, values)),
            "notin" => Ok(Requirement::NotIn(key, values)),
            _ => Err(bad()),
        };
    }
    for (op, build) in [
        (
            "!=",
            Requirement::NotEquals as fn(String, String) -> Requirement,
        ),
        ("==", Requirement::Equals),
        ("=", Requirement::Equals),
    ] {
        if let Some((key, value)) = part.split_once(op) {
            let key = label_key(key.trim()).ok_or_else(bad)?;
            return Ok(build(key, value.trim().to_string()));
        }
    }
    for (op, greater) in [('>', true), ('<', false)] {
        if let Some((key, value)) = part.split_once(op) {
            let key = label_key(key.trim()).ok_or_else(bad)?;
            let n = value.trim().parse::<i64>().map_err(|_| bad())?;
            return Ok(if greater {
                Requirement::GreaterThan(key, n)
            } else {
                Requirement::LessThan(key, n)
            });
        }
    }
    Ok(Requirement::Exists(label_key(part).ok_or_else(bad)?))
}

fn label_key(key: &str) -> Option<String> {
    let valid = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    valid.then(|| key.to_string())
}

/// A parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`, comma-separated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(input: &str) -> Result<Self, String> {
        if input.trim().is_empty() {
            return Ok(Self::default());
        }
        input
            .split(',')
            .map(|part| {
                let part = part.trim();
                let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                    (f, false, v)
                } else if let Some((f, v)) = part.split_once("==") {
                    (f, true, v)
                } else if let Some((f, v)) = part.split_once('=') {
                    (f, true, v)
                } else {
                    return Err(format!(
                        "invalid selector: '{part}'; can't understand '{part}'"
                    ));
                };
                Ok((field.trim().to_string(), equal, value.trim().to_string()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(FieldSelector)
    }

    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(f, _, _)| f.as_str())
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field
                .split('.')
                .try_fold(object, |v, segment| v.get(segment))
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            (actual == *value) == *equal
        })
    }
}

/// The field labels a kind may be selected by, besides `metadata.name` and `metadata.namespace`.
pub fn extra_field_labels(group: &str, plural: &str) -> &'static [&'static str] {
    match (group, plural) {
        ("", "secrets") => &["type"],
        ("", "namespaces") => &["status.phase"],
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("events.k8s.io", "events") => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn matches(selector: &str, labels: Value) -> bool {
        LabelSelector::parse(selector)
            .unwrap_or_else(|e| panic!("{selector:?} should parse: {e}"))
            .matches(Some(&labels))
    }

    #[test]
    fn equality_operators() {
        let labels = json!({ "app": "web", "tier": "front" });
        assert!(matches("app=web", labels.clone()));
        assert!(matches("app==web", labels.clone()));
        assert!(matches("app = web", labels.clone()));
        assert!(!matches("app!=web", labels.clone()));
        assert!(matches("app!=db", labels.clone()));
        assert!(matches("missing!=x", labels.clone()));
        assert!(matches("app=web,tier=front", labels.clone()));
        assert!(!matches("app=web,tier=back", labels));
    }

    #[test]
    fn set_operators_as_kube_renders_them() {
        let labels = json!({ "env": "prod" });
        assert!(matches("env in (prod,staging)", labels.clone()));
        assert!(matches("env in (prod, staging)", labels.clone()));
        assert!(!matches("env notin (prod,staging)", labels.clone()));
        assert!(matches("missing notin (x)", labels.clone()));
        assert!(!matches("missing in (x)", labels.clone()));
        assert!(matches("env in (prod),env", labels));
    }

    #[test]
    fn existence_operators() {
        let labels = json!({ "env": "prod" });
        assert!(matches("env", labels.clone()));
        assert!(!matches("!env", labels.clone()));
        assert!(matches("!other", labels.clone()));
        assert!(matches(" ! other ", labels));
    }

    #[test]
    fn numeric_comparisons() {
        assert!(matches("n>3", json!({ "n": "5" })));
        assert!(!matches("n<3", json!({ "n": "5" })));
    }

    #[test]
    fn empty_selector_matches_unlabelled_objects() {
        assert!(LabelSelector::parse("").is_ok_and(|s| s.matches(None)));
        assert!(LabelSelector::parse("!a").is_ok_and(|s| s.matches(None)));
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in ["a in (b", "a,", "a b", "a in x", "a (b)", "=b", "n>x", "a)"] {
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn field_selectors() {
        let object = json!({ "metadata": { "name": "a", "namespace": "ns" }, "type": "Opaque" });
        let parse = |s: &str| FieldSelector::parse(s).unwrap_or_else(|e| panic!("{e}"));
        assert!(parse("metadata.name=a").matches(&object));
        assert!(parse("metadata.name==a,metadata.namespace=ns").matches(&object));
        assert!(!parse("metadata.name!=a").matches(&object));
        assert!(parse("type=Opaque").matches(&object));
        assert!(FieldSelector::parse("metadata.name").is_err());
        assert_eq!(
            parse("metadata.name=a,type!=x")
                .fields()
                .collect::<Vec<_>>(),
            ["metadata.name", "type"]
        );
    }
}
