//! Everything that talks to the spoke cluster's API server: discovery (apiVersion + kind →
//! resource and scope, cached), server-side apply in phases with the wait for CRDs to be
//! Established, pruning and deletion by label, and reads for health.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use brokkr_crds::AGENT_FIELD_MANAGER;
use futures::future::join_all;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, Preconditions, PropagationPolicy,
};
use kube::discovery::Scope;
use kube::{Client, ResourceExt};
use serde_json::Value;

use crate::manifest::{self, DEFAULT_NAMESPACE, Manifest, ObjectKey, Ownership, Phase};

/// Kinds whose objects are looked for by label when pruning, besides the kinds the agent has
/// applied in this process and those of the current deployment object, so that an agent that
/// restarted still finds objects dropped from a stack while it was down. Kinds the cluster
/// does not serve are skipped.
pub const WELL_KNOWN_KINDS: [(&str, &str, &str); 20] = [
    ("", "v1", "Namespace"),
    ("", "v1", "ConfigMap"),
    ("", "v1", "Secret"),
    ("", "v1", "Service"),
    ("", "v1", "ServiceAccount"),
    ("", "v1", "PersistentVolumeClaim"),
    ("apps", "v1", "Deployment"),
    ("apps", "v1", "StatefulSet"),
    ("apps", "v1", "DaemonSet"),
    ("batch", "v1", "Job"),
    ("batch", "v1", "CronJob"),
    ("networking.k8s.io", "v1", "Ingress"),
    ("networking.k8s.io", "v1", "NetworkPolicy"),
    ("rbac.authorization.k8s.io", "v1", "Role"),
    ("rbac.authorization.k8s.io", "v1", "RoleBinding"),
    ("rbac.authorization.k8s.io", "v1", "ClusterRole"),
    ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding"),
    ("policy", "v1", "PodDisruptionBudget"),
    ("autoscaling", "v2", "HorizontalPodAutoscaler"),
    (manifest::CRD_GROUP, "v1", manifest::CRD_KIND),
];

/// How often, and how far apart, discovery is retried for a kind whose CRD was applied in the
/// same round (API servers publish discovery a moment after a CRD is Established).
const FRESH_KIND_ATTEMPTS: u32 = 8;
const FRESH_KIND_PAUSE: Duration = Duration::from_millis(250);
const ESTABLISHED_POLL: Duration = Duration::from_millis(200);

/// A kind as discovery resolved it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub resource: ApiResource,
    pub namespaced: bool,
}

/// (group, kind): what identifies a kind across versions.
pub type KindKey = (String, String);

impl Resolved {
    pub fn kind_key(&self) -> KindKey {
        (self.resource.group.clone(), self.resource.kind.clone())
    }

    fn api(&self, client: &Client, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) if self.namespaced => Api::namespaced_with(client.clone(), ns, &self.resource),
            _ => Api::all_with(client.clone(), &self.resource),
        }
    }

    pub fn key_of(&self, object: &DynamicObject) -> ObjectKey {
        ObjectKey {
            group: self.resource.group.clone(),
            kind: self.resource.kind.clone(),
            namespace: if self.namespaced {
                object.metadata.namespace.clone()
            } else {
                None
            },
            name: object.name_any(),
        }
    }
}

/// One object that could not be applied or deleted, and the API server's reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectFailure {
    /// `Kind namespace/name`.
    pub object: String,
    pub message: String,
}

impl ObjectFailure {
    pub fn summary(&self) -> String {
        format!("{}: {}", self.object, self.message)
    }
}

/// An object the agent applied, with what it applied (for drift checks).
#[derive(Clone, Debug)]
pub struct AppliedObject {
    pub resource: Resolved,
    pub desired: Value,
}

/// The result of applying one deployment object.
#[derive(Debug, Default)]
pub struct ApplyOutcome {
    pub applied: BTreeMap<ObjectKey, AppliedObject>,
    pub failures: Vec<ObjectFailure>,
    /// Every manifest whose kind resolved, applied or not: what pruning keeps.
    pub desired: BTreeSet<ObjectKey>,
    /// Kinds of manifests that did not resolve: pruning leaves those kinds alone this round.
    pub unresolved: BTreeSet<KindKey>,
    /// The kinds of this deployment object.
    pub kinds: BTreeMap<KindKey, Resolved>,
}

