//! The hub<->agent protocol: JSON bodies of `/api/v1/agent/*`.
//!
//! | method and path | request | response |
//! | --- | --- | --- |
//! | `GET /api/v1/agent/desired?since=<cursor>&wait=<seconds>` | — | [`DesiredState`] |
//! | `GET /api/v1/agent/deployment-objects/{id}` | — | [`DeploymentObject`] |
//! | `POST /api/v1/agent/events` | [`EventBatch`] | [`EventBatchResult`] |
//! | `POST /api/v1/agent/heartbeat` | [`Heartbeat`] | [`HeartbeatAck`] |
//! | `POST /api/v1/agent/key` | — | [`RotatedKey`] |
//!
//! Every request carries `Authorization: Bearer <agent key>`; every error is an
//! [`ApiError`] with the matching HTTP status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Path prefix of the agent API.
pub const API_PREFIX: &str = "/api/v1/agent";
/// Longest long-poll the hub grants, in seconds; longer `wait`s are cut to this.
pub const MAX_WAIT_SECONDS: u64 = 60;
/// Most events one [`EventBatch`] may carry.
pub const MAX_EVENTS_PER_BATCH: usize = 500;
/// Longest event message, in characters.
pub const MAX_EVENT_MESSAGE_CHARS: usize = 4096;
/// [`Heartbeat::state`] of an agent that does its job and has nothing left to do.
pub const STATE_READY: &str = "Ready";
/// [`Heartbeat::state`] of an agent that cannot do its job on the spoke (the API server is
/// unreachable, its inventories cannot be read, RBAC refuses a watch); the heartbeat's
/// `message` says why. It takes precedence over every other state.
pub const STATE_ERROR: &str = "Error";
/// Longest [`Heartbeat::message`] an agent sends, in characters: it cuts longer ones.
pub const MAX_STATE_MESSAGE_CHARS: usize = 1024;
/// Longest [`Heartbeat::message`] the hub accepts, in bytes (room for 1,024 characters of
/// any script); longer ones are refused with 422.
pub const MAX_STATE_MESSAGE_BYTES: usize = 4096;

/// Everything an agent should hold. A stack missing from `stacks` is to be removed
/// from the spoke, along with everything the agent applied for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesiredState {
    /// Opaque; send it back as `since` to wait for the next change.
    pub cursor: String,
    pub stacks: Vec<DesiredStack>,
}

/// What one targeted stack should look like on the spoke.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesiredStack {
    pub stack_id: Uuid,
    /// `<namespace>/<name>` of the Stack in the hub.
    pub stack_name: String,
    pub deployment_object_id: Uuid,
    pub sequence: i64,
    pub checksum: String,
    /// The stack was deleted: remove everything applied for it, then report a
    /// `Delete` event for this deployment object.
    pub deletion: bool,
    /// The deployment object itself, exactly as `GET /api/v1/agent/deployment-objects/{id}`
    /// answers it, so the agent need not fetch it. The hub includes it when the object is
    /// small (its JSON at most 64 KiB by default) and newer than the request's `since`
    /// cursor; it leaves it out for larger objects, deletion markers and objects an earlier
    /// answer already carried. When it is absent (as from hubs that predate it), the agent
    /// fetches the object. Agents that predate it ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<DeploymentObject>,
}

/// One deployment object's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentObject {
    pub id: Uuid,
    pub stack_id: Uuid,
    pub sequence: i64,
    pub checksum: String,
    pub deletion: bool,
    /// Multi-document YAML of the objects to apply (empty for a deletion).
    pub yaml: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventBatch {
    pub events: Vec<AgentEvent>,
}

