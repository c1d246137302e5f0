//! The agent's inventory of a stack: what it applied for the stack on this spoke, kept in a
//! ConfigMap `brokkr-inventory-<stack id>` in the agent's namespace (in the manner of
//! kubectl's ApplySet and OCM's AppliedManifestWork).
//!
//! The inventory, not labels, decides ownership. An object is written into it *before* it is
//! applied (intent: its uid is not known yet) and gets its uid from the apply's answer; it
//! leaves the inventory only once it is confirmed gone (or confirmed not to be ours). Pruning,
//! stack deletion, untargeting and the start-up sweep all read it, so objects of every kind
//! are found after any restart, and only an object the inventory lists *with the live uid*
//! is ever deleted.
//!
//! The ownership rules are the pure functions [`claim`] and [`verdict`].

use std::collections::BTreeMap;

use brokkr_crds::{
    AGENT_FIELD_MANAGER, AGENT_LABEL, DeletionPolicy, INVENTORY_LABEL, LABEL_PREFIX, STACK_LABEL,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::apply::server_message;
use crate::manifest::ObjectKey;

/// The ConfigMap key holding the inventory (JSON).
pub const DATA_KEY: &str = "inventory.json";

/// The message of an object the agent refuses to take over.
pub const NOT_MANAGED: &str = "exists and is not managed by Brokkr; set spec.adoptExisting: true on the Stack to take it over";

/// Name of the stack's inventory ConfigMap.
pub fn name_of(stack_id: Uuid) -> String {
    format!("brokkr-inventory-{stack_id}")
}

/// One object the agent applied (or is about to apply) for the stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    #[serde(default)]
    pub group: String,
    pub version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// `None` while the object is intended but not yet seen applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl Entry {
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            group: self.group.clone(),
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    pub fn gvk(&self) -> GroupVersionKind {
        GroupVersionKind::gvk(&self.group, &self.version, &self.kind)
    }
}

/// What the ConfigMap holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    stack_id: Uuid,
    #[serde(default)]
    stack_name: String,
    #[serde(default)]
    deletion_policy: DeletionPolicy,
    #[serde(default)]
    objects: Vec<Entry>,
}

/// The inventory of one (agent, stack).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    pub stack_id: Uuid,
    pub stack_name: String,
    /// The deletion policy of the last deployment object applied: what untargeting and the
    /// start-up sweep follow.
    pub deletion_policy: DeletionPolicy,
    pub entries: BTreeMap<ObjectKey, Entry>,
}

impl Inventory {
    pub fn new(stack_id: Uuid, stack_name: &str) -> Inventory {
        Inventory {
            stack_id,
            stack_name: stack_name.to_owned(),
            deletion_policy: DeletionPolicy::Delete,
            entries: BTreeMap::new(),
        }
    }

    pub fn to_json(&self) -> String {
        let stored = Stored {
            stack_id: self.stack_id,
            stack_name: self.stack_name.clone(),
            deletion_policy: self.deletion_policy,
            objects: self.entries.values().cloned().collect(),
        };
        serde_json::to_string(&stored).unwrap_or_default()
    }

    pub fn from_json(json: &str) -> Result<Inventory, String> {
        let stored: Stored = serde_json::from_str(json).map_err(|e| e.to_string())?;
        Ok(Inventory {
            stack_id: stored.stack_id,
            stack_name: stored.stack_name,
            deletion_policy: stored.deletion_policy,
            entries: stored.objects.into_iter().map(|e| (e.key(), e)).collect(),
        })
    }

    /// Records the intent to apply `entry` (keeping a known uid when the new one is unknown
    /// and the object is the same one).
    pub fn intend(&mut self, entry: Entry) {
        self.entries.insert(entry.key(), entry);
    }

    pub fn set_uid(&mut self, key: &ObjectKey, uid: Option<String>) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.uid = uid;
        }
    }
}

/// What ownership decisions need to know of a live object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Live {
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// The agent's field manager applied it (server-side apply).
    pub applied_by_agent: bool,
    /// It has a deletion timestamp.
    pub deleting: bool,
}

impl Live {
    pub fn of(object: &DynamicObject) -> Live {
        let applied_by_agent = object.metadata.managed_fields.iter().flatten().any(|m| {
            m.manager.as_deref() == Some(AGENT_FIELD_MANAGER)
                && m.operation.as_deref() == Some("Apply")
        });
        Live {
            uid: object.uid().unwrap_or_default(),
            labels: object.labels().clone(),
            applied_by_agent,
            deleting: object.metadata.deletion_timestamp.is_some(),
        }
    }

