//! Drift: a watch per applied kind (selected by the agent label; labels only *find* objects
//! here, they never make an object the agent's) — cluster-wide, or with `--allowed-namespaces`
//! one per namespace the kind is applied in, so the agent never lists outside its namespaces
//! ([`SpokeScope::watch_namespaces`]) — and the debounced sync of stacks whose
//! objects were changed or deleted. The sync itself finds the drift (it reads every live
//! object anyway) and corrects it, or with `driftPolicy: Detect` only compares; either way
//! each drift episode is reported as a `Drift` event ([`drift_message`]). A watch RBAC
//! refuses makes the agent report `Error` ([`refusal_message`]) until the API server lets
//! it watch again (asked every [`REFUSED_RECHECK`]) or the watch is no longer needed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::api::{Api, DynamicObject, WatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use uuid::Uuid;

use brokkr_crds::wire::{EventStatus, EventType};

use super::Worker;
use super::sync::StackState;
use crate::apply::{AppliedObject, KindKey, Resolved};
use crate::manifest::{self, ObjectKey};
use crate::scope::SpokeScope;

/// How often a watch RBAC refuses is tried again.
const REFUSED_RECHECK: Duration = Duration::from_secs(10);

/// One drift watch: a kind, in one namespace or (`None`) across the cluster.
pub(super) type WatchKey = (KindKey, Option<String>);

/// How an applied object drifted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Change {
    /// It no longer holds what was applied.
    Changed,
    /// It was deleted.
    Deleted,
}

impl Change {
    fn as_str(self) -> &'static str {
        match self {
            Change::Changed => "changed",
            Change::Deleted => "deleted",
        }
    }
}

/// The `Drift` event of one episode: `Success` when every object was put back, else
/// `Failure`; each object named with what happened to it.
pub(super) fn drift_message(drift: &BTreeMap<ObjectKey, (Change, bool)>) -> (EventStatus, String) {
    let all_corrected = drift.values().all(|(_, corrected)| *corrected);
    let objects: Vec<String> = drift
        .iter()
        .map(|(key, (change, corrected))| {
            let fate = if *corrected {
                "corrected"
            } else {
                "not corrected"
            };
            format!("{key} ({}, {fate})", change.as_str())
        })
        .collect();
    let count = drift.len();
    let plural = if count == 1 { "object" } else { "objects" };
    let status = if all_corrected {
        EventStatus::Success
    } else {
        EventStatus::Failure
    };
    (
        status,
        format!("{count} {plural} drifted: {}", objects.join("; ")),
    )
}

/// What a stack remembers of the drift its last sync found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct DriftMemory {
    /// Drift left in place (`driftPolicy: Detect`).
    pub(super) uncorrected: BTreeMap<ObjectKey, Change>,
    /// Drift put back.
    pub(super) corrected: BTreeMap<ObjectKey, Change>,
}

/// Whether a sync's drift is worth a `Drift` event: a new episode (drift after a clean
/// sync, or a different set of drifted objects) is; the same drift found again by the next
/// sync is not (a field the server normalises would otherwise be reported on every
/// resync); the end of drift left in place is (so the hub's `Drifted` clears).
pub(super) fn next_drift_report(
    memory: &DriftMemory,
    drift: &BTreeMap<ObjectKey, (Change, bool)>,
) -> (DriftMemory, Option<(EventStatus, String)>) {
    let pick = |want: bool| -> BTreeMap<ObjectKey, Change> {
        drift
            .iter()
            .filter(|(_, (_, corrected))| *corrected == want)
            .map(|(key, (change, _))| (key.clone(), *change))
            .collect()
    };
    let next = DriftMemory {
        uncorrected: pick(false),
        corrected: pick(true),
    };
    let report = if drift.is_empty() {
        (!memory.uncorrected.is_empty()).then(|| {
            (
                EventStatus::Success,
                "no drift: every object holds what was applied".to_owned(),
            )
        })
    } else if next == *memory {
        None
    } else {
        Some(drift_message(drift))
    };
    (next, report)
}

/// The worker's drift bookkeeping.
pub(super) struct Drift {
    pub(super) watchers: HashMap<WatchKey, AbortHandle>,
    pub(super) watch_tasks: JoinSet<()>,
    pub(super) sightings_tx: mpsc::UnboundedSender<Sighting>,
    /// Stacks to re-apply when the debounce ends.
    pub(super) drifted: BTreeSet<Uuid>,
    /// Stacks whose health to re-evaluate when the debounce ends.
    pub(super) health_due: BTreeSet<Uuid>,
    pub(super) debounce_until: Option<Instant>,
    /// Watches RBAC refuses, with the heartbeat's reason, until they list again.
    pub(super) refused: BTreeMap<WatchKey, String>,
}

