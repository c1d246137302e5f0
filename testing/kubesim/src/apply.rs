//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! A simplification of structured-merge-diff: a manager owns a set of *leaf* paths, where a
//! leaf is a scalar, an empty map, or a whole list (every list is atomic, which is what CRDs get
//! by default without `x-kubernetes-list-type`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use crate::status::{ApiError, Cause};

pub type Path = Vec<String>;
pub type FieldSet = BTreeSet<Path>;

/// Which part of an object a write may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The main resource. `status_subresource` says whether `status` is excluded.
    Main { status_subresource: bool },
    /// The `/status` subresource: only `status`.
    Status,
    /// Everything that can be owned at all.
    All,
}

/// The metadata fields that managers can own; the rest is the server's.
const OWNABLE_METADATA: [&str; 4] = ["labels", "annotations", "finalizers", "ownerReferences"];

/// The owned leaves of `object` within `scope`, with their values.
pub fn leaves(object: &Value, scope: Scope) -> BTreeMap<Path, &Value> {
    let mut out = BTreeMap::new();
    let Some(fields) = object.as_object() else {
        return out;
    };
    for (key, value) in fields {
        let included = match key.as_str() {
            "apiVersion" | "kind" => false,
            "status" => match scope {
                Scope::Main { status_subresource } => !status_subresource,
                Scope::Status | Scope::All => true,
            },
            _ => scope != Scope::Status,
        };
        if !included {
            continue;
        }
        if key == "metadata" {
            for meta_key in OWNABLE_METADATA {
                if let Some(v) = value.get(meta_key) {
                    collect(v, vec!["metadata".into(), meta_key.into()], &mut out);
                }
            }
        } else {
            collect(value, vec![key.clone()], &mut out);
        }
    }
    out
}

fn collect<'a>(value: &'a Value, path: Path, out: &mut BTreeMap<Path, &'a Value>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let mut child = path.clone();
                child.push(k.clone());
                collect(v, child, out);
            }
        }
        Value::Null => {}
        _ => {
            out.insert(path, value);
        }
    }
}

/// Two paths overlap when one is a prefix of the other (including equality).
fn overlaps(a: &Path, b: &Path) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

pub fn get_path<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(object, |v, k| v.get(k))
}

/// Removes the value at `path`, then any maps left empty by that, down to depth 2
/// (a top-level field like `spec` or `data` is left in place, as an empty map).
fn remove_path(object: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let Some(parent) = parents
        .iter()
        .try_fold(&mut *object, |v, k| v.get_mut(k))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    parent.remove(last);
    if parent.is_empty() && parents.len() >= 2 {
        remove_path(object, parents);
    }
}

pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for element in path {
            let entry = node
                .entry(format!("f:{element}"))
                .or_insert_with(|| Value::Object(Map::new()));
            match entry {
                Value::Object(map) => node = map,
                _ => break,
            }
        }
    }
    Value::Object(root)
}