/// A report about one deployment object. `id` is made by the agent, once per
/// report, so that a retried POST is recognised and stored once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentEvent {
    pub id: Uuid,
    pub deployment_object_id: Uuid,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub status: EventStatus,
    /// For failures the API server's message; for `Health`, see [`health_message`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum EventType {
    /// The deployment object was applied (or failed to apply).
    Apply,
    /// Everything applied for the stack was removed (or could not be).
    Delete,
    /// The health of what was applied changed.
    Health,
    /// Applied objects were changed or deleted on the spoke (one event per episode):
    /// `Success` when the agent put them back, `Failure` when it did not (`driftPolicy:
    /// Detect`). Hubs that predate it refuse the event; the agent then drops it alone.
    Drift,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Apply => "Apply",
            EventType::Delete => "Delete",
            EventType::Health => "Health",
            EventType::Drift => "Drift",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum EventStatus {
    Success,
    Failure,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Success => "Success",
            EventStatus::Failure => "Failure",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventBatchResult {
    pub accepted: u64,
    /// Events the hub already had from an earlier delivery.
    pub duplicates: u64,
}

/// Health of what an agent applied for a stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Progressing,
    Degraded,
    #[default]
    Unknown,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Progressing => "progressing",
            Health::Degraded => "degraded",
            Health::Unknown => "unknown",
        }
    }

    /// The event status a `Health` event carries: only `degraded` is a failure.
    pub fn event_status(self) -> EventStatus {
        match self {
            Health::Degraded => EventStatus::Failure,
            _ => EventStatus::Success,
        }
    }
}

/// The message of a `Health` event: the health word first (the status column holds
/// only Success/Failure), then the detail, e.g. `progressing: Deployment web 1/3 available`.
pub fn health_message(health: Health, detail: &str) -> String {
    if detail.is_empty() {
        health.as_str().to_owned()
    } else {
        format!("{}: {detail}", health.as_str())
    }
}

/// Reads the health word back out of a `Health` event's message.
pub fn parse_health_message(message: &str) -> Health {
    let word = message.split(':').next().unwrap_or_default().trim();
    match word {
        "healthy" => Health::Healthy,
        "progressing" => Health::Progressing,
        "degraded" => Health::Degraded,
        _ => Health::Unknown,
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// The agent's version.
    pub version: String,
    /// What the agent is doing: `Starting`, `Ready` ([`STATE_READY`]), `Syncing`, `Degraded`,
    /// or `Error` ([`STATE_ERROR`]) when it cannot do its job on the spoke.
    pub state: String,
    /// Why the agent is in its state; set with `state: "Error"`, e.g. `spoke API server
    /// unreachable: ...`. At most [`MAX_STATE_MESSAGE_CHARS`] characters from agents, and
    /// [`MAX_STATE_MESSAGE_BYTES`] bytes at the hub. Hubs that predate it ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub stacks: Vec<StackSummary>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StackSummary {
    pub stack_id: Uuid,
    pub deployment_object_id: Uuid,
    pub health: Health,
    /// Objects of the stack currently applied.
    pub objects: u32,
    /// Objects of the stack that failed to apply.
    pub failed: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatAck {
    /// The interval at which the hub expects heartbeats; three missed ones mark the
    /// agent Offline.
    pub heartbeat_interval_seconds: u64,
    /// The key the heartbeat was sent with: the agent rotates it (`POST
    /// /api/v1/agent/key`) once 2/3 of its lifetime has passed. Hubs that predate key
    /// lifetimes leave it out; agents that predate it ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyLifetime>,
}

/// When a key was issued and when it expires. Never the key itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyLifetime {
    /// The key's public prefix (`brokkr_<prefix>_...`).
    pub prefix: String,
    pub issued_at: Time,
    pub expires_at: Time,
}

/// The answer of `POST /api/v1/agent/key`: the caller's new key. The key it called with
/// stays valid for the Agent's `keyPolicy.overlap` (default one hour), then is refused
/// with 401 `key_revoked`. Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotatedKey {
    /// The new key, `brokkr_<prefix>_<secret>`.
    pub key: String,
    pub prefix: String,
    pub issued_at: Time,
    pub expires_at: Time,
    /// Until when the key this request was sent with stays valid (the Agent's
    /// `keyPolicy.overlap` from now). An agent that cannot store the new key switches to
    /// it before then rather than be locked out. Absent from older hubs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key_valid_until: Option<Time>,
}

impl std::fmt::Debug for RotatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotatedKey")
            .field("prefix", &self.prefix)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A string from the network that PostgreSQL cannot store (a `text` value, and a
/// `jsonb` string, may not hold NUL), named by its field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} contains a NUL character (\\u0000), which cannot be stored")]
pub struct UnstorableText {
    pub field: String,
}

/// Refuses text the database cannot hold. JSON with invalid Unicode (a lone surrogate)
/// never gets this far: the JSON parser refuses it.
pub fn check_storable(field: impl FnOnce() -> String, value: &str) -> Result<(), UnstorableText> {
    if value.contains('\0') {
        return Err(UnstorableText { field: field() });
    }
    Ok(())
}

/// `text` with every NUL replaced by U+FFFD, for messages an agent copies from spoke
/// objects, which anyone with write access to the spoke can fill.
pub fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}").into()
    } else {
        text.into()
    }
}

