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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub controller: &'static str,
    /// The error's category, the same word as the Warning Event's reason.
    pub category: &'static str,
}

/// Cheap to clone; every clone records into the same registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Family<ControllerLabels, Counter>,
    reconcile_failures: Family<FailureLabels, Counter>,
    reconcile_seconds: Family<ControllerLabels, Histogram>,
    pub leader: Gauge,
    pub api: ApiMetrics,
    /// How current this replica's cached desired state is kept.
    pub feed: FeedMetrics,
    /// Large shrinks of a stack's target set recomputed from the API server first.
    pub target_shrinks_confirmed: Counter,
    /// The fleet as the leader sees it, and alerting.
    pub fleet: FleetMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("brokkr_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let reconcile_failures = Family::<FailureLabels, Counter>::default();
        let reconcile_seconds = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let leader = Gauge::default();
        let target_shrinks_confirmed = Counter::default();
        registry.register(
            "target_shrinks_confirmed",
            "Steps removing more than half of a stack's targets, recomputed from the API server before being written",
            target_shrinks_confirmed.clone(),
        );
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
        let api = ApiMetrics::register(&mut registry);
        let feed = FeedMetrics::register(&mut registry);
        let fleet = FleetMetrics::register(&mut registry);
        Metrics {
            registry: Arc::new(registry),
            reconciles,
            reconcile_failures,
            reconcile_seconds,
            leader,
            api,
            feed,
            target_shrinks_confirmed,
            fleet,
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
    /// Counts the reconcile; `failure` is the category of the error that failed it.
    pub fn finish(self, failure: Option<&'static str>) {
        self.metrics.reconciles.get_or_create(&self.labels).inc();
        if let Some(category) = failure {
            self.metrics
                .reconcile_failures
                .get_or_create(&FailureLabels {
                    controller: self.labels.controller,
                    category,
                })
                .inc();
        }
        self.metrics
            .reconcile_seconds
            .get_or_create(&self.labels)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentStatusLabels {
    /// The Agent's `status.phase`.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StackConditionLabels {
    pub condition: &'static str,
    /// `True`, `False` or `Unknown` (no such condition yet).
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertRuleLabels {
    pub namespace: String,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// `delivered`, `failed` (retried) or `abandoned` (the retry window passed).
    pub result: &'static str,
    /// `webhook` or `slack`.
    pub channel_type: &'static str,
}

/// The fleet as the leader sees it (agents by status, stacks by condition, alerts firing)
/// and notification deliveries. Only the leader sets them; other replicas show zeros.
#[derive(Clone, Default)]
pub struct FleetMetrics {
    pub agents: Family<AgentStatusLabels, Gauge>,
    pub stacks: Family<StackConditionLabels, Gauge>,
    pub alerts_firing: Family<AlertRuleLabels, Gauge>,
    pub notification_deliveries: Family<DeliveryLabels, Counter>,
}

impl FleetMetrics {
    fn register(registry: &mut Registry) -> FleetMetrics {
        let fleet = FleetMetrics::default();
        registry.register(
            "agents",
            "Agents by status.phase (Pending, Online, Offline, Error, Suspended)",
            fleet.agents.clone(),
        );
        registry.register(
            "stacks",
            "Stacks by condition (Ready, Degraded, Applied, RolloutHalted) and its status",
            fleet.stacks.clone(),
        );
        registry.register(
            "alerts_firing",
            "Alerts firing now, by AlertRule",
            fleet.alerts_firing.clone(),
        );
        registry.register(
            "notification_deliveries",
            "Attempts to deliver alert notifications to channels, by result",
            fleet.notification_deliveries.clone(),
        );
        fleet
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    pub lookup: &'static str,
}

/// The agent API's serving limits: connections, timeouts, rate limits and key lookups.
#[derive(Clone, Default)]
pub struct ApiMetrics {
    /// Open connections of the agent API.
    pub connections: Gauge,
    /// Times the connection cap was reached, so new connections waited in the backlog.
    pub connection_cap_reached: Counter,
    /// Connections closed by the server: `header_timeout`, `idle_timeout`, `tls_handshake`.
    pub connections_closed: Family<ReasonLabels, Counter>,
    /// Requests answered 429: `key_rate` (one agent key over its rate), `unknown_keys`
    /// (too many lookups of unknown keys).
    pub requests_limited: Family<ReasonLabels, Counter>,
    /// Database lookups of key prefixes that were not cached: `found`, `unknown`.
    pub key_lookups: Family<ResultLabels, Counter>,
    /// Queries made for first-time lookups, each for a batch of them: `keys`,
    /// `desired_states`.
    pub lookup_queries: Family<LookupLabels, Counter>,
    /// Requests refused 401 from the cache of unknown key prefixes, without a query.
    pub unknown_keys_cached: Counter,
    /// Heartbeats PostgreSQL refused, dropped so that the rest of their batch is written.
    pub heartbeats_dropped: Counter,
}

impl ApiMetrics {
    fn register(registry: &mut Registry) -> ApiMetrics {
        let metrics = ApiMetrics::default();
        registry.register(
            "api_connections",
            "Open connections of the agent API",
            metrics.connections.clone(),
        );
        registry.register(
            "api_connection_cap_reached",
            "Times the agent API's connection cap was reached (new connections wait)",
            metrics.connection_cap_reached.clone(),
        );
        registry.register(
            "api_connections_closed",
            "Agent API connections closed by the hub, by reason",
            metrics.connections_closed.clone(),
        );
        registry.register(
            "api_requests_limited",
            "Agent API requests answered 429, by reason",
            metrics.requests_limited.clone(),
        );
        registry.register(
            "api_key_lookups",
            "Database lookups of agent key prefixes that were not cached, by result",
            metrics.key_lookups.clone(),
        );
        registry.register(
            "api_lookup_queries",
            "Queries for batches of first-time lookups (keys, desired states), by lookup",
            metrics.lookup_queries.clone(),
        );
        registry.register(
            "api_unknown_keys_cached",
            "Agent API requests refused as unknown keys from the cache, without a query",
            metrics.unknown_keys_cached.clone(),
        );
        registry.register(
            "api_heartbeats_dropped",
            "Heartbeats PostgreSQL refused, dropped so the rest of their batch is written",
            metrics.heartbeats_dropped.clone(),
        );
        metrics
    }

    pub fn requests_limited_because(&self, reason: &'static str) {
        self.requests_limited
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn connection_closed_because(&self, reason: &'static str) {
        self.connections_closed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The counter of `lookup`'s queries.
    pub fn lookup_queries_of(&self, lookup: &'static str) -> Counter {
        self.lookup_queries
            .get_or_create(&LookupLabels { lookup })
            .clone()
    }

    pub fn key_looked_up(&self, result: &'static str) {
        self.key_lookups
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

/// The change feed that keeps each replica's cached desired state current.
#[derive(Clone, Default)]
pub struct FeedMetrics {
    /// Notifications whose payload did not parse; they are ignored.
    pub notifications_ignored: Counter,
    /// LISTEN connections replaced (lost, or failing their periodic check); every cached
    /// view is dropped then, since notifications may have been missed.
    pub listener_reconnects: Counter,
    /// Cached views compared with PostgreSQL by the periodic re-validation.
    pub views_revalidated: Counter,
    /// Cached views the re-validation found stale and replaced (a missed notification).
    pub stale_views_corrected: Counter,
}

impl FeedMetrics {
    fn register(registry: &mut Registry) -> FeedMetrics {
        let metrics = FeedMetrics::default();
        registry.register(
            "feed_notifications_ignored",
            "Desired-state notifications ignored because their payload did not parse",
            metrics.notifications_ignored.clone(),
        );
        registry.register(
            "feed_listener_reconnects",
            "LISTEN connections replaced after being lost or failing their periodic check",
            metrics.listener_reconnects.clone(),
        );
        registry.register(
            "feed_views_revalidated",
            "Cached desired-state views compared with PostgreSQL by the periodic re-validation",
            metrics.views_revalidated.clone(),
        );
        registry.register(
            "feed_stale_views_corrected",
            "Cached desired-state views found stale by the periodic re-validation and replaced",
            metrics.stale_views_corrected.clone(),
        );
        metrics
    }
}
