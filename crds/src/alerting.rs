//! Alerting: `NotificationChannel` (where alerts go) and `AlertRule` (what to watch, for
//! how long, and which channels to tell), plus the JSON body every webhook receives.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{NAME_MAX_LEN, SpecError, validate_name, validate_storable};

/// Most extra headers a webhook channel may send.
pub const MAX_WEBHOOK_HEADERS: usize = 16;
/// Most conditions one AlertRule may watch.
pub const MAX_RULE_CONDITIONS: usize = 8;
/// Most channels one AlertRule may notify.
pub const MAX_RULE_CHANNELS: usize = 8;
/// Most firing alerts an AlertRule's status lists (`status.firingCount` counts them all).
pub const MAX_FIRING_IN_STATUS: usize = 20;
/// `renotifyInterval` when it is not set.
pub const DEFAULT_RENOTIFY_INTERVAL: Duration = Duration::from_secs(4 * 3600);
/// Header carrying `sha256=<hex HMAC-SHA256 of the body>` when a signing key is set.
pub const SIGNATURE_HEADER: &str = "X-Brokkr-Signature";
/// Header carrying the notification's id: the same on every retry, so a receiver can
/// drop a delivery it already processed.
pub const DELIVERY_HEADER: &str = "X-Brokkr-Delivery";

/// Where alerts are delivered: a webhook (any HTTP endpoint that takes JSON) or a Slack
/// incoming webhook. URLs and signing keys are read from Secrets in the channel's
/// namespace when a notification is sent.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "brokkr.io",
    version = "v1alpha1",
    kind = "NotificationChannel",
    namespaced,
    status = "NotificationChannelStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "nch",
    category = "brokkr",
    doc = "A NotificationChannel is where AlertRules of its namespace send alerts: a \
           webhook that receives a JSON body (optionally signed with HMAC-SHA256) or a \
           Slack incoming webhook.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Last-Delivery",
        type_ = "date",
        json_path = ".status.lastDeliveryTime",
        description = "When a notification was last sent, successfully or not"
    ),
    printcolumn(
        name = "Failures",
        type_ = "integer",
        json_path = ".status.consecutiveFailures",
        description = "Delivery attempts that failed in a row"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NotificationChannelSpec {
    /// `webhook` or `slack`; the field of the same name configures it.
    #[serde(rename = "type")]
    pub type_: ChannelType,
    /// Required with `type: webhook`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookChannel>,
    /// Required with `type: slack`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<SlackChannel>,
}

/// The kind of a NotificationChannel.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChannelType {
    /// An HTTP POST of the alert as JSON.
    #[default]
    Webhook,
    /// A Slack incoming webhook: the alert as a Slack message.
    Slack,
}

impl ChannelType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelType::Webhook => "webhook",
            ChannelType::Slack => "slack",
        }
    }
}

/// A webhook: Brokkr POSTs each notification as JSON to the URL.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookChannel {
    /// The Secret key holding the URL (`https://...`).
    pub url_secret_ref: SecretKeySelector,
    /// The Secret key holding an HMAC key. When set, every request carries
    /// `X-Brokkr-Signature: sha256=<hex HMAC-SHA256 of the body>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_ref: Option<SecretKeySelector>,
    /// Extra request headers, at most 16 (for example a team or routing key).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub headers: BTreeMap<String, String>,
}

/// A Slack incoming webhook.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlackChannel {
    /// The Secret key holding the incoming-webhook URL (`https://hooks.slack.com/...`).
    pub url_secret_ref: SecretKeySelector,
}

/// One key of a Secret in the channel's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Observed state of a NotificationChannel, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotificationChannelStatus {
    /// The `metadata.generation` the `Ready` condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the spec is valid and its Secrets hold what it names, and the last
    /// delivery (if any) succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
    /// When a notification was last sent, successfully or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery_time: Option<Time>,
    /// `Delivered`, or why the last attempt failed (`HTTP 503`, a connection error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery_result: Option<String>,
    /// Delivery attempts that failed in a row; 0 after a success.
    #[serde(default)]
    pub consecutive_failures: u32,
}

