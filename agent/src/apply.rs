//! Everything that talks to the spoke cluster's API server about the objects of stacks:
//! discovery (apiVersion + kind → resource and scope, cached), server-side apply of one
//! object, the wait for CRDs to be Established, deletion with a uid precondition, and reads.
//! What to apply or delete, and in which order, is decided by the agent's sync and removal.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use brokkr_crds::AGENT_FIELD_MANAGER;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
    Preconditions, PropagationPolicy,
};
use kube::discovery::Scope;
use kube::{Client, ResourceExt};
use serde_json::Value;

use crate::manifest::{self, DEFAULT_NAMESPACE, Manifest, ObjectKey, Ownership};

/// How often, and how far apart, discovery is retried for a kind whose CRD was applied in the
/// same round (API servers publish discovery a moment after a CRD is Established).
pub const FRESH_KIND_ATTEMPTS: u32 = 8;
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

    /// Resolves a kind for reading or deleting: `None` when the cluster does not serve it
    /// (its objects cannot exist).
    pub async fn lookup(&self, gvk: &GroupVersionKind) -> Result<Option<Resolved>, String> {
        if let Some(Some(resolved)) = self.cache().get(gvk) {
            return Ok(Some(resolved.clone()));
        }
        self.discover(gvk).await
    }

    /// Where `manifest` goes once its kind is resolved.
    pub fn key_for(manifest: &Manifest, resolved: &Resolved) -> ObjectKey {
        ObjectKey {
            group: resolved.resource.group.clone(),
            kind: resolved.resource.kind.clone(),
            namespace: resolved.namespaced.then(|| {
                manifest
                    .namespace
                    .clone()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
            }),
            name: manifest.name.clone(),
        }
    }

    /// Server-side applies one object (forced, the agent's field manager) and returns what
    /// was applied and the server's answer.
    /// `ignored`: JSON pointers of fields to leave out (`ignoreDifferences`).
    pub async fn apply_object(
        &self,
        manifest: &Manifest,
        resolved: &Resolved,
        ownership: &Ownership,
        ignored: &[String],
    ) -> Result<(AppliedObject, DynamicObject), String> {
        let gvk = manifest.gvk();
        let mut resolved = resolved.clone();
        let mut retried = false;
        loop {
            let key = Self::key_for(manifest, &resolved);
            let mut desired =
                manifest::prepare(&manifest.object, key.namespace.as_deref(), ownership);
            manifest::strip_pointers(&mut desired, ignored);
            let api = resolved.api(&self.client, key.namespace.as_deref());
            let params = PatchParams::apply(AGENT_FIELD_MANAGER).force();
            match api
                .patch(&manifest.name, &params, &Patch::Apply(&desired))
                .await
            {
                Ok(object) => {
                    tracing::debug!(object = %key, "applied");
                    return Ok((
                        AppliedObject {
                            resource: resolved,
                            desired,
                        },
                        object,
                    ));
                }
                // A 404 from an apply is a missing namespace or a kind that went away since
                // discovery: look the kind up again, once.
                Err(err) if is_status(&err, 404) && !retried => {
                    retried = true;
                    self.invalidate(&gvk);
                    resolved = self.resolve(&gvk, 1).await?;
                }
                Err(err) => return Err(server_message(&err)),
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

    /// Deletes the object if it still has `uid` (a precondition, so that a re-created object
    /// of the same name is never deleted). `Ok(false)`: it was gone or replaced already.
    pub async fn delete_exact(
        &self,
        key: &ObjectKey,
        resolved: &Resolved,
        uid: &str,
    ) -> Result<bool, String> {
        let api = resolved.api(&self.client, key.namespace.as_deref());
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&key.name, &params).await {
            Ok(_) => {
                tracing::info!(object = %key, "deleted");
                Ok(true)
            }
            Err(err) if is_status(&err, 404) || is_status(&err, 409) => Ok(false),
            Err(err) => Err(server_message(&err)),
        }
    }

    /// Merge-patches the object (for orphaning: removing Brokkr's labels and annotations).
    pub async fn merge_patch(
        &self,
        key: &ObjectKey,
        resolved: &Resolved,
        patch: &Value,
    ) -> Result<(), String> {
        let api = resolved.api(&self.client, key.namespace.as_deref());
        api.patch(&key.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(|_| ())
            .map_err(|err| server_message(&err))
    }

    /// Reads the live object, `None` when it does not exist.
    pub async fn get_object(
        &self,
        key: &ObjectKey,
        resolved: &Resolved,
    ) -> Result<Option<DynamicObject>, String> {
        let api = resolved.api(&self.client, key.namespace.as_deref());
        api.get_opt(&key.name)
            .await
            .map_err(|err| server_message(&err))
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
