//! Wake-ups for long-polls: PostgreSQL notifications (sent by triggers on every write
//! that can change an agent's desired state) fanned out to this replica's waiting
//! requests. Every hub replica listens, so an agent is woken whichever replica it
//! talks to.

use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tracing::{info, warn};
use uuid::Uuid;

pub const DESIRED_CHANNEL: &str = "brokkr_desired";
pub const STATUS_CHANNEL: &str = "brokkr_status";

/// What may have changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A stack has a new deployment object or deletion marker.
    Stack(Uuid),
    /// An agent's targets changed.
    Agent(Uuid),
    /// Unknown (notifications may have been missed): everyone re-checks.
    All,
}

impl Change {
    pub fn parse(payload: &str) -> Change {
        let parsed = match payload.split_once(':') {
            Some(("s", id)) => Uuid::parse_str(id).ok().map(Change::Stack),
            Some(("a", id)) => Uuid::parse_str(id).ok().map(Change::Agent),
            _ => None,
        };
        parsed.unwrap_or(Change::All)
    }
}

/// Where changes are published on this replica.
#[derive(Clone)]
pub struct ChangeFeed {
    sender: broadcast::Sender<Change>,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        // Large enough that a burst of notifications rarely lags a waiter; a lagging
        // waiter just re-checks, as for `All`.
        let (sender, _) = broadcast::channel(4096);
        ChangeFeed { sender }
    }
}

impl ChangeFeed {
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.sender.subscribe()
    }

    pub fn publish(&self, change: Change) {
        let _ = self.sender.send(change);
    }

    /// Listens on PostgreSQL until the process ends, reconnecting after failures
    /// (and waking everyone then, since notifications may have been missed).
    pub async fn listen(self, database_url: String) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.listen_once(&database_url).await {
                Ok(()) => {}
                Err(err) => {
                    warn!(error = %err, "lost the PostgreSQL notification connection; reconnecting");
                }
            }
            self.publish(Change::All);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    async fn listen_once(&self, database_url: &str) -> Result<(), sea_orm::sqlx::Error> {
        let mut listener = PgListener::connect(database_url).await?;
        listener.listen(DESIRED_CHANNEL).await?;
        info!(
            channel = DESIRED_CHANNEL,
            "listening for desired-state changes"
        );
        // Anything written while we were not listening is unknown to the waiters.
        self.publish(Change::All);
        loop {
            let notification = listener.recv().await?;
            self.publish(Change::parse(notification.payload()));
        }
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
        assert_eq!(Change::parse("garbage"), Change::All);
        assert_eq!(Change::parse("s:not-a-uuid"), Change::All);
    }
}
