//! Drift: a watch per applied kind (selected by the agent label; labels only *find* objects
//! here, they never make an object the agent's) — cluster-wide, or with `--allowed-namespaces`
//! one per namespace the kind is applied in, so the agent never lists outside its namespaces
//! ([`SpokeScope::watch_namespaces`]) — and the debounced sync of stacks whose
//! objects were changed or deleted. The sync itself finds the drift (it reads every live
//! object anyway) and corrects it, or with `driftPolicy: Detect` only compares; either way
//! each drift episode is reported as a `Drift` event ([`drift_message`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::StreamExt;
use kube::Client;
use kube::api::{Api, DynamicObject};
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
    let stream =
        watcher::watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listing: BTreeSet<ObjectKey> = BTreeSet::new();
    while let Some(event) = stream.next().await {
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
            Err(err) => {
                tracing::debug!(kind = %resolved.resource.kind, namespace = namespace.as_deref().unwrap_or("*"), error = %err, "watch interrupted");
                continue;
            }
        };
        if sightings.send(sighting).is_err() {
            return;
        }
    }
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