impl NotificationChannelSpec {
    /// Checks that the section named by `type` is there and what it holds.
    pub fn validate(&self) -> Result<(), SpecError> {
        let missing = |field: &str| SpecError::Invalid {
            field: format!("spec.{field}"),
            reason: format!("type {} needs spec.{field}", self.type_.as_str()),
        };
        match self.type_ {
            ChannelType::Webhook => {
                let webhook = self.webhook.as_ref().ok_or_else(|| missing("webhook"))?;
                webhook
                    .url_secret_ref
                    .validate("spec.webhook.urlSecretRef")?;
                if let Some(signing) = &webhook.signing_secret_ref {
                    signing.validate("spec.webhook.signingSecretRef")?;
                }
                if webhook.headers.len() > MAX_WEBHOOK_HEADERS {
                    return Err(SpecError::Invalid {
                        field: "spec.webhook.headers".into(),
                        reason: format!(
                            "{} headers; at most {MAX_WEBHOOK_HEADERS} are allowed",
                            webhook.headers.len()
                        ),
                    });
                }
                for (name, value) in &webhook.headers {
                    let valid_name = !name.is_empty()
                        && name.len() <= 128
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
                    if !valid_name {
                        return Err(SpecError::Invalid {
                            field: "spec.webhook.headers".into(),
                            reason: format!(
                                "{:?} is not a header name (letters, digits, '-' and '_', at most 128)",
                                name.chars().take(128).collect::<String>()
                            ),
                        });
                    }
                    let reserved = [
                        "content-type",
                        "content-length",
                        "host",
                        &SIGNATURE_HEADER.to_ascii_lowercase(),
                        &DELIVERY_HEADER.to_ascii_lowercase(),
                    ];
                    if reserved.contains(&name.to_ascii_lowercase().as_str()) {
                        return Err(SpecError::Invalid {
                            field: format!("spec.webhook.headers[{name:?}]"),
                            reason: "the operator sets this header itself".into(),
                        });
                    }
                    let valid_value = value.len() <= 1024
                        && value
                            .bytes()
                            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
                    if !valid_value {
                        return Err(SpecError::Invalid {
                            field: format!("spec.webhook.headers[{name:?}]"),
                            reason: "a header value is printable ASCII, at most 1024 characters"
                                .into(),
                        });
                    }
                }
            }
            ChannelType::Slack => {
                let slack = self.slack.as_ref().ok_or_else(|| missing("slack"))?;
                slack.url_secret_ref.validate("spec.slack.urlSecretRef")?;
            }
        }
        Ok(())
    }
}

impl SecretKeySelector {
    fn validate(&self, field: &'static str) -> Result<(), SpecError> {
        validate_name(field, &self.name, 253)?;
        validate_name(field, &self.key, 253)
    }
}

/// Watches Stacks of its namespace and Agents its namespace may target, and notifies
/// channels when a condition has held for its `for` duration, and again when it clears.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "brokkr.io",
    version = "v1alpha1",
    kind = "AlertRule",
    namespaced,
    status = "AlertRuleStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "alr",
    category = "brokkr",
    doc = "An AlertRule watches Stacks of its namespace (spec.stackSelector) and Agents \
           its namespace may target (spec.agentSelector), and notifies its \
           NotificationChannels when a condition has held for its `for` duration, and \
           again when it clears.",
    printcolumn(name = "Severity", type_ = "string", json_path = ".spec.severity"),
    printcolumn(
        name = "Firing",
        type_ = "integer",
        json_path = ".status.firingCount",
        description = "Alerts of this rule firing now"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AlertRuleSpec {
    /// The Agents the agent conditions watch, by label, among those that accept
    /// AgentTargets from this namespace (`spec.targetableFrom`). `{}` selects all of them.
    /// Required when an agent condition (`AgentOffline`, `AgentError`, `KeyExpiring`) is
    /// listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_selector: Option<LabelSelector>,
    /// The Stacks of this namespace the stack conditions watch, by label. `{}` selects
    /// every Stack of the namespace. Required when a stack condition (`StackDegraded`,
    /// `ApplyFailing`, `RolloutHalted`) is listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_selector: Option<LabelSelector>,
    /// What fires an alert, each with how long it must hold first. 1 to 8 entries.
    #[schemars(length(min = 1, max = 8))]
    pub conditions: Vec<AlertCondition>,
    /// `critical`, `warning` (the default) or `info`; passed on to the channels.
    #[serde(default)]
    pub severity: Severity,
    /// Names of NotificationChannels in this namespace to notify. 1 to 8 entries.
    #[schemars(length(min = 1, max = 8))]
    pub channels: Vec<String>,
    /// How often a still-firing alert is sent again, such as `4h` (the default) or `30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renotify_interval: Option<String>,
}

/// One condition an AlertRule watches.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertCondition {
    /// What to watch.
    #[serde(rename = "type")]
    pub type_: AlertConditionType,
    /// How long the condition must hold before the alert fires, such as `30s` or `10m`.
    /// Without it, the alert fires at once.
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub for_: Option<String>,
}