impl Drift {
    pub(super) fn new() -> (Drift, mpsc::UnboundedReceiver<Sighting>) {
        let (sightings_tx, sightings_rx) = mpsc::unbounded_channel();
        (
            Drift {
                watchers: HashMap::new(),
                watch_tasks: JoinSet::new(),
                sightings_tx,
                drifted: BTreeSet::new(),
                health_due: BTreeSet::new(),
                debounce_until: None,
                refused: BTreeMap::new(),
            },
            sightings_rx,
        )
    }
}

/// What a watch saw happen to objects the agent labelled.
pub(super) enum Sighting {
    Changed {
        key: ObjectKey,
        live: serde_json::Value,
    },
    Deleted {
        key: ObjectKey,
    },
    /// A (re-)list finished with exactly these objects of the kind (in `namespace`, when the
    /// watch is of one namespace): any applied object of the kind there missing from it was
    /// deleted while the watch was down.
    Listed {
        kind: KindKey,
        namespace: Option<String>,
        keys: BTreeSet<ObjectKey>,
    },
    /// The API server refuses the watch (403): the agent cannot see drift there.
    Refused {
        watch: WatchKey,
        reason: String,
    },
    /// A refused watch works again.
    Allowed {
        watch: WatchKey,
    },
}

/// The API server's 403 behind a watch error, if that is what it is.
fn forbidden(err: &watcher::Error) -> Option<&kube::core::Status> {
    let status = match err {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status))
        | watcher::Error::WatchError(status) => status,
        _ => return None,
    };
    status.is_forbidden().then_some(&**status)
}

/// The heartbeat's reason for a refused watch: the resource, where, and the API server's
/// message (which names the user and the verb, never an object's content).
pub(super) fn refusal_message(
    resolved: &Resolved,
    namespace: Option<&str>,
    server_message: &str,
) -> String {
    let resource = &resolved.resource;
    let resource = if resource.group.is_empty() {
        resource.plural.clone()
    } else {
        format!("{}.{}", resource.plural, resource.group)
    };
    let place = match namespace {
        Some(namespace) => format!("in namespace {namespace}"),
        None => "across the cluster".to_owned(),
    };
    format!("RBAC refuses watching {resource} {place}: {server_message}")
}

/// Watches one kind (in one namespace, or across the cluster) for objects labelled with this
/// agent's name.
pub(super) async fn watch_kind(
    client: Client,
    resolved: Resolved,
    namespace: Option<String>,
    selector: String,
    sightings: mpsc::UnboundedSender<Sighting>,
) {
    let api: Api<DynamicObject> = match &namespace {
        Some(ns) => Api::namespaced_with(client, ns, &resolved.resource),
        None => Api::all_with(client, &resolved.resource),
    };
    let watch: WatchKey = (resolved.kind_key(), namespace.clone());
    let place = namespace.as_deref().unwrap_or("*");
    // Each round is one watcher; a new one starts when a refused watch is allowed again.
    loop {
        let stream = watcher::watcher(api.clone(), watcher::Config::default().labels(&selector))
            .default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut listing: BTreeSet<ObjectKey> = BTreeSet::new();
        let mut refused = false;
        let mut recheck = tokio::time::interval(REFUSED_RECHECK);
        loop {
            let event = tokio::select! {
                event = stream.next() => match event {
                    Some(event) => event,
                    None => return,
                },
                // A watcher that starts watching after a refusal says nothing until an object
                // changes: ask the API server directly whether it still refuses.
                _ = recheck.tick(), if refused => {
                    if !watch_allowed(&api, &selector).await {
                        continue;
                    }
                    tracing::info!(kind = %resolved.resource.kind, namespace = place, "the drift watch is allowed again");
                    if sightings.send(Sighting::Allowed { watch: watch.clone() }).is_err() {
                        return;
                    }
                    // Start over now rather than after the watcher's backoff.
                    break;
                }
            };
            let sighting = match event {
                Ok(Event::Apply(object)) | Ok(Event::InitApply(object)) => {
                    let key = resolved.key_of(&object);
                    listing.insert(key.clone());
                    match serde_json::to_value(&object) {
                        Ok(live) => Sighting::Changed { key, live },
                        Err(_) => continue,
                    }
                }
                Ok(Event::Delete(object)) => Sighting::Deleted {
                    key: resolved.key_of(&object),
                },
                Ok(Event::Init) => {
                    listing.clear();
                    continue;
                }
                Ok(Event::InitDone) => Sighting::Listed {
                    kind: resolved.kind_key(),
                    namespace: namespace.clone(),
                    keys: std::mem::take(&mut listing),
                },
                Err(err) => match forbidden(&err) {
                    // Once per episode; the watcher keeps retrying with its backoff.
                    Some(status) if !refused => {
                        refused = true;
                        recheck.reset();
                        let reason =
                            refusal_message(&resolved, namespace.as_deref(), &status.message);
                        tracing::warn!(%reason, "RBAC refuses a drift watch: drift there goes unseen");
                        Sighting::Refused {
                            watch: watch.clone(),
                            reason,
                        }
                    }
                    _ => {
                        tracing::debug!(kind = %resolved.resource.kind, namespace = place, error = %err, "watch interrupted");
                        continue;
                    }
                },
            };
            if sightings.send(sighting).is_err() {
                return;
            }
        }
    }
}

