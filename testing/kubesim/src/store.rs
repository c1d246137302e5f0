//! The one object store: objects as JSON, one global resourceVersion counter, a bounded event
//! history for watches, and the server-side lifecycle (finalizers, garbage collection through
//! ownerReferences, namespace and CRD termination).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::apply::{self, ManagedEntry, Writer};
use crate::resources::{self, CRD_GROUP, CRD_PLURAL, ResourceType};
use crate::schema;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::status::{ApiError, Cause, ResourceRef};
use crate::typed;

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

/// Everything but metadata (and status, when it is a subresource): what `generation` tracks.
fn spec_part(object: &Value, status_subresource: bool) -> Value {
    let mut part = object.clone();
    if let Value::Object(map) = &mut part {
        map.remove("metadata");
        map.remove("apiVersion");
        map.remove("kind");
        if status_subresource {
            map.remove("status");
        }
    }
    part
}

fn owner_uids(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid")?.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

fn validate_name(rt: &ResourceType, name: &str) -> Option<Cause> {
    if name.is_empty() {
        return Some(Cause {
            reason: "FieldValueRequired",
            message: "Required value: name or generateName is required".into(),
            field: "metadata.name".into(),
        });
    }
    let (ok, what) = if rt.is_namespace() || (rt.group.is_empty() && rt.plural == "services") {
        (
            is_dns_label(name),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
        )
    } else {
        (
            is_dns_subdomain(name),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        )
    };
    (!ok).then(|| Cause {
        reason: "FieldValueInvalid",
        message: format!("Invalid value: {}: {what}", json!(name)),
        field: "metadata.name".into(),
    })
}

fn generated_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(5)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
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

impl State {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn compacted_rv(&self) -> u64 {
        self.compacted_rv
    }

    /// Built-ins plus every CRD that serves at least one version.
    pub fn resource_types(&self) -> Vec<ResourceType> {
        let mut types = resources::builtin_types();
        types.extend(
            self.objects_of(CRD_GROUP, CRD_PLURAL)
                .filter_map(|(_, crd)| resources::type_from_crd(crd)),
        );
        types
    }

    pub fn resource_type(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.resource_types()
            .into_iter()
            .find(|t| t.group == group && t.plural == plural && t.serves(version))
    }

    fn target_for(&self, pick: impl Fn(&ResourceType) -> bool, namespace: Option<&str>) -> Target {
        let rt = self
            .resource_types()
            .into_iter()
            .find(|t| pick(t))
            .unwrap_or_else(|| unreachable!("built-in resource types are always registered"));
        Target {
            version: rt.versions[0].clone(),
            namespace: namespace.map(String::from),
            rt,
        }
    }

    fn objects_of<'a>(
        &'a self,
        group: &str,
        resource: &str,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> {
        let start = Key {
            group: group.to_string(),
            resource: resource.to_string(),
            namespace: String::new(),
            name: String::new(),
        };
        let (group, resource) = (group.to_string(), resource.to_string());
        self.objects
            .range(start..)
            .take_while(move |(k, _)| k.group == group && k.resource == resource)
    }

    /// Events after `rv`, oldest first; `None` when some of them are no longer retained.
    pub fn events_after(&self, rv: u64) -> Option<Vec<Arc<Event>>> {
        if rv < self.compacted_rv {
            return None;
        }
        let start = self.history.partition_point(|e| e.rv <= rv);
        Some(self.history.range(start..).cloned().collect())
    }

    pub fn get(&self, target: &Target, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&target.key(name))
            .map(|o| target.present(o))
            .ok_or_else(|| target.not_found(name))
    }

    /// The matching objects, ordered by namespace and name.
    pub fn list(
        &self,
        target: &Target,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Vec<Value> {
        self.objects_of(&target.rt.group, &target.rt.plural)
            .filter(|(k, _)| {
                target
                    .namespace
                    .as_ref()
                    .is_none_or(|ns| *ns == k.namespace)
            })
            .filter(|(_, o)| labels.matches(o.pointer("/metadata/labels")) && fields.matches(o))
            .map(|(_, o)| target.present(o))
            .collect()
    }

    fn record(&mut self, key: &Key, kind: EventKind, object: Value, previous: Option<Value>) {
        self.history.push_back(Arc::new(Event {
            rv: self.rv,
            group: key.group.clone(),
            resource: key.resource.clone(),
            namespace: key.namespace.clone(),
            kind,
            object,
            previous,
        }));
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted_rv = dropped.rv;
            }
        }
    }

    /// Stores `object` under a fresh resourceVersion and records the event.
    fn commit(&mut self, key: Key, mut object: Value) -> Value {
        self.rv += 1;
        metadata_mut(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let previous = self.objects.insert(key.clone(), object.clone());
        let kind = if previous.is_some() {
            EventKind::Modified
        } else {
            EventKind::Added
        };
        self.record(&key, kind, object.clone(), previous);
        object
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.rv += 1;
        metadata_mut(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.record(key, EventKind::Deleted, object.clone(), None);
        Some(object)
    }

    fn namespace_object(&self, name: &str) -> Option<&Value> {
        self.objects.get(&Key {
            group: String::new(),
            resource: "namespaces".into(),
            namespace: String::new(),
            name: name.to_string(),
        })
    }

    pub fn create(
        &mut self,
        target: &Target,
        body: Value,
        manager: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if let Some(error) = typed::check(&target.rt, &body).first() {
            return Err(typed::decode_error(&target.rt, &target.version, error));
        }
        self.write(
            target,
            None,
            body,
            Ownership::Update(manager.to_string()),
            "",
            dry_run,
        )
    }

    /// PUT: replaces the object (or, for `subresource == "status"`, its status).
    pub fn replace(
        &mut self,
        target: &Target,
        name: &str,
        body: Value,
        manager: &str,
        subresource: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if let Some(error) = typed::check(&target.rt, &body).first() {
            return Err(typed::decode_error(&target.rt, &target.version, error));
        }
        let current = self.get(target, name)?;
        check_body_identity(target, name, &body)?;
        let requested_rv = meta_str(&body, "resourceVersion").unwrap_or_default();
        if requested_rv.is_empty() {
            if target.rt.custom.is_some() {
                return Err(target.invalid(
                    name,
                    vec![Cause {
                        reason: "FieldValueInvalid",
                        message: "Invalid value: 0x0: must be specified for an update".into(),
                        field: "metadata.resourceVersion".into(),
                    }],
                ));
            }
        } else if Some(requested_rv) != meta_str(&current, "resourceVersion") {
            return Err(ApiError::stale(target.rt.reference(), name));
        }
        self.write(
            target,
            Some(current),
            body,
            Ownership::Update(manager.to_string()),
            subresource,
            dry_run,
        )
    }

    /// PATCH in any of its four forms. Returns the object and whether it was created (by apply).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        target: &Target,
        name: &str,
        patch_type: PatchType,
        body: &[u8],
        manager: Option<&str>,
        subresource: &str,
        dry_run: bool,
    ) -> Result<(Value, bool), ApiError> {
        let current = self.get(target, name);
        if let PatchType::Apply { force } = patch_type {
            let manager = manager.ok_or_else(|| {
                ApiError::invalid(
                    "PatchOptions.meta.k8s.io",
                    "meta.k8s.io",
                    "",
                    vec![Cause {
                        reason: "FieldValueRequired",
                        message: "Required value: is required for apply patch".into(),
                        field: "fieldManager".into(),
                    }],
                )
            })?;
            return self.server_side_apply(
                target,
                name,
                current.ok(),
                body,
                manager,
                force,
                subresource,
                dry_run,
            );
        }
        let current = current?;
        let mut patched = current.clone();
        match patch_type {
            PatchType::Merge | PatchType::Strategic => {
                let patch: Value = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
                if !patch.is_object() {
                    return Err(ApiError::bad_request("patch body must be a JSON object"));
                }
                json_patch::merge(&mut patched, &patch);
                if patch_type == PatchType::Strategic {
                    strip_directives(&mut patched);
                }
            }
            PatchType::Json => {
                let mut patch: json_patch::Patch = serde_json::from_slice(body).map_err(|e| {
                    ApiError::bad_request(format!("error decoding JSON patch: {e}"))
                })?;
                // The API server's JSON patch treats a missing field as null, so
                // `test <missing path> == null` passes (kube's finalizer helper relies on it).
                patch.0.retain(|op| match op {
                    json_patch::PatchOperation::Test(test) => {
                        !(test.value.is_null() && patched.pointer(test.path.as_str()).is_none())
                    }
                    _ => true,
                });
                json_patch::patch(&mut patched, &patch).map_err(|e| {
                    target.invalid(
                        name,
                        vec![Cause {
                            reason: "FieldValueInvalid",
                            message: format!("the JSON patch could not be applied: {e}"),
                            field: String::new(),
                        }],
                    )
                })?;
            }
            PatchType::Apply { .. } => unreachable!("handled above"),
        }
        if !patched.is_object() {
            return Err(ApiError::bad_request(
                "the patched document is not an object",
            ));
        }
        if let Some(error) = typed::check(&target.rt, &patched).first() {
            return Err(typed::patch_error(&patched, error));
        }
        check_body_identity(target, name, &patched)?;
        if meta_str(&patched, "resourceVersion") != meta_str(&current, "resourceVersion") {
            return Err(ApiError::stale(target.rt.reference(), name));
        }
        let manager = manager.unwrap_or("unknown").to_string();
        let object = self.write(
            target,
            Some(current),
            patched,
            Ownership::Update(manager),
            subresource,
            dry_run,
        )?;
        Ok((object, false))
    }

    #[allow(clippy::too_many_arguments)]
    fn server_side_apply(
        &mut self,
        target: &Target,
        name: &str,
        current: Option<Value>,
        body: &[u8],
        manager: &str,
        force: bool,
        subresource: &str,
        dry_run: bool,
    ) -> Result<(Value, bool), ApiError> {
        let config: Value = serde_json::from_slice(body)
            .or_else(|_| serde_yaml::from_slice(body))
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        for (field, expected) in [
            ("apiVersion", target.api_version()),
            ("kind", target.rt.kind.clone()),
        ] {
            match config.get(field).and_then(Value::as_str) {
                Some(actual) if actual == expected => {}
                Some(actual) => {
                    return Err(ApiError::bad_request(format!(
                        "{field} {actual:?} does not match the expected {expected:?}"
                    )));
                }
                None => {
                    return Err(ApiError::bad_request(format!(
                        "invalid object: {field} must be set in an apply configuration"
                    )));
                }
            }
        }
        let type_errors = typed::check(&target.rt, &config);
        if !type_errors.is_empty() {
            let namespace = target.namespace.as_deref().unwrap_or_default();
            return Err(typed::apply_error(
                &target.rt,
                &target.version,
                namespace,
                name,
                &type_errors,
            ));
        }
        check_body_identity(target, name, &config)?;
        if meta_str(&config, "name").is_none() {
            return Err(ApiError::bad_request(
                "metadata.name must be set in an apply configuration",
            ));
        }
        if let Some(rv) = meta_str(&config, "resourceVersion")
            && current
                .as_ref()
                .and_then(|c| meta_str(c, "resourceVersion"))
                != Some(rv)
        {
            return Err(match current {
                Some(_) => ApiError::stale(target.rt.reference(), name),
                None => target.not_found(name),
            });
        }
        if current.is_none() && subresource == "status" {
            return Err(target.not_found(name));
        }
        let api_version = target.api_version();
        let time = now();
        let writer = Writer {
            manager,
            api_version: &api_version,
            subresource,
            status_subresource: target.rt.status_subresource,
            now: &time,
        };
        let (merged, entries) = apply::apply(current.as_ref(), &config, &writer, force)
            .map_err(|c| apply::conflict_error(&c))?;
        let created = current.is_none();
        let object = self.write(
            target,
            current,
            merged,
            Ownership::Applied(entries),
            subresource,
            dry_run,
        )?;
        Ok((object, created))
    }

    /// The single write path: create (`current == None`) or update. Applies the subresource
    /// rules, server-owned metadata, defaulting, validation, generation and managedFields; skips
    /// no-op updates (no new resourceVersion, no event) as the apiserver does.
    fn write(
        &mut self,
        target: &Target,
        current: Option<Value>,
        candidate: Value,
        ownership: Ownership,
        subresource: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let rt = &target.rt;
        if !candidate.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        let mut object = match (&current, subresource) {
            (Some(current), "status") => {
                let mut object = current.clone();
                set_or_remove(&mut object, "status", candidate.get("status").cloned());
                object
            }
            (Some(current), _) if rt.status_subresource => {
                let mut object = candidate;
                set_or_remove(&mut object, "status", current.get("status").cloned());
                object
            }
            (None, _) if rt.status_subresource => {
                let mut object = candidate;
                set_or_remove(&mut object, "status", None);
                object
            }
            _ => candidate,
        };
        object["apiVersion"] = json!(target.api_version());
        object["kind"] = json!(rt.kind);

        let name = match &current {
            Some(current) => meta_str(current, "name").unwrap_or_default().to_string(),
            None => self.name_for_create(target, &object)?,
        };
        let key = target.key(&name);
        {
            let meta = metadata_mut(&mut object);
            meta.insert("name".into(), json!(name));
            match &target.namespace {
                Some(ns) if rt.namespaced => meta.insert("namespace".into(), json!(ns)),
                _ => meta.remove("namespace"),
            };
            for server_owned in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                match current
                    .as_ref()
                    .and_then(|c| c.pointer(&format!("/metadata/{server_owned}")))
                {
                    Some(v) => meta.insert(server_owned.into(), v.clone()),
                    None => meta.remove(server_owned),
                };
            }
            meta.remove("selfLink");
            meta.remove("resourceVersion");
            if current.is_none() {
                meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
                meta.insert("creationTimestamp".into(), json!(now()));
            }
        }

        match &current {
            None => self.check_can_create(target, &key)?,
            Some(current) if is_deleting(current) => {
                let before = finalizers(current);
                if finalizers(&object).iter().any(|f| !before.contains(f)) {
                    return Err(target.invalid(
                        &name,
                        vec![Cause {
                            reason: "FieldValueForbidden",
                            message: "Forbidden: no new finalizers can be added if the object is being deleted"
                                .into(),
                            field: "metadata.finalizers".into(),
                        }],
                    ));
                }
            }
            Some(_) => {}
        }

        self.default_fields(target, current.as_ref(), &mut object);
        self.validate(target, &name, &mut object)?;

        if rt.tracks_generation {
            let generation = match &current {
                None => 1,
                Some(current) => {
                    let previous = current
                        .pointer("/metadata/generation")
                        .and_then(Value::as_i64)
                        .unwrap_or(1);
                    if spec_part(current, rt.status_subresource)
                        == spec_part(&object, rt.status_subresource)
                    {
                        previous
                    } else {
                        previous + 1
                    }
                }
            };
            metadata_mut(&mut object).insert("generation".into(), json!(generation));
        } else {
            metadata_mut(&mut object).remove("generation");
        }

        let mut entries = match ownership {
            Ownership::Applied(entries) => entries,
            Ownership::Update(manager) => {
                let api_version = target.api_version();
                let time = now();
                let writer = Writer {
                    manager: &manager,
                    api_version: &api_version,
                    subresource,
                    status_subresource: rt.status_subresource,
                    now: &time,
                };
                let previous = current
                    .as_ref()
                    .map(apply::parse_entries)
                    .unwrap_or_default();
                apply::record_update(current.as_ref(), &object, previous, &writer)
            }
        };
        apply::prune(&mut entries, &object);
        if entries.is_empty() {
            metadata_mut(&mut object).remove("managedFields");
        } else {
            metadata_mut(&mut object)
                .insert("managedFields".into(), apply::render_entries(&entries));
        }

        if let Some(current) = &current {
            let mut unchanged = object.clone();
            metadata_mut(&mut unchanged).insert(
                "resourceVersion".into(),
                current
                    .pointer("/metadata/resourceVersion")
                    .cloned()
                    .unwrap_or(Value::Null),
            );
            if unchanged == *current {
                return Ok(target.present(current));
            }
        }
        if dry_run {
            return Ok(target.present(&object));
        }

        let created = current.is_none();
        let stored = self.commit(key.clone(), object);
        if created && rt.is_namespace() {
            self.populate_namespace(&name);
        }
        self.collect_garbage();
        Ok(target.present(self.objects.get(&key).unwrap_or(&stored)))
    }

    fn name_for_create(&self, target: &Target, object: &Value) -> Result<String, ApiError> {
        if let Some(ns) = meta_str(object, "namespace")
            && target.rt.namespaced
            && target.namespace.as_deref() != Some(ns)
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        match (meta_str(object, "name"), meta_str(object, "generateName")) {
            (Some(name), _) if !name.is_empty() => Ok(name.to_string()),
            (_, Some(prefix)) if !prefix.is_empty() => {
                Ok(format!("{prefix}{}", generated_suffix()))
            }
            _ => Err(target.invalid(
                "",
                vec![
                    validate_name(&target.rt, "")
                        .unwrap_or_else(|| unreachable!("empty names are invalid")),
                ],
            )),
        }
    }

    fn check_can_create(&self, target: &Target, key: &Key) -> Result<(), ApiError> {
        let rt = &target.rt;
        if let Some(cause) = validate_name(rt, &key.name) {
            return Err(target.invalid(&key.name, vec![cause]));
        }
        if rt.namespaced {
            let namespaces = ResourceRef {
                group: "",
                plural: "namespaces",
            };
            let namespace = self
                .namespace_object(&key.namespace)
                .ok_or_else(|| ApiError::not_found(namespaces, &key.namespace))?;
            if is_deleting(namespace) {
                return Err(ApiError::forbidden(format!(
                    "{} {:?} is forbidden: unable to create new content in namespace {} because it is being terminated",
                    rt.plural, key.name, key.namespace
                )));
            }
        }
        if rt.custom.as_ref().is_some_and(|c| c.terminating) {
            return Err(ApiError::method_not_allowed(format!(
                "create not allowed while custom resource definition is terminating: {}",
                rt.custom
                    .as_ref()
                    .map(|c| c.crd_name.as_str())
                    .unwrap_or_default()
            )));
        }
        if self.objects.contains_key(key) {
            return Err(ApiError::already_exists(rt.reference(), &key.name));
        }
        Ok(())
    }

    /// The little defaulting real controllers and strategies would do that clients rely on.
    fn default_fields(&mut self, target: &Target, current: Option<&Value>, object: &mut Value) {
        let rt = &target.rt;
        match (rt.group.as_str(), rt.plural.as_str()) {
            ("", "namespaces") => {
                let name = meta_str(object, "name").unwrap_or_default().to_string();
                let meta = metadata_mut(object);
                let labels = meta.entry("labels").or_insert_with(|| json!({}));
                if labels.is_object() {
                    labels["kubernetes.io/metadata.name"] = json!(name);
                }
                if object.pointer("/spec/finalizers").is_none() {
                    object["spec"] = json!({ "finalizers": ["kubernetes"] });
                }
                let phase = if current.is_some_and(is_deleting) {
                    "Terminating"
                } else {
                    "Active"
                };
                if !object.get("status").is_some_and(Value::is_object) {
                    object["status"] = json!({});
                }
                object["status"]["phase"] = json!(phase);
            }
            ("", "services") => {
                let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
                    return;
                };
                let kind = spec
                    .entry("type")
                    .or_insert_with(|| json!("ClusterIP"))
                    .clone();
                spec.entry("sessionAffinity")
                    .or_insert_with(|| json!("None"));
                if kind != "ExternalName" && !spec.contains_key("clusterIP") {
                    let ip = match current.and_then(|c| c.pointer("/spec/clusterIP")) {
                        Some(ip) => ip.clone(),
                        None => {
                            let n = self.next_service_ip;
                            self.next_service_ip += 1;
                            json!(format!("10.96.{}.{}", (n / 250) % 250, n % 250 + 1))
                        }
                    };
                    spec.insert("clusterIPs".into(), json!([ip.clone()]));
                    spec.insert("clusterIP".into(), ip);
                }
                for port in spec
                    .get_mut("ports")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    if let Some(port) = port.as_object_mut() {
                        port.entry("protocol").or_insert_with(|| json!("TCP"));
                        if let Some(number) = port.get("port").cloned() {
                            port.entry("targetPort").or_insert(number);
                        }
                    }
                }
            }
            ("", "secrets") => {
                // stringData is write-only: the apiserver folds it into data.
                if let Some(Value::Object(string_data)) =
                    object.as_object_mut().and_then(|o| o.remove("stringData"))
                {
                    if !object.get("data").is_some_and(Value::is_object) {
                        object["data"] = json!({});
                    }
                    for (key, value) in string_data {
                        if let Some(text) = value.as_str() {
                            object["data"][key] = json!(base64(text.as_bytes()));
                        }
                    }
                }
                if object.get("type").is_none_or(Value::is_null) {
                    object["type"] = json!("Opaque");
                }
            }
            ("apps", "deployments" | "statefulsets") => {
                if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.entry("replicas").or_insert_with(|| json!(1));
                }
            }
            (CRD_GROUP, CRD_PLURAL) => {
                let names = object
                    .pointer("/spec/names")
                    .filter(|n| n.is_object())
                    .cloned()
                    .unwrap_or_else(|| json!({}));
                let mut accepted = names.clone();
                if let Some(kind) = names.get("kind").and_then(Value::as_str) {
                    accepted["singular"] = names
                        .get("singular")
                        .cloned()
                        .unwrap_or_else(|| json!(kind.to_lowercase()));
                    accepted["listKind"] = names
                        .get("listKind")
                        .cloned()
                        .unwrap_or_else(|| json!(format!("{kind}List")));
                }
                let storage: Vec<Value> = object
                    .pointer("/spec/versions")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                    .filter_map(|v| v.get("name").cloned())
                    .collect();
                let mut stored_versions: Vec<Value> = current
                    .and_then(|c| c.pointer("/status/storedVersions"))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for v in storage {
                    if !stored_versions.contains(&v) {
                        stored_versions.push(v);
                    }
                }
                let condition = |kind: &str, reason: &str, message: &str| {
                    let since = current
                        .and_then(|c| c.pointer("/status/conditions"))
                        .and_then(Value::as_array)
                        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
                        .and_then(|c| c.get("lastTransitionTime").cloned())
                        .unwrap_or_else(|| json!(now()));
                    json!({ "type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": since })
                };
                object["status"] = json!({
                    "conditions": [
                        condition("NamesAccepted", "NoConflicts", "no conflicts found"),
                        condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                    ],
                    "acceptedNames": accepted,
                    "storedVersions": stored_versions,
                });
            }
            _ => {}
        }
    }

    fn validate(&self, target: &Target, name: &str, object: &mut Value) -> Result<(), ApiError> {
        let rt = &target.rt;
        let causes = if rt.is_crd() {
            schema::validate_crd(object)
        } else if let Some(schema) = rt
            .custom
            .as_ref()
            .and_then(|c| c.schemas.get(&target.version))
        {
            schema::prune(schema, object);
            schema::validate(schema, object)
        } else {
            Vec::new()
        };
        if causes.is_empty() {
            Ok(())
        } else {
            Err(target.invalid(name, causes))
        }
    }

    /// What the service-account and root-CA controllers put into every new namespace.
    fn populate_namespace(&mut self, namespace: &str) {
        let service_accounts = self.target_for(
            |t| t.group.is_empty() && t.plural == "serviceaccounts",
            Some(namespace),
        );
        let config_maps = self.target_for(
            |t| t.group.is_empty() && t.plural == "configmaps",
            Some(namespace),
        );
        let account = json!({ "metadata": { "name": "default" } });
        let root_ca = json!({
            "metadata": { "name": "kube-root-ca.crt", "annotations": { "kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters." } },
            "data": { "ca.crt": "-----BEGIN CERTIFICATE-----\nkubesim has no CA: it serves plain HTTP\n-----END CERTIFICATE-----\n" },
        });
        for (target, object) in [(service_accounts, account), (config_maps, root_ca)] {
            if let Err(err) = self.create(&target, object, CONTROL_PLANE, false) {
                tracing::warn!("populating namespace {namespace}: {err}");
            }
        }
    }

    pub fn delete(
        &mut self,
        target: &Target,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Deleted, ApiError> {
        let key = target.key(name);
        let current = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| target.not_found(name))?;
        if let Some(uid) = &options.precondition_uid
            && meta_str(&current, "uid") != Some(uid.as_str())
        {
            return Err(ApiError::precondition_failed(
                target.rt.reference(),
                name,
                format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&current, "uid").unwrap_or_default()
                ),
            ));
        }
        if let Some(rv) = &options.precondition_rv
            && meta_str(&current, "resourceVersion") != Some(rv.as_str())
        {
            return Err(ApiError::precondition_failed(
                target.rt.reference(),
                name,
                format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&current, "resourceVersion").unwrap_or_default()
                ),
            ));
        }
        if options.dry_run {
            return Ok(Deleted::Pending(target.present(&current)));
        }
        self.begin_delete(&key, options.propagation);
        self.collect_garbage();
        Ok(match self.objects.get(&key) {
            Some(still_there) => Deleted::Pending(target.present(still_there)),
            None => {
                let mut gone = target.present(&current);
                metadata_mut(&mut gone)
                    .insert("resourceVersion".into(), json!(self.rv.to_string()));
                Deleted::Gone(gone)
            }
        })
    }

    /// Starts deleting an object: removes it now, or marks it (deletionTimestamp) when
    /// finalizers, namespace contents or custom resources must go first.
    fn begin_delete(&mut self, key: &Key, propagation: Propagation) {
        let Some(current) = self.objects.get(key).cloned() else {
            return;
        };
        let uid = meta_str(&current, "uid").unwrap_or_default().to_string();
        if propagation == Propagation::Orphan {
            self.orphan_dependents(&uid);
        }
        let mut object = current.clone();
        let mut holds = finalizers(&object);
        if propagation == Propagation::Foreground
            && self.has_dependents(&uid)
            && !holds.iter().any(|f| f == "foregroundDeletion")
        {
            holds.push("foregroundDeletion".into());
            metadata_mut(&mut object).insert("finalizers".into(), json!(holds));
        }
        let has_contents = (key.group.is_empty() && key.resource == "namespaces")
            || (key.group == CRD_GROUP && key.resource == CRD_PLURAL);
        if holds.is_empty() && !has_contents {
            self.remove(key);
            return;
        }
        if !is_deleting(&object) {
            let meta = metadata_mut(&mut object);
            meta.insert("deletionTimestamp".into(), json!(now()));
            meta.insert("deletionGracePeriodSeconds".into(), json!(0));
            if key.group.is_empty() && key.resource == "namespaces" {
                object["status"] = json!({ "phase": "Terminating" });
            }
        }
        if object != current {
            self.commit(key.clone(), object);
        }
    }

    fn has_dependents(&self, uid: &str) -> bool {
        self.objects
            .values()
            .any(|o| owner_uids(o).iter().any(|u| u == uid))
    }

    fn orphan_dependents(&mut self, uid: &str) {
        let dependents: Vec<(Key, Value)> = self
            .objects
            .iter()
            .filter(|(_, o)| owner_uids(o).iter().any(|u| u == uid))
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect();
        for (key, mut object) in dependents {
            if let Some(Value::Array(refs)) = object.pointer_mut("/metadata/ownerReferences") {
                refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
                if refs.is_empty() {
                    metadata_mut(&mut object).remove("ownerReferences");
                }
            }
            self.commit(key, object);
        }
    }

    /// Runs the garbage collector, namespace and CRD finalization to a fixpoint, synchronously,
    /// so tests that poll see a settled state right after the request that triggered it.
    fn collect_garbage(&mut self) {
        loop {
            let uids: HashSet<String> = self
                .objects
                .values()
                .filter_map(|o| meta_str(o, "uid").map(String::from))
                .collect();
            let foreground_owners: HashSet<String> = self
                .objects
                .values()
                .filter(|o| {
                    is_deleting(o) && finalizers(o).iter().any(|f| f == "foregroundDeletion")
                })
                .filter_map(|o| meta_str(o, "uid").map(String::from))
                .collect();
            let terminating_namespaces: HashSet<String> = self
                .objects_of("", "namespaces")
                .filter(|(_, o)| is_deleting(o))
                .map(|(k, _)| k.name.clone())
                .collect();
            let terminating_crds: HashSet<(String, String)> = self
                .objects_of(CRD_GROUP, CRD_PLURAL)
                .filter(|(_, o)| is_deleting(o))
                .filter_map(|(_, o)| {
                    let group = o.pointer("/spec/group")?.as_str()?;
                    let plural = o.pointer("/spec/names/plural")?.as_str()?;
                    Some((group.to_string(), plural.to_string()))
                })
                .collect();

            let mut to_delete = Vec::new();
            let mut to_remove = Vec::new();
            let mut release_foreground = Vec::new();
            for (key, object) in &self.objects {
                let deleting = is_deleting(object);
                let holds = finalizers(object);
                let uid = meta_str(object, "uid").unwrap_or_default();
                let owners = owner_uids(object);
                if deleting {
                    if holds.iter().any(|f| f == "foregroundDeletion") && !self.has_dependents(uid)
                    {
                        release_foreground.push(key.clone());
                    }
                    let empty = if key.group.is_empty() && key.resource == "namespaces" {
                        !self.objects.keys().any(|k| k.namespace == key.name)
                    } else if key.group == CRD_GROUP && key.resource == CRD_PLURAL {
                        let group = object
                            .pointer("/spec/group")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        let plural = object
                            .pointer("/spec/names/plural")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        self.objects_of(group, plural).next().is_none()
                    } else {
                        true
                    };
                    if holds.is_empty() && empty {
                        to_remove.push(key.clone());
                    }
                    continue;
                }
                let orphaned = !owners.is_empty() && owners.iter().all(|u| !uids.contains(u));
                let owner_going_first = owners.iter().any(|u| foreground_owners.contains(u));
                let in_terminating_namespace = terminating_namespaces.contains(&key.namespace);
                let of_terminating_crd =
                    terminating_crds.contains(&(key.group.clone(), key.resource.clone()));
                if orphaned || owner_going_first || in_terminating_namespace || of_terminating_crd {
                    to_delete.push(key.clone());
                }
            }
            if to_delete.is_empty() && to_remove.is_empty() && release_foreground.is_empty() {
                return;
            }
            for key in release_foreground {
                if let Some(mut object) = self.objects.get(&key).cloned() {
                    let rest: Vec<String> = finalizers(&object)
                        .into_iter()
                        .filter(|f| f != "foregroundDeletion")
                        .collect();
                    metadata_mut(&mut object).insert("finalizers".into(), json!(rest));
                    if rest.is_empty() {
                        metadata_mut(&mut object).remove("finalizers");
                    }
                    self.commit(key, object);
                }
            }
            for key in to_remove {
                self.remove(&key);
            }
            for key in to_delete {
                self.begin_delete(&key, Propagation::Background);
            }
        }
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn set_or_remove(object: &mut Value, field: &str, value: Option<Value>) {
    if let Value::Object(map) = object {
        match value {
            Some(v) => map.insert(field.to_string(), v),
            None => map.remove(field),
        };
    }
}

/// Removes strategic-merge-patch directives (`$patch`, `$setElementOrder/...`, `$retainKeys`)
/// that our merge-patch approximation leaves behind.
fn strip_directives(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with('$'));
            map.values_mut().for_each(strip_directives);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

/// A body's name and namespace, when given, must be the URL's.
fn check_body_identity(target: &Target, name: &str, body: &Value) -> Result<(), ApiError> {
    if let Some(body_name) = meta_str(body, "name")
        && body_name != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    if let (Some(ns), Some(url_ns)) = (meta_str(body, "namespace"), &target.namespace)
        && target.rt.namespaced
        && !ns.is_empty()
        && ns != url_ns
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Arc<Store> {
        Store::new(Options::default())
    }

    fn target(state: &State, group: &str, plural: &str, namespace: Option<&str>) -> Target {
        state.target_for(|t| t.group == group && t.plural == plural, namespace)
    }

    fn config_map(name: &str) -> Value {
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name }, "data": { "k": "v" } })
    }

    fn background() -> DeleteOptions {
        DeleteOptions {
            propagation: Propagation::Background,
            precondition_uid: None,
            precondition_rv: None,
            dry_run: false,
        }
    }

    #[test]
    fn base64_matches_the_standard_alphabet_with_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"hunter2"), "aHVudGVyMg==");
    }

    #[test]
    fn bootstraps_namespaces_with_their_default_contents() {
        let store = store();
        let state = store.lock();
        let cms = target(&state, "", "configmaps", Some("default"));
        let names: Vec<String> = state
            .list(&cms, &LabelSelector::default(), &FieldSelector::default())
            .iter()
            .filter_map(|o| meta_str(o, "name").map(String::from))
            .collect();
        assert_eq!(names, ["kube-root-ca.crt"]);
    }

    #[test]
    fn no_op_updates_keep_the_resource_version() {
        let store = store();
        let mut state = store.lock();
        let cms = target(&state, "", "configmaps", Some("default"));
        let created = state
            .create(&cms, config_map("a"), "m", false)
            .expect("create");
        let rv = state.resource_version();
        let replaced = state
            .replace(&cms, "a", created.clone(), "m", "", false)
            .expect("update");
        assert_eq!(
            replaced["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
        assert_eq!(state.resource_version(), rv);
    }

    #[test]
    fn history_overflow_expires_old_resource_versions() {
        let store = Store::new(Options {
            history_limit: 2,
            ..Options::default()
        });
        let mut state = store.lock();
        let cms = target(&state, "", "configmaps", Some("default"));
        let start = state.resource_version();
        for name in ["a", "b", "c"] {
            state
                .create(&cms, config_map(name), "m", false)
                .expect("create");
        }
        assert!(state.events_after(start).is_none());
        let recent = state
            .events_after(state.resource_version() - 1)
            .expect("retained");
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0].kind, EventKind::Added);
    }

    #[test]
    fn dependents_of_a_removed_owner_are_collected() {
        let store = store();
        let mut state = store.lock();
        let cms = target(&state, "", "configmaps", Some("default"));
        let owner = state
            .create(&cms, config_map("owner"), "m", false)
            .expect("owner");
        let mut dependent = config_map("dependent");
        dependent["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"],
        }]);
        state
            .create(&cms, dependent, "m", false)
            .expect("dependent");
        state.delete(&cms, "owner", &background()).expect("delete");
        assert!(state.get(&cms, "dependent").is_err());
    }

    #[test]
    fn deleting_a_namespace_waits_for_finalized_contents() {
        let store = store();
        let mut state = store.lock();
        let namespaces = target(&state, "", "namespaces", None);
        state
            .create(
                &namespaces,
                json!({ "metadata": { "name": "doomed" } }),
                "m",
                false,
            )
            .expect("namespace");
        let cms = target(&state, "", "configmaps", Some("doomed"));
        let mut held = config_map("held");
        held["metadata"]["finalizers"] = json!(["example.com/hold"]);
        state.create(&cms, held, "m", false).expect("configmap");
        state
            .delete(&namespaces, "doomed", &background())
            .expect("delete");
        let ns = state.get(&namespaces, "doomed").expect("still terminating");
        assert_eq!(ns["status"]["phase"], "Terminating");
        let mut released = state.get(&cms, "held").expect("held back by its finalizer");
        assert!(is_deleting(&released));
        released["metadata"]["finalizers"] = json!([]);
        state
            .replace(&cms, "held", released, "m", "", false)
            .expect("release");
        assert!(state.get(&cms, "held").is_err());
        assert!(state.get(&namespaces, "doomed").is_err());
    }

    #[test]
    fn foreground_deletion_removes_dependents_first() {
        let store = store();
        let mut state = store.lock();
        let cms = target(&state, "", "configmaps", Some("default"));
        let owner = state
            .create(&cms, config_map("owner"), "m", false)
            .expect("owner");
        let mut dependent = config_map("dependent");
        dependent["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"],
        }]);
        dependent["metadata"]["finalizers"] = json!(["example.com/hold"]);
        state
            .create(&cms, dependent, "m", false)
            .expect("dependent");
        let options = DeleteOptions {
            propagation: Propagation::Foreground,
            ..background()
        };
        assert!(matches!(
            state.delete(&cms, "owner", &options),
            Ok(Deleted::Pending(_))
        ));
        let mut dependent = state.get(&cms, "dependent").expect("held");
        dependent["metadata"]["finalizers"] = json!([]);
        state
            .replace(&cms, "dependent", dependent, "m", "", false)
            .expect("release");
        assert!(
            state.get(&cms, "owner").is_err(),
            "owner goes once its dependents are gone"
        );
    }
}
