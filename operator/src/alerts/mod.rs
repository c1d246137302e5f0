//! Alerting: AlertRules are evaluated against the Agents and Stacks the leader watches,
//! firing and resolved episodes are kept in PostgreSQL (`alerts`), and their
//! notifications (`alert_notifications`) are delivered to NotificationChannels.

pub mod channels;
pub mod deliver;
pub mod evaluate;

use std::time::Duration;

/// How the leader evaluates AlertRules and delivers their notifications.
#[derive(Clone, Debug)]
pub struct AlertingConfig {
    /// How often every AlertRule is evaluated. An alert fires at most this long after its
    /// condition has held for its `for`.
    pub evaluate_every: Duration,
    /// How long resolved alerts are kept in the database.
    pub resolved_retention: Duration,
    pub delivery: deliver::DeliveryConfig,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        AlertingConfig {
            evaluate_every: Duration::from_secs(5),
            resolved_retention: Duration::from_secs(30 * 24 * 3600),
            delivery: deliver::DeliveryConfig::default(),
        }
    }
}