/// The conditions an AlertRule can watch.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum AlertConditionType {
    /// An Agent missed three heartbeats (`status.phase: Offline`).
    AgentOffline,
    /// An Agent reports it cannot work on its spoke (`status.phase: Error`).
    AgentError,
    /// An Agent's key has less than 10 % of its lifetime left (`KeyExpiring=True`).
    KeyExpiring,
    /// A Stack has an agent that failed to apply it or reports it unhealthy
    /// (`Degraded=True`).
    StackDegraded,
    /// A Stack has an agent that failed to apply its current revision
    /// (`Applied=False`, reason `ApplyFailed`).
    ApplyFailing,
    /// A Stack's rollout stopped moving agents (`RolloutHalted=True`).
    RolloutHalted,
}

impl AlertConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AgentOffline => "AgentOffline",
            Self::AgentError => "AgentError",
            Self::KeyExpiring => "KeyExpiring",
            Self::StackDegraded => "StackDegraded",
            Self::ApplyFailing => "ApplyFailing",
            Self::RolloutHalted => "RolloutHalted",
        }
    }

    /// Whether its subjects are Agents (else Stacks).
    pub fn watches_agents(self) -> bool {
        matches!(
            self,
            Self::AgentOffline | Self::AgentError | Self::KeyExpiring
        )
    }
}

impl std::fmt::Display for AlertConditionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How urgent a rule's alerts are.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    #[default]
    Warning,
    Info,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// Observed state of an AlertRule, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertRuleStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the spec is valid and every channel it names exists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
    /// Alerts of this rule firing now.
    #[serde(default)]
    pub firing_count: u32,
    /// The firing alerts, oldest first, at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firing: Vec<FiringAlert>,
}

/// One firing alert, as an AlertRule's status lists it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FiringAlert {
    /// The condition that holds.
    pub condition: AlertConditionType,
    /// The Agent or Stack it holds for.
    pub subject: AlertSubject,
    /// When the condition began to hold.
    pub started_at: Time,
    /// What is wrong, from the subject's status.
    pub message: String,
}

