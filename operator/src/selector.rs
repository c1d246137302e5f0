//! Kubernetes label selectors over Agent labels, as AgentTargets use them.

use std::collections::BTreeMap;

use brokkr_crds::LabelSelector;

/// Whether `labels` satisfy `selector`, with Kubernetes' semantics: every
/// `matchLabels` pair and every `matchExpressions` requirement must hold, and an
/// empty selector matches everything. Unknown operators match nothing (the CRD's
/// validation refuses them before they get here).
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    let expressions_match = selector.match_expressions.iter().flatten().all(|req| {
        let values = req.values.as_deref().unwrap_or_default();
        let value = labels.get(&req.key);
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_match && expressions_match
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(yaml: &str) -> LabelSelector {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn match_labels_need_every_pair() {
        let s = selector("matchLabels: {env: prod, region: eu}");
        assert!(matches(
            &s,
            &labels(&[("env", "prod"), ("region", "eu"), ("x", "y")])
        ));
        assert!(!matches(&s, &labels(&[("env", "prod")])));
        assert!(!matches(&s, &labels(&[("env", "dev"), ("region", "eu")])));
    }

    #[test]
    fn expressions_follow_kubernetes_operators() {
        let s = selector(
            "matchExpressions:
  - {key: env, operator: In, values: [prod, staging]}
  - {key: tier, operator: NotIn, values: [legacy]}
  - {key: gpu, operator: Exists}
  - {key: quarantined, operator: DoesNotExist}",
        );
        assert!(matches(&s, &labels(&[("env", "prod"), ("gpu", "a100")])));
        assert!(matches(
            &s,
            &labels(&[("env", "staging"), ("gpu", ""), ("tier", "web")])
        ));
        assert!(!matches(&s, &labels(&[("env", "dev"), ("gpu", "x")])), "In");
        assert!(
            !matches(
                &s,
                &labels(&[("env", "prod"), ("gpu", "x"), ("tier", "legacy")])
            ),
            "NotIn"
        );
        assert!(!matches(&s, &labels(&[("env", "prod")])), "Exists");
        assert!(
            !matches(
                &s,
                &labels(&[("env", "prod"), ("gpu", "x"), ("quarantined", "yes")])
            ),
            "DoesNotExist"
        );
    }

    #[test]
    fn an_empty_selector_matches_every_agent() {
        assert!(matches(&selector("{}"), &labels(&[])));
        assert!(matches(&selector("{}"), &labels(&[("a", "b")])));
    }
}
