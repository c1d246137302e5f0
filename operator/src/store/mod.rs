//! The store: every database operation the hub makes, as named operations over the
//! SeaORM entities. Controllers and API handlers call these; none of them builds SQL.
//!
//! A write that touches several rows runs in one transaction. Values longer than the
//! schema's columns come back as [`StoreError::TooLong`] before anything is written;
//! unique violations as [`StoreError::Conflict`].

mod agents;
mod deployments;
mod error;
mod events;
mod generators;
mod metadata;
mod stacks;

use sea_orm::{DatabaseConnection, DbBackend, Statement, Value};

pub use agents::{AgentKey, AgentSync, check_agent_version};
pub use deployments::{DesiredEntry, DesiredState, HeadObject, StackHead};
pub use error::{StoreError, StoreResult};
pub use events::{AgentStackStatus, EventReport, EventSummary, RecordedEvents};
pub use generators::GeneratorSync;
pub use stacks::{StackContent, StackSync, StackSynced, TargetsChanged};

/// Column sizes of the schema, checked before every write so that nothing is truncated.
pub mod limits {
    pub const NAME: usize = 255;
    pub const CLUSTER_NAME: usize = 255;
    pub const AGENT_STATUS: usize = 50;
    pub const EVENT_TYPE: usize = 50;
    pub const EVENT_STATUS: usize = 10;
    pub const LABEL: usize = 64;
    pub const ANNOTATION_KEY: usize = 64;
    pub const ANNOTATION_VALUE: usize = 64;
    pub const PAK_PREFIX: usize = 32;
    pub const AGENT_VERSION: usize = 64;
    /// `agent_events.message` is TEXT; the bound keeps one chatty agent from filling
    /// the database with a single report.
    pub const EVENT_MESSAGE: usize = 4096;
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
    let actual = value.chars().count();
    if actual > limit {
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