/// Reads fieldsV1. Elements we never produce (`k:`, `v:`, `i:`) are kept verbatim; they name no
/// leaf of ours and so are dropped by the next prune.
pub fn from_fields_v1(fields: &Value) -> FieldSet {
    fn walk(node: &Value, path: &mut Path, out: &mut FieldSet) {
        let Some(map) = node.as_object() else {
            return;
        };
        if map.is_empty() && !path.is_empty() {
            out.insert(path.clone());
        }
        for (key, child) in map {
            if key == "." {
                if !path.is_empty() {
                    out.insert(path.clone());
                }
                continue;
            }
            path.push(key.strip_prefix("f:").unwrap_or(key).to_string());
            walk(child, path, out);
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    walk(fields, &mut Vec::new(), &mut out);
    out
}

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedEntry {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    pub api_version: String,
    pub time: String,
    /// `""` for the main resource, `"status"` for the status subresource.
    pub subresource: String,
    pub fields: FieldSet,
}

impl ManagedEntry {
    fn is(&self, manager: &str, operation: &str, subresource: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }

    /// How the apiserver names a manager in conflict messages.
    fn describe(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            s = format!("{s} with subresource {:?}", self.subresource);
        }
        if self.operation == "Update" {
            s = format!("{s} using {} at {}", self.api_version, self.time);
        }
        s
    }
}

pub fn parse_entries(object: &Value) -> Vec<ManagedEntry> {
    let Some(entries) = object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    let text = |e: &Value, k: &str| {
        e.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    entries
        .iter()
        .filter(|e| e.get("manager").is_some())
        .map(|e| ManagedEntry {
            manager: text(e, "manager"),
            operation: text(e, "operation"),
            api_version: text(e, "apiVersion"),
            time: text(e, "time"),
            subresource: text(e, "subresource"),
            fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
        })
        .collect()
}

pub fn render_entries(entries: &[ManagedEntry]) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|e| {
                let mut entry = json!({
                    "manager": e.manager,
                    "operation": e.operation,
                    "apiVersion": e.api_version,
                    "time": e.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": to_fields_v1(&e.fields),
                });
                if !e.subresource.is_empty() {
                    entry["subresource"] = json!(e.subresource);
                }
                entry
            })
            .collect(),
    )
}

/// Who is writing, for the ownership bookkeeping.
#[derive(Debug, Clone)]
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub subresource: &'a str,
    pub status_subresource: bool,
    pub now: &'a str,
}

impl Writer<'_> {
    fn scope(&self) -> Scope {
        if self.subresource == "status" {
            Scope::Status
        } else {
            Scope::Main {
                status_subresource: self.status_subresource,
            }
        }
    }

    /// Finds or appends this writer's entry for `operation`.
    fn entry<'e>(
        &self,
        entries: &'e mut Vec<ManagedEntry>,
        operation: &str,
    ) -> &'e mut ManagedEntry {
        let index = match entries
            .iter()
            .position(|e| e.is(self.manager, operation, self.subresource))
        {
            Some(i) => i,
            None => {
                entries.push(ManagedEntry {
                    manager: self.manager.to_string(),
                    operation: operation.to_string(),
                    api_version: self.api_version.to_string(),
                    time: self.now.to_string(),
                    subresource: self.subresource.to_string(),
                    fields: FieldSet::new(),
                });
                entries.len() - 1
            }
        };
        &mut entries[index]
    }

    fn set_fields(&self, entry: &mut ManagedEntry, fields: FieldSet) {
        if entry.fields != fields {
            entry.fields = fields;
            entry.time = self.now.to_string();
            entry.api_version = self.api_version.to_string();
        }
    }
}

/// Drops owned paths that no longer exist in `object`, then entries that own nothing.
pub fn prune(entries: &mut Vec<ManagedEntry>, object: &Value) {
    let present = leaves(object, Scope::All);
    for entry in entries.iter_mut() {
        entry.fields.retain(|p| present.contains_key(p));
    }
    entries.retain(|e| !e.fields.is_empty());
}

/// Ownership after a create/update/patch (operation `Update`): the writer takes every field it
/// added or changed, from whoever had it; removed fields are owned by nobody.
pub fn record_update(
    old: Option<&Value>,
    new: &Value,
    mut entries: Vec<ManagedEntry>,
    writer: &Writer<'_>,
) -> Vec<ManagedEntry> {
    let before = old.map(|o| leaves(o, writer.scope())).unwrap_or_default();
    let changed: FieldSet = leaves(new, writer.scope())
        .into_iter()
        .filter(|(path, value)| before.get(path) != Some(value))
        .map(|(path, _)| path)
        .collect();
    if !changed.is_empty() {
        for entry in entries.iter_mut() {
            if !entry.is(writer.manager, "Update", writer.subresource) {
                entry
                    .fields
                    .retain(|p| !changed.iter().any(|c| overlaps(p, c)));
            }
        }
        let entry = writer.entry(&mut entries, "Update");
        let mut fields = entry.fields.clone();
        fields.retain(|p| !changed.iter().any(|c| overlaps(p, c)));
        fields.extend(changed);
        writer.set_fields(entry, fields);
    }
    prune(&mut entries, new);
    entries
}

