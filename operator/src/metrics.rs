//! Prometheus metrics of the hub, served at `/metrics`.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

/// Cheap to clone; every clone records into the same registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Family<ControllerLabels, Counter>,
    reconcile_failures: Family<ControllerLabels, Counter>,
    reconcile_seconds: Family<ControllerLabels, Histogram>,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("brokkr_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let reconcile_failures = Family::<ControllerLabels, Counter>::default();
        let reconcile_seconds = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed",
            reconcile_failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles take",
            reconcile_seconds.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the controllers' leader lease",
            leader.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            reconciles,
            reconcile_failures,
            reconcile_seconds,
            leader,
        }
    }
}

impl Metrics {
    pub fn reconcile_started(&self, controller: &'static str) -> ReconcileTimer {
        ReconcileTimer {
            metrics: self.clone(),
            labels: ControllerLabels { controller },
            started: Instant::now(),
        }
    }

    /// The registry in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

pub struct ReconcileTimer {
    metrics: Metrics,
    labels: ControllerLabels,
    started: Instant,
}

impl ReconcileTimer {
    pub fn finish(self, succeeded: bool) {
        self.metrics.reconciles.get_or_create(&self.labels).inc();
        if !succeeded {
            self.metrics
                .reconcile_failures
                .get_or_create(&self.labels)
                .inc();
        }
        self.metrics
            .reconcile_seconds
            .get_or_create(&self.labels)
            .observe(self.started.elapsed().as_secs_f64());
    }
}