/// The result of pruning or deleting.
#[derive(Debug, Default)]
pub struct DeleteOutcome {
    pub deleted: Vec<ObjectKey>,
    pub failures: Vec<ObjectFailure>,
}

/// The spoke-cluster side of the agent.
pub struct Applier {
    client: Client,
    crd_timeout: Duration,
    /// `None` records a kind the cluster does not serve (used for well-known kinds only;
    /// applying an object of an unknown kind always asks again).
    discovery: Mutex<HashMap<GroupVersionKind, Option<Resolved>>>,
}

/// The API server's message for a failed call (what users see in events).
pub fn server_message(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        kube::Error::Api(status) if !status.reason.is_empty() => status.reason.clone(),
        other => other.to_string(),
    }
}

fn is_status(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == code)
}

fn unknown_kind(gvk: &GroupVersionKind) -> String {
    let api_version = if gvk.group.is_empty() {
        gvk.version.clone()
    } else {
        format!("{}/{}", gvk.group, gvk.version)
    };
    format!(
        "no matches for kind \"{}\" in version \"{api_version}\" (the API server does not serve it)",
        gvk.kind
    )
}

impl Applier {
    pub fn new(client: Client, crd_timeout: Duration) -> Applier {
        Applier {
            client,
            crd_timeout,
            discovery: Mutex::new(HashMap::new()),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn cache(&self) -> MutexGuard<'_, HashMap<GroupVersionKind, Option<Resolved>>> {
        self.discovery
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets everything discovery found (the periodic resync calls this).
    pub fn clear_discovery(&self) {
        self.cache().clear();
    }

    async fn discover(&self, gvk: &GroupVersionKind) -> Result<Option<Resolved>, String> {
        match kube::discovery::pinned_kind(&self.client, gvk).await {
            Ok((resource, caps)) => {
                let resolved = Resolved {
                    resource,
                    namespaced: caps.scope == Scope::Namespaced,
                };
                self.cache().insert(gvk.clone(), Some(resolved.clone()));
                Ok(Some(resolved))
            }
            Err(kube::Error::Discovery(_)) => Ok(None),
            Err(err) if is_status(&err, 404) => Ok(None),
            Err(err) => Err(format!(
                "failed to discover {}: {}",
                gvk.kind,
                server_message(&err)
            )),
        }
    }

    /// Resolves a kind for applying: from the cache, else discovery (re-run on every miss, so
    /// a kind served since the last look is found). `attempts` > 1 retries a kind not served
    /// (yet).
    pub async fn resolve(&self, gvk: &GroupVersionKind, attempts: u32) -> Result<Resolved, String> {
        if let Some(Some(resolved)) = self.cache().get(gvk) {
            return Ok(resolved.clone());
        }
        for attempt in 1..=attempts.max(1) {
            if let Some(resolved) = self.discover(gvk).await? {
                return Ok(resolved);
            }
            if attempt < attempts {
                tokio::time::sleep(FRESH_KIND_PAUSE).await;
            }
        }
        Err(unknown_kind(gvk))
    }

    fn invalidate(&self, gvk: &GroupVersionKind) {
        self.cache().remove(gvk);
    }

    /// Resolves a kind for listing: cached answers, including "not served", are reused until
    /// [`Applier::clear_discovery`].
    async fn resolve_known(&self, gvk: &GroupVersionKind) -> Option<Resolved> {
        if let Some(cached) = self.cache().get(gvk) {
            return cached.clone();
        }
        match self.discover(gvk).await {
            Ok(Some(resolved)) => Some(resolved),
            Ok(None) => {
                self.cache().insert(gvk.clone(), None);
                None
            }
            Err(message) => {
                tracing::debug!(%message, "skipping a well-known kind");
                None
            }
        }
    }

    /// The well-known kinds the cluster serves, plus `extra`.
    pub async fn listable_kinds(
        &self,
        extra: impl IntoIterator<Item = Resolved>,
    ) -> BTreeMap<KindKey, Resolved> {
        let mut kinds = BTreeMap::new();
        for (group, version, kind) in WELL_KNOWN_KINDS {
            if let Some(resolved) = self
                .resolve_known(&GroupVersionKind::gvk(group, version, kind))
                .await
            {
                kinds.insert(resolved.kind_key(), resolved);
            }
        }
        for resolved in extra {
            kinds.insert(resolved.kind_key(), resolved);
        }
        kinds
    }

    /// Applies a deployment object: Namespaces, then CRDs (waiting until they are
    /// Established), then everything else. An object that fails does not stop the others.
    pub async fn apply_all(&self, manifests: &[Manifest], ownership: &Ownership) -> ApplyOutcome {
        let mut outcome = ApplyOutcome::default();
        let mut ordered: Vec<&Manifest> = manifests.iter().collect();
        ordered.sort_by_key(|m| m.phase());
        let fresh_kinds: BTreeSet<KindKey> = manifests
            .iter()
            .filter_map(Manifest::defined_kind)
            .collect();
        let mut crds = Vec::new();
        let mut waited = false;
        for manifest in ordered {
            if manifest.phase() == Phase::Rest && !waited {
                waited = true;
                self.wait_for_crds(&crds, &mut outcome).await;
            }
            let fresh = fresh_kinds.contains(&(manifest.group().to_owned(), manifest.kind.clone()));
            let attempts = if fresh { FRESH_KIND_ATTEMPTS } else { 1 };
            match self.apply_one(manifest, ownership, attempts).await {
                Ok((key, applied)) => {
                    if manifest.phase() == Phase::Crds {
                        crds.push(key.clone());
                    }
                    outcome
                        .kinds
                        .insert(applied.resource.kind_key(), applied.resource.clone());
                    outcome.desired.insert(key.clone());
                    outcome.applied.insert(key, applied);
                }
                Err((key, resolved, message)) => {
                    match (key, resolved) {
                        (Some(key), Some(resolved)) => {
                            outcome.kinds.insert(resolved.kind_key(), resolved);
                            outcome.desired.insert(key);
                        }
                        _ => {
                            outcome
                                .unresolved
                                .insert((manifest.group().to_owned(), manifest.kind.clone()));
                        }
                    }
                    tracing::warn!(object = %manifest.describe(), %message, "failed to apply");
                    outcome.failures.push(ObjectFailure {
                        object: manifest.describe(),
                        message,
                    });
                }
            }
        }
        if !waited {
            self.wait_for_crds(&crds, &mut outcome).await;
        }
        outcome
    }

    /// Applies one object; on failure returns its key and kind when they resolved.
    async fn apply_one(
        &self,
        manifest: &Manifest,
        ownership: &Ownership,
        attempts: u32,
    ) -> Result<(ObjectKey, AppliedObject), (Option<ObjectKey>, Option<Resolved>, String)> {
        let gvk = manifest.gvk();
        let mut resolved = self
            .resolve(&gvk, attempts)
            .await
            .map_err(|message| (None, None, message))?;
        let mut retried = false;
        loop {
            let namespace = resolved.namespaced.then(|| {
                manifest
                    .namespace
                    .clone()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
            });
            let key = ObjectKey {
                group: resolved.resource.group.clone(),
                kind: resolved.resource.kind.clone(),
                namespace: namespace.clone(),
                name: manifest.name.clone(),
            };
            let desired = manifest::prepare(&manifest.object, namespace.as_deref(), ownership);
            let api = resolved.api(&self.client, namespace.as_deref());
            let params = PatchParams::apply(AGENT_FIELD_MANAGER).force();
            match api
                .patch(&manifest.name, &params, &Patch::Apply(&desired))
                .await
            {
                Ok(_) => {
                    tracing::debug!(object = %key, "applied");
                    return Ok((
                        key,
                        AppliedObject {
                            resource: resolved,
                            desired,
                        },
                    ));
                }
                // A 404 from an apply is a missing namespace or a kind that went away since
                // discovery: look the kind up again, once.
                Err(err) if is_status(&err, 404) && !retried => {
                    retried = true;
                    self.invalidate(&gvk);
                    match self.resolve(&gvk, 1).await {
                        Ok(again) => resolved = again,
                        Err(message) => return Err((None, None, message)),
                    }
                }
                Err(err) => return Err((Some(key), Some(resolved), server_message(&err))),
            }
        }
    }

    async fn wait_for_crds(&self, crds: &[ObjectKey], outcome: &mut ApplyOutcome) {
        let waits = crds
            .iter()
            .map(|key| async move { (key, self.wait_established(&key.name).await) });
        for (key, result) in join_all(waits).await {
            if let Err(message) = result {
                tracing::warn!(object = %key, %message, "CRD not established");
                outcome.applied.remove(key);
                outcome.failures.push(ObjectFailure {
                    object: key.to_string(),
                    message,
                });
            }
        }
    }

    /// Waits until the CRD's `Established` condition is True, for at most the configured time.
    pub async fn wait_established(&self, name: &str) -> Result<(), String> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let deadline = tokio::time::Instant::now() + self.crd_timeout;
        loop {
            match api.get_opt(name).await {
                Ok(Some(crd)) => {
                    let established = crd
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    if established {
                        return Ok(());
                    }
                }
                Ok(None) => {}
                Err(err) => tracing::debug!(crd = name, error = %err, "polling CRD"),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "not Established after {}s",
                    self.crd_timeout.as_secs_f64()
                ));
            }
            tokio::time::sleep(ESTABLISHED_POLL).await;
        }
    }

    /// Deletes the objects matching `selector` in `kinds` (but not in `skip`) that `doomed`
    /// picks, ordinary objects first, then CRDs, then Namespaces. Only objects carrying the
    /// selector's labels are ever touched.
    pub async fn delete_matching(
        &self,
        selector: &str,
        kinds: &BTreeMap<KindKey, Resolved>,
        skip: &BTreeSet<KindKey>,
        doomed: impl Fn(&ObjectKey, &DynamicObject) -> bool,
    ) -> DeleteOutcome {
        let mut outcome = DeleteOutcome::default();
        let mut candidates: Vec<(ObjectKey, Resolved, Option<String>)> = Vec::new();
        for (kind_key, resolved) in kinds {
            if skip.contains(kind_key) {
                continue;
            }
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resolved.resource);
            match api.list(&ListParams::default().labels(selector)).await {
                Ok(list) => {
                    for object in list.items {
                        let key = resolved.key_of(&object);
                        if object.metadata.deletion_timestamp.is_none() && doomed(&key, &object) {
                            candidates.push((key, resolved.clone(), object.metadata.uid.clone()));
                        }
                    }
                }
                // The kind is gone (its CRD was deleted): nothing of it is left to delete.
                Err(err) if is_status(&err, 404) => {}
                Err(err) => outcome.failures.push(ObjectFailure {
                    object: resolved.resource.kind.clone(),
                    message: format!("failed to list for pruning: {}", server_message(&err)),
                }),
            }
        }
        candidates.sort_by(|(a, _, _), (b, _, _)| {
            (a.phase().delete_rank(), a).cmp(&(b.phase().delete_rank(), b))
        });
        for (key, resolved, uid) in candidates {
            let api = resolved.api(&self.client, key.namespace.as_deref());
            let params = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                preconditions: Some(Preconditions {
                    uid,
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&key.name, &params).await {
                Ok(_) => {
                    tracing::info!(object = %key, "deleted");
                    outcome.deleted.push(key);
                }
                // Already gone, or replaced by a new object of the same name: not ours to delete.
                Err(err) if is_status(&err, 404) || is_status(&err, 409) => {}
                Err(err) => {
                    let message = server_message(&err);
                    tracing::warn!(object = %key, %message, "failed to delete");
                    outcome.failures.push(ObjectFailure {
                        object: key.to_string(),
                        message,
                    });
                }
            }
        }
        outcome
    }

    /// Reads the live object, `None` when it does not exist.
    pub async fn get(&self, key: &ObjectKey, resolved: &Resolved) -> Result<Option<Value>, String> {
        let api = resolved.api(&self.client, key.namespace.as_deref());
        match api.get_opt(&key.name).await {
            Ok(Some(object)) => serde_json::to_value(object)
                .map(Some)
                .map_err(|e| e.to_string()),
            Ok(None) => Ok(None),
            Err(err) => Err(server_message(&err)),
        }
    }
}
