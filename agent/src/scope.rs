//! What the agent may touch on its spoke: `--allowed-namespaces` and `--allow-cluster-scoped`.
//!
//! An object of a stack outside the scope is refused on its own (an Apply Failure naming it
//! and the allowed namespaces); the stack's other objects still apply. The scope also decides
//! where the agent lists and watches: with allowed namespaces, only in those namespaces, so
//! that a namespaced Role in each of them (the chart's `rbac.scope: namespaces`) is all the
//! agent needs. Changing the scope never deletes anything: an object the inventory lists and
//! the scope now refuses is left in place and kept in the inventory.

use std::collections::BTreeSet;
use std::fmt;

use crate::manifest::ObjectKey;

/// The scope the agent works in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpokeScope {
    /// `None`: every namespace.
    namespaces: Option<BTreeSet<String>>,
    cluster_scoped: bool,
}

impl Default for SpokeScope {
    fn default() -> Self {
        SpokeScope::everything()
    }
}

/// A list of namespaces for messages: `a, b`.
struct Listed<'a>(&'a BTreeSet<String>);

impl fmt::Display for Listed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(String::as_str).collect();
        f.write_str(&names.join(", "))
    }
}

impl SpokeScope {
    /// Every namespace and cluster-scoped objects (the default, as before these flags).
    pub fn everything() -> SpokeScope {
        SpokeScope {
            namespaces: None,
            cluster_scoped: true,
        }
    }

    /// `namespaces`: `None` for every namespace. `cluster_scoped`: whether cluster-scoped
    /// objects other than the allowed Namespaces may be written.
    pub fn new(namespaces: Option<BTreeSet<String>>, cluster_scoped: bool) -> SpokeScope {
        SpokeScope {
            namespaces,
            cluster_scoped,
        }
    }

    /// The allowed namespaces; `None` when every namespace is.
    pub fn namespaces(&self) -> Option<&BTreeSet<String>> {
        self.namespaces.as_ref()
    }

    pub fn allows_cluster_scoped(&self) -> bool {
        self.cluster_scoped
    }

    fn allows_namespace(&self, namespace: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|n| n.contains(namespace))
    }

    /// `Ok` when the agent may write the object at `key`, else why not (the message follows
    /// the object's name in the Apply Failure event).
    pub fn check(&self, key: &ObjectKey) -> Result<(), String> {
        match (&key.namespace, &self.namespaces) {
            (Some(namespace), Some(allowed)) if !allowed.contains(namespace) => Err(format!(
                "refused: namespace {namespace:?} is outside the namespaces this agent may write to (--allowed-namespaces: {})",
                Listed(allowed)
            )),
            (Some(_), _) => Ok(()),
            (None, _) if self.cluster_scoped => Ok(()),
            (None, Some(allowed)) if is_namespace(key) && allowed.contains(&key.name) => Ok(()),
            (None, Some(allowed)) if is_namespace(key) => Err(format!(
                "refused: Namespace {:?} is not one this agent may write to (--allowed-namespaces: {}; --allow-cluster-scoped=false)",
                key.name,
                Listed(allowed)
            )),
            (None, Some(allowed)) => Err(format!(
                "refused: cluster-scoped objects are not allowed on this agent (--allow-cluster-scoped=false; only the Namespaces {} may be written)",
                Listed(allowed)
            )),
            (None, None) => Err(
                "refused: cluster-scoped objects are not allowed on this agent (--allow-cluster-scoped=false)"
                    .to_owned(),
            ),
        }
    }

    /// Where to watch a kind for drift: `Some(vec![None])` for one cluster-wide watch,
    /// `Some(namespaces)` for one watch per namespace, `None` for no watch at all (a
    /// cluster-scoped kind when the agent may not list cluster-wide: drift of those objects
    /// is corrected by the periodic resync). `used`: the namespaces the kind's applied
    /// objects are in.
    pub fn watch_namespaces(
        &self,
        namespaced: bool,
        used: &BTreeSet<String>,
    ) -> Option<Vec<Option<String>>> {
        match (&self.namespaces, namespaced) {
            (None, _) => Some(vec![None]),
            (Some(_), false) => None,
            (Some(_), true) => Some(
                used.iter()
                    .filter(|ns| self.allows_namespace(ns))
                    .map(|ns| Some(ns.clone()))
                    .collect(),
            ),
        }
    }
}

