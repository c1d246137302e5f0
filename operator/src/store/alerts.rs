//! Alerts: firing and resolved episodes of AlertRules, and the notifications they queue.
//!
//! The evaluation decides what holds now ([`RuleObservation`]); this module turns the
//! difference with the firing rows into one transaction: new episodes fire, episodes whose
//! condition cleared resolve, long-firing ones are re-sent. Every change queues one
//! notification per channel, with its body fixed there, for the deliverer
//! ([`super::notifications`]). The unique index on firing episodes makes a repeated
//! evaluation (a restart, a second replica) a no-op instead of a duplicate.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use brokkr_crds::{AlertConditionType, AlertNotification, AlertState, AlertSubject, Severity};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, EntityTrait, TransactionTrait, Value};
use uuid::Uuid;

use super::{Store, StoreResult, statement};
use crate::entity::alerts;
use crate::status::to_time;

/// `alerts.state` of an episode whose condition holds.
pub const FIRING: &str = "firing";
/// `alerts.state` of an episode whose condition cleared.
pub const RESOLVED: &str = "resolved";

/// A condition that holds now for one subject of a rule.
#[derive(Clone, Debug, PartialEq)]
pub struct ActiveCondition {
    pub condition: AlertConditionType,
    pub subject: AlertSubject,
    /// `metadata.uid` of the subject.
    pub subject_uid: Uuid,
    /// When it began to hold.
    pub since: DateTime<Utc>,
    pub message: String,
    /// It has held for the rule's `for`: the alert fires.
    pub due: bool,
}

/// One rule, as the evaluation sees it now.
#[derive(Clone, Debug)]
pub struct RuleObservation<'a> {
    pub rule_uid: Uuid,
    pub rule_namespace: &'a str,
    pub rule_name: &'a str,
    pub severity: Severity,
    /// The rule's channels that exist; notifications go to these.
    pub channels: &'a [String],
    pub renotify_interval: Duration,
    /// Every condition that holds now, due or not: a firing alert whose condition still
    /// holds stays firing even if `for` was raised meanwhile.
    pub active: &'a [ActiveCondition],
}

/// What one observation changed.
#[derive(Clone, Debug, Default)]
pub struct RuleChanges {
    pub fired: Vec<alerts::Model>,
    pub resolved: Vec<alerts::Model>,
    pub reminded: Vec<alerts::Model>,
}

impl RuleChanges {
    pub fn is_empty(&self) -> bool {
        self.fired.is_empty() && self.resolved.is_empty() && self.reminded.is_empty()
    }
}

type EpisodeKey = (String, Uuid);

fn key_of(alert: &alerts::Model) -> EpisodeKey {
    (alert.condition.clone(), alert.subject_uid)
}

impl Store {
    /// Every firing alert, oldest first.
    pub async fn firing_alerts(&self) -> StoreResult<Vec<alerts::Model>> {
        Ok(alerts::Entity::find()
            .from_raw_sql(statement(
                "SELECT * FROM alerts WHERE state = 'firing' ORDER BY started_at, id",
                [],
            ))
            .all(&self.db)
            .await?)
    }

