use sea_orm::{DbErr, RuntimeErr};

pub type StoreResult<T> = Result<T, StoreError>;

/// SQLSTATE raised by the trigger that keeps deployment objects immutable.
const IMMUTABLE_SQLSTATE: &str = "BR001";
const UNIQUE_VIOLATION: &str = "23505";
const FOREIGN_KEY_VIOLATION: &str = "23503";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{field} is {actual} characters long; at most {limit} are allowed")]
    TooLong {
        field: &'static str,
        limit: usize,
        actual: usize,
    },
    #[error("{what} already exists ({constraint})")]
    Conflict { what: String, constraint: String },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("refers to a row that does not exist ({constraint})")]
    MissingReference { constraint: String },
    #[error("deployment objects {deployment_object_ids:?} are not targeted at this agent")]
    NotTargeted {
        deployment_object_ids: Vec<uuid::Uuid>,
    },
    #[error("deployment objects are immutable: {message}")]
    Immutable { message: String },
    #[error("database error")]
    Database(#[source] DbErr),
}

impl StoreError {
    pub fn not_found(what: impl Into<String>) -> StoreError {
        StoreError::NotFound { what: what.into() }
    }

    /// Whether PostgreSQL (or our own check) refused the data itself, so the same
    /// write can never succeed; otherwise the database may just be unreachable.
    pub fn is_refused_data(&self) -> bool {
        match self {
            StoreError::Database(err) => database_error(err).is_some(),
            StoreError::Conflict { .. }
            | StoreError::MissingReference { .. }
            | StoreError::Immutable { .. }
            | StoreError::TooLong { .. } => true,
            StoreError::NotFound { .. } | StoreError::NotTargeted { .. } => false,
        }
    }
}

impl From<DbErr> for StoreError {
    fn from(err: DbErr) -> StoreError {
        let Some(db_error) = database_error(&err) else {
            return StoreError::Database(err);
        };
        let code = db_error.code().map(|c| c.into_owned()).unwrap_or_default();
        let constraint = db_error.constraint().unwrap_or_default().to_owned();
        match code.as_str() {
            UNIQUE_VIOLATION => StoreError::Conflict {
                what: conflict_subject(&constraint).to_owned(),
                constraint,
            },
            FOREIGN_KEY_VIOLATION => StoreError::MissingReference { constraint },
            IMMUTABLE_SQLSTATE => StoreError::Immutable {
                message: db_error.message().to_owned(),
            },
            _ => StoreError::Database(err),
        }
    }
}

fn database_error(err: &DbErr) -> Option<&(dyn sea_orm::sqlx::error::DatabaseError + 'static)> {
    match err {
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            e.as_database_error()
        }
        _ => None,
    }
}

/// A reader's name for what a unique index protects.
fn conflict_subject(constraint: &str) -> &'static str {
    match constraint {
        "stacks_name_live_key" => "a live stack with this name",
        "generators_name_live_key" => "a live generator with this name",
        "agents_name_cluster_live_key" => "a live agent with this name and cluster",
        "agents_pak_prefix_live_key" => "an agent key with this prefix",
        c if c.ends_with("resource_uid_live_key") => "a live row for this resource",
        "agent_targets_agent_stack_key" => "this agent target",
        c if c.contains("labels") => "this label",
        c if c.contains("annotations") => "this annotation",
        "agent_events_pkey" => "an event with this id",
        _ => "a row with these values",
    }
}
