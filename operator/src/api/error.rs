//! The one error type of the agent API: every failure is a JSON `{error, message}`
//! with the matching status code; 5xx bodies say nothing internal.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use brokkr_crds::wire;
use tracing::error;

use crate::controllers::error_chain;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    /// 401 `key_expired`: the key is past its `expires_at`.
    #[error("{0}")]
    KeyExpired(String),
    /// 401 `key_revoked`: the key's `revoked_at` has passed.
    #[error("{0}")]
    KeyRevoked(String),
    #[error("{0}")]
    Forbidden(String),
    /// 403 `generator_suspended`: the generator's `spec.suspend` is true.
    #[error("{0}")]
    GeneratorSuspended(String),
    /// 403 `insufficient_scope`: the key may not call this API.
    #[error("{0}")]
    InsufficientScope(String),
    #[error("{0}")]
    NotFound(String),
    /// 409 `conflict`: another field manager owns a field the request sets.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("request body is larger than the {0} bytes allowed")]
    TooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unprocessable(String),
    /// 501: this hub cannot do what was asked (e.g. rotate keys without a Kubernetes client).
    #[error("{0}")]
    NotImplemented(String),
    #[error("the request took too long")]
    Timeout,
    /// Answered 429 with `Retry-After`.
    #[error("{message}; retry after {retry_after_seconds} s")]
    TooManyRequests {
        message: String,
        retry_after_seconds: u64,
    },
    #[error("the hub cannot serve this request right now; retry later")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    /// The `error` code of the JSON body.
    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::KeyExpired(_) => (StatusCode::UNAUTHORIZED, "key_expired"),
            ApiError::KeyRevoked(_) => (StatusCode::UNAUTHORIZED, "key_revoked"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::InsufficientScope(_) => (StatusCode::FORBIDDEN, "insufficient_scope"),
            ApiError::GeneratorSuspended(_) => (StatusCode::FORBIDDEN, "generator_suspended"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
            ApiError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
            ApiError::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::TooManyRequests { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_requests")
            }
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Unavailable(source) = &self {
            error!(error = %error_chain(source.as_ref()), "agent API request failed");
        }
        let body = wire::ApiError {
            error: code.to_owned(),
            message: self.to_string(),
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::TooManyRequests {
            retry_after_seconds,
            ..
        } = self
        {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_seconds));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        match err {
            StoreError::TooLong { .. } => ApiError::Unprocessable(err.to_string()),
            StoreError::NotTargeted { .. } => ApiError::Unprocessable(err.to_string()),
            StoreError::NotFound { .. } => ApiError::NotFound(err.to_string()),
            other => ApiError::Unavailable(Box::new(other)),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                "expected a request body with Content-Type: application/json".into(),
            ),
            JsonRejection::JsonSyntaxError(err) => {
                ApiError::BadRequest(format!("malformed JSON: {}", err.body_text()))
            }
            JsonRejection::JsonDataError(err) => ApiError::Unprocessable(err.body_text()),
            JsonRejection::BytesRejection(err) if err.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::TooLarge(super::BODY_LIMIT)
            }
            other => ApiError::BadRequest(other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::BadRequest(rejection.body_text())
    }
}
