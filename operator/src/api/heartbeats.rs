//! Heartbeats are written in batches: 10,000 agents beating every 15 s are ~700
//! requests a second, and one UPDATE each kept PostgreSQL at half a core. They are
//! buffered and written once a second in one statement, so an agent shows as seen at
//! most a second late; its `Offline` deadline is three heartbeat intervals.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tracing::warn;
use uuid::Uuid;

use super::lock;
use crate::controllers::error_chain;
use crate::store::Store;

const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Heartbeats not written yet: the latest version per agent.
#[derive(Default)]
pub struct Heartbeats {
    pending: Mutex<HashMap<Uuid, String>>,
    flusher: OnceLock<()>,
}

impl Heartbeats {
    /// Buffers a heartbeat; the first one starts the writer, which ends when the API
    /// that owns `self` is dropped.
    pub fn record(self: &Arc<Self>, store: &Store, agent_id: Uuid, version: String) {
        lock(&self.pending).insert(agent_id, version);
        self.flusher.get_or_init(|| {
            tokio::spawn(flush_until_dropped(Arc::downgrade(self), store.clone()));
        });
    }
}

async fn flush_until_dropped(heartbeats: Weak<Heartbeats>, store: Store) {
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        let Some(heartbeats) = heartbeats.upgrade() else {
            return;
        };
        let batch: Vec<(Uuid, String)> = lock(&heartbeats.pending).drain().collect();
        if batch.is_empty() {
            continue;
        }
        if let Err(err) = store.record_heartbeats(&batch).await {
            warn!(error = %error_chain(&err), agents = batch.len(), "could not record heartbeats; retrying");
            let mut pending = lock(&heartbeats.pending);
            for (agent_id, version) in batch {
                // A newer heartbeat of the same agent wins.
                pending.entry(agent_id).or_insert(version);
            }
        }
    }
}
