//! The registry of resource types (built-ins plus one entry per established CRD) and the
//! discovery documents generated from it.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::status::ResourceRef;

pub const CRD_GROUP: &str = "apiextensions.k8s.io";
pub const CRD_PLURAL: &str = "customresourcedefinitions";

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const STATUS_VERBS: [&str; 3] = ["get", "patch", "update"];

/// A servable resource, version-agnostic: objects are stored once per (group, plural).
#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    /// Served versions, preferred first.
    pub versions: Vec<String>,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub short_names: Vec<String>,
    pub namespaced: bool,
    pub status_subresource: bool,
    /// Whether `metadata.generation` is maintained (workloads, CRDs and custom resources).
    pub tracks_generation: bool,
    /// Present for custom resources.
    pub custom: Option<CustomInfo>,
}

#[derive(Debug, Clone)]
pub struct CustomInfo {
    /// The CRD's name, `<plural>.<group>`.
    pub crd_name: String,
    /// `openAPIV3Schema` per served version.
    pub schemas: BTreeMap<String, Value>,
    /// The CRD is being deleted: reads still work, creates are refused.
    pub terminating: bool,
}

impl ResourceType {
    pub fn reference(&self) -> ResourceRef<'_> {
        ResourceRef {
            group: &self.group,
            plural: &self.plural,
        }
    }

    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    /// The kind as the apiserver names it in 422 messages: `ConfigMap`, `Deployment.apps`.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    pub fn serves(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
    }

    pub fn is_crd(&self) -> bool {
        self.group == CRD_GROUP && self.plural == CRD_PLURAL
    }

    pub fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.plural == "namespaces"
    }

    fn api_resource_entries(&self) -> Vec<Value> {
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": VERBS,
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        let mut entries = vec![main];
        if self.status_subresource {
            entries.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": STATUS_VERBS,
            }));
        }
        entries
    }

    fn aggregated_entry(&self, version: &str) -> Value {
        let response_kind = json!({ "group": self.group, "version": version, "kind": self.kind });
        let mut entry = json!({
            "resource": self.plural,
            "responseKind": response_kind,
            "scope": if self.namespaced { "Namespaced" } else { "Cluster" },
            "singularResource": self.singular,
            "verbs": VERBS,
        });
        if !self.short_names.is_empty() {
            entry["shortNames"] = json!(self.short_names);
        }
        if self.status_subresource {
            entry["subresources"] = json!([{
                "subresource": "status",
                "responseKind": response_kind,
                "verbs": STATUS_VERBS,
            }]);
        }
        entry
    }
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    short_names: &'static [&'static str],
    namespaced: bool,
    status_subresource: bool,
    tracks_generation: bool,
}

const BUILTINS: &[Builtin] = &[
    Builtin {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        short_names: &["ns"],
        namespaced: false,
        status_subresource: true,
        tracks_generation: false,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        short_names: &["cm"],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "Secret",
        plural: "secrets",
        short_names: &[],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        short_names: &["svc"],
        namespaced: true,
        status_subresource: true,
        tracks_generation: false,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        short_names: &["sa"],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "Event",
        plural: "events",
        short_names: &["ev"],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
    },
    Builtin {
        group: "events.k8s.io",
        version: "v1",
        kind: "Event",
        plural: "events",
        short_names: &["ev"],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
    },
    Builtin {
        group: "apps",
        version: "v1",
        kind: "Deployment",
        plural: "deployments",
        short_names: &["deploy"],
        namespaced: true,
        status_subresource: true,
        tracks_generation: true,
    },
    Builtin {
        group: "apps",
        version: "v1",
        kind: "StatefulSet",
        plural: "statefulsets",
        short_names: &["sts"],
        namespaced: true,
        status_subresource: true,
        tracks_generation: true,
    },
    Builtin {
        group: "apps",
        version: "v1",
        kind: "DaemonSet",
        plural: "daemonsets",
        short_names: &["ds"],
        namespaced: true,
        status_subresource: true,
        tracks_generation: true,
    },
    Builtin {
        group: "batch",
        version: "v1",
        kind: "Job",
        plural: "jobs",
        short_names: &[],
        namespaced: true,
        status_subresource: true,
        tracks_generation: true,
    },
    Builtin {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        short_names: &[],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
    },
    Builtin {
        group: CRD_GROUP,
        version: "v1",
        kind: "CustomResourceDefinition",
        plural: CRD_PLURAL,
        short_names: &["crd", "crds"],
        namespaced: false,
        status_subresource: true,
        tracks_generation: true,
    },
];