/// A field another manager owns with a different value.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub manager: String,
    pub path: Path,
}

fn dotted(path: &Path) -> String {
    path.iter().map(|p| format!(".{p}")).collect()
}

/// The 409 the apiserver answers for apply conflicts (message format from k8s `conflict.go`).
pub fn conflict_error(conflicts: &[Conflict]) -> ApiError {
    let causes = conflicts
        .iter()
        .map(|c| Cause {
            reason: "FieldManagerConflict",
            message: format!("conflict with {}", c.manager),
            field: dotted(&c.path),
        })
        .collect();
    let message = match conflicts {
        [one] => format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            one.manager,
            dotted(&one.path)
        ),
        many => {
            let mut by_manager: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for c in many {
                by_manager
                    .entry(&c.manager)
                    .or_default()
                    .push(dotted(&c.path));
            }
            let lines: Vec<String> = by_manager
                .iter()
                .flat_map(|(manager, paths)| {
                    std::iter::once(format!("conflicts with {manager}:"))
                        .chain(paths.iter().map(|p| format!("- {p}")))
                })
                .collect();
            format!(
                "Apply failed with {} conflicts: {}",
                many.len(),
                lines.join("\n")
            )
        }
    };
    ApiError::apply_conflict(message, causes)
}

/// Recursively merges an applied configuration into the live object: maps merge key by key,
/// everything else (scalars, lists) is replaced.
fn merge_into(live: &mut Value, applied: &Value) {
    match (live, applied) {
        (Value::Object(live), Value::Object(applied)) => {
            for (k, v) in applied {
                match live.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_into(existing, v)
                    }
                    _ => {
                        live.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (live, applied) => *live = applied.clone(),
    }
}

fn strip_nulls(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|_, v| !v.is_null());
        map.values_mut().for_each(strip_nulls);
    }
}

/// Restricts an applied configuration to what the writer's scope may set.
fn scoped_config(applied: &Value, writer: &Writer<'_>) -> Value {
    let mut config = applied.clone();
    strip_nulls(&mut config);
    if let Value::Object(map) = &mut config {
        match writer.scope() {
            Scope::Status => {
                map.retain(|k, _| {
                    matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status")
                });
                if let Some(Value::Object(meta)) = map.get_mut("metadata") {
                    meta.retain(|k, _| {
                        matches!(k.as_str(), "name" | "namespace" | "resourceVersion")
                    });
                }
            }
            Scope::Main {
                status_subresource: true,
            } => {
                map.remove("status");
            }
            _ => {}
        }
    }
    config
}

