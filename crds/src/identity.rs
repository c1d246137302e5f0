//! Identity of a manifest object in a cluster, shared by the hub (which refuses two
//! documents naming the same object) and the agent (which applies, tracks and deletes
//! objects by it).

use std::fmt;

/// What makes two manifests the same object in a cluster: the API group (not the version,
/// which is only how it is spelled), kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// `""` for the core group.
    pub group: String,
    pub kind: String,
    /// `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    /// `Kind namespace/name`, or `Kind name` for a cluster-scoped object.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// `apps/v1` → (`apps`, `v1`); `v1` → (``, `v1`).
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    api_version.rsplit_once('/').unwrap_or(("", api_version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_is_what_precedes_the_version() {
        assert_eq!(split_api_version("apps/v1"), ("apps", "v1"));
        assert_eq!(split_api_version("v1"), ("", "v1"));
        assert_eq!(
            split_api_version("apiextensions.k8s.io/v1"),
            ("apiextensions.k8s.io", "v1")
        );
    }

    #[test]
    fn keys_read_as_kind_namespace_and_name() {
        let key = |namespace: Option<&str>| ObjectKey {
            group: "apps".into(),
            kind: "Deployment".into(),
            namespace: namespace.map(str::to_owned),
            name: "web".into(),
        };
        assert_eq!(key(Some("shop")).to_string(), "Deployment shop/web");
        assert_eq!(key(None).to_string(), "Deployment web");
    }
}
