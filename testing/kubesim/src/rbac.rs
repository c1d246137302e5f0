//! RBAC for impersonated requests, evaluated like the apiserver's RBAC authorizer.
//!
//! A request that impersonates (`Impersonate-User`, `Impersonate-Group`) is authorized against
//! the stored Roles, ClusterRoles, RoleBindings and ClusterRoleBindings; every other request is
//! an administrator's, as before. What is evaluated, as the real authorizer does:
//! - the user and its groups: a service account user (`system:serviceaccount:<ns>:<name>`)
//!   impersonated without groups gets `system:serviceaccounts` and
//!   `system:serviceaccounts:<ns>`; every impersonated user gets `system:authenticated`;
//!   `system:masters` may do everything;
//! - the request's attributes: verb (`get`, `list`, `watch`, `create`, `update`, `patch`,
//!   `delete`, `deletecollection`), API group, resource and subresource (`deployments/status`),
//!   name (for list and watch: from a `metadata.name=` field selector), and namespace (a
//!   Namespace object's own name is its namespace, so a Role in `x` covers Namespace `x`);
//! - rules: `verbs`, `apiGroups`, `resources` (`*`, `resource`, `resource/sub`, `*/sub`) and
//!   `resourceNames` (which never match a request without a name, e.g. create or an unfiltered
//!   list); RoleBindings grant in their namespace only (to a Role there or a ClusterRole),
//!   ClusterRoleBindings everywhere; subjects `ServiceAccount` (namespace defaulting to the
//!   binding's), `User` and `Group`;
//! - a server-side apply that would create the object also needs `create`.
//!
//! A refusal is the apiserver's 403 `Forbidden` Status and message. Not simulated: discovery
//! paths are open to every user (the default `system:discovery` binding of real clusters),
//! ClusterRole aggregation, and the escalation checks on writing RBAC objects.

use std::collections::HashMap;

use http::{HeaderMap, Method};
use serde_json::{Value, json};

use crate::resources::ResourceType;
use crate::router::{ResourcePath, Route};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::{State, Target};

pub const GROUP: &str = "rbac.authorization.k8s.io";
const USER_HEADER: &str = "impersonate-user";
const GROUP_HEADER: &str = "impersonate-group";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// The four RBAC kinds, served like any built-in (`rbac.authorization.k8s.io/v1`).
pub fn resource_types() -> Vec<ResourceType> {
    [
        ("Role", "roles", true),
        ("ClusterRole", "clusterroles", false),
        ("RoleBinding", "rolebindings", true),
        ("ClusterRoleBinding", "clusterrolebindings", false),
    ]
    .into_iter()
    .map(|(kind, plural, namespaced)| ResourceType {
        group: GROUP.into(),
        versions: vec!["v1".into()],
        kind: kind.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        short_names: Vec::new(),
        namespaced,
        status_subresource: false,
        tracks_generation: false,
        custom: None,
    })
    .collect()
}

/// Who an impersonated request acts as.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    /// The user of the `Impersonate-*` headers; `None` when the request does not impersonate.
    pub fn impersonated(headers: &HeaderMap) -> Result<Option<User>, ApiError> {
        let text = |value: &http::HeaderValue| {
            value.to_str().map(str::to_owned).map_err(|_| {
                ApiError::bad_request("impersonation headers must be visible ASCII".to_owned())
            })
        };
        let name = headers.get(USER_HEADER).map(text).transpose()?;
        let groups = headers
            .get_all(GROUP_HEADER)
            .iter()
            .map(text)
            .collect::<Result<Vec<String>, ApiError>>()?;
        let Some(name) = name else {
            if groups.is_empty() {
                return Ok(None);
            }
            return Err(ApiError::bad_request(
                "requested [{Group}] without impersonating a user".to_owned(),
            ));
        };
        if name.is_empty() {
            return Err(ApiError::bad_request(
                "the Impersonate-User header is empty".to_owned(),
            ));
        }
        let mut groups = groups;
        if groups.is_empty()
            && let Some((namespace, _)) = service_account(&name)
        {
            groups = vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{namespace}"),
            ];
        }
        if name != "system:anonymous" && !groups.iter().any(|g| g == "system:authenticated") {
            groups.push("system:authenticated".to_owned());
        }
        Ok(Some(User { name, groups }))
    }
}