    /// Fires, resolves and re-sends the alerts of one rule so that they match
    /// `observation`, queueing their notifications, in one transaction. `firing` is the
    /// rule's firing alerts as last read; rows another writer changed meanwhile are
    /// skipped (every write re-checks the row's state).
    pub async fn apply_rule_observation(
        &self,
        observation: &RuleObservation<'_>,
        firing: &[alerts::Model],
        now: DateTime<Utc>,
    ) -> StoreResult<RuleChanges> {
        let active: BTreeMap<EpisodeKey, &ActiveCondition> = observation
            .active
            .iter()
            .map(|a| ((a.condition.as_str().to_owned(), a.subject_uid), a))
            .collect();
        let firing_keys: BTreeSet<EpisodeKey> = firing.iter().map(key_of).collect();
        let to_resolve: Vec<&alerts::Model> = firing
            .iter()
            .filter(|alert| !active.contains_key(&key_of(alert)))
            .collect();
        let to_fire: Vec<&ActiveCondition> = active
            .iter()
            .filter(|(key, a)| a.due && !firing_keys.contains(*key))
            .map(|(_, a)| *a)
            .collect();
        let renotify = chrono::Duration::from_std(observation.renotify_interval)
            .unwrap_or(chrono::Duration::MAX);
        let to_remind: Vec<&alerts::Model> = firing
            .iter()
            .filter(|alert| active.contains_key(&key_of(alert)))
            .filter(|alert| alert.reminded_at + renotify <= now)
            .collect();
        let mut changes = RuleChanges::default();
        if to_resolve.is_empty() && to_fire.is_empty() && to_remind.is_empty() {
            return Ok(changes);
        }

        let txn = self.db.begin().await?;
        for alert in to_resolve {
            let resolved = alerts::Entity::find()
                .from_raw_sql(statement(
                    "UPDATE alerts SET state = 'resolved', resolved_at = now() \
                     WHERE id = $1 AND state = 'firing' RETURNING *",
                    [alert.id.into()],
                ))
                .one(&txn)
                .await?;
            if let Some(resolved) = resolved {
                queue(
                    &txn,
                    &resolved,
                    observation.channels,
                    AlertState::Resolved,
                    false,
                )
                .await?;
                changes.resolved.push(resolved);
            }
        }
        for condition in to_fire {
            let fired = alerts::Entity::find()
                .from_raw_sql(statement(
                    "INSERT INTO alerts (id, rule_uid, rule_namespace, rule_name, condition, \
                       subject_kind, subject_uid, subject_namespace, subject_name, severity, \
                       state, message, started_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'firing', $11, $12) \
                     ON CONFLICT (rule_uid, condition, subject_uid) WHERE state = 'firing' \
                     DO NOTHING RETURNING *",
                    [
                        Uuid::now_v7().into(),
                        observation.rule_uid.into(),
                        observation.rule_namespace.into(),
                        observation.rule_name.into(),
                        condition.condition.as_str().into(),
                        condition.subject.kind.clone().into(),
                        condition.subject_uid.into(),
                        condition.subject.namespace.clone().into(),
                        condition.subject.name.clone().into(),
                        observation.severity.as_str().into(),
                        bounded_message(&condition.message).into(),
                        condition.since.into(),
                    ],
                ))
                .one(&txn)
                .await?;
            if let Some(fired) = fired {
                queue(
                    &txn,
                    &fired,
                    observation.channels,
                    AlertState::Firing,
                    false,
                )
                .await?;
                changes.fired.push(fired);
            }
        }
        for alert in to_remind {
            let reminded = alerts::Entity::find()
                .from_raw_sql(statement(
                    "UPDATE alerts SET reminded_at = now() \
                     WHERE id = $1 AND state = 'firing' AND reminded_at = $2 RETURNING *",
                    [alert.id.into(), alert.reminded_at.into()],
                ))
                .one(&txn)
                .await?;
            if let Some(reminded) = reminded {
                queue(
                    &txn,
                    &reminded,
                    observation.channels,
                    AlertState::Firing,
                    true,
                )
                .await?;
                changes.reminded.push(reminded);
            }
        }
        txn.commit().await?;
        Ok(changes)
    }

    /// Resolves, without notifications, the firing alerts of rules that no longer exist.
    pub async fn resolve_alerts_of_deleted_rules(&self, live_rules: &[Uuid]) -> StoreResult<u64> {
        let live: Vec<Value> = live_rules.iter().map(|uid| (*uid).into()).collect();
        let result = self
            .db
            .execute_raw(statement(
                "UPDATE alerts SET state = 'resolved', resolved_at = now() \
                 WHERE state = 'firing' AND rule_uid <> ALL($1::uuid[])",
                [Value::Array(
                    sea_orm::sea_query::ArrayType::Uuid,
                    Some(Box::new(live)),
                )],
            ))
            .await?;
        Ok(result.rows_affected())
    }