/// Why the hub refuses a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHeartbeat {
    #[error(transparent)]
    Unstorable(#[from] UnstorableText),
    #[error("message is {len} bytes long; at most {MAX_STATE_MESSAGE_BYTES} are accepted")]
    MessageTooLong { len: usize },
}

impl Heartbeat {
    /// Refuses strings the hub could not store, naming the first such field, and a
    /// message longer than [`MAX_STATE_MESSAGE_BYTES`].
    pub fn validate(&self) -> Result<(), InvalidHeartbeat> {
        check_storable(|| "version".to_owned(), &self.version)?;
        check_storable(|| "state".to_owned(), &self.state)?;
        if let Some(message) = &self.message {
            check_storable(|| "message".to_owned(), message)?;
            if message.len() > MAX_STATE_MESSAGE_BYTES {
                return Err(InvalidHeartbeat::MessageTooLong { len: message.len() });
            }
        }
        Ok(())
    }

    /// Whether the agent reports that it cannot do its job ([`STATE_ERROR`]).
    pub fn is_error(&self) -> bool {
        self.state == STATE_ERROR
    }
}

impl EventBatch {
    /// Refuses strings the hub could not store, naming the first such field.
    pub fn validate(&self) -> Result<(), UnstorableText> {
        for (index, event) in self.events.iter().enumerate() {
            if let Some(message) = &event.message {
                check_storable(|| format!("events[{index}].message"), message)?;
            }
        }
        Ok(())
    }
}