/// `system:serviceaccount:<ns>:<name>` → (ns, name).
fn service_account(user: &str) -> Option<(&str, &str)> {
    let rest = user.strip_prefix(SERVICE_ACCOUNT_PREFIX)?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then_some((namespace, name))
}

/// The name a field selector requires exactly (`metadata.name=x` or `metadata.name==x`).
fn exact_name(selector: &str) -> Option<&str> {
    selector.split(',').find_map(|term| {
        let value = term.trim().strip_prefix("metadata.name")?;
        let value = value
            .strip_prefix("==")
            .or_else(|| value.strip_prefix('='))?;
        Some(value.trim())
    })
}

/// What the authorizer decides on: the attributes of a resource request.
#[derive(Debug, Clone, PartialEq)]
pub struct Attributes {
    pub verb: &'static str,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    /// Empty at the cluster scope.
    pub namespace: String,
    /// Empty when the request names no object.
    pub name: String,
}

impl Attributes {
    /// The attributes of a resource request, as the apiserver's RequestInfo derives them.
    pub fn of(method: &Method, path: &ResourcePath<'_>, params: &HashMap<String, String>) -> Self {
        let watch = params.get("watch").is_some_and(|v| v == "true" || v == "1");
        let verb = match (method.as_str(), path.name.is_some()) {
            ("GET", false) if watch => "watch",
            ("GET", false) => "list",
            ("GET", true) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", false) => "deletecollection",
            ("DELETE", true) => "delete",
            _ => "unknown",
        };
        let mut name = path.name.unwrap_or_default().to_owned();
        if matches!(verb, "list" | "watch")
            && let Some(only) = params.get("fieldSelector").and_then(|s| exact_name(s))
        {
            name = only.to_owned();
        }
        let is_namespace = path.group.is_empty() && path.plural == "namespaces";
        let namespace = match path.namespace {
            Some(ns) => ns.to_owned(),
            None if is_namespace => path.name.unwrap_or_default().to_owned(),
            None => String::new(),
        };
        Attributes {
            verb,
            group: path.group.to_owned(),
            resource: path.plural.to_owned(),
            subresource: path.subresource.unwrap_or_default().to_owned(),
            namespace,
            name,
        }
    }

    /// The apiserver's 403 for these attributes.
    pub fn forbidden(&self, user: &User) -> ApiError {
        let resource = if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        };
        let scope = if self.namespace.is_empty() {
            "at the cluster scope".to_owned()
        } else {
            format!("in the namespace {:?}", self.namespace)
        };
        let reason = format!(
            "User {:?} cannot {} resource {resource:?} in API group {:?} {scope}",
            user.name, self.verb, self.group
        );
        let qualified = if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        let message = if self.name.is_empty() {
            format!("{qualified} is forbidden: {reason}")
        } else {
            format!("{qualified} {:?} is forbidden: {reason}", self.name)
        };
        let mut details = json!({ "kind": self.resource });
        if !self.name.is_empty() {
            details["name"] = json!(self.name);
        }
        if !self.group.is_empty() {
            details["group"] = json!(self.group);
        }
        ApiError {
            code: 403,
            reason: "Forbidden",
            message,
            details: Some(details),
        }
    }
}

/// The RBAC objects as stored.
struct Policy {
    roles: Vec<Value>,
    cluster_roles: Vec<Value>,
    role_bindings: Vec<Value>,
    cluster_role_bindings: Vec<Value>,
}

impl Policy {
    fn load(state: &State) -> Policy {
        let everything = |plural: &str| -> Vec<Value> {
            let Some(rt) = state.resource_type(GROUP, "v1", plural) else {
                return Vec::new();
            };
            let target = Target {
                rt,
                version: "v1".into(),
                namespace: None,
            };
            state.list(
                &target,
                &LabelSelector::default(),
                &FieldSelector::default(),
            )
        };
        Policy {
            roles: everything("roles"),
            cluster_roles: everything("clusterroles"),
            role_bindings: everything("rolebindings"),
            cluster_role_bindings: everything("clusterrolebindings"),
        }
    }