    /// Applied by this agent for this stack: the agent's own server-side apply *and* both
    /// ownership labels. Used only where the inventory could not record the uid (an agent
    /// that stopped between applying and recording, or one from before inventories).
    fn applied_by_us(&self, stack_id: Uuid, agent: &str) -> bool {
        self.applied_by_agent
            && self.labels.get(STACK_LABEL) == Some(&stack_id.to_string())
            && self.labels.get(AGENT_LABEL).map(String::as_str) == Some(agent)
    }

    /// Labelled as another stack's.
    fn other_stack(&self, stack_id: Uuid) -> Option<&str> {
        self.labels
            .get(STACK_LABEL)
            .map(String::as_str)
            .filter(|s| *s != stack_id.to_string())
    }
}

/// Whether the stack may apply an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Nothing there: create it.
    Create,
    /// It is the stack's (the inventory lists its uid).
    Ours { uid: String },
    /// Not the stack's, and the stack may take it over (`adoptExisting`).
    Adopt { uid: String },
    /// Leave it alone; the reason is reported.
    Refuse(String),
}

/// Who may apply `key`: `live` is the object on the spoke, `inventory` the stack's, `owner`
/// another stack of this agent whose inventory lists it.
pub fn claim(
    key: &ObjectKey,
    live: Option<&Live>,
    inventory: &Inventory,
    agent: &str,
    owner: Option<Uuid>,
    adopt_existing: bool,
) -> Claim {
    let Some(live) = live else {
        return Claim::Create;
    };
    if let Some(other) = owner {
        return Claim::Refuse(format!(
            "is managed by another Brokkr stack ({other}) and is never taken over"
        ));
    }
    let listed = inventory
        .entries
        .get(key)
        .is_some_and(|e| e.uid.as_deref() == Some(live.uid.as_str()));
    if listed || live.applied_by_us(inventory.stack_id, agent) {
        return Claim::Ours {
            uid: live.uid.clone(),
        };
    }
    if let Some(other) = live.other_stack(inventory.stack_id) {
        return Claim::Refuse(format!(
            "is labelled as another Brokkr stack's ({other}) and is never taken over"
        ));
    }
    if adopt_existing {
        return Claim::Adopt {
            uid: live.uid.clone(),
        };
    }
    Claim::Refuse(NOT_MANAGED.to_owned())
}

/// What to do with an inventoried object the stack no longer wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It is gone: drop it from the inventory.
    Gone,
    /// What is there is not ours (replaced, or never confirmed): drop it, never touch it.
    NotOurs,
    /// Ours and being deleted already: wait.
    Terminating,
    Delete {
        uid: String,
    },
    Orphan {
        uid: String,
    },
}

/// The fate of `entry` given the live object: deleted (or orphaned) only if the live uid is
/// the one the inventory recorded.
pub fn verdict(
    entry: &Entry,
    live: Option<&Live>,
    stack_id: Uuid,
    agent: &str,
    policy: DeletionPolicy,
) -> Verdict {
    let Some(live) = live else {
        return Verdict::Gone;
    };
    let ours = match &entry.uid {
        Some(uid) => *uid == live.uid,
        None => live.applied_by_us(stack_id, agent),
    };
    if !ours {
        return Verdict::NotOurs;
    }
    let uid = live.uid.clone();
    match policy {
        DeletionPolicy::Orphan => Verdict::Orphan { uid },
        DeletionPolicy::Delete if live.deleting => Verdict::Terminating,
        DeletionPolicy::Delete => Verdict::Delete { uid },
    }
}

/// A merge patch removing every `brokkr.io/*` label and annotation of `object`, with its
/// uid and resourceVersion as preconditions.
pub fn strip_patch(object: &DynamicObject) -> serde_json::Value {
    let nulls = |map: &BTreeMap<String, String>| -> serde_json::Map<String, serde_json::Value> {
        map.keys()
            .filter(|k| k.starts_with(LABEL_PREFIX))
            .map(|k| (k.clone(), serde_json::Value::Null))
            .collect()
    };
    serde_json::json!({
        "metadata": {
            "uid": object.metadata.uid,
            "resourceVersion": object.metadata.resource_version,
            "labels": nulls(object.labels()),
            "annotations": nulls(object.annotations()),
        }
    })
}

/// Where an agent keeps its inventories.
#[derive(Clone)]
pub struct InventoryStore {
    api: Api<ConfigMap>,
    agent: String,
}