pub fn builtin_types() -> Vec<ResourceType> {
    BUILTINS
        .iter()
        .map(|b| ResourceType {
            group: b.group.into(),
            versions: vec![b.version.into()],
            kind: b.kind.into(),
            plural: b.plural.into(),
            singular: b.kind.to_lowercase(),
            short_names: b.short_names.iter().map(|s| s.to_string()).collect(),
            namespaced: b.namespaced,
            status_subresource: b.status_subresource,
            tracks_generation: b.tracks_generation,
            custom: None,
        })
        .chain(crate::rbac::resource_types())
        .collect()
}

/// The resource type a stored CRD defines, or `None` when it serves no version.
pub fn type_from_crd(crd: &Value) -> Option<ResourceType> {
    let spec = crd.get("spec")?;
    let names = spec.get("names")?;
    let kind = names.get("kind")?.as_str()?.to_string();
    let mut served: Vec<&Value> = spec
        .get("versions")?
        .as_array()?
        .iter()
        .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(false))
        .collect();
    served.sort_by_key(|v| {
        std::cmp::Reverse(
            kube::core::Version::parse(v["name"].as_str().unwrap_or_default()).priority(),
        )
    });
    if served.is_empty() {
        return None;
    }
    let versions: Vec<String> = served
        .iter()
        .filter_map(|v| v.get("name")?.as_str().map(String::from))
        .collect();
    let schemas = served
        .iter()
        .filter_map(|v| {
            let schema = v.pointer("/schema/openAPIV3Schema")?.clone();
            Some((v.get("name")?.as_str()?.to_string(), schema))
        })
        .collect();
    let status_subresource = served
        .iter()
        .any(|v| v.pointer("/subresources/status").is_some());
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    Some(ResourceType {
        group: spec.get("group")?.as_str()?.to_string(),
        versions,
        plural: names.get("plural")?.as_str()?.to_string(),
        singular: names
            .get("singular")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| kind.to_lowercase()),
        short_names: strings(names.get("shortNames")),
        kind,
        namespaced: spec.get("scope").and_then(Value::as_str) == Some("Namespaced"),
        status_subresource,
        tracks_generation: true,
        custom: Some(CustomInfo {
            crd_name: crd.pointer("/metadata/name")?.as_str()?.to_string(),
            schemas,
            terminating: crd.pointer("/metadata/deletionTimestamp").is_some(),
        }),
    })
}

/// `(group name, preferred version first)` for every group at `/apis`, in registry order.
fn groups(types: &[ResourceType]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for t in types.iter().filter(|t| !t.group.is_empty()) {
        let index = match groups.iter().position(|(g, _)| *g == t.group) {
            Some(i) => i,
            None => {
                groups.push((t.group.clone(), Vec::new()));
                groups.len() - 1
            }
        };
        for v in &t.versions {
            if !groups[index].1.contains(v) {
                groups[index].1.push(v.clone());
            }
        }
    }
    for (_, versions) in &mut groups {
        versions.sort_by_key(|v| std::cmp::Reverse(kube::core::Version::parse(v).priority()));
    }
    groups
}

fn group_json(name: &str, versions: &[String]) -> Value {
    let gv = |v: &String| json!({ "groupVersion": format!("{name}/{v}"), "version": v });
    json!({
        "name": name,
        "versions": versions.iter().map(gv).collect::<Vec<_>>(),
        "preferredVersion": versions.first().map(gv).unwrap_or(Value::Null),
    })
}

