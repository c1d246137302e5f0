//! The one object store: objects as JSON, one global resourceVersion counter, a bounded event
//! history for watches, and the server-side lifecycle (finalizers, garbage collection through
//! ownerReferences, namespace and CRD termination).
//!
//! This module holds the types and the shared lock; [`State`]'s operations live by concern:
//! - `storage`: the objects, the resourceVersion counter, the event history, get and list;
//! - `write`: create, replace and the single write path every change goes through;
//! - `patch`: merge, JSON and strategic-merge patches, and server-side apply;
//! - `defaults`: what the apiserver's strategies and controllers fill in;
//! - `gc`: deletion, finalizers, and garbage collection of dependents, namespaces and CRDs.

mod defaults;
mod gc;
mod patch;
mod storage;
mod write;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::apply::ManagedEntry;
use crate::resources::ResourceType;
use crate::status::{ApiError, Cause};

/// The manager recorded for what the simulated control plane itself writes.
const CONTROL_PLANE: &str = "kube-controller-manager";

/// Tuning for one simulator.
#[derive(Debug, Clone)]
pub struct Options {
    /// Events kept for watches; a watch from before the oldest gets 410 Gone.
    pub history_limit: usize,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            history_limit: 4096,
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub group: String,
    pub resource: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
}

/// One change, as retained for watches.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub group: String,
    pub resource: String,
    pub namespace: String,
    pub kind: EventKind,
    pub object: Value,
    /// The object before a modification, so selector-filtered watches can turn a change that
    /// leaves (or enters) the selection into DELETED (or ADDED), as the apiserver does.
    pub previous: Option<Value>,
}

/// Where a request points: a resource type at a version, within a namespace or not.
#[derive(Debug, Clone)]
pub struct Target {
    pub rt: ResourceType,
    pub version: String,
    /// The namespace of the URL; `None` for cluster-scoped resources and all-namespace lists.
    pub namespace: Option<String>,
}

impl Target {
    fn key(&self, name: &str) -> Key {
        Key {
            group: self.rt.group.clone(),
            resource: self.rt.plural.clone(),
            namespace: self.namespace.clone().unwrap_or_default(),
            name: name.to_string(),
        }
    }

    fn api_version(&self) -> String {
        self.rt.api_version(&self.version)
    }

    fn not_found(&self, name: &str) -> ApiError {
        ApiError::not_found(self.rt.reference(), name)
    }

    fn invalid(&self, name: &str, causes: Vec<Cause>) -> ApiError {
        ApiError::invalid(&self.rt.qualified_kind(), &self.rt.group, name, causes)
    }

    /// The object as this request's version shows it (no conversion: only `apiVersion` differs).
    pub fn present(&self, object: &Value) -> Value {
        let mut object = object.clone();
        object["apiVersion"] = json!(self.api_version());
        object["kind"] = json!(self.rt.kind);
        object
    }
}

/// How a write's field ownership is recorded.
pub enum Ownership {
    /// A create/update/patch by this manager (operation `Update`).
    Update(String),
    /// Already computed by server-side apply.
    Applied(Vec<ManagedEntry>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

#[derive(Debug, Clone)]
pub struct DeleteOptions {
    pub propagation: Propagation,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

pub enum Deleted {
    /// Removed; the last state of the object.
    Gone(Value),
    /// Still there, with `deletionTimestamp` set, waiting for finalizers or contents.
    Pending(Value),
}

/// How a patch body is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    Apply { force: bool },
}

pub struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// The newest resourceVersion whose event is no longer retained.
    compacted_rv: u64,
    /// Bumped to end every open watch stream.
    epoch: u64,
    next_service_ip: u32,
}

pub struct Store {
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    options: Options,
    requests: crate::requests::RequestLog,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

fn finalizers(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn is_deleting(object: &Value) -> bool {
    object
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|t| !t.is_null())
}

fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    match object.get_mut("metadata") {
        Some(Value::Object(meta)) => meta,
        _ => unreachable!("metadata was just made an object"),
    }
}

impl Store {
    pub fn new(options: Options) -> Arc<Store> {
        let (changes, _) = watch::channel(0);
        let store = Arc::new(Store {
            state: Mutex::new(State {
                rv: 0,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit: options.history_limit.max(1),
                compacted_rv: 0,
                epoch: 0,
                next_service_ip: 1,
            }),
            changes,
            options,
            requests: Default::default(),
        });
        store.with_state(|state| {
            let namespaces = state.target_for(|t| t.is_namespace(), None);
            for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                let namespace = json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name } });
                if let Err(err) = state.create(&namespaces, namespace, CONTROL_PLANE, false) {
                    tracing::error!("bootstrapping namespace {name}: {err}");
                }
            }
        });
        store
    }

    /// The counters of the requests served (see [`crate::requests`]).
    pub(crate) fn requests(&self) -> &crate::requests::RequestLog {
        &self.requests
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the state and wakes watchers if it changed anything.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.lock();
        let before = (state.rv, state.epoch);
        let result = f(&mut state);
        let after = (state.rv, state.epoch);
        drop(state);
        if after != before {
            self.changes.send_replace(after.0);
        }
        result
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Forgets the whole event history and ends every open watch, so watchers resuming from
    /// any resourceVersion they have seen get 410 Gone and must re-list.
    pub fn compact_history(&self) {
        self.with_state(|state| {
            state.rv += 1;
            state.compacted_rv = state.rv;
            state.history.clear();
            state.epoch += 1;
        });
    }

    /// Ends every open watch stream (used at shutdown).
    pub fn close_watches(&self) {
        self.with_state(|state| state.epoch += 1);
    }
}

#[cfg(test)]
mod fixtures {
    use super::*;

    pub(super) fn store() -> Arc<Store> {
        Store::new(Options::default())
    }

    pub(super) fn target(
        state: &State,
        group: &str,
        plural: &str,
        namespace: Option<&str>,
    ) -> Target {
        state.target_for(|t| t.group == group && t.plural == plural, namespace)
    }

    pub(super) fn config_map(name: &str) -> Value {
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name }, "data": { "k": "v" } })
    }

    pub(super) fn background() -> DeleteOptions {
        DeleteOptions {
            propagation: Propagation::Background,
            precondition_uid: None,
            precondition_rv: None,
            dry_run: false,
        }
    }
}
