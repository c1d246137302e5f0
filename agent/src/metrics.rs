//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::hub::Endpoint;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

/// The agent's metrics and readiness.
pub struct Metrics {
    registry: Registry,
    /// Objects applied successfully (server-side apply calls that succeeded).
    pub applies: Counter,
    /// Objects that failed to apply.
    pub apply_failures: Counter,
    /// Objects deleted by pruning, stack deletion or orphan cleanup.
    pub prune_deletes: Counter,
    /// Unix time of the last sync pass in which every stack applied without failure.
    pub last_successful_sync: Gauge<f64, AtomicU64>,
    /// Failed hub requests, by endpoint.
    pub hub_request_errors: Family<EndpointLabels, Counter>,
    /// Events waiting to be delivered to the hub.
    pub events_pending: Gauge,
    /// Applied objects that drifted and were not put back (`driftPolicy: Detect`).
    pub drifted_objects: Gauge,
    /// Drift episodes reported (corrected or not).
    pub drift_episodes: Counter,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("brokkr_agent");
        let applies = Counter::default();
        let apply_failures = Counter::default();
        let prune_deletes = Counter::default();
        let last_successful_sync = Gauge::<f64, AtomicU64>::default();
        let hub_request_errors = Family::<EndpointLabels, Counter>::default();
        let events_pending = Gauge::default();
        let drifted_objects = Gauge::default();
        let drift_episodes = Counter::default();
        registry.register(
            "drifted_objects",
            "Applied objects that drifted and were not put back (driftPolicy: Detect)",
            drifted_objects.clone(),
        );
        registry.register(
            "drift_episodes",
            "Drift episodes reported, corrected or not",
            drift_episodes.clone(),
        );
        registry.register(
            "applies",
            "Objects applied with server-side apply",
            applies.clone(),
        );
        registry.register(
            "apply_failures",
            "Objects that failed to apply",
            apply_failures.clone(),
        );
        registry.register(
            "prune_deletes",
            "Objects deleted because their stack no longer holds them or was removed",
            prune_deletes.clone(),
        );
        registry.register(
            "last_successful_sync_timestamp_seconds",
            "Unix time of the last sync in which every stack applied without failure",
            last_successful_sync.clone(),
        );
        registry.register(
            "hub_request_errors",
            "Failed requests to the hub, by endpoint",
            hub_request_errors.clone(),
        );
        registry.register(
            "events_pending",
            "Events waiting to be delivered to the hub",
            events_pending.clone(),
        );
        Metrics {
            registry,
            applies,
            apply_failures,
            prune_deletes,
            last_successful_sync,
            hub_request_errors,
            events_pending,
            drifted_objects,
            drift_episodes,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn hub_error(&self, endpoint: Endpoint) {
        self.hub_request_errors
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.as_str().to_owned(),
            })
            .inc();
    }

    pub fn hub_errors(&self, endpoint: Endpoint) -> u64 {
        self.hub_request_errors
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.as_str().to_owned(),
            })
            .get()
    }

    /// Ready once a desired state was fetched from the hub.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// `/metrics`, `/healthz` (the process serves) and `/readyz` (a desired state was fetched).
pub fn app(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
        .into_response()
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> Response {
    if metrics.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no desired state fetched from the hub yet",
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn get_path(app: Router, path: &str) -> (StatusCode, String) {
        let response = app
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readiness_follows_the_first_desired_state() {
        let metrics = Arc::new(Metrics::default());
        assert_eq!(
            get_path(app(metrics.clone()), "/healthz").await.0,
            StatusCode::OK
        );
        assert_eq!(
            get_path(app(metrics.clone()), "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        metrics.set_ready();
        assert_eq!(get_path(app(metrics), "/readyz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_are_exposed_in_prometheus_text() {
        let metrics = Arc::new(Metrics::default());
        metrics.applies.inc_by(3);
        metrics.prune_deletes.inc();
        metrics.hub_error(Endpoint::Desired);
        metrics.last_successful_sync.set(1_700_000_000.0);
        let (status, text) = get_path(app(metrics), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        for line in [
            "brokkr_agent_applies_total 3",
            "brokkr_agent_apply_failures_total 0",
            "brokkr_agent_prune_deletes_total 1",
            "brokkr_agent_hub_request_errors_total{endpoint=\"desired\"} 1",
            "brokkr_agent_last_successful_sync_timestamp_seconds 1700000000.0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