impl InventoryStore {
    pub fn new(client: Client, namespace: &str, agent: &str) -> InventoryStore {
        InventoryStore {
            api: Api::namespaced(client, namespace),
            agent: agent.to_owned(),
        }
    }

    /// Every inventory of this agent. Unreadable ones are logged and skipped (their objects
    /// are then never deleted).
    pub async fn load_all(&self) -> Result<BTreeMap<Uuid, Inventory>, String> {
        let selector = format!("{INVENTORY_LABEL}=true,{AGENT_LABEL}={}", self.agent);
        let list = self
            .api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| format!("failed to list the inventories: {}", server_message(&e)))?;
        let mut inventories = BTreeMap::new();
        for config_map in list.items {
            let name = config_map.name_any();
            let json = config_map
                .data
                .as_ref()
                .and_then(|d| d.get(DATA_KEY))
                .cloned()
                .unwrap_or_default();
            match Inventory::from_json(&json) {
                Ok(inventory) if name == name_of(inventory.stack_id) => {
                    inventories.insert(inventory.stack_id, inventory);
                }
                Ok(_) => {
                    tracing::warn!(inventory = %name, "skipping an inventory under a name not its own")
                }
                Err(message) => {
                    tracing::warn!(inventory = %name, %message, "skipping an unreadable inventory")
                }
            }
        }
        Ok(inventories)
    }

    /// Writes the inventory (server-side apply, the agent's field manager).
    pub async fn save(&self, inventory: &Inventory) -> Result<(), String> {
        let name = name_of(inventory.stack_id);
        let object = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "labels": {
                    INVENTORY_LABEL: "true",
                    STACK_LABEL: inventory.stack_id.to_string(),
                    AGENT_LABEL: self.agent,
                },
            },
            "data": { DATA_KEY: inventory.to_json() },
        });
        let params = PatchParams::apply(AGENT_FIELD_MANAGER).force();
        self.api
            .patch(&name, &params, &Patch::Apply(&object))
            .await
            .map(|_| ())
            .map_err(|e| format!("failed to record the inventory: {}", server_message(&e)))
    }

    /// Deletes the inventory (every object of it is gone or orphaned).
    pub async fn delete(&self, stack_id: Uuid) -> Result<(), String> {
        match self
            .api
            .delete(&name_of(stack_id), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(format!(
                "failed to delete the inventory: {}",
                server_message(&e)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "edge-1";

    fn stack() -> Uuid {
        Uuid::from_u128(7)
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            group: String::new(),
            kind: "ConfigMap".into(),
            namespace: Some("shop".into()),
            name: name.into(),
        }
    }

    fn entry(name: &str, uid: Option<&str>) -> Entry {
        Entry {
            group: String::new(),
            version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: Some("shop".into()),
            name: name.into(),
            uid: uid.map(str::to_owned),
        }
    }

    fn inventory(entries: &[Entry]) -> Inventory {
        let mut inventory = Inventory::new(stack(), "shop/web");
        for e in entries {
            inventory.intend(e.clone());
        }
        inventory
    }

    fn live(uid: &str) -> Live {
        Live {
            uid: uid.into(),
            ..Live::default()
        }
    }

    fn labelled(uid: &str, stack: Uuid, by_agent: bool) -> Live {
        Live {
            uid: uid.into(),
            labels: [
                (STACK_LABEL.to_owned(), stack.to_string()),
                (AGENT_LABEL.to_owned(), AGENT.to_owned()),
            ]
            .into(),
            applied_by_agent: by_agent,
            deleting: false,
        }
    }

    #[test]
    fn the_inventory_survives_its_config_map() {
        let mut inventory = inventory(&[entry("a", Some("u1")), entry("b", None)]);
        inventory.deletion_policy = DeletionPolicy::Orphan;
        let json = inventory.to_json();
        assert_eq!(Inventory::from_json(&json), Ok(inventory));
        assert!(Inventory::from_json("{").is_err());
    }

    #[test]
    fn an_absent_object_is_created_and_a_listed_uid_is_ours() {
        let inv = inventory(&[entry("a", Some("u1"))]);
        assert_eq!(
            claim(&key("a"), None, &inv, AGENT, None, false),
            Claim::Create
        );
        assert_eq!(
            claim(&key("a"), Some(&live("u1")), &inv, AGENT, None, false),
            Claim::Ours { uid: "u1".into() }
        );
    }

    #[test]
    fn an_existing_object_not_in_the_inventory_is_refused_unless_adoption_is_allowed() {
        let inv = inventory(&[]);
        assert_eq!(
            claim(&key("a"), Some(&live("u9")), &inv, AGENT, None, false),
            Claim::Refuse(NOT_MANAGED.into())
        );
        assert_eq!(
            claim(&key("a"), Some(&live("u9")), &inv, AGENT, None, true),
            Claim::Adopt { uid: "u9".into() }
        );
    }

    #[test]
    fn a_recreated_object_with_another_uid_is_not_ours() {
        let inv = inventory(&[entry("a", Some("u1"))]);
        assert_eq!(
            claim(&key("a"), Some(&live("u2")), &inv, AGENT, None, false),
            Claim::Refuse(NOT_MANAGED.into())
        );
    }

    #[test]
    fn labels_alone_do_not_make_an_object_ours() {
        let inv = inventory(&[]);
        // A user copied the labels, but the agent never applied it.
        assert_eq!(
            claim(
                &key("a"),
                Some(&labelled("u3", stack(), false)),
                &inv,
                AGENT,
                None,
                false
            ),
            Claim::Refuse(NOT_MANAGED.into())
        );
        // The agent's own apply with its labels (an older agent, or a lost uid) is ours.
        assert_eq!(
            claim(
                &key("a"),
                Some(&labelled("u3", stack(), true)),
                &inv,
                AGENT,
                None,
                false
            ),
            Claim::Ours { uid: "u3".into() }
        );
    }

    #[test]
    fn another_stacks_object_is_never_taken_over_even_with_adoption() {
        let inv = inventory(&[]);
        let other = Uuid::from_u128(8);
        let refused = claim(&key("a"), Some(&live("u4")), &inv, AGENT, Some(other), true);
        assert!(matches!(refused, Claim::Refuse(m) if m.contains(&other.to_string())));
        let refused = claim(
            &key("a"),
            Some(&labelled("u4", other, true)),
            &inv,
            AGENT,
            None,
            true,
        );
        assert!(matches!(refused, Claim::Refuse(m) if m.contains("another Brokkr stack")));
    }

    #[test]
    fn only_an_object_with_the_recorded_uid_is_deleted() {
        let e = entry("a", Some("u1"));
        let delete = DeletionPolicy::Delete;
        assert_eq!(verdict(&e, None, stack(), AGENT, delete), Verdict::Gone);
        assert_eq!(
            verdict(&e, Some(&live("u1")), stack(), AGENT, delete),
            Verdict::Delete { uid: "u1".into() }
        );
        assert_eq!(
            verdict(&e, Some(&live("u2")), stack(), AGENT, delete),
            Verdict::NotOurs
        );
        // Even when it carries our labels.
        assert_eq!(
            verdict(
                &e,
                Some(&labelled("u2", stack(), true)),
                stack(),
                AGENT,
                delete
            ),
            Verdict::NotOurs
        );
        let mut terminating = live("u1");
        terminating.deleting = true;
        assert_eq!(
            verdict(&e, Some(&terminating), stack(), AGENT, delete),
            Verdict::Terminating
        );
        assert_eq!(
            verdict(
                &e,
                Some(&live("u1")),
                stack(),
                AGENT,
                DeletionPolicy::Orphan
            ),
            Verdict::Orphan { uid: "u1".into() }
        );
    }

    #[test]
    fn an_intended_object_is_deleted_only_if_the_agent_applied_it() {
        let e = entry("a", None);
        let delete = DeletionPolicy::Delete;
        assert_eq!(
            verdict(&e, Some(&live("u5")), stack(), AGENT, delete),
            Verdict::NotOurs
        );
        assert_eq!(
            verdict(
                &e,
                Some(&labelled("u5", stack(), true)),
                stack(),
                AGENT,
                delete
            ),
            Verdict::Delete { uid: "u5".into() }
        );
    }

    #[test]
    fn orphaning_removes_only_brokkr_labels_and_annotations() {
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": "a", "uid": "u1", "resourceVersion": "9",
                "labels": {"app": "web", "brokkr.io/stack": "s", "brokkr.io/agent": "a"},
                "annotations": {"note": "x", "brokkr.io/checksum": "c"}
            }
        }))
        .unwrap();
        assert_eq!(
            strip_patch(&object),
            serde_json::json!({"metadata": {
                "uid": "u1", "resourceVersion": "9",
                "labels": {"brokkr.io/stack": null, "brokkr.io/agent": null},
                "annotations": {"brokkr.io/checksum": null}
            }})
        );
    }
}
