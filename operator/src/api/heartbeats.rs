//! Heartbeats are written in batches: 10,000 agents beating every 15 s are ~700
//! requests a second, and one UPDATE each kept PostgreSQL at half a core. They are
//! buffered and written once a second in one statement, so an agent shows as seen at
//! most a second late; its `Offline` deadline is three heartbeat intervals.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tracing::warn;
use uuid::Uuid;

use super::lock;
use crate::controllers::error_chain;
use crate::store::{HeartbeatReport, Store};

const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Heartbeats not written yet: the latest version, state and message per agent.
#[derive(Default)]
pub struct Heartbeats {
    pending: Mutex<HashMap<Uuid, HeartbeatReport>>,
    flusher: OnceLock<()>,
    /// Heartbeats PostgreSQL refused, dropped rather than retried forever.
    pub dropped: Counter,
}

impl Heartbeats {
    /// A buffer that counts the heartbeats it drops in `dropped` (a registered metric).
    pub fn counting_drops_in(dropped: Counter) -> Heartbeats {
        Heartbeats {
            dropped,
            ..Heartbeats::default()
        }
    }

    /// Buffers a heartbeat; the first one starts the writer, which ends when the API
    /// that owns `self` is dropped.
    pub fn record(self: &Arc<Self>, store: &Store, agent_id: Uuid, beat: HeartbeatReport) {
        lock(&self.pending).insert(agent_id, beat);
        self.flusher.get_or_init(|| {
            tokio::spawn(flush_until_dropped(Arc::downgrade(self), store.clone()));
        });
    }

    /// Puts back heartbeats that could not be written; a newer one of the same agent wins.
    fn requeue(&self, beats: Vec<(Uuid, HeartbeatReport)>) {
        let mut pending = lock(&self.pending);
        for (agent_id, beat) in beats {
            pending.entry(agent_id).or_insert(beat);
        }
    }
}

async fn flush_until_dropped(heartbeats: Weak<Heartbeats>, store: Store) {
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        let Some(heartbeats) = heartbeats.upgrade() else {
            return;
        };
        let batch: Vec<(Uuid, HeartbeatReport)> = lock(&heartbeats.pending).drain().collect();
        if !batch.is_empty() {
            flush(&heartbeats, &store, batch).await;
        }
    }
}

/// Writes a batch. When PostgreSQL refuses it, the rows that poison it are found by
/// halving (a few statements, not one per agent) and dropped, so one agent can never
/// stop every other agent's heartbeats; when the database is unreachable, everything
/// is kept for the next flush.
async fn flush(heartbeats: &Heartbeats, store: &Store, batch: Vec<(Uuid, HeartbeatReport)>) {
    let mut parts = vec![batch];
    while let Some(part) = parts.pop() {
        let Err(err) = store.record_heartbeats(&part).await else {
            continue;
        };
        if !err.is_refused_data() {
            warn!(error = %error_chain(&err), agents = part.len(), "could not record heartbeats; retrying");
            heartbeats.requeue(part);
            for rest in parts.drain(..) {
                heartbeats.requeue(rest);
            }
            return;
        }
        if part.len() == 1 {
            warn!(error = %error_chain(&err), agent_id = %part[0].0, "PostgreSQL refused a heartbeat; dropping it");
            heartbeats.dropped.inc();
            continue;
        }
        let mut first = part;
        let second = first.split_off(first.len() / 2);
        parts.push(first);
        parts.push(second);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use brokkr_testdb::TestDb;

    use super::*;
    use crate::store::AgentSync;

    #[tokio::test]
    async fn a_heartbeat_postgresql_refuses_is_dropped_and_the_rest_are_written() {
        let db = TestDb::new().await;
        let store = Store::new(db.conn().clone());
        let mut batch = Vec::new();
        let mut ids = Vec::new();
        for n in 0..9 {
            let agent = store
                .sync_agent(&AgentSync {
                    resource_uid: Uuid::new_v4(),
                    name: &format!("edge-{n}"),
                    cluster_name: "edge",
                    is_suspended: false,
                    labels: &[],
                    annotations: &BTreeMap::new(),
                })
                .await
                .unwrap();
            // Every third agent reports it cannot work.
            let (state, message) = if n % 3 == 0 {
                ("Error", Some(format!("spoke API server unreachable ({n})")))
            } else {
                ("Ready", None)
            };
            batch.push((
                agent.id,
                HeartbeatReport {
                    version: format!("1.{n}.0"),
                    state: state.to_owned(),
                    message,
                },
            ));
            ids.push(agent.id);
        }
        // The API refuses these; PostgreSQL refuses them too (a NUL in jsonb), which
        // used to fail every batch they were part of, every second, for good.
        let poisoned = [batch[4].0, batch[6].0];
        batch[4].1.version = "1.4.0\0".to_owned();
        batch[6].1.message = Some("unreachable\0".to_owned());
        let heartbeats = Heartbeats::default();

        flush(&heartbeats, &store, batch).await;

        assert_eq!(heartbeats.dropped.get(), 2);
        assert!(lock(&heartbeats.pending).is_empty());
        for (n, id) in ids.into_iter().enumerate() {
            let row = store.find_agent(id).await.unwrap().unwrap();
            if poisoned.contains(&row.id) {
                assert!(row.last_heartbeat.is_none());
            } else if n % 3 == 0 {
                assert_eq!(row.status, "Error");
                assert_eq!(
                    row.state_message.as_deref(),
                    Some(&*format!("spoke API server unreachable ({n})"))
                );
            } else {
                assert_eq!(row.status, "Online");
                assert_eq!(row.state_message, None);
                assert_eq!(row.agent_version.as_deref(), Some(&*format!("1.{n}.0")));
            }
        }
    }
}