/// Whether the API server lets the agent start this watch now: a watch request, dropped as
/// soon as it is answered.
async fn watch_allowed(api: &Api<DynamicObject>, selector: &str) -> bool {
    let params = WatchParams::default().labels(selector).timeout(1);
    let started = tokio::time::timeout(super::state::PROBE_TIMEOUT, api.watch(&params, "0")).await;
    matches!(started, Ok(Ok(_)))
}

/// The watches the applied objects need: per kind, one cluster-wide or one per namespace the
/// kind is applied in, as the scope allows.
pub(super) fn needed_watches<'a>(
    scope: &SpokeScope,
    applied: impl Iterator<Item = (&'a ObjectKey, &'a AppliedObject)>,
) -> BTreeMap<WatchKey, Resolved> {
    let mut kinds: BTreeMap<KindKey, (Resolved, BTreeSet<String>)> = BTreeMap::new();
    for (key, object) in applied {
        let entry = kinds
            .entry(object.resource.kind_key())
            .or_insert_with(|| (object.resource.clone(), BTreeSet::new()));
        entry.1.extend(key.namespace.clone());
    }
    let mut needed = BTreeMap::new();
    for (kind, (resolved, used)) in kinds {
        let Some(namespaces) = scope.watch_namespaces(resolved.namespaced, &used) else {
            continue;
        };
        for namespace in namespaces {
            needed.insert((kind.clone(), namespace), resolved.clone());
        }
    }
    needed
}

impl Worker {
    fn owner_of(&self, key: &ObjectKey) -> Option<(Uuid, &AppliedObject)> {
        self.stacks
            .iter()
            .find_map(|(id, s)| s.applied.get(key).map(|a| (*id, a)))
    }

    pub(super) fn on_sighting(&mut self, sighting: Sighting) {
        let mut touched = BTreeSet::new();
        match sighting {
            Sighting::Changed { key, live } => {
                let owner = self
                    .owner_of(&key)
                    .map(|(id, applied)| (id, manifest::live_matches(&applied.desired, &live)));
                if let Some((id, matches)) = owner {
                    if !matches {
                        tracing::info!(stack = %id, object = %key, "drift: the object was changed");
                        self.drift.drifted.insert(id);
                    } else if let Some(stack) = self.stacks.get_mut(&id) {
                        // It holds what was applied: a corrected episode is over, and drift
                        // left in place (Detect) may be too: look again.
                        stack.drift.corrected.remove(&key);
                        if stack.drift.uncorrected.contains_key(&key) {
                            self.drift.drifted.insert(id);
                        }
                    }
                    touched.insert(id);
                }
            }
            Sighting::Deleted { key } => {
                if let Some((id, _)) = self.owner_of(&key) {
                    tracing::info!(stack = %id, object = %key, "drift: the object was deleted");
                    self.drift.drifted.insert(id);
                    touched.insert(id);
                }
            }
            Sighting::Listed {
                kind,
                namespace,
                keys,
            } => {
                for (id, stack) in &self.stacks {
                    let missing = stack.applied.keys().find(|key| {
                        key.group == kind.0
                            && key.kind == kind.1
                            && (namespace.is_none() || key.namespace == namespace)
                            && !keys.contains(key)
                    });
                    if let Some(key) = missing {
                        tracing::info!(stack = %id, object = %key, "drift: the object is gone");
                        self.drift.drifted.insert(*id);
                        touched.insert(*id);
                    }
                }
            }
            // Only while the watch is wanted: a stopped one's last word does not count.
            Sighting::Refused { watch, reason } => {
                if self.drift.watchers.contains_key(&watch) {
                    self.drift.refused.insert(watch, reason);
                }
            }
            Sighting::Allowed { watch } => {
                self.drift.refused.remove(&watch);
            }
        }
        if touched.is_empty() {
            return;
        }
        self.drift.health_due.extend(touched);
        if self.drift.debounce_until.is_none() {
            self.drift.debounce_until = Some(Instant::now() + self.config.drift_debounce);
        }
    }

