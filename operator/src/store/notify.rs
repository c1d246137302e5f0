//! The PostgreSQL notification channels the hub listens on, and their payloads. Triggers
//! in the migrations send them (the SQL stays as written there):
//!
//! | channel | payload | sent by |
//! | --- | --- | --- |
//! | [`DESIRED_CHANNEL`] | `s:<stack id>`: a stack has a new deployment object or deletion marker | `009_notifications` |
//! | [`DESIRED_CHANNEL`] | `a:<agent id>`: an agent's targets changed, or it reported removing a stack | `009_notifications`, `013_removal_report_notifications` |
//! | [`DESIRED_CHANNEL`] | `k:<agent or generator id>`: its keys, suspension or deletion changed | `011_agent_access_notifications`, `016_api_keys`, `017_generator_access_notifications` |
//! | [`STATUS_CHANNEL`] | `metadata.uid` of a Stack agents reported on | `009_notifications`, `014_status_notifications_by_uid` |
//! | [`AGENTS_CHANNEL`] | the name of an agent whose status (Online, Error, Offline) or reported reason changed | `009_notifications`, `020_agent_state` |
//!
//! The change feed ([`crate::api::changes`]) listens on the first, the status mirror
//! ([`crate::mirror`]) on the other two.

use brokkr_crds::Agent;
use kube::runtime::reflector::ObjectRef;
use uuid::Uuid;

/// An agent's desired state or access may have changed; payloads parse as [`Change`].
pub const DESIRED_CHANNEL: &str = "brokkr_desired";
/// Agents reported on a stack; the payload is the Stack resource's `metadata.uid`.
pub const STATUS_CHANNEL: &str = "brokkr_status";
/// An agent's status or reported reason changed; payloads parse with [`status_agent`].
pub const AGENTS_CHANNEL: &str = "brokkr_agents";

/// What may have changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A stack has a new deployment object or deletion marker.
    Stack(Uuid),
    /// An agent's targets changed.
    Agent(Uuid),
    /// An agent's key, suspension or deletion changed.
    Access(Uuid),
    /// Unknown (notifications may have been missed): everyone re-checks.
    All,
}

impl Change {
    /// The change a [`DESIRED_CHANNEL`] notification names; `None` when its payload does
    /// not parse (it is then ignored and counted: a stray `NOTIFY` must not flush every
    /// replica's views).
    pub fn parse(payload: &str) -> Option<Change> {
        match payload.split_once(':') {
            Some(("s", id)) => Uuid::parse_str(id).ok().map(Change::Stack),
            Some(("a", id)) => Uuid::parse_str(id).ok().map(Change::Agent),
            Some(("k", id)) => Uuid::parse_str(id).ok().map(Change::Access),
            _ => None,
        }
    }
}

/// The Agent an [`AGENTS_CHANNEL`] notification names.
pub fn status_agent(payload: &str) -> ObjectRef<Agent> {
    ObjectRef::new(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_a_stack_or_an_agent() {
        let id = Uuid::now_v7();
        assert_eq!(Change::parse(&format!("s:{id}")), Some(Change::Stack(id)));
        assert_eq!(Change::parse(&format!("a:{id}")), Some(Change::Agent(id)));
        assert_eq!(Change::parse(&format!("k:{id}")), Some(Change::Access(id)));
        assert_eq!(Change::parse("garbage"), None);
        assert_eq!(Change::parse("s:not-a-uuid"), None);
        assert_eq!(Change::parse(""), None);
    }

    #[test]
    fn agent_names_map_to_their_resources() {
        let agent = status_agent("edge-1");
        assert_eq!(agent.name, "edge-1");
        assert_eq!(agent.namespace, None);
    }
}
