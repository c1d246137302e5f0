//! Watch streams: newline-delimited `{"type":..,"object":..}` events read from the store's
//! history in resourceVersion order, with bookmarks and the apiserver's 410 for expired versions.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use serde_json::{Value, json};
use tokio::time::{Instant, MissedTickBehavior};

use crate::selectors::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::{EventKind, State, Store, Target};

/// What a `?watch=true` request asked for.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub target: Target,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// `None`, `""` and `"0"` all mean "current state first, then changes".
    pub resource_version: Option<String>,
    pub timeout: Duration,
    pub bookmarks: bool,
    pub send_initial_events: bool,
    /// Render objects as `PartialObjectMetadata`.
    pub metadata_only: bool,
}

/// Where a watch starts.
enum Start {
    /// Synthetic ADDED events for the current state, then changes.
    CurrentState,
    /// Changes after this resourceVersion.
    After(u64),
}

impl WatchRequest {
    fn start(&self) -> Result<Start, ApiError> {
        match self.resource_version.as_deref() {
            None | Some("") | Some("0") => Ok(Start::CurrentState),
            Some(rv) => rv
                .parse::<u64>()
                .map(Start::After)
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}"))),
        }
    }

    fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object.pointer("/metadata/labels")) && self.fields.matches(object)
    }

    fn render(&self, event_type: &str, object: &Value) -> Bytes {
        let mut object = self.target.present(object);
        if self.metadata_only {
            object = as_partial_metadata(&object);
        }
        line(event_type, object)
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if initial_events_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        line(
            "BOOKMARK",
            json!({
                "kind": self.target.rt.kind,
                "apiVersion": self.target.rt.api_version(&self.target.version),
                "metadata": metadata,
            }),
        )
    }

    /// The events after `cursor` this watch should see, or `None` if they are no longer retained.
    fn pending(&self, state: &State, cursor: u64) -> Option<Vec<Bytes>> {
        let target = &self.target;
        let events = state.events_after(cursor)?;
        let lines = events
            .iter()
            .filter(|e| e.group == target.rt.group && e.resource == target.rt.plural)
            .filter(|e| {
                target
                    .namespace
                    .as_ref()
                    .is_none_or(|ns| *ns == e.namespace)
            })
            .filter_map(|e| {
                let now = self.matches(&e.object);
                let before = e.previous.as_ref().map_or(now, |p| self.matches(p));
                let event_type = match (e.kind, before, now) {
                    (EventKind::Added, _, true) => "ADDED",
                    (EventKind::Modified, true, true) => "MODIFIED",
                    (EventKind::Modified, false, true) => "ADDED",
                    (EventKind::Modified, true, false) => "DELETED",
                    (EventKind::Deleted, _, true) => "DELETED",
                    _ => return None,
                };
                Some(self.render(event_type, &e.object))
            })
            .collect();
        Some(lines)
    }
}

fn line(event_type: &str, object: Value) -> Bytes {
    let mut bytes =
        serde_json::to_vec(&json!({ "type": event_type, "object": object })).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn expired_line(rv: u64, current: u64) -> Bytes {
    line(
        "ERROR",
        ApiError::expired(format!("too old resource version: {rv} ({current})")).to_status(),
    )
}

/// `PartialObjectMetadata` as the apiserver renders it for `as=PartialObjectMetadata` requests.
pub fn as_partial_metadata(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

enum Wake {
    Changed,
    Bookmark,
    End,
}

/// Validates the request, then returns the stream of event lines.
pub fn stream(
    store: Arc<Store>,
    request: WatchRequest,
) -> Result<impl Stream<Item = Result<Bytes, Infallible>>, ApiError> {
    let start = request.start()?;
    Ok(async_stream::stream! {
        let deadline = Instant::now() + request.timeout;
        let mut changes = store.subscribe();
        changes.borrow_and_update();
        let (initial, mut cursor, epoch, expired) = {
            let state = store.lock();
            let current = state.resource_version();
            let mut initial = Vec::new();
            let mut expired = false;
            let cursor = match start {
                Start::After(rv) if !request.send_initial_events => {
                    if rv < state.compacted_rv() {
                        initial.push(expired_line(rv, current));
                        expired = true;
                    }
                    rv
                }
                _ => {
                    for object in state.list(&request.target, &request.labels, &request.fields) {
                        initial.push(request.render("ADDED", &object));
                    }
                    if request.send_initial_events {
                        initial.push(request.bookmark(current, true));
                    }
                    current
                }
            };
            (initial, cursor, state.epoch(), expired)
        };
        for bytes in initial {
            yield Ok(bytes);
        }
        if expired {
            return;
        }

        let mut bookmarks = tokio::time::interval_at(
            Instant::now() + store.options().bookmark_interval,
            store.options().bookmark_interval,
        );
        bookmarks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            changes.borrow_and_update();
            let batch = {
                let state = store.lock();
                if state.epoch() != epoch {
                    break;
                }
                let batch = request.pending(&state, cursor);
                let current = state.resource_version();
                if batch.is_some() {
                    cursor = current;
                }
                batch.ok_or_else(|| expired_line(cursor, current))
            };
            match batch {
                Ok(lines) => {
                    for bytes in lines {
                        yield Ok(bytes);
                    }
                }
                Err(expired) => {
                    // A watcher that fell behind the retained history must re-list.
                    yield Ok(expired);
                    break;
                }
            }
            let wake = tokio::select! {
                changed = changes.changed() => if changed.is_ok() { Wake::Changed } else { Wake::End },
                _ = bookmarks.tick(), if request.bookmarks => Wake::Bookmark,
                _ = tokio::time::sleep_until(deadline) => Wake::End,
            };
            match wake {
                Wake::Changed => {}
                Wake::Bookmark => yield Ok(request.bookmark(cursor, false)),
                Wake::End => break,
            }
        }
    })
}
