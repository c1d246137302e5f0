//! The store: every database operation the hub makes, as named operations over the
//! SeaORM entities. Controllers and API handlers call these; none of them builds SQL.
//!
//! A write that touches several rows runs in one transaction. Values longer than the
//! schema's columns come back as [`StoreError::TooLong`] before anything is written;
//! unique violations as [`StoreError::Conflict`].

mod agents;
pub mod alerts;
mod api_keys;
pub mod audit;
mod deployments;
mod error;
mod events;
mod generators;
mod metadata;
pub mod notifications;
pub mod notify;
mod rollouts;
mod stacks;

use std::str::FromStr;
use std::time::Duration;

use sea_orm::sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sea_orm::{ConnectOptions, DatabaseConnection, DbBackend, Statement, Value};

pub use agents::{AgentKey, AgentSync, HeartbeatReport, check_agent_version};
pub use api_keys::{FirstUse, KeyHolder, KeyOwner, NewKey, PendingKeyChange, Revoke};
pub use audit::{AuditEntry, AuditQuery, AuditRecord, AuditResource};
pub use deployments::{DesiredEntry, DesiredRows, HeadObject, StackHead};
pub use error::{StoreError, StoreResult};
pub use events::{AgentStackStatus, Assignment, EventReport, EventSummary, RecordedEvents};
pub use generators::GeneratorSync;
pub use rollouts::{Serving, ServingChanged};
pub use stacks::{ContentAuthor, Revision, StackContent, StackSync, StackSynced, TargetsChanged};

/// Column sizes of the schema, checked before every write so that nothing is truncated;
/// the CRDs' spec checks use the same ones.
pub use brokkr_crds::validation::limits;

/// TCP keepalive of every PostgreSQL connection the hub opens (the pool and each LISTEN
/// connection), as `(setting, value)` startup options. sqlx cannot set `SO_KEEPALIVE` on
/// its own sockets, so the server side of each connection does it: PostgreSQL probes a
/// connection idle for 30 s every 10 s and closes it after 3 unanswered probes, or when
/// data stays unacknowledged for 30 s (`tcp_user_timeout`). The probes also keep the
/// connection's NAT and firewall state from expiring while it is idle. The hub's own side
/// is bounded by application checks: [`check_listener`] on LISTEN connections, and the
/// pool's test-before-acquire within [`ACQUIRE_TIMEOUT`].
pub const KEEPALIVE: [(&str, u32); 4] = [
    ("tcp_keepalives_idle", 30),
    ("tcp_keepalives_interval", 10),
    ("tcp_keepalives_count", 3),
    ("tcp_user_timeout", 30_000),
];

/// Longest wait for a pooled connection (including the liveness test of an idle one) or a
/// new one; past it the request fails (503) instead of hanging on a dead connection.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections of the hub's pool.
pub const MAX_CONNECTIONS: u32 = 20;

/// `application_name` of the hub's LISTEN connections, to tell them apart in
/// `pg_stat_activity`.
pub const LISTENER_APPLICATION_NAME: &str = "brokkr-hub-listener";

/// PostgreSQL connection options for `url` with the hub's [`KEEPALIVE`] settings.
pub fn pg_options(url: &str) -> Result<PgConnectOptions, sea_orm::sqlx::Error> {
    Ok(PgConnectOptions::from_str(url)?.options(KEEPALIVE))
}

/// The hub's pool: [`KEEPALIVE`] on every connection, [`MAX_CONNECTIONS`], and every
/// connection tested before use within [`ACQUIRE_TIMEOUT`].
pub fn connect_options(url: &str) -> ConnectOptions {
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(MAX_CONNECTIONS)
        .connect_timeout(ACQUIRE_TIMEOUT)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(true)
        .sqlx_logging(false)
        .map_sqlx_postgres_opts(|options| options.options(KEEPALIVE));
    options
}

/// A LISTEN connection to `url`, subscribed to `channels`, with [`KEEPALIVE`]. It does not
/// reconnect by itself: once the connection is lost, `try_recv` answers `Ok(None)` and the
/// caller opens a new one, knowing that notifications may have been missed in between.
pub async fn listen(url: &str, channels: &[&str]) -> Result<PgListener, sea_orm::sqlx::Error> {
    let options = pg_options(url)?.application_name(LISTENER_APPLICATION_NAME);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(options)
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.ignore_pool_close_event(true);
    listener.eager_reconnect(false);
    bounded(
        ACQUIRE_TIMEOUT,
        listener.listen_all(channels.iter().copied()),
    )
    .await?;
    Ok(listener)
}

/// Proves that `listener`'s connection still works end to end: a query on it, answered
/// within `timeout`. A half-open connection (the server or the path to it gone without a
/// word) otherwise looks exactly like a quiet one. Notifications arriving meanwhile are
/// kept for the next `try_recv`.
pub async fn check_listener(
    listener: &mut PgListener,
    timeout: Duration,
) -> Result<(), sea_orm::sqlx::Error> {
    use sea_orm::sqlx::Executor;
    bounded(timeout, async {
        listener.execute("SELECT 1").await?;
        Ok(())
    })
    .await
}

async fn bounded<T>(
    timeout: Duration,
    work: impl Future<Output = Result<T, sea_orm::sqlx::Error>>,
) -> Result<T, sea_orm::sqlx::Error> {
    tokio::time::timeout(timeout, work).await.map_err(|_| {
        sea_orm::sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("PostgreSQL did not answer within {timeout:?}"),
        ))
    })?
}

/// Handle to the hub's database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
}

impl Store {
    pub fn new(db: DatabaseConnection) -> Store {
        Store { db }
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }
}

/// Refuses `value` when it has more characters than the column `field` holds.
fn check_len(field: &'static str, value: &str, limit: usize) -> StoreResult<()> {
    if let Some(actual) = brokkr_crds::validation::length_over(value, limit) {
        return Err(StoreError::TooLong {
            field,
            limit,
            actual,
        });
    }
    Ok(())
}

fn statement<I>(sql: &str, values: I) -> Statement
where
    I: IntoIterator<Item = Value>,
{
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_carries_the_keepalive_settings() {
        let options = pg_options("postgres://u@db.example:5432/brokkr").unwrap();
        let startup = options.get_options().unwrap_or_default();
        for (setting, value) in KEEPALIVE {
            assert!(
                startup.contains(&format!("-c {setting}={value}")),
                "{startup}"
            );
        }
    }

    #[test]
    fn length_is_counted_in_characters_like_varchar() {
        assert!(check_len("label", &"é".repeat(64), limits::LABEL).is_ok());
        let err = check_len("label", &"é".repeat(65), limits::LABEL).unwrap_err();
        assert!(matches!(
            err,
            StoreError::TooLong {
                field: "label",
                limit: 64,
                actual: 65
            }
        ));
        assert_eq!(
            err.to_string(),
            "label is 65 characters long; at most 64 are allowed"
        );
    }
}
