//! Failures as the API server reports them: `meta/v1` `Status` objects with the real
//! `reason`s and codes, because product code matches on `ErrorResponse { code, reason }`.

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One entry of `details.causes`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    pub reason: &'static str,
    pub message: String,
    pub field: String,
}

/// A failed request, rendered as a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

/// How a resource is named in messages and `details`: `configmaps`, `deployments.apps`.
#[derive(Debug, Clone, Copy)]
pub struct ResourceRef<'a> {
    pub group: &'a str,
    pub plural: &'a str,
}

impl ResourceRef<'_> {
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn details(&self, name: &str) -> Value {
        let mut details = json!({ "name": name, "kind": self.plural });
        if !self.group.is_empty() {
            details["group"] = json!(self.group);
        }
        details
    }
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// What the API server makes of an error that is not a `Status`: 500 with no reason.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/merge-patch+json, application/json-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {content_type:?})"
            ),
        )
    }

    /// The 404 for a path that names no known resource (not an object lookup).
    pub fn no_such_route() -> Self {
        let mut err = Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
        err.details = Some(json!({
            "causes": [{ "reason": "UnexpectedServerResponse", "message": "404 page not found" }]
        }));
        err
    }

    pub fn not_found(resource: ResourceRef<'_>, name: &str) -> Self {
        let mut err = Self::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", resource.qualified()),
        );
        err.details = Some(resource.details(name));
        err
    }

    pub fn already_exists(resource: ResourceRef<'_>, name: &str) -> Self {
        let mut err = Self::new(
            409,
            "AlreadyExists",
            format!("{} {name:?} already exists", resource.qualified()),
        );
        err.details = Some(resource.details(name));
        err
    }

    /// Optimistic-concurrency failure: the caller's `resourceVersion` is stale.
    pub fn stale(resource: ResourceRef<'_>, name: &str) -> Self {
        let mut err = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                resource.qualified()
            ),
        );
        err.details = Some(resource.details(name));
        err
    }

    /// A precondition (uid or resourceVersion in DeleteOptions) did not hold.
    pub fn precondition_failed(resource: ResourceRef<'_>, name: &str, what: String) -> Self {
        let mut err = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: {what}",
                resource.qualified()
            ),
        );
        err.details = Some(resource.details(name));
        err
    }

    /// Server-side apply conflicts; `message` and `causes` follow the apiserver's format.
    pub fn apply_conflict(message: String, causes: Vec<Cause>) -> Self {
        let mut err = Self::new(409, "Conflict", message);
        err.details = Some(json!({ "causes": causes_json(&causes) }));
        err
    }

    /// 422 Invalid. `kind` is e.g. `ConfigMap`, `Deployment.apps`, `Widget.example.com`.
    pub fn invalid(kind: &str, group: &str, name: &str, causes: Vec<Cause>) -> Self {
        let rendered: Vec<String> = causes
            .iter()
            .map(|c| {
                if c.field.is_empty() {
                    c.message.clone()
                } else {
                    format!("{}: {}", c.field, c.message)
                }
            })
            .collect();
        let summary = match rendered.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let bare_kind = kind.split('.').next().unwrap_or(kind);
        let mut details =
            json!({ "name": name, "kind": bare_kind, "causes": causes_json(&causes) });
        if !group.is_empty() {
            details["group"] = json!(group);
        }
        ApiError {
            code: 422,
            reason: "Invalid",
            message: format!("{kind} {name:?} is invalid: {summary}"),
            details: Some(details),
        }
    }

    /// What a watch sends (as an ERROR event) when asked to start before the retained history.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if self.reason.is_empty() {
            // `reason` is omitted when empty, as Go's `omitempty` does.
            if let Some(fields) = status.as_object_mut() {
                fields.remove("reason");
            }
        }
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

fn causes_json(causes: &[Cause]) -> Value {
    Value::Array(
        causes
            .iter()
            .map(|c| json!({ "reason": c.reason, "message": c.message, "field": c.field }))
            .collect(),
    )
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = http::StatusCode::from_u16(self.code)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        (code, axum::Json(self.to_status())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_the_group_qualified_resource() {
        let err = ApiError::not_found(
            ResourceRef {
                group: "apps",
                plural: "deployments",
            },
            "web",
        );
        assert_eq!(err.message, r#"deployments.apps "web" not found"#);
        let status = err.to_status();
        assert_eq!(status["reason"], "NotFound");
        assert_eq!(status["code"], 404);
        assert_eq!(status["details"]["group"], "apps");
    }

    #[test]
    fn invalid_lists_several_causes_in_brackets() {
        let cause = |field: &str| Cause {
            reason: "FieldValueRequired",
            message: "Required value".into(),
            field: field.into(),
        };
        let err = ApiError::invalid(
            "Widget.example.com",
            "example.com",
            "w",
            vec![cause("spec.a"), cause("spec.b")],
        );
        assert_eq!(
            err.message,
            r#"Widget.example.com "w" is invalid: [spec.a: Required value, spec.b: Required value]"#
        );
        assert_eq!(err.to_status()["details"]["kind"], "Widget");
    }
}