/// What an alert is about: an Agent (cluster-scoped) or a Stack.
#[derive(
    Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct AlertSubject {
    /// `Agent` or `Stack`.
    pub kind: String,
    /// Name of the Agent or Stack.
    pub name: String,
    /// The Stack's namespace; absent for Agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl std::fmt::Display for AlertSubject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{} {namespace}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

impl AlertRuleSpec {
    /// Checks the conditions, durations, selectors and channel names.
    pub fn validate(&self) -> Result<(), SpecError> {
        let invalid = |field: String, reason: String| SpecError::Invalid { field, reason };
        if self.conditions.is_empty() || self.conditions.len() > MAX_RULE_CONDITIONS {
            return Err(invalid(
                "spec.conditions".into(),
                format!(
                    "{} entries; 1 to {MAX_RULE_CONDITIONS} are allowed",
                    self.conditions.len()
                ),
            ));
        }
        for (index, condition) in self.conditions.iter().enumerate() {
            if self.conditions[..index]
                .iter()
                .any(|c| c.type_ == condition.type_)
            {
                return Err(invalid(
                    format!("spec.conditions[{index}].type"),
                    format!("{} is listed twice", condition.type_),
                ));
            }
            condition
                .hold_for()
                .map_err(|reason| invalid(format!("spec.conditions[{index}].for"), reason))?;
            let (selector, field) = if condition.type_.watches_agents() {
                (&self.agent_selector, "spec.agentSelector")
            } else {
                (&self.stack_selector, "spec.stackSelector")
            };
            if selector.is_none() {
                return Err(invalid(
                    field.into(),
                    format!(
                        "{} needs {field} to say what it watches ({{}} selects everything)",
                        condition.type_
                    ),
                ));
            }
        }
        for (selector, field) in [
            (&self.agent_selector, "spec.agentSelector"),
            (&self.stack_selector, "spec.stackSelector"),
        ] {
            if let Some(selector) = selector {
                kube::core::Selector::try_from(selector.clone())
                    .map_err(|err| invalid(field.into(), err.to_string()))?;
            }
        }
        if self.channels.is_empty() || self.channels.len() > MAX_RULE_CHANNELS {
            return Err(invalid(
                "spec.channels".into(),
                format!(
                    "{} entries; 1 to {MAX_RULE_CHANNELS} are allowed",
                    self.channels.len()
                ),
            ));
        }
        for channel in &self.channels {
            validate_name("spec.channels[]", channel, NAME_MAX_LEN)?;
        }
        self.renotify_interval()?;
        Ok(())
    }

    /// How often a still-firing alert is sent again.
    pub fn renotify_interval(&self) -> Result<Duration, SpecError> {
        match &self.renotify_interval {
            None => Ok(DEFAULT_RENOTIFY_INTERVAL),
            Some(text) => {
                brokkr_common::parse_interval(text).map_err(|reason| SpecError::Invalid {
                    field: "spec.renotifyInterval".into(),
                    reason,
                })
            }
        }
    }
}

impl AlertCondition {
    /// How long the condition must hold before it fires (zero without `for`).
    pub fn hold_for(&self) -> Result<Duration, String> {
        match &self.for_ {
            None => Ok(Duration::ZERO),
            Some(text) => {
                validate_storable(|| "for".into(), text).map_err(|err| err.to_string())?;
                brokkr_common::parse_duration(text)
            }
        }
    }
}

/// `state` of a notification.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// The condition holds (sent when it fires, and again every `renotifyInterval`).
    Firing,
    /// The condition cleared (sent once).
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }
}

/// The JSON body a webhook channel receives (a Slack channel gets the same facts as a
/// Slack message). The body of a notification is fixed when it is created, so every
/// retry sends the same bytes and the same `X-Brokkr-Delivery` id.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertNotification {
    /// Id of the notification (the `X-Brokkr-Delivery` header).
    pub id: String,
    /// Id of the alert: the same for its firing, reminder and resolved notifications.
    pub alert_id: String,
    /// The AlertRule, `<namespace>/<name>`.
    pub rule: String,
    pub condition: AlertConditionType,
    pub state: AlertState,
    /// True for a reminder of an alert that is still firing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reminder: bool,
    pub subject: AlertSubject,
    pub severity: Severity,
    /// When the condition began to hold.
    pub started_at: Time,
    /// When it cleared (resolved notifications).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<Time>,
    /// What is wrong (or that it cleared), in words.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHANNEL: &str = r#"
apiVersion: brokkr.io/v1alpha1
kind: NotificationChannel
metadata: {name: ops, namespace: team-a}
spec:
  type: webhook
  webhook:
    urlSecretRef: {name: hook-url, key: url}
    signingSecretRef: {name: hook-hmac, key: key}
    headers: {X-Team: a}
"#;

    const RULE: &str = r#"
apiVersion: brokkr.io/v1alpha1
kind: AlertRule
metadata: {name: edge-down, namespace: team-a}
spec:
  agentSelector: {matchLabels: {env: prod}}
  conditions:
    - {type: AgentOffline, for: 30s}
    - {type: StackDegraded, for: 10m}
  stackSelector: {}
  severity: critical
  channels: [ops]
