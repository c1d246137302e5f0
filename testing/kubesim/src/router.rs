//! The HTTP surface: URL parsing, query parameters, content negotiation, and the mapping of
//! each verb onto the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use serde_json::{Value, json};

use crate::resources;
use crate::selectors::{FieldSelector, LabelSelector, extra_field_labels};
use crate::status::ApiError;
use crate::store::{DeleteOptions, Deleted, PatchType, Propagation, Store, Target};
use crate::watch::{self, WatchRequest};

const AGGREGATED_DISCOVERY: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

pub fn router(store: Arc<Store>) -> Router {
    Router::new().fallback(handle).with_state(store)
}

/// A resource URL, split into its parts.
#[derive(Debug, PartialEq)]
pub(crate) struct ResourcePath<'a> {
    pub(crate) group: &'a str,
    pub(crate) version: &'a str,
    pub(crate) namespace: Option<&'a str>,
    pub(crate) plural: &'a str,
    pub(crate) name: Option<&'a str>,
    pub(crate) subresource: Option<&'a str>,
}

#[derive(Debug, PartialEq)]
pub(crate) enum Route<'a> {
    Health,
    Version,
    CoreVersions,
    Groups,
    Group(&'a str),
    Resources { group: &'a str, version: &'a str },
    Resource(ResourcePath<'a>),
}

fn parse_route(path: &str) -> Option<Route<'_>> {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segments.as_slice() {
        ["healthz" | "livez" | "readyz", ..] => return Some(Route::Health),
        ["version"] => return Some(Route::Version),
        ["api"] => return Some(Route::CoreVersions),
        ["apis"] => return Some(Route::Groups),
        ["apis", group] => return Some(Route::Group(group)),
        ["api", version] => return Some(Route::Resources { group: "", version }),
        ["apis", group, version] => return Some(Route::Resources { group, version }),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", _, "status" | "finalize"] => (None, rest),
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => (Some(*namespace), rest),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    Some(Route::Resource(ResourcePath {
        group,
        version,
        namespace,
        plural,
        name,
        subresource,
    }))
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn ok(body: &Value) -> Response {
    json_response(StatusCode::OK, body)
}

/// Query parameters; a repeated key keeps its last value.
fn query_params(uri: &Uri) -> HashMap<String, String> {
    let query = uri.query().unwrap_or_default();
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn flag(params: &HashMap<String, String>, name: &str) -> bool {
    params.get(name).is_some_and(|v| v == "true" || v == "1")
}

fn accepts(headers: &HeaderMap, needle: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(needle))
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_ascii_lowercase()
}

/// The field manager of a non-apply write: the `fieldManager` parameter, else the user agent's
/// product name (as the apiserver derives it), else `unknown`.
fn manager_for_update(params: &HashMap<String, String>, headers: &HeaderMap) -> String {
    if let Some(m) = params.get("fieldManager").filter(|m| !m.is_empty()) {
        return m.clone();
    }
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|m| !m.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .or_else(|_| serde_yaml::from_slice(body))
        .map_err(|e| {
            ApiError::bad_request(format!("the request body could not be decoded: {e}"))
        })?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::bad_request("the request body must be an object"))
    }
}

async fn handle(
    State(store): State<Arc<Store>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    tracing::debug!(%method, %uri, "request");
    let response = match parse_route(uri.path()) {
        Some(route) => {
            if let Route::Resource(path) = &route {
                let verb = verb(&method, path, &uri);
                store.requests().record(verb, path.plural, path.subresource);
            }
            let authorized = {
                let state = store.lock();
                crate::rbac::authorize(&state, &method, &headers, &query_params(&uri), &route)
            };
            authorized.and_then(|()| dispatch(&store, &method, &uri, &headers, &body, route))
        }
        None => Err(ApiError::no_such_route()),
    };
    response.unwrap_or_else(|err| {
        tracing::debug!(%method, %uri, %err, "failed");
        err.into_response()
    })
}

