//! The event queue: events get their id (UUIDv7) when they are queued, are POSTed to the hub
//! in batches of at most `MAX_EVENTS_PER_BATCH`, and are retried with the same ids until the
//! hub accepts them, so a retry never duplicates.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use brokkr_common::{Backoff, error_sources};
use brokkr_crds::wire::{
    AgentEvent, EventBatch, EventStatus, EventType, MAX_EVENT_MESSAGE_CHARS, MAX_EVENTS_PER_BATCH,
    storable,
};
use reqwest::StatusCode;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::hub::{Endpoint, HubClient};
use crate::metrics::Metrics;

/// Events kept while the hub is unreachable; past this the oldest are dropped.
pub const QUEUE_CAPACITY: usize = 10_000;

/// A handle to the event queue; cheap to clone.
#[derive(Clone, Default)]
pub struct Reporter {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    queue: Mutex<VecDeque<AgentEvent>>,
    notify: Notify,
}

impl Reporter {
    pub fn new() -> Reporter {
        Reporter::default()
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<AgentEvent>> {
        // The queue is plain data: a panic elsewhere while holding the lock leaves it usable.
        self.inner
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues an event and returns its id.
    pub fn report(
        &self,
        deployment_object_id: Uuid,
        event_type: EventType,
        status: EventStatus,
        message: Option<String>,
    ) -> Uuid {
        let event = AgentEvent {
            id: Uuid::now_v7(),
            deployment_object_id,
            event_type,
            status,
            // Messages quote spoke objects' conditions, which a spoke user can fill
            // with NULs that the hub cannot store.
            message: message.map(|m| truncate(&storable(&m), MAX_EVENT_MESSAGE_CHARS)),
        };
        let id = event.id;
        {
            let mut queue = self.queue();
            if queue.len() >= QUEUE_CAPACITY
                && let Some(dropped) = queue.pop_front()
            {
                tracing::warn!(
                    event_id = %dropped.id,
                    "event queue full: dropping the oldest undelivered event"
                );
            }
            queue.push_back(event);
        }
        self.inner.notify.notify_one();
        id
    }

    /// Events not yet accepted by the hub.
    pub fn pending(&self) -> usize {
        self.queue().len()
    }

    /// Up to `limit` of the oldest undelivered events, still queued.
    pub fn peek_batch(&self, limit: usize) -> Vec<AgentEvent> {
        self.queue().iter().take(limit).cloned().collect()
    }

    /// Removes delivered events (by id, wherever they are in the queue).
    pub fn acknowledge(&self, ids: &HashSet<Uuid>) {
        self.queue().retain(|e| !ids.contains(&e.id));
    }

    /// Delivers queued events until the task is dropped.
    pub async fn run(self, hub: HubClient, backoff: Backoff, metrics: Arc<Metrics>) {
        let mut attempt = 0u32;
        let mut limit = MAX_EVENTS_PER_BATCH;
        loop {
            let notified = self.inner.notify.notified();
            let batch = self.peek_batch(limit);
            metrics.events_pending.set(self.pending() as i64);
            if batch.is_empty() {
                notified.await;
                continue;
            }
            let ids: HashSet<Uuid> = batch.iter().map(|e| e.id).collect();
            let sent = batch.len();
            match hub.post_events(&EventBatch { events: batch }).await {
                Ok(result) => {
                    tracing::debug!(
                        sent,
                        accepted = result.accepted,
                        duplicates = result.duplicates,
                        "events delivered"
                    );
                    self.acknowledge(&ids);
                    attempt = 0;
                    // After finding a refused event one at a time, grow back gradually.
                    limit = (limit * 2).min(MAX_EVENTS_PER_BATCH);
                }
                Err(err) => {
                    metrics.hub_error(Endpoint::Events);
                    match err.status() {
                        Some(StatusCode::PAYLOAD_TOO_LARGE) if sent > 1 => {
                            limit = (sent / 2).max(1);
                            tracing::warn!(
                                sent,
                                "the hub refused an event batch as too large: sending smaller batches"
                            );
                            continue;
                        }
                        Some(
                            StatusCode::BAD_REQUEST
                            | StatusCode::PAYLOAD_TOO_LARGE
                            | StatusCode::UNPROCESSABLE_ENTITY,
                        ) if sent == 1 => {
                            // A single event the hub will never take: retrying would block
                            // every later one.
                            tracing::error!(error = %err, event_ids = ?ids, "the hub refused an event: dropping it");
                            self.acknowledge(&ids);
                            continue;
                        }
                        Some(StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY) => {
                            // Find the bad one by sending one at a time.
                            limit = 1;
                            continue;
                        }
                        _ if err.is_auth() => tracing::error!(
                            error = %err,
                            "the hub refused the agent key while sending events (bad key, or the agent is suspended or deleted): keeping them and retrying"
                        ),
                        _ => {
                            tracing::warn!(error = %err, source = %error_sources(&err), pending = self.pending(), "failed to send events: retrying")
                        }
                    }
                    tokio::time::sleep(backoff.jittered(attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }
}

/// At most `max` characters, cut on a character boundary.
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => text[..cut].to_owned(),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_get_time_ordered_ids_and_stay_until_acknowledged() {
        let reporter = Reporter::new();
        let do_id = Uuid::now_v7();
        let first = reporter.report(do_id, EventType::Apply, EventStatus::Success, None);
        let second = reporter.report(
            do_id,
            EventType::Health,
            EventStatus::Success,
            Some("healthy".into()),
        );
        assert_eq!(first.get_version_num(), 7);
        assert!(first < second);

        let batch = reporter.peek_batch(MAX_EVENTS_PER_BATCH);
        assert_eq!(
            batch.iter().map(|e| e.id).collect::<Vec<_>>(),
            [first, second]
        );
        // Not acknowledged: the same events (same ids) come back for the retry.
        assert_eq!(reporter.peek_batch(MAX_EVENTS_PER_BATCH), batch);

        reporter.acknowledge(&HashSet::from([first]));
        assert_eq!(reporter.pending(), 1);
        assert_eq!(reporter.peek_batch(10)[0].id, second);
    }

    #[test]
    fn batches_are_capped() {
        let reporter = Reporter::new();
        for _ in 0..MAX_EVENTS_PER_BATCH + 7 {
            reporter.report(Uuid::nil(), EventType::Apply, EventStatus::Success, None);
        }
        assert_eq!(
            reporter.peek_batch(MAX_EVENTS_PER_BATCH).len(),
            MAX_EVENTS_PER_BATCH
        );
        assert_eq!(reporter.pending(), MAX_EVENTS_PER_BATCH + 7);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let reporter = Reporter::new();
        let long = "é".repeat(MAX_EVENT_MESSAGE_CHARS + 10);
        reporter.report(
            Uuid::nil(),
            EventType::Apply,
            EventStatus::Failure,
            Some(long),
        );
        let message = reporter.peek_batch(1)[0].message.clone().unwrap();
        assert_eq!(message.chars().count(), MAX_EVENT_MESSAGE_CHARS);
        assert_eq!(truncate("abc", 5), "abc");
    }

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let reporter = Reporter::new();
        let first = reporter.report(Uuid::nil(), EventType::Apply, EventStatus::Success, None);
        for _ in 1..QUEUE_CAPACITY {
            reporter.report(Uuid::nil(), EventType::Apply, EventStatus::Success, None);
        }
        assert_eq!(reporter.peek_batch(1)[0].id, first);
        reporter.report(Uuid::nil(), EventType::Apply, EventStatus::Success, None);
        assert_eq!(reporter.pending(), QUEUE_CAPACITY);
        assert_ne!(reporter.peek_batch(1)[0].id, first);
    }
}