"#;

    #[test]
    fn the_issue_shapes_parse_and_are_valid() {
        let channel: NotificationChannel = serde_yaml::from_str(CHANNEL).unwrap();
        assert_eq!(channel.spec.type_, ChannelType::Webhook);
        assert_eq!(channel.spec.validate(), Ok(()));
        let rule: AlertRule = serde_yaml::from_str(RULE).unwrap();
        assert_eq!(rule.spec.validate(), Ok(()));
        assert_eq!(rule.spec.severity, Severity::Critical);
        assert_eq!(
            rule.spec.conditions[0].hold_for(),
            Ok(Duration::from_secs(30))
        );
        assert_eq!(rule.spec.renotify_interval(), Ok(DEFAULT_RENOTIFY_INTERVAL));
    }

    #[test]
    fn a_channel_without_its_section_or_with_bad_headers_is_refused() {
        let mut channel: NotificationChannel = serde_yaml::from_str(CHANNEL).unwrap();
        channel.spec.type_ = ChannelType::Slack;
        assert_eq!(
            channel.spec.validate().unwrap_err().to_string(),
            "spec.slack is invalid: type slack needs spec.slack"
        );
        channel.spec.type_ = ChannelType::Webhook;
        let with_header = |name: &str, value: &str| {
            let mut spec = channel.spec.clone();
            let headers = &mut spec.webhook.as_mut().unwrap().headers;
            headers.clear();
            headers.insert(name.into(), value.into());
            spec.validate()
        };
        assert!(
            with_header("X-Brokkr-Signature", "forged")
                .unwrap_err()
                .to_string()
                .contains("sets this header")
        );
        assert!(with_header("X Bad", "v").is_err());
        assert!(with_header("X-Ok", "line\nbreak").is_err());
        assert_eq!(with_header("X-Ok", "fine"), Ok(()));
    }

    #[test]
    fn a_rule_says_what_it_watches_and_for_how_long() {
        let mut rule: AlertRule = serde_yaml::from_str(RULE).unwrap();
        rule.spec.stack_selector = None;
        assert_eq!(
            rule.spec.validate().unwrap_err().to_string(),
            "spec.stackSelector is invalid: StackDegraded needs spec.stackSelector to say what it watches ({} selects everything)"
        );
        rule.spec.stack_selector = Some(LabelSelector::default());
        rule.spec.conditions[1].for_ = Some("soon".into());
        assert!(
            rule.spec
                .validate()
                .unwrap_err()
                .to_string()
                .starts_with("spec.conditions[1].for is invalid")
        );
        rule.spec.conditions[1].for_ = None;
        rule.spec.conditions[1].type_ = AlertConditionType::AgentOffline;
        assert!(
            rule.spec
                .validate()
                .unwrap_err()
                .to_string()
                .contains("listed twice")
        );
        rule.spec.conditions.truncate(1);
        rule.spec.channels.clear();
        assert!(rule.spec.validate().is_err());
        rule.spec.channels = vec!["ops".into()];
        rule.spec.renotify_interval = Some("0s".into());
        assert!(rule.spec.validate().is_err());
    }

    #[test]
    fn the_notification_body_has_the_fields_receivers_rely_on() {
        let body = AlertNotification {
            id: "n".into(),
            alert_id: "a".into(),
            rule: "team-a/edge-down".into(),
            condition: AlertConditionType::AgentOffline,
            state: AlertState::Firing,
            reminder: false,
            subject: AlertSubject {
                kind: "Agent".into(),
                name: "edge-1".into(),
                namespace: None,
            },
            severity: Severity::Critical,
            started_at: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            resolved_at: None,
            message: "missed three heartbeats".into(),
        };
        let json = serde_json::to_value(&body).unwrap();
        for field in [
            "rule",
            "condition",
            "state",
            "subject",
            "severity",
            "startedAt",
            "message",
        ] {
            assert!(json.get(field).is_some(), "{field} missing from {json}");
        }
        assert_eq!(json["state"], "firing");
        assert_eq!(
            json["subject"],
            serde_json::json!({"kind": "Agent", "name": "edge-1"})
        );
    }
}
