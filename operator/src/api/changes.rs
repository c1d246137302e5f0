//! What the hub's API replicas hold in memory, kept current by PostgreSQL
//! notifications: triggers send one on every write that can change an agent's desired
//! state or its access. Every replica listens, so an agent is served correctly whichever
//! replica it talks to.
//!
//! A stack change is resolved once per notification (one query, however many agents
//! the stack targets) and patched into the agents' views; see [`super::views`].

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use tracing::{info, warn};
use uuid::Uuid;

use super::auth::AuthCache;
use super::views::DesiredViews;
use crate::controllers::error_chain;
use crate::store::Store;

pub const DESIRED_CHANNEL: &str = "brokkr_desired";
pub const STATUS_CHANNEL: &str = "brokkr_status";

/// How long an agent's authentication is trusted without a notification saying
/// otherwise.
pub const AUTH_CACHE_TTL: Duration = Duration::from_secs(300);

/// Most notifications handled as one batch (one heads query).
const MAX_BATCH: usize = 1000;

/// What may have changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A stack has a new deployment object or deletion marker.
    Stack(Uuid),
    /// An agent's targets changed.
    Agent(Uuid),
    /// An agent's key, suspension or deletion changed.
    Access(Uuid),
    /// Unknown (notifications may have been missed): everyone re-checks.
    All,
}

impl Change {
    pub fn parse(payload: &str) -> Change {
        let parsed = match payload.split_once(':') {
            Some(("s", id)) => Uuid::parse_str(id).ok().map(Change::Stack),
            Some(("a", id)) => Uuid::parse_str(id).ok().map(Change::Agent),
            Some(("k", id)) => Uuid::parse_str(id).ok().map(Change::Access),
            _ => None,
        };
        parsed.unwrap_or(Change::All)
    }
}

struct Held {
    views: DesiredViews,
    auth: AuthCache,
}

/// This replica's views of agents' desired state and access. Cheap to clone.
#[derive(Clone)]
pub struct ChangeFeed {
    held: Arc<Held>,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        ChangeFeed {
            held: Arc::new(Held {
                views: DesiredViews::default(),
                auth: AuthCache::new(AUTH_CACHE_TTL),
            }),
        }
    }
}

impl ChangeFeed {
    pub(crate) fn views(&self) -> &DesiredViews {
        &self.held.views
    }

    pub(crate) fn auth(&self) -> &AuthCache {
        &self.held.auth
    }

    /// Applies a batch of changes.
    async fn apply(&self, store: &Store, changes: &[Change]) {
        if changes.contains(&Change::All) {
            return self.forget_all();
        }
        let mut stacks = Vec::new();
        for change in changes {
            match change {
                Change::Stack(id) if !stacks.contains(id) => stacks.push(*id),
                Change::Stack(_) | Change::All => {}
                Change::Agent(id) => self.views().forget(*id),
                Change::Access(id) => self.auth().forget_agent(*id),
            }
        }
        if stacks.is_empty() {
            return;
        }
        match store.stack_heads(&stacks).await {
            Ok(heads) => self.views().apply_heads(&heads),
            Err(err) => {
                warn!(error = %error_chain(&err), "could not read changed stacks; every agent re-reads its desired state");
                self.views().forget_all();
            }
        }
    }

    fn forget_all(&self) {
        self.views().forget_all();
        self.auth().forget_all();
    }

    /// Listens on PostgreSQL until the process ends, reconnecting after failures
    /// (and forgetting everything then, since notifications may have been missed).
    pub async fn listen(self, database_url: String, store: Store) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.listen_once(&database_url, &store).await {
                Ok(()) => {
                    warn!("lost the PostgreSQL notification connection; reconnecting");
                    delay = Duration::from_millis(200);
                }
                Err(err) => {
                    warn!(error = %err, "PostgreSQL notification connection failed; reconnecting");
                }
            }
            self.forget_all();
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    /// Returns when the connection is lost.
    async fn listen_once(
        &self,
        database_url: &str,
        store: &Store,
    ) -> Result<(), sea_orm::sqlx::Error> {
        let mut listener = PgListener::connect(database_url).await?;
        listener.listen(DESIRED_CHANNEL).await?;
        info!(
            channel = DESIRED_CHANNEL,
            "listening for desired-state changes"
        );
        // Anything written while we were not listening is unknown.
        self.forget_all();
        let mut batch = Vec::new();
        // `try_recv` (unlike `recv`) reports a lost connection, after which
        // notifications may have been missed.
        while let Some(notification) = listener.try_recv().await? {
            batch.clear();
            batch.push(Change::parse(notification.payload()));
            while batch.len() < MAX_BATCH {
                match listener.next_buffered() {
                    Some(notification) => batch.push(Change::parse(notification.payload())),
                    None => break,
                }
            }
            self.apply(store, &batch).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_a_stack_or_an_agent() {
        let id = Uuid::now_v7();
        assert_eq!(Change::parse(&format!("s:{id}")), Change::Stack(id));
        assert_eq!(Change::parse(&format!("a:{id}")), Change::Agent(id));
        assert_eq!(Change::parse(&format!("k:{id}")), Change::Access(id));
        assert_eq!(Change::parse("garbage"), Change::All);
        assert_eq!(Change::parse("s:not-a-uuid"), Change::All);
    }
}