/// The Kubernetes verb of a resource request, as RBAC and audit logs name it.
fn verb(method: &Method, path: &ResourcePath<'_>, uri: &Uri) -> &'static str {
    match (method.as_str(), path.name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if flag(&query_params(uri), "watch") => "watch",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        _ => "other",
    }
}

fn dispatch(
    store: &Arc<Store>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    route: Route<'_>,
) -> Result<Response, ApiError> {
    let discovery = |value: Option<Value>| -> Result<Response, ApiError> {
        if *method != Method::GET {
            return Err(ApiError::method_not_allowed("discovery is read-only"));
        }
        value.map(|v| ok(&v)).ok_or_else(ApiError::no_such_route)
    };
    let aggregated = accepts(headers, "as=APIGroupDiscoveryList");
    match route {
        Route::Health => Ok((StatusCode::OK, "ok").into_response()),
        Route::Version => discovery(Some(resources::version_info())),
        Route::CoreVersions | Route::Groups if aggregated && *method == Method::GET => {
            let types = store.lock().resource_types();
            let value = resources::aggregated(&types, route == Route::CoreVersions);
            let mut response = ok(&value);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(AGGREGATED_DISCOVERY),
            );
            Ok(response)
        }
        Route::CoreVersions => discovery(Some(resources::core_versions())),
        Route::Groups => discovery(Some(resources::group_list(&store.lock().resource_types()))),
        Route::Group(group) => discovery(resources::group(&store.lock().resource_types(), group)),
        Route::Resources { group, version } => discovery(resources::resource_list(
            &store.lock().resource_types(),
            group,
            version,
        )),
        Route::Resource(path) => resource_request(store, method, uri, headers, body, path),
    }
}