    pub(super) async fn on_debounce(&mut self) {
        self.drift.debounce_until = None;
        let drifted = std::mem::take(&mut self.drift.drifted);
        let health_due = std::mem::take(&mut self.drift.health_due);
        for id in &drifted {
            self.sync_stack(*id).await;
        }
        for id in health_due.difference(&drifted) {
            if let Some(mut stack) = self.stacks.remove(id) {
                self.evaluate_health(&mut stack).await;
                self.stacks.insert(*id, stack);
            }
        }
    }

    /// Starts a watch for every kind currently applied (where the scope lets the agent
    /// watch, [`needed_watches`]) and stops the ones no longer needed.
    pub(super) fn ensure_watchers(&mut self) {
        let needed = needed_watches(
            &self.config.scope,
            self.stacks.values().flat_map(|s| s.applied.iter()),
        );
        self.drift.watchers.retain(|kind, handle| {
            let keep = needed.contains_key(kind);
            if !keep {
                handle.abort();
            }
            keep
        });
        let watchers = &self.drift.watchers;
        self.drift
            .refused
            .retain(|watch, _| watchers.contains_key(watch));
        let selector = manifest::agent_selector(&self.config.agent_name);
        for (watch, resolved) in needed {
            if self.drift.watchers.contains_key(&watch) {
                continue;
            }
            let namespace = watch.1.clone();
            tracing::debug!(kind = %resolved.resource.kind, namespace = namespace.as_deref().unwrap_or("*"), "watching for drift");
            let handle = self.drift.watch_tasks.spawn(watch_kind(
                self.applier.client().clone(),
                resolved,
                namespace,
                selector.clone(),
                self.drift.sightings_tx.clone(),
            ));
            self.drift.watchers.insert(watch, handle);
        }
        // Reap finished (aborted) watch tasks.
        while self.drift.watch_tasks.try_join_next().is_some() {}
    }

    /// Reports drift as [`next_drift_report`] decides.
    pub(super) fn report_drift(
        &mut self,
        stack: &mut StackState,
        drift: &BTreeMap<ObjectKey, (Change, bool)>,
    ) {
        let (memory, report) = next_drift_report(&stack.drift, drift);
        stack.drift = memory;
        let Some((status, message)) = report else {
            return;
        };
        tracing::info!(status = status.as_str(), %message, "drift");
        if !drift.is_empty() {
            self.metrics.drift_episodes.inc();
        }
        self.reporter.report(
            stack.desired.deployment_object_id,
            EventType::Drift,
            status,
            Some(message),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            group: String::new(),
            kind: "ConfigMap".into(),
            namespace: Some("shop".into()),
            name: name.into(),
        }
    }

    #[test]
    fn drift_is_reported_once_per_episode_and_when_drift_left_in_place_ends() {
        let changed = |corrected| BTreeMap::from([(key("a"), (Change::Changed, corrected))]);
        let clean = BTreeMap::new();
        // Corrected: reported; found again by the next sync: not; after a clean sync: again.
        let (memory, report) = next_drift_report(&DriftMemory::default(), &changed(true));
        assert_eq!(report.unwrap().0, EventStatus::Success);
        let (memory, report) = next_drift_report(&memory, &changed(true));
        assert!(report.is_none());
        let (memory, report) = next_drift_report(&memory, &clean);
        assert!(report.is_none(), "the end of corrected drift is no news");
        let (memory, report) = next_drift_report(&memory, &changed(true));
        assert!(report.is_some());
        // Left in place: reported, not repeated, its end reported.
        let (memory, report) = next_drift_report(&memory, &changed(false));
        assert_eq!(report.unwrap().0, EventStatus::Failure);
        assert_eq!(memory.uncorrected.len(), 1);
        let (memory, report) = next_drift_report(&memory, &changed(false));
        assert!(report.is_none());
        let mut more = changed(false);
        more.insert(key("b"), (Change::Deleted, false));
        let (memory, report) = next_drift_report(&memory, &more);
        assert!(report.unwrap().1.starts_with("2 objects drifted"));
        let (memory, report) = next_drift_report(&memory, &clean);
        assert_eq!(
            report,
            Some((
                EventStatus::Success,
                "no drift: every object holds what was applied".into()
            ))
        );
        assert_eq!(memory, DriftMemory::default());
    }

