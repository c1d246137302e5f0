//! Alert notifications on their way to NotificationChannels: claimed by the leader's
//! sender, then recorded as delivered, failed (retried later) or abandoned.
//!
//! Everything a sender needs to resume after a restart or failover is in
//! `alert_notifications`: a claim only pushes `next_attempt_at` forward, so a sender that
//! dies mid-send leaves its rows due again once the claim runs out, and two senders never
//! hold the same row at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, FromQueryResult};
use uuid::Uuid;

use super::{Store, StoreResult, statement};

/// Longest `last_error` kept, in bytes.
pub const MAX_LAST_ERROR_BYTES: usize = 1024;

/// A notification claimed for sending.
#[derive(Clone, Debug, PartialEq, FromQueryResult)]
pub struct DueNotification {
    pub id: Uuid,
    pub alert_id: Uuid,
    pub channel_namespace: String,
    pub channel_name: String,
    /// The JSON body as PostgreSQL prints it: the same bytes on every claim, so every
    /// retry sends (and signs) exactly what the first attempt did.
    pub body: String,
    /// Attempts made so far.
    pub attempts: i32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// One notification as stored, for tests.
#[cfg(any(test, feature = "testing"))]
#[derive(Clone, Debug, PartialEq, FromQueryResult)]
pub struct NotificationRecord {
    pub id: Uuid,
    pub channel_namespace: String,
    pub channel_name: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub abandoned_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

// Oldest due first; the claim pushes `next_attempt_at` past the send, so the row is not
// due for anyone else meanwhile. SKIP LOCKED: a concurrent claim takes other rows
// instead of waiting for these.
const CLAIM: &str = r#"
WITH due AS (
    SELECT id FROM alert_notifications
    WHERE delivered_at IS NULL AND abandoned_at IS NULL AND next_attempt_at <= now()
    ORDER BY next_attempt_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE alert_notifications n
SET next_attempt_at = now() + make_interval(secs => $2)
FROM due
WHERE n.id = due.id
RETURNING n.id, n.alert_id, n.channel_namespace, n.channel_name, n.body::text AS body,
          n.attempts, n.last_error, n.created_at
"#;

// Each outcome counts the attempt on the notification and on its alert, in one
// statement. Only a notification still open is changed: a late outcome of a send whose
// claim ran out (and which another sender finished) changes nothing.
const DELIVERED: &str = r#"
WITH n AS (
    UPDATE alert_notifications
    SET attempts = attempts + 1, delivered_at = now(), last_error = NULL
    WHERE id = $1 AND delivered_at IS NULL AND abandoned_at IS NULL
    RETURNING alert_id
)
UPDATE alerts a SET delivery_attempts = a.delivery_attempts + 1, last_notified_at = now()
FROM n WHERE a.id = n.alert_id
"#;

const FAILED: &str = r#"
WITH n AS (
    UPDATE alert_notifications
    SET attempts = attempts + 1, last_error = $2,
        next_attempt_at = now() + make_interval(secs => $3)
    WHERE id = $1 AND delivered_at IS NULL AND abandoned_at IS NULL
    RETURNING alert_id
)
UPDATE alerts a SET delivery_attempts = a.delivery_attempts + 1
FROM n WHERE a.id = n.alert_id
"#;

const ABANDONED: &str = r#"
WITH n AS (
    UPDATE alert_notifications
    SET attempts = attempts + $3, last_error = $2, abandoned_at = now()
    WHERE id = $1 AND delivered_at IS NULL AND abandoned_at IS NULL
    RETURNING alert_id
)
UPDATE alerts a SET delivery_attempts = a.delivery_attempts + $3
FROM n WHERE a.id = n.alert_id
"#;

/// `error` as `last_error` holds it: NULs replaced, at most [`MAX_LAST_ERROR_BYTES`].
fn bounded_error(error: &str) -> String {
    let text = brokkr_crds::wire::storable(error);
    brokkr_common::truncate_bytes(&text, MAX_LAST_ERROR_BYTES).to_owned()
}

impl Store {
    /// Claims up to `limit` due notifications, oldest due first, for `claim_for`: they are
    /// not due again, for this or any other sender, until the claim runs out or an
    /// outcome is recorded. A sender that dies mid-send thus leaves them to be retried.
    pub async fn claim_due_notifications(
        &self,
        limit: u64,
        claim_for: Duration,
    ) -> StoreResult<Vec<DueNotification>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = DueNotification::find_by_statement(statement(
            CLAIM,
            [limit.into(), claim_for.as_secs_f64().into()],
        ))
        .all(&self.db)
        .await?;
        // RETURNING has no order of its own.
        rows.sort_by_key(|row| (row.created_at, row.id));
        Ok(rows)
    }

    /// Records a successful attempt: the notification is never sent again, and its alert
    /// was notified now. Returns whether the notification was still open.
    pub async fn notification_delivered(&self, id: Uuid) -> StoreResult<bool> {
        self.record_outcome(statement(DELIVERED, [id.into()])).await
    }

    /// Records a failed attempt with its `error`, to be retried `retry_after` from now
    /// (the database's clock, the one claims are made by).
    pub async fn notification_failed(
        &self,
        id: Uuid,
        error: &str,
        retry_after: Duration,
    ) -> StoreResult<bool> {
        self.record_outcome(statement(
            FAILED,
            [
                id.into(),
                bounded_error(error).into(),
                retry_after.as_secs_f64().into(),
            ],
        ))
        .await
    }

    /// Gives up on a notification: it is never sent again. `attempted`: whether this
    /// follows an attempt (counted) or the retry window ran out before one was made.
    pub async fn notification_abandoned(
        &self,
        id: Uuid,
        error: &str,
        attempted: bool,
    ) -> StoreResult<bool> {
        self.record_outcome(statement(
            ABANDONED,
            [
                id.into(),
                bounded_error(error).into(),
                i32::from(attempted).into(),
            ],
        ))
        .await
    }

    /// Makes claimed notifications due at once again, without counting an attempt (a
    /// sender stopping before it sent them).
    pub async fn release_notifications(&self, ids: &[Uuid]) -> StoreResult<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let result = self
            .db
            .execute_raw(statement(
                "UPDATE alert_notifications SET next_attempt_at = now() \
                 WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb)::uuid) \
                   AND delivered_at IS NULL AND abandoned_at IS NULL",
                [serde_json::json!(ids).into()],
            ))
            .await?;
        Ok(result.rows_affected())
    }