    /// Deletes alerts resolved more than `older_than` ago, with their notifications.
    pub async fn prune_resolved_alerts(&self, older_than: Duration) -> StoreResult<u64> {
        let result = self
            .db
            .execute_raw(statement(
                "DELETE FROM alerts WHERE state = 'resolved' \
                 AND resolved_at < now() - make_interval(secs => $1)",
                [older_than.as_secs_f64().into()],
            ))
            .await?;
        Ok(result.rows_affected())
    }

    /// Every alert of a rule, oldest first (for tests and tools).
    #[cfg(any(test, feature = "testing"))]
    pub async fn alerts_of_rule(&self, rule_uid: Uuid) -> StoreResult<Vec<alerts::Model>> {
        Ok(alerts::Entity::find()
            .from_raw_sql(statement(
                "SELECT * FROM alerts WHERE rule_uid = $1 ORDER BY fired_at, id",
                [rule_uid.into()],
            ))
            .all(&self.db)
            .await?)
    }
}

/// Messages come from subjects' status, which agents fill from spoke objects.
fn bounded_message(message: &str) -> String {
    const MAX: usize = 1024;
    let storable = brokkr_crds::wire::storable(message);
    if storable.len() <= MAX {
        return storable.into_owned();
    }
    format!("{}…", brokkr_common::truncate_bytes(&storable, MAX))
}

/// Queues one notification of `alert` per channel.
async fn queue(
    txn: &impl ConnectionTrait,
    alert: &alerts::Model,
    channels: &[String],
    state: AlertState,
    reminder: bool,
) -> StoreResult<()> {
    for channel in channels {
        let id = Uuid::now_v7();
        let body = notification_body(id, alert, state, reminder);
        txn.execute_raw(statement(
            "INSERT INTO alert_notifications (id, alert_id, channel_namespace, channel_name, body) \
             VALUES ($1, $2, $3, $4, $5)",
            [
                id.into(),
                alert.id.into(),
                alert.rule_namespace.clone().into(),
                channel.clone().into(),
                serde_json::to_value(&body)
                    .unwrap_or(serde_json::Value::Null)
                    .into(),
            ],
        ))
        .await?;
    }
    Ok(())
}

/// The body every channel of `alert` receives for this notification.
pub fn notification_body(
    id: Uuid,
    alert: &alerts::Model,
    state: AlertState,
    reminder: bool,
) -> AlertNotification {
    let condition = alert.condition_type();
    let subject = alert.subject();
    let message = match state {
        AlertState::Firing => alert.message.clone(),
        AlertState::Resolved => format!(
            "{} no longer holds for {subject} (it fired with: {})",
            alert.condition, alert.message
        ),
    };
    AlertNotification {
        id: id.to_string(),
        alert_id: alert.id.to_string(),
        rule: format!("{}/{}", alert.rule_namespace, alert.rule_name),
        condition,
        state,
        reminder,
        subject,
        severity: parse_severity(&alert.severity),
        started_at: to_time(alert.started_at).unwrap_or_else(crate::status::now),
        resolved_at: alert.resolved_at.and_then(to_time),
        message,
    }
}

impl alerts::Model {
    /// The Agent or Stack the alert is about.
    pub fn subject(&self) -> AlertSubject {
        AlertSubject {
            kind: self.subject_kind.clone(),
            name: self.subject_name.clone(),
            namespace: self.subject_namespace.clone(),
        }
    }

    /// The condition, as written from an [`AlertConditionType`] when the alert fired.
    pub fn condition_type(&self) -> AlertConditionType {
        serde_json::from_value(serde_json::Value::String(self.condition.clone()))
            .unwrap_or(AlertConditionType::AgentOffline)
    }
}

fn parse_severity(text: &str) -> Severity {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).unwrap_or_default()
}