fn resource_request(
    store: &Arc<Store>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    path: ResourcePath<'_>,
) -> Result<Response, ApiError> {
    let rt = store
        .lock()
        .resource_type(path.group, path.version, path.plural)
        .ok_or_else(ApiError::no_such_route)?;
    // A namespace in the URL of a cluster-scoped kind, or a namespaced object named without one.
    let wrong_scope = matches!(
        (rt.namespaced, path.namespace, path.name),
        (false, Some(_), _) | (true, None, Some(_))
    );
    let subresource = match path.subresource {
        None => "",
        Some("status") if rt.status_subresource => "status",
        Some(_) => return Err(ApiError::no_such_route()),
    };
    if wrong_scope {
        return Err(ApiError::no_such_route());
    }
    let target = Target {
        version: path.version.to_string(),
        namespace: path.namespace.map(String::from),
        rt,
    };
    let params = query_params(uri);
    let dry_run = params.get("dryRun").is_some_and(|v| v == "All");
    let metadata_only = accepts(headers, "as=PartialObjectMetadata");
    let render = |object: Value| {
        if metadata_only {
            watch::as_partial_metadata(&object)
        } else {
            object
        }
    };

    match (method.clone(), path.name) {
        (Method::GET, None) if flag(&params, "watch") => {
            watch_response(store, target, &params, metadata_only)
        }
        (Method::GET, None) => {
            let (labels, fields) = selectors(&target, &params)?;
            let state = store.lock();
            let items: Vec<Value> = state
                .list(&target, &labels, &fields)
                .into_iter()
                .map(render)
                .collect();
            Ok(ok(&list_document(
                &target,
                items,
                state.resource_version(),
                metadata_only,
            )))
        }
        (Method::GET, Some(name)) => Ok(ok(&render(store.lock().get(&target, name)?))),
        (Method::POST, None) => {
            if target.rt.namespaced && target.namespace.is_none() {
                return Err(ApiError::method_not_allowed(format!(
                    "{} must be created in a namespace",
                    target.rt.plural
                )));
            }
            let manager = manager_for_update(&params, headers);
            let object =
                store.with_state(|s| s.create(&target, parse_body(body)?, &manager, dry_run))?;
            Ok(json_response(StatusCode::CREATED, &object))
        }
        (Method::PUT, Some(name)) => {
            let manager = manager_for_update(&params, headers);
            let object = store.with_state(|s| {
                s.replace(
                    &target,
                    name,
                    parse_body(body)?,
                    &manager,
                    subresource,
                    dry_run,
                )
            })?;
            Ok(ok(&object))
        }
        (Method::PATCH, Some(name)) => {
            let patch_type = match content_type(headers)
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
            {
                "application/merge-patch+json" => PatchType::Merge,
                "application/json-patch+json" => PatchType::Json,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/apply-patch+yaml" | "application/apply-patch+json" => {
                    PatchType::Apply {
                        force: flag(&params, "force"),
                    }
                }
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            if params.contains_key("force") && !matches!(patch_type, PatchType::Apply { .. }) {
                return Err(ApiError::invalid(
                    "PatchOptions.meta.k8s.io",
                    "meta.k8s.io",
                    "",
                    vec![crate::status::Cause {
                        reason: "FieldValueForbidden",
                        message: "Forbidden: may not be specified for non-apply patch".into(),
                        field: "force".into(),
                    }],
                ));
            }
            let manager = match patch_type {
                PatchType::Apply { .. } => params
                    .get("fieldManager")
                    .filter(|m| !m.is_empty())
                    .cloned(),
                _ => Some(manager_for_update(&params, headers)),
            };
            let (object, created) = store.with_state(|s| {
                s.patch(
                    &target,
                    name,
                    patch_type,
                    body,
                    manager.as_deref(),
                    subresource,
                    dry_run,
                )
            })?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(status, &object))
        }
        (Method::DELETE, Some(name)) => {
            if !subresource.is_empty() {
                return Err(ApiError::method_not_allowed(
                    "the status subresource cannot be deleted",
                ));
            }
            let options = delete_options(&params, body)?;
            match store.with_state(|s| s.delete(&target, name, &options))? {
                Deleted::Pending(object) => Ok(ok(&object)),
                Deleted::Gone(object) if target.rt.custom.is_some() => Ok(ok(&object)),
                Deleted::Gone(object) => Ok(ok(&json!({
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {
                        "name": name,
                        "group": target.rt.group,
                        "kind": target.rt.plural,
                        "uid": object.pointer("/metadata/uid").cloned().unwrap_or(Value::Null),
                    },
                }))),
            }
        }
        (Method::DELETE, None) => {
            let (labels, fields) = selectors(&target, &params)?;
            let options = delete_options(&params, body)?;
            let deleted = store.with_state(|s| -> Result<Vec<Value>, ApiError> {
                let names: Vec<String> = s
                    .list(&target, &labels, &fields)
                    .iter()
                    .filter_map(|o| o.pointer("/metadata/name")?.as_str().map(String::from))
                    .collect();
                let mut deleted = Vec::new();
                for name in names {
                    let scoped = Target {
                        namespace: target.namespace.clone(),
                        ..target.clone()
                    };
                    match s.delete(&scoped, &name, &options) {
                        Ok(Deleted::Gone(o) | Deleted::Pending(o)) => deleted.push(o),
                        Err(err) if err.code == 404 => {}
                        Err(err) => return Err(err),
                    }
                }
                Ok(deleted)
            })?;
            let rv = store.lock().resource_version();
            Ok(ok(&list_document(&target, deleted, rv, false)))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on this path"
        ))),
    }
}

fn list_document(target: &Target, items: Vec<Value>, rv: u64, metadata_only: bool) -> Value {
    let (kind, api_version) = if metadata_only {
        (
            "PartialObjectMetadataList".to_string(),
            "meta.k8s.io/v1".to_string(),
        )
    } else {
        (
            format!("{}List", target.rt.kind),
            target.rt.api_version(&target.version),
        )
    };
    json!({
        "kind": kind,
        "apiVersion": api_version,
        "metadata": { "resourceVersion": rv.to_string() },
        "items": items,
    })
}

fn selectors(
    target: &Target,
    params: &HashMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(
        params
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )
    .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(
        params
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )
    .map_err(ApiError::bad_request)?;
    let extra = extra_field_labels(&target.rt.group, &target.rt.plural);
    if let Some(unsupported) = fields
        .fields()
        .find(|f| !matches!(*f, "metadata.name" | "metadata.namespace") && !extra.contains(f))
    {
        return Err(ApiError::bad_request(format!(
            "field label not supported: {unsupported}"
        )));
    }
    Ok((labels, fields))
}