    fn applied(kind: &str, namespaced: bool) -> AppliedObject {
        let gvk = kube::api::GroupVersionKind::gvk("", "v1", kind);
        AppliedObject {
            resource: Resolved {
                resource: kube::api::ApiResource::from_gvk(&gvk),
                namespaced,
            },
            desired: serde_json::Value::Null,
        }
    }

    #[test]
    fn watches_are_per_namespace_inside_the_allowed_namespaces_and_cluster_wide_otherwise() {
        let namespace = ObjectKey {
            group: String::new(),
            kind: "Namespace".into(),
            namespace: None,
            name: "shop".into(),
        };
        let mut elsewhere = key("b");
        elsewhere.namespace = Some("pay".into());
        let objects = [
            (key("a"), applied("ConfigMap", true)),
            (elsewhere, applied("ConfigMap", true)),
            (key("c"), applied("ConfigMap", true)),
            (namespace, applied("Namespace", false)),
        ];
        let config_maps = (String::new(), "ConfigMap".to_owned());
        let namespaces = (String::new(), "Namespace".to_owned());
        let everywhere = needed_watches(
            &SpokeScope::everything(),
            objects.iter().map(|(k, a)| (k, a)),
        );
        let keys: Vec<&WatchKey> = everywhere.keys().collect();
        assert_eq!(
            keys,
            [&(config_maps.clone(), None), &(namespaces.clone(), None)]
        );
        let confined = SpokeScope::new(Some(["shop".to_owned(), "pay".to_owned()].into()), false);
        let per_namespace = needed_watches(&confined, objects.iter().map(|(k, a)| (k, a)));
        let keys: Vec<&WatchKey> = per_namespace.keys().collect();
        assert_eq!(
            keys,
            [
                &(config_maps.clone(), Some("pay".to_owned())),
                &(config_maps, Some("shop".to_owned())),
            ],
            "one watch per namespace used, none cluster-wide"
        );
    }

    #[test]
    fn a_refused_watch_names_the_resource_and_where() {
        let gvk = kube::api::GroupVersionKind::gvk("apps", "v1", "Deployment");
        let deployments = Resolved {
            resource: kube::api::ApiResource::from_gvk(&gvk),
            namespaced: true,
        };
        assert_eq!(
            refusal_message(&deployments, Some("shop"), "deployments.apps is forbidden"),
            "RBAC refuses watching deployments.apps in namespace shop: deployments.apps is forbidden"
        );
        let config_maps = applied("ConfigMap", true).resource;
        assert_eq!(
            refusal_message(&config_maps, None, "forbidden"),
            "RBAC refuses watching configmaps across the cluster: forbidden"
        );
        let status =
            |code| Box::new(kube::core::Status::failure("no", "Forbidden").with_code(code));
        assert!(
            forbidden(&watcher::Error::InitialListFailed(kube::Error::Api(
                status(403)
            )))
            .is_some()
        );
        assert!(forbidden(&watcher::Error::WatchError(status(403))).is_some());
        assert!(forbidden(&watcher::Error::NoResourceVersion).is_none());
    }

    #[test]
    fn a_drift_event_names_each_object_and_whether_it_was_put_back() {
        let corrected = BTreeMap::from([(key("a"), (Change::Changed, true))]);
        assert_eq!(
            drift_message(&corrected),
            (
                EventStatus::Success,
                "1 object drifted: ConfigMap shop/a (changed, corrected)".into()
            )
        );
        let detected = BTreeMap::from([
            (key("a"), (Change::Changed, false)),
            (key("b"), (Change::Deleted, false)),
        ]);
        assert_eq!(
            drift_message(&detected),
            (
                EventStatus::Failure,
                "2 objects drifted: ConfigMap shop/a (changed, not corrected); ConfigMap shop/b (deleted, not corrected)".into()
            )
        );
    }
}