    fn named<'a>(objects: &'a [Value], namespace: Option<&str>, name: &str) -> Option<&'a Value> {
        objects.iter().find(|o| {
            o.pointer("/metadata/name").and_then(Value::as_str) == Some(name)
                && namespace.is_none_or(|ns| {
                    o.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns)
                })
        })
    }

    /// The rules the binding grants, if it applies to `user`.
    fn granted<'a>(&'a self, binding: &Value, user: &User) -> &'a [Value] {
        let namespace = binding
            .pointer("/metadata/namespace")
            .and_then(Value::as_str);
        let subjects = binding
            .get("subjects")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if !subjects
            .iter()
            .any(|s| subject_matches(s, namespace.unwrap_or_default(), user))
        {
            return &[];
        }
        let role_ref = |field: &str| {
            binding
                .pointer(&format!("/roleRef/{field}"))
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        let role = match (role_ref("kind"), namespace) {
            ("ClusterRole", _) => Self::named(&self.cluster_roles, None, role_ref("name")),
            ("Role", Some(ns)) => Self::named(&self.roles, Some(ns), role_ref("name")),
            _ => None,
        };
        role.and_then(|r| r.get("rules"))
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    fn allows(&self, user: &User, request: &Attributes) -> bool {
        let cluster = self
            .cluster_role_bindings
            .iter()
            .flat_map(|b| self.granted(b, user));
        let namespaced = self
            .role_bindings
            .iter()
            .filter(|b| {
                !request.namespace.is_empty()
                    && b.pointer("/metadata/namespace").and_then(Value::as_str)
                        == Some(request.namespace.as_str())
            })
            .flat_map(|b| self.granted(b, user));
        cluster
            .chain(namespaced)
            .any(|rule| rule_allows(rule, request))
    }
}