/// `GET /api`
pub fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1" }],
    })
}

/// `GET /apis`
pub fn group_list(types: &[ResourceType]) -> Value {
    let groups: Vec<Value> = groups(types)
        .iter()
        .map(|(name, versions)| group_json(name, versions))
        .collect();
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
}

/// `GET /apis/<group>`
pub fn group(types: &[ResourceType], name: &str) -> Option<Value> {
    let (_, versions) = groups(types).into_iter().find(|(g, _)| g == name)?;
    let mut group = group_json(name, &versions);
    group["kind"] = json!("APIGroup");
    group["apiVersion"] = json!("v1");
    Some(group)
}

/// `GET /api/v1` or `GET /apis/<group>/<version>`
pub fn resource_list(types: &[ResourceType], group: &str, version: &str) -> Option<Value> {
    let served: Vec<&ResourceType> = types
        .iter()
        .filter(|t| t.group == group && t.serves(version))
        .collect();
    if served.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let resources: Vec<Value> = served
        .iter()
        .flat_map(|t| t.api_resource_entries())
        .collect();
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// Aggregated discovery (`apidiscovery.k8s.io/v2`) for `/api` (`core == true`) or `/apis`.
pub fn aggregated(types: &[ResourceType], core: bool) -> Value {
    let group_names: Vec<(String, Vec<String>)> = if core {
        vec![(String::new(), vec!["v1".to_string()])]
    } else {
        groups(types)
    };
    let items: Vec<Value> = group_names
        .iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|version| {
                    let resources: Vec<Value> = types
                        .iter()
                        .filter(|t| t.group == *group && t.serves(version))
                        .map(|t| t.aggregated_entry(version))
                        .collect();
                    json!({ "version": version, "resources": resources, "freshness": "Current" })
                })
                .collect();
            let mut item =
                json!({ "metadata": { "creationTimestamp": null }, "versions": versions });
            if !group.is_empty() {
                item["metadata"]["name"] = json!(group);
            }
            item
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}

/// `GET /version`; claims the Kubernetes version whose API k8s-openapi is built against.
pub fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-kubesim",
        "gitCommit": "kubesim",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "none",
        "compiler": "kubesim",
        "platform": "linux/amd64",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd(versions: Value) -> Value {
        json!({
            "metadata": { "name": "widgets.example.com" },
            "spec": {
                "group": "example.com",
                "scope": "Namespaced",
                "names": { "kind": "Widget", "plural": "widgets", "shortNames": ["wd"] },
                "versions": versions,
            }
        })
    }

    #[test]
    fn crd_type_prefers_the_highest_priority_served_version() {
        let t = type_from_crd(&crd(json!([
            { "name": "v1alpha1", "served": true, "storage": false },
            { "name": "v1", "served": true, "storage": true, "subresources": { "status": {} } },
            { "name": "v2", "served": false, "storage": false },
        ])))
        .expect("valid CRD");
        assert_eq!(t.versions, ["v1", "v1alpha1"]);
        assert_eq!(t.singular, "widget");
        assert!(t.namespaced && t.status_subresource && t.tracks_generation);
    }

    #[test]
    fn crd_serving_nothing_defines_no_type() {
        assert!(type_from_crd(&crd(json!([{ "name": "v1", "served": false }]))).is_none());
    }

    #[test]
    fn resource_list_includes_status_subresources() {
        let list = resource_list(&builtin_types(), "apps", "v1").expect("apps/v1 is served");
        let names: Vec<&str> = list["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert!(names.contains(&"deployments") && names.contains(&"deployments/status"));
        assert!(resource_list(&builtin_types(), "apps", "v2").is_none());
    }

    #[test]
    fn group_list_has_each_group_once() {
        let list = group_list(&builtin_types());
        let names: Vec<&str> = list["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g["name"].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "events.k8s.io",
                "apps",
                "batch",
                "coordination.k8s.io",
                CRD_GROUP,
                crate::rbac::GROUP
            ]
        );
    }
}