fn watch_response(
    store: &Arc<Store>,
    target: Target,
    params: &HashMap<String, String>,
    metadata_only: bool,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(&target, params)?;
    let timeout = match params.get("timeoutSeconds") {
        Some(t) => t
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {t:?}")))?,
        None => 1800,
    };
    let request = WatchRequest {
        target,
        labels,
        fields,
        resource_version: params.get("resourceVersion").cloned(),
        timeout: Duration::from_secs(timeout),
        bookmarks: flag(params, "allowWatchBookmarks"),
        send_initial_events: flag(params, "sendInitialEvents"),
        metadata_only,
    };
    let stream = watch::stream(store.clone(), request)?;
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

fn delete_options(
    params: &HashMap<String, String>,
    body: &[u8],
) -> Result<DeleteOptions, ApiError> {
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    let policy = params
        .get("propagationPolicy")
        .map(String::as_str)
        .or_else(|| body.get("propagationPolicy").and_then(Value::as_str))
        .or_else(
            || match body.get("orphanDependents").and_then(Value::as_bool) {
                Some(true) => Some("Orphan"),
                _ => None,
            },
        );
    let propagation = match policy {
        None | Some("Background") => Propagation::Background,
        Some("Foreground") => Propagation::Foreground,
        Some("Orphan") => Propagation::Orphan,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\""
            )));
        }
    };
    let dry_run = params.get("dryRun").is_some_and(|v| v == "All")
        || body
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|d| d.iter().any(|v| v == "All"));
    let precondition = |field: &str| {
        body.pointer(&format!("/preconditions/{field}"))
            .and_then(Value::as_str)
            .map(String::from)
    };
    Ok(DeleteOptions {
        propagation,
        precondition_uid: precondition("uid"),
        precondition_rv: precondition("resourceVersion"),
        dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource<'a>(
        group: &'a str,
        namespace: Option<&'a str>,
        plural: &'a str,
        name: Option<&'a str>,
        subresource: Option<&'a str>,
    ) -> Option<Route<'a>> {
        Some(Route::Resource(ResourcePath {
            group,
            version: "v1",
            namespace,
            plural,
            name,
            subresource,
        }))
    }

    #[test]
    fn routes() {
        assert_eq!(parse_route("/api"), Some(Route::CoreVersions));
        assert_eq!(parse_route("/apis/apps"), Some(Route::Group("apps")));
        assert_eq!(
            parse_route("/apis/apps/v1"),
            Some(Route::Resources {
                group: "apps",
                version: "v1"
            })
        );
        assert_eq!(
            parse_route("/api/v1/namespaces"),
            resource("", None, "namespaces", None, None)
        );
        assert_eq!(
            parse_route("/api/v1/namespaces/a"),
            resource("", None, "namespaces", Some("a"), None)
        );
        assert_eq!(
            parse_route("/api/v1/namespaces/a/status"),
            resource("", None, "namespaces", Some("a"), Some("status"))
        );
        assert_eq!(
            parse_route("/api/v1/namespaces/a/configmaps"),
            resource("", Some("a"), "configmaps", None, None)
        );
        assert_eq!(
            parse_route("/apis/apps/v1/namespaces/a/deployments/d/status"),
            resource("apps", Some("a"), "deployments", Some("d"), Some("status"))
        );
        assert_eq!(
            parse_route("/apis/apps/v1/deployments"),
            resource("apps", None, "deployments", None, None)
        );
        assert_eq!(parse_route("/nope"), None);
        assert_eq!(parse_route("/api/v1/namespaces/a/configmaps/b/c/d"), None);
    }

    #[test]
    fn query_decoding() {
        let uri: Uri = "/x?&labelSelector=env+in+%28a%2Cb%29&watch=1&watch=true"
            .parse()
            .expect("uri");
        let params = query_params(&uri);
        assert_eq!(params["labelSelector"], "env in (a,b)");
        assert!(flag(&params, "watch"));
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