fn strings(value: &Value, field: &str) -> Vec<String> {
    value
        .get(field)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn subject_matches(subject: &Value, binding_namespace: &str, user: &User) -> bool {
    let field = |f: &str| subject.get(f).and_then(Value::as_str).unwrap_or_default();
    match field("kind") {
        "ServiceAccount" => {
            let namespace = match field("namespace") {
                "" => binding_namespace,
                ns => ns,
            };
            user.name == format!("{SERVICE_ACCOUNT_PREFIX}{namespace}:{}", field("name"))
        }
        "User" => user.name == field("name"),
        "Group" => user.groups.iter().any(|g| g == field("name")),
        _ => false,
    }
}

/// Whether one PolicyRule covers the request (the authorizer's RuleAllows).
pub fn rule_allows(rule: &Value, request: &Attributes) -> bool {
    let any_or = |values: &[String], wanted: &str| values.iter().any(|v| v == "*" || v == wanted);
    let verbs = strings(rule, "verbs");
    let groups = strings(rule, "apiGroups");
    let resources = strings(rule, "resources");
    let names = strings(rule, "resourceNames");
    let combined = if request.subresource.is_empty() {
        request.resource.clone()
    } else {
        format!("{}/{}", request.resource, request.subresource)
    };
    let resource_matches = resources.iter().any(|r| {
        r == "*"
            || *r == combined
            || (!request.subresource.is_empty()
                && r.strip_prefix("*/") == Some(request.subresource.as_str()))
    });
    any_or(&verbs, request.verb)
        && any_or(&groups, &request.group)
        && resource_matches
        && (names.is_empty() || (!request.name.is_empty() && names.contains(&request.name)))
}

/// Authorizes a request when it impersonates; `Ok` for everyone else (an administrator) and
/// for discovery and health paths.
pub fn authorize(
    state: &State,
    method: &Method,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    route: &Route<'_>,
) -> Result<(), ApiError> {
    let Some(user) = User::impersonated(headers)? else {
        return Ok(());
    };
    let Route::Resource(path) = route else {
        return Ok(());
    };
    if user.groups.iter().any(|g| g == "system:masters") {
        return Ok(());
    }
    let policy = Policy::load(state);
    let request = Attributes::of(method, path, params);
    if !policy.allows(&user, &request) {
        return Err(request.forbidden(&user));
    }
    // A server-side apply that creates the object needs `create` as well.
    let applying = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/apply-patch"));
    if request.verb == "patch" && applying && !exists(state, path) {
        let create = Attributes {
            verb: "create",
            ..request
        };
        if !policy.allows(&user, &create) {
            return Err(create.forbidden(&user));
        }
    }
    Ok(())
}

fn exists(state: &State, path: &ResourcePath<'_>) -> bool {
    let (Some(name), Some(rt)) = (
        path.name,
        state.resource_type(path.group, path.version, path.plural),
    ) else {
        return false;
    };
    let target = Target {
        rt,
        version: path.version.to_owned(),
        namespace: path.namespace.map(str::to_owned),
    };
    state.get(&target, name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(verb: &'static str, resource: &str, sub: &str, ns: &str, name: &str) -> Attributes {
        Attributes {
            verb,
            group: if resource == "deployments" {
                "apps".into()
            } else {
                String::new()
            },
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn rules_match_verbs_groups_resources_subresources_and_names() {
        let rule =
            json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]});
        assert!(rule_allows(
            &rule,
            &request("get", "configmaps", "", "a", "x")
        ));
        assert!(!rule_allows(
            &rule,
            &request("delete", "configmaps", "", "a", "x")
        ));
        assert!(!rule_allows(
            &rule,
            &request("get", "secrets", "", "a", "x")
        ));
        let apps = json!({"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["*"]});
        assert!(rule_allows(
            &apps,
            &request("patch", "deployments", "", "a", "d")
        ));
        assert!(
            !rule_allows(&apps, &request("patch", "deployments", "status", "a", "d")),
            "a resource does not cover its subresources"
        );
        let status = json!({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["patch"]});
        assert!(rule_allows(
            &status,
            &request("patch", "deployments", "status", "a", "d")
        ));
        assert!(!rule_allows(
            &status,
            &request("patch", "deployments", "", "a", "d")
        ));
        let everything = json!({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]});
        assert!(rule_allows(
            &everything,
            &request("update", "deployments", "status", "", "d")
        ));
        let named = json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["key"], "verbs": ["get", "update", "create", "list"]});
        assert!(rule_allows(
            &named,
            &request("get", "secrets", "", "a", "key")
        ));
        assert!(!rule_allows(
            &named,
            &request("get", "secrets", "", "a", "other")
        ));
        assert!(!rule_allows(
            &named,
            &request("create", "secrets", "", "a", "")
        ));
        assert!(!rule_allows(
            &named,
            &request("list", "secrets", "", "a", "")
        ));
    }

    #[test]
    fn impersonated_service_accounts_get_their_groups() {
        let mut headers = HeaderMap::new();
        assert_eq!(User::impersonated(&headers).ok(), Some(None));
        headers.insert(
            USER_HEADER,
            "system:serviceaccount:ns:sa"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        let user = User::impersonated(&headers).ok().flatten();
        assert_eq!(
            user.map(|u| u.groups),
            Some(vec![
                "system:serviceaccounts".to_owned(),
                "system:serviceaccounts:ns".to_owned(),
                "system:authenticated".to_owned()
            ])
        );
        headers.insert(
            GROUP_HEADER,
            "team".parse().unwrap_or_else(|_| unreachable!()),
        );
        let user = User::impersonated(&headers).ok().flatten();
        assert_eq!(
            user.map(|u| u.groups),
            Some(vec!["team".to_owned(), "system:authenticated".to_owned()])
        );
        headers.remove(USER_HEADER);
        assert!(
            User::impersonated(&headers).is_err(),
            "groups without a user"
        );
    }

    #[test]
    fn the_forbidden_message_is_the_apiservers() {
        let user = User {
            name: "system:serviceaccount:ns:sa".into(),
            groups: Vec::new(),
        };
        assert_eq!(
            request("list", "configmaps", "", "x", "")
                .forbidden(&user)
                .message,
            "configmaps is forbidden: User \"system:serviceaccount:ns:sa\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"x\""
        );
        assert_eq!(
            request("get", "deployments", "status", "", "d")
                .forbidden(&user)
                .message,
            "deployments.apps \"d\" is forbidden: User \"system:serviceaccount:ns:sa\" cannot get resource \"deployments/status\" in API group \"apps\" at the cluster scope"
        );
    }
}