    async fn record_outcome(&self, statement: sea_orm::Statement) -> StoreResult<bool> {
        // The alert row is the one updated last; a notification is never without its
        // alert (foreign key, cascading delete), so one row changed means it was open.
        let result = self.db.execute_raw(statement).await?;
        Ok(result.rows_affected() > 0)
    }

    /// The notifications of `alert_id`, oldest first.
    #[cfg(any(test, feature = "testing"))]
    pub async fn notifications_of_alert(
        &self,
        alert_id: Uuid,
    ) -> StoreResult<Vec<NotificationRecord>> {
        Ok(NotificationRecord::find_by_statement(statement(
            "SELECT id, channel_namespace, channel_name, attempts, next_attempt_at, \
                    delivered_at, abandoned_at, last_error, created_at \
             FROM alert_notifications WHERE alert_id = $1 ORDER BY created_at, id",
            [alert_id.into()],
        ))
        .all(&self.db)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_error_is_bounded_and_storable() {
        assert_eq!(bounded_error("a\0b"), "a\u{FFFD}b");
        let long = "é".repeat(MAX_LAST_ERROR_BYTES);
        let bounded = bounded_error(&long);
        assert!(bounded.len() <= MAX_LAST_ERROR_BYTES);
        assert!(bounded.len() >= MAX_LAST_ERROR_BYTES - 1);
        assert!(bounded.chars().all(|c| c == 'é'));
    }
}