/// Server-side apply of `applied` by `writer` onto `live` (absent when the object does not
/// exist yet). Returns the merged object and its new managed fields, or the conflicts.
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    writer: &Writer<'_>,
    force: bool,
) -> Result<(Value, Vec<ManagedEntry>), Vec<Conflict>> {
    let config = scoped_config(applied, writer);
    let config_leaves = leaves(&config, writer.scope());
    let wanted: FieldSet = config_leaves.keys().cloned().collect();
    let empty = Value::Object(Map::new());
    let live = live.unwrap_or(&empty);
    let mut entries = parse_entries(live);

    // The applied leaves that would change the live object; only those can conflict.
    let changing: Vec<&Path> = config_leaves
        .iter()
        .filter(|(path, value)| {
            let live_value = get_path(live, path);
            // Merging an empty map into a map changes nothing.
            let noop_map = value.as_object().is_some_and(Map::is_empty)
                && live_value.is_some_and(Value::is_object);
            live_value != Some(**value) && !noop_map
        })
        .map(|(path, _)| path)
        .collect();
    let mut conflicts = Vec::new();
    for path in &changing {
        for entry in entries.iter().filter(|e| e.manager != writer.manager) {
            if entry.fields.iter().any(|owned| overlaps(owned, path)) {
                conflicts.push(Conflict {
                    manager: entry.describe(),
                    path: (*path).clone(),
                });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    for entry in entries.iter_mut().filter(|e| e.manager != writer.manager) {
        entry
            .fields
            .retain(|owned| !changing.iter().any(|path| overlaps(owned, path)));
    }

    let previously_applied = entries
        .iter()
        .find(|e| e.is(writer.manager, "Apply", writer.subresource))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut merged = live.clone();
    merge_into(&mut merged, &config);
    for dropped in previously_applied.difference(&wanted) {
        let owned_elsewhere = entries
            .iter()
            .filter(|e| !e.is(writer.manager, "Apply", writer.subresource))
            .any(|e| e.fields.iter().any(|p| overlaps(p, dropped)));
        let re_added = wanted.iter().any(|w| overlaps(w, dropped));
        if !owned_elsewhere && !re_added {
            remove_path(&mut merged, dropped);
        }
    }

    let entry = writer.entry(&mut entries, "Apply");
    writer.set_fields(entry, wanted);
    prune(&mut entries, &merged);
    Ok((merged, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Path {
        p.split('.').map(String::from).collect()
    }

    fn writer(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            api_version: "v1",
            subresource: "",
            status_subresource: false,
            now: "2025-01-01T00:00:00Z",
        }
    }

    fn config_map(data: Value) -> Value {
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c" }, "data": data })
    }

    fn with_entries(mut object: Value, entries: &[ManagedEntry]) -> Value {
        object["metadata"]["managedFields"] = render_entries(entries);
        object
    }

    #[test]
    fn leaves_skip_server_metadata_and_scope_status() {
        let object = json!({
            "apiVersion": "v1", "kind": "X",
            "metadata": { "name": "a", "uid": "u", "labels": { "l": "1" } },
            "spec": { "list": [1, 2], "empty": {}, "n": 1 },
            "status": { "ready": true },
        });
        let main: Vec<Path> = leaves(
            &object,
            Scope::Main {
                status_subresource: true,
            },
        )
        .into_keys()
        .collect();
        assert_eq!(
            main,
            [
                path("metadata.labels.l"),
                path("spec.empty"),
                path("spec.list"),
                path("spec.n")
            ]
        );
        let status: Vec<Path> = leaves(&object, Scope::Status).into_keys().collect();
        assert_eq!(status, [path("status.ready")]);
    }

    #[test]
    fn fields_v1_round_trips() {
        let set: FieldSet = [
            path("data.a"),
            path("data.b"),
            path("metadata.labels.x.y/z"),
        ]
        .into_iter()
        .collect();
        let rendered = to_fields_v1(&set);
        assert_eq!(rendered["f:data"]["f:a"], json!({}));
        assert_eq!(from_fields_v1(&rendered), set);
        let real = json!({ "f:metadata": { "f:labels": { ".": {}, "f:app": {} } } });
        assert_eq!(
            from_fields_v1(&real),
            [path("metadata.labels"), path("metadata.labels.app")]
                .into_iter()
                .collect()
        );
    }

    #[test]
    fn update_takes_changed_fields_from_other_managers() {
        let old = config_map(json!({ "a": "1", "b": "1" }));
        let created = record_update(None, &old, Vec::new(), &writer("creator"));
        assert_eq!(
            created[0].fields,
            [path("data.a"), path("data.b")].into_iter().collect()
        );
        let new = config_map(json!({ "a": "2" }));
        let entries = record_update(Some(&old), &new, created, &writer("editor"));
        assert_eq!(entries.len(), 1, "creator lost a (taken) and b (removed)");
        assert_eq!(entries[0].manager, "editor");
        assert_eq!(entries[0].fields, [path("data.a")].into_iter().collect());
    }

    #[test]
    fn apply_removes_fields_its_manager_dropped() {
        let (first, entries) = apply(
            None,
            &config_map(json!({ "a": "1", "b": "1" })),
            &writer("m"),
            false,
        )
        .expect("no conflicts on create");
        let live = with_entries(first, &entries);
        let (second, entries) = apply(
            Some(&live),
            &config_map(json!({ "a": "1" })),
            &writer("m"),
            false,
        )
        .expect("same manager");
        assert_eq!(second["data"], json!({ "a": "1" }));
        assert_eq!(entries[0].fields, [path("data.a")].into_iter().collect());
    }

    #[test]
    fn apply_keeps_dropped_fields_another_manager_owns() {
        let (first, entries) =
            apply(None, &config_map(json!({ "a": "1" })), &writer("m"), false).expect("create");
        let live = with_entries(first, &entries);
        let (shared, entries) = apply(
            Some(&live),
            &config_map(json!({ "a": "1" })),
            &writer("other"),
            false,
        )
        .expect("same value");
        let live = with_entries(shared, &entries);
        let (after, _) =
            apply(Some(&live), &config_map(json!({})), &writer("m"), false).expect("drop");
        assert_eq!(after["data"], json!({ "a": "1" }));
    }

    #[test]
    fn apply_conflicts_unless_forced() {
        let (first, entries) =
            apply(None, &config_map(json!({ "a": "1" })), &writer("m"), false).expect("create");
        let live = with_entries(first, &entries);
        let conflicts = apply(
            Some(&live),
            &config_map(json!({ "a": "2" })),
            &writer("other"),
            false,
        )
        .expect_err("conflict");
        assert_eq!(
            conflicts,
            [Conflict {
                manager: "\"m\"".into(),
                path: path("data.a")
            }]
        );
        let err = conflict_error(&conflicts);
        assert_eq!(
            err.message,
            "Apply failed with 1 conflict: conflict with \"m\": .data.a"
        );
        let (forced, entries) = apply(
            Some(&live),
            &config_map(json!({ "a": "2" })),
            &writer("other"),
            true,
        )
        .expect("forced");
        assert_eq!(forced["data"]["a"], "2");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].manager, "other");
    }

    #[test]
    fn update_managers_are_described_with_version_and_time() {
        let old = config_map(json!({ "a": "1" }));
        let entries = record_update(None, &old, Vec::new(), &writer("kubectl"));
        let live = with_entries(old, &entries);
        let conflicts = apply(
            Some(&live),
            &config_map(json!({ "a": "2", "b": "2" })),
            &writer("m"),
            false,
        )
        .expect_err("conflict");
        assert_eq!(conflicts.len(), 1);
        assert_eq!(
            conflicts[0].manager,
            "\"kubectl\" using v1 at 2025-01-01T00:00:00Z"
        );
    }

    #[test]
    fn status_apply_touches_only_status() {
        let w = Writer {
            subresource: "status",
            status_subresource: true,
            ..writer("s")
        };
        let live = json!({ "metadata": { "name": "c" }, "spec": { "x": 1 } });
        let config = json!({ "metadata": { "name": "c", "labels": { "l": "x" } }, "spec": { "x": 2 }, "status": { "ok": true } });
        let (merged, entries) = apply(Some(&live), &config, &w, false).expect("status apply");
        assert_eq!(merged["spec"]["x"], 1);
        assert!(merged["metadata"].get("labels").is_none());
        assert_eq!(entries[0].subresource, "status");
        assert_eq!(entries[0].fields, [path("status.ok")].into_iter().collect());
    }

    #[test]
    fn conflict_message_groups_by_manager() {
        let conflicts = [
            Conflict {
                manager: "\"b\"".into(),
                path: path("spec.x"),
            },
            Conflict {
                manager: "\"a\"".into(),
                path: path("spec.y"),
            },
        ];
        assert_eq!(
            conflict_error(&conflicts).message,
            "Apply failed with 2 conflicts: conflicts with \"a\":\n- .spec.y\nconflicts with \"b\":\n- .spec.x"
        );
    }
}