fn is_namespace(key: &ObjectKey) -> bool {
    key.group.is_empty() && key.kind == "Namespace"
}

/// A Kubernetes namespace name: a DNS label (at most 63 lowercase alphanumerics or `-`,
/// starting and ending with an alphanumeric).
pub fn validate_namespace(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 63 {
        return Err("a namespace name has at most 63 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err("a namespace name holds only lowercase letters, digits and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("a namespace name starts and ends with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: &str, namespace: Option<&str>, name: &str) -> ObjectKey {
        ObjectKey {
            group: if kind == "ClusterRole" {
                "rbac.authorization.k8s.io".into()
            } else {
                String::new()
            },
            kind: kind.into(),
            namespace: namespace.map(String::from),
            name: name.into(),
        }
    }

    fn shop_and_pay(cluster_scoped: bool) -> SpokeScope {
        SpokeScope::new(
            Some(["shop".to_owned(), "pay".to_owned()].into()),
            cluster_scoped,
        )
    }

    #[test]
    fn everything_is_allowed_by_default() {
        let scope = SpokeScope::default();
        assert!(scope.check(&key("ConfigMap", Some("any"), "a")).is_ok());
        assert!(scope.check(&key("ClusterRole", None, "r")).is_ok());
        assert!(scope.check(&key("Namespace", None, "any")).is_ok());
    }

    #[test]
    fn an_object_outside_the_allowed_namespaces_is_refused_naming_them() {
        let scope = shop_and_pay(true);
        assert!(scope.check(&key("ConfigMap", Some("shop"), "a")).is_ok());
        let message = scope
            .check(&key("ConfigMap", Some("kube-system"), "a"))
            .unwrap_err();
        assert_eq!(
            message,
            "refused: namespace \"kube-system\" is outside the namespaces this agent may write to (--allowed-namespaces: pay, shop)"
        );
        // Cluster-scoped objects stay allowed unless --allow-cluster-scoped=false.
        assert!(scope.check(&key("ClusterRole", None, "r")).is_ok());
        assert!(scope.check(&key("Namespace", None, "other")).is_ok());
    }

    #[test]
    fn without_cluster_scoped_only_the_allowed_namespaces_themselves_may_be_written() {
        let scope = shop_and_pay(false);
        assert!(scope.check(&key("Namespace", None, "shop")).is_ok());
        let other = scope.check(&key("Namespace", None, "other")).unwrap_err();
        assert!(other.contains("Namespace \"other\""), "{other}");
        assert!(other.contains("pay, shop"), "{other}");
        let role = scope.check(&key("ClusterRole", None, "r")).unwrap_err();
        assert!(
            role.contains("cluster-scoped objects are not allowed"),
            "{role}"
        );
        let anywhere = SpokeScope::new(None, false);
        assert!(anywhere.check(&key("ConfigMap", Some("x"), "a")).is_ok());
        assert!(anywhere.check(&key("Namespace", None, "x")).is_err());
    }

    #[test]
    fn watches_stay_inside_the_allowed_namespaces() {
        let used: BTreeSet<String> = ["shop".to_owned(), "elsewhere".to_owned()].into();
        assert_eq!(
            SpokeScope::default().watch_namespaces(true, &used),
            Some(vec![None])
        );
        assert_eq!(
            SpokeScope::default().watch_namespaces(false, &BTreeSet::new()),
            Some(vec![None])
        );
        let scope = shop_and_pay(true);
        assert_eq!(
            scope.watch_namespaces(true, &used),
            Some(vec![Some("shop".to_owned())])
        );
        assert_eq!(scope.watch_namespaces(false, &BTreeSet::new()), None);
    }

    #[test]
    fn namespace_names_are_dns_labels() {
        for good in ["a", "shop", "team-1", &"x".repeat(63)] {
            assert!(validate_namespace(good).is_ok(), "{good}");
        }
        for bad in ["", "Shop", "-a", "a-", "a.b", "a b", &"x".repeat(64)] {
            assert!(validate_namespace(bad).is_err(), "{bad}");
        }
    }
}
