//! The objects themselves: the resourceVersion counter, the bounded event history watches
//! read from, the resource types served, and reads (get, list).

use std::sync::Arc;

use serde_json::{Value, json};

use super::{Event, EventKind, Key, State, Target, metadata_mut};
use crate::resources::{self, CRD_GROUP, CRD_PLURAL, ResourceType};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::status::ApiError;

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

    pub(super) fn target_for(
        &self,
        pick: impl Fn(&ResourceType) -> bool,
        namespace: Option<&str>,
    ) -> Target {
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

    pub(super) fn objects_of<'a>(
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
    pub(super) fn commit(&mut self, key: Key, mut object: Value) -> Value {
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

    pub(super) fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.rv += 1;
        metadata_mut(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.record(key, EventKind::Deleted, object.clone(), None);
        Some(object)
    }

    pub(super) fn namespace_object(&self, name: &str) -> Option<&Value> {
        self.objects.get(&Key {
            group: String::new(),
            resource: "namespaces".into(),
            namespace: String::new(),
            name: name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::*;
    use crate::store::{Options, Store};

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
}
