//! Deletion and what follows it: preconditions, finalizers, propagation (background,
//! foreground, orphan), and the garbage collector that removes dependents of deleted owners and
//! the contents of terminating namespaces and CRDs.

use std::collections::HashSet;

use serde_json::{Value, json};

use super::{
    DeleteOptions, Deleted, Key, Propagation, State, Target, finalizers, is_deleting, meta_str,
    metadata_mut, now,
};
use crate::resources::{CRD_GROUP, CRD_PLURAL};
use crate::status::ApiError;

impl State {
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

    /// Whether the collector can find anything after a create or update of `key`: such a
    /// write removes no object, so only an object being deleted somewhere, or owners of the
    /// written object that are missing, give it work. Cheaper than a sweep, which would
    /// make every write cost as much as the whole store.
    pub(super) fn garbage_possible_after_write(&self, key: &Key) -> bool {
        let owners = self.objects.get(key).map(owner_uids).unwrap_or_default();
        let mut missing: Vec<&str> = owners.iter().map(String::as_str).collect();
        for object in self.objects.values() {
            if is_deleting(object) {
                return true;
            }
            if !missing.is_empty()
                && let Some(uid) = meta_str(object, "uid")
            {
                missing.retain(|owner| *owner != uid);
            }
        }
        !missing.is_empty()
    }

    /// Runs the garbage collector, namespace and CRD finalization to a fixpoint, synchronously,
    /// so tests that poll see a settled state right after the request that triggered it.
    pub(super) fn collect_garbage(&mut self) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::*;

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