/// Body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiError {
    /// A stable, machine-readable code, e.g. `unauthorized`, `not_found`.
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_use_the_documented_json_names() {
        let event = AgentEvent {
            id: Uuid::nil(),
            deployment_object_id: Uuid::nil(),
            event_type: EventType::Health,
            status: Health::Progressing.event_status(),
            message: Some(health_message(Health::Progressing, "web 1/3 available")),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "Health");
        assert_eq!(json["status"], "Success");
        assert_eq!(json["deploymentObjectId"], Uuid::nil().to_string());
        assert_eq!(json["message"], "progressing: web 1/3 available");
    }

    #[test]
    fn health_survives_the_event_message() {
        for health in [
            Health::Healthy,
            Health::Progressing,
            Health::Degraded,
            Health::Unknown,
        ] {
            assert_eq!(
                parse_health_message(&health_message(health, "detail: x")),
                health
            );
            assert_eq!(parse_health_message(&health_message(health, "")), health);
        }
        assert_eq!(parse_health_message("gibberish"), Health::Unknown);
    }

    #[test]
    fn nul_characters_are_refused_by_field_and_replaced_in_copied_messages() {
        let beat = Heartbeat {
            version: "1.0\0".into(),
            ..Default::default()
        };
        assert_eq!(
            beat.validate().unwrap_err().to_string(),
            "version contains a NUL character (\\u0000), which cannot be stored"
        );
        let event = |message: &str| AgentEvent {
            id: Uuid::nil(),
            deployment_object_id: Uuid::nil(),
            event_type: EventType::Health,
            status: EventStatus::Success,
            message: Some(message.to_owned()),
        };
        let batch = EventBatch {
            events: vec![event("fine"), event("bad\0one")],
        };
        assert_eq!(batch.validate().unwrap_err().field, "events[1].message");
        assert_eq!(storable("a\0b"), "a\u{FFFD}b");
        assert!(matches!(
            storable("clean"),
            std::borrow::Cow::Borrowed("clean")
        ));
        assert!(
            EventBatch {
                events: vec![event(&storable("bad\0one"))]
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn heartbeat_messages_cross_old_and_new_hubs_and_agents() {
        // A new agent's heartbeat, read by a hub that predates `message` (serde ignores
        // unknown fields: `Heartbeat` does not deny them).
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct OldHeartbeat {
            version: String,
            state: String,
            #[serde(default)]
            stacks: Vec<StackSummary>,
        }
        let new = Heartbeat {
            version: "2.0.0".into(),
            state: STATE_ERROR.into(),
            message: Some("spoke API server unreachable: connection refused".into()),
            stacks: Vec::new(),
        };
        let json = serde_json::to_string(&new).unwrap();
        assert!(
            json.contains(r#""message":"spoke API server unreachable"#),
            "{json}"
        );
        let old: OldHeartbeat = serde_json::from_str(&json).unwrap();
        assert_eq!(old.state, "Error");
        // An old agent's heartbeat, read by a new hub: no message; and a new agent in a
        // state without a message sends none.
        let from_old: Heartbeat =
            serde_json::from_str(r#"{"version":"1.0.0","state":"Ready","stacks":[]}"#).unwrap();
        assert_eq!(from_old.message, None);
        assert!(!from_old.is_error());
        let ready = Heartbeat {
            state: STATE_READY.into(),
            ..Default::default()
        };
        assert!(!serde_json::to_string(&ready).unwrap().contains("message"));
    }

    #[test]
    fn heartbeat_messages_with_nul_or_over_4096_bytes_are_refused() {
        let beat = |message: String| Heartbeat {
            version: "1.0.0".into(),
            state: STATE_ERROR.into(),
            message: Some(message),
            stacks: Vec::new(),
        };
        assert!(
            beat("é".repeat(MAX_STATE_MESSAGE_BYTES / 2))
                .validate()
                .is_ok()
        );
        assert_eq!(
            beat("x".repeat(MAX_STATE_MESSAGE_BYTES + 1)).validate(),
            Err(InvalidHeartbeat::MessageTooLong { len: 4097 })
        );
        assert_eq!(
            beat("bad\0".into()).validate().unwrap_err().to_string(),
            "message contains a NUL character (\\u0000), which cannot be stored"
        );
    }

    #[test]
    fn inline_objects_cross_old_and_new_hubs_and_agents() {
        // A new hub's answer, read by an agent that predates `object` (serde ignores
        // unknown fields: neither `DesiredState` nor `DesiredStack` denies them).
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        #[allow(dead_code)]
        struct OldDesiredStack {
            stack_id: Uuid,
            stack_name: String,
            deployment_object_id: Uuid,
            sequence: i64,
            checksum: String,
            deletion: bool,
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct OldDesiredState {
            cursor: String,
            stacks: Vec<OldDesiredStack>,
        }
        let object = DeploymentObject {
            id: Uuid::from_u128(2),
            stack_id: Uuid::from_u128(1),
            sequence: 7,
            checksum: "abc".into(),
            deletion: false,
            yaml: "kind: ConfigMap\n".into(),
        };
        let stack = DesiredStack {
            stack_id: object.stack_id,
            stack_name: "ns/app".into(),
            deployment_object_id: object.id,
            sequence: 7,
            checksum: "abc".into(),
            deletion: false,
            object: None,
        };
        let new = DesiredState {
            cursor: "7.0123456789abcdef".into(),
            stacks: vec![DesiredStack {
                object: Some(object.clone()),
                ..stack.clone()
            }],
        };
        let json = serde_json::to_string(&new).unwrap();
        assert!(json.contains(r#""object":{"id":"#), "{json}");
        let old: OldDesiredState = serde_json::from_str(&json).unwrap();
        assert_eq!(old.stacks[0].deployment_object_id, object.id);
        assert_eq!(old.stacks[0].checksum, "abc");
        // An old hub's answer, read by a new agent: no object, so it fetches; and a new
        // hub's answer without one does not mention it.
        let without = DesiredState {
            cursor: new.cursor.clone(),
            stacks: vec![stack],
        };
        let old_json = serde_json::to_string(&without).unwrap();
        assert!(!old_json.contains("object"), "{old_json}");
        let from_old: DesiredState = serde_json::from_str(&old_json).unwrap();
        assert_eq!(from_old.stacks[0].object, None);
        assert_eq!(serde_json::from_str::<DesiredState>(&json).unwrap(), new);
    }

    #[test]
    fn invalid_unicode_in_json_is_refused_by_the_parser() {
        let body = r#"{"version":"\ud800","state":"Ready"}"#;
        assert!(serde_json::from_str::<Heartbeat>(body).is_err());
    }

    #[test]
    fn unknown_event_types_are_rejected() {
        let body = r#"{"id":"00000000-0000-0000-0000-000000000000","deploymentObjectId":"00000000-0000-0000-0000-000000000000","type":"Explode","status":"Success"}"#;
        assert!(serde_json::from_str::<AgentEvent>(body).is_err());
    }
}
