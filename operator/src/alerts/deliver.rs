//! Delivery of queued alert notifications to their NotificationChannels, run by the
//! leader only.
//!
//! Each round claims the notifications that are due (see
//! [`Store::claim_due_notifications`]), reads each one's channel and Secrets, and POSTs
//! it: a webhook gets the queued JSON body byte for byte (signed when the channel has a
//! signing key), a Slack channel a Slack message made from it. A 2xx answer delivers it;
//! anything else is retried with jittered backoff until the retry window (counted from
//! when it was queued) runs out, and then it is abandoned with a Warning Event on the
//! channel. Every outcome is in the database before the next round, so a restart or a
//! failover resumes where the last leader stopped; the same `X-Brokkr-Delivery` id on
//! every try lets a receiver drop a notification it already processed.
//!
//! Logs name notifications, alerts and channels, never a URL, a key or a body (it names
//! the customers' objects).

use std::collections::BTreeMap;
use std::time::Duration;

use brokkr_common::Backoff;
use brokkr_common::error_chain;
use brokkr_crds::alerting::{DELIVERY_HEADER, SIGNATURE_HEADER};
use brokkr_crds::conditions::{find_condition, new_condition, reasons, set_condition, types};
use brokkr_crds::{
    AlertNotification, AlertState, ChannelType, NotificationChannel, NotificationChannelStatus,
    OPERATOR_FIELD_MANAGER, Time,
};
use chrono::Utc;
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::{Api, Client, ResourceExt};
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use sha2::{Digest, Sha256};
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use super::channels::{self, Endpoint};
use crate::metrics::{DeliveryLabels, Metrics};
use crate::status::now;
use crate::store::Store;
use crate::store::notifications::DueNotification;

/// How much of a failed answer's body is read, for the error message: the receiver is
/// not trusted to send little.
pub const MAX_ERROR_BODY_BYTES: usize = 256;

/// Channels sent to at once in a round (one channel's notifications go in order).
const CHANNELS_AT_ONCE: usize = 8;

/// Longest Slack message text, in bytes (Slack's section text holds 3000 characters).
const MAX_SLACK_TEXT_BYTES: usize = 2900;

/// How the sender paces itself.
#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// How often the queue is checked for due notifications.
    pub poll_interval: Duration,
    /// The delay before each retry, by attempt number.
    pub retry: Backoff,
    /// A notification not delivered this long after it was queued is abandoned.
    pub give_up_after: Duration,
    /// Longest wait for a receiver's answer (connecting included).
    pub http_timeout: Duration,
    /// Notifications claimed per round.
    pub batch: u64,
    /// How long a claim keeps other senders off a notification: longer than a round can
    /// take; a sender that dies mid-round leaves its claims to run out, then they are
    /// retried.
    pub claim_for: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            poll_interval: Duration::from_secs(1),
            retry: brokkr_common::backoff::NOTIFICATION,
            give_up_after: Duration::from_secs(24 * 3600),
            http_timeout: Duration::from_secs(10),
            batch: 20,
            claim_for: Duration::from_secs(300),
        }
    }
}

/// Delivers due notifications until `stop` resolves: the loop the leader runs. A send in
/// progress when `stop` resolves is finished; claimed notifications not yet sent are
/// made due again at once, for the next leader.
pub async fn deliver_until(
    store: Store,
    client: Client,
    metrics: Metrics,
    config: DeliveryConfig,
    stop: impl Future<Output = ()>,
) {
    let http = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.http_timeout)
        .connect_timeout(config.http_timeout)
        .user_agent(concat!("brokkr-operator/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(http) => http,
        Err(err) => {
            tracing::error!(error = %error_chain(&err), "failed to build the HTTP client; no notification is delivered");
            return;
        }
    };
    let sender = Sender {
        recorder: Recorder::new(client.clone(), Reporter::from(channels::REPORTER)),
        store,
        client,
        metrics,
        config,
        http,
    };
    let (stopped, stopping) = tokio::sync::watch::channel(false);
    let signal = async move {
        stop.await;
        let _ = stopped.send(true);
    };
    let work = async {
        let mut wake = stopping.clone();
        loop {
            if *stopping.borrow() {
                break;
            }
            let full = match sender.round(&stopping).await {
                // A full batch: more may be due at once.
                Ok(claimed) => claimed > 0 && claimed as u64 >= sender.config.batch,
                Err(err) => {
                    warn!(error = %error_chain(&err), "failed to claim due notifications");
                    false
                }
            };
            if full {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(sender.config.poll_interval) => {}
                _ = wake.wait_for(|stopping| *stopping) => break,
            }
        }
    };
    // `work` ends only once `signal` has.
    futures::future::join(signal, work).await;
}

struct Sender {
    store: Store,
    client: Client,
    metrics: Metrics,
    config: DeliveryConfig,
    http: reqwest::Client,
    recorder: Recorder,
}

/// Why an attempt failed: `result` for `status.lastDeliveryResult` (short), `detail`
/// for the notification's `last_error` and the condition.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Failure {
    result: String,
    detail: String,
}

impl Failure {
    fn new(result: impl Into<String>) -> Failure {
        let result = result.into();
        Failure {
            detail: result.clone(),
            result,
        }
    }
}

impl Sender {
    /// Claims and sends one batch; returns how many notifications it claimed.
    async fn round(
        &self,
        stopping: &tokio::sync::watch::Receiver<bool>,
    ) -> crate::store::StoreResult<usize> {
        let due = self
            .store
            .claim_due_notifications(self.config.batch, self.config.claim_for)
            .await?;
        let claimed = due.len();
        let mut by_channel: BTreeMap<(String, String), Vec<DueNotification>> = BTreeMap::new();
        for notification in due {
            by_channel
                .entry((
                    notification.channel_namespace.clone(),
                    notification.channel_name.clone(),
                ))
                .or_default()
                .push(notification);
        }
        futures::stream::iter(by_channel.into_values())
            .for_each_concurrent(CHANNELS_AT_ONCE, |notifications| {
                self.deliver_to_channel(notifications, stopping)
            })
            .await;
        Ok(claimed)
    }

    /// Sends `notifications` (all to one channel, oldest first) one after the other.
    async fn deliver_to_channel(
        &self,
        notifications: Vec<DueNotification>,
        stopping: &tokio::sync::watch::Receiver<bool>,
    ) {
        let mut left = notifications.into_iter();
        while let Some(notification) = left.next() {
            if *stopping.borrow() {
                let ids: Vec<Uuid> = std::iter::once(notification.id)
                    .chain(left.map(|n| n.id))
                    .collect();
                if let Err(err) = self.store.release_notifications(&ids).await {
                    warn!(error = %error_chain(&err), "failed to release claimed notifications; they are retried once the claim runs out");
                }
                return;
            }
            let span = info_span!(
                "deliver",
                notification = %notification.id,
                alert = %notification.alert_id,
                channel = %format!("{}/{}", notification.channel_namespace, notification.channel_name),
            );
            self.deliver(notification).instrument(span).await;
        }
    }

    /// One attempt at one notification, and its bookkeeping.
    async fn deliver(&self, notification: DueNotification) {
        let channels: Api<NotificationChannel> =
            Api::namespaced(self.client.clone(), &notification.channel_namespace);
        let channel = channels.get_opt(&notification.channel_name).await;
        let channel_type = match &channel {
            Ok(Some(channel)) => channel.spec.type_.as_str(),
            _ => "unknown",
        };
        let deadline = notification.created_at
            + chrono::Duration::from_std(self.config.give_up_after)
                .unwrap_or(chrono::TimeDelta::MAX);
        if Utc::now() >= deadline {
            let why = format!(
                "not delivered within {} of being queued ({} attempts); last error: {}",
                humantime::format_duration(self.config.give_up_after),
                notification.attempts,
                notification.last_error.as_deref().unwrap_or("none"),
            );
            log_recorded(self.abandon(&notification, channel_type, &why, false).await);
            if let Ok(Some(channel)) = &channel {
                self.abandoned_event(channel, &notification, &why).await;
            }
            return;
        }

        let outcome = match &channel {
            Ok(Some(channel)) => self.attempt(channel, &notification).await,
            Ok(None) => Err(Failure::new(format!(
                "NotificationChannel {}/{} not found",
                notification.channel_namespace, notification.channel_name
            ))),
            Err(err) => Err(Failure::new(format!(
                "failed to read NotificationChannel {}/{}: {}",
                notification.channel_namespace,
                notification.channel_name,
                error_chain(err)
            ))),
        };
        let recorded = match &outcome {
            Ok(()) => {
                info!("delivered the notification");
                self.count(channel_type, "delivered");
                self.store.notification_delivered(notification.id).await
            }
            Err(failure) => {
                let attempt = u32::try_from(notification.attempts).unwrap_or(u32::MAX);
                let retry_after = self.config.retry.jittered(attempt);
                let retry_at = Utc::now()
                    + chrono::Duration::from_std(retry_after).unwrap_or(chrono::TimeDelta::MAX);
                if retry_at >= deadline {
                    let why = format!(
                        "not delivered within {} of being queued ({} attempts); last error: {}",
                        humantime::format_duration(self.config.give_up_after),
                        notification.attempts.saturating_add(1),
                        failure.detail,
                    );
                    let recorded = self.abandon(&notification, channel_type, &why, true).await;
                    if let Ok(Some(channel)) = &channel {
                        self.abandoned_event(channel, &notification, &why).await;
                    }
                    recorded
                } else {
                    warn!(error = %failure.detail, retry_in = ?retry_after, "failed to deliver the notification; retrying");
                    self.count(channel_type, "failed");
                    self.store
                        .notification_failed(notification.id, &failure.detail, retry_after)
                        .await
                }
            }
        };
        log_recorded(recorded);
        if let Ok(Some(channel)) = channel {
            self.record_on_channel(channel, outcome.as_ref().map(|_| ()))
                .await;
        }
    }

    /// Records that `notification` is given up on. Returns the store's answer.
    async fn abandon(
        &self,
        notification: &DueNotification,
        channel_type: &'static str,
        why: &str,
        attempted: bool,
    ) -> crate::store::StoreResult<bool> {
        warn!(error = %why, "gave up on the notification");
        self.count(channel_type, "abandoned");
        self.store
            .notification_abandoned(notification.id, why, attempted)
            .await
    }

    async fn abandoned_event(
        &self,
        channel: &NotificationChannel,
        notification: &DueNotification,
        why: &str,
    ) {
        channels::publish(
            &self.recorder,
            channel,
            EventType::Warning,
            reasons::DELIVERY_FAILING,
            "Deliver",
            format!(
                "gave up on notification {} of alert {}: {why}",
                notification.id, notification.alert_id
            ),
        )
        .await;
    }

    fn count(&self, channel_type: &'static str, result: &'static str) {
        self.metrics
            .fleet
            .notification_deliveries
            .get_or_create(&DeliveryLabels {
                result,
                channel_type,
            })
            .inc();
    }

    /// Reads the channel's Secrets and sends the notification once.
    async fn attempt(
        &self,
        channel: &NotificationChannel,
        notification: &DueNotification,
    ) -> Result<(), Failure> {
        let endpoint = channels::resolve(&self.client, channel)
            .await
            .map_err(|problem| Failure::new(error_chain(&problem)))?;
        let request = build_request(&self.http, &endpoint, notification)?;
        send(request, self.config.http_timeout).await
    }

    /// Writes the attempt's result to the channel's status (a failure is only logged: the
    /// notification's own record is what counts). `channel` was just read.
    async fn record_on_channel(
        &self,
        mut channel: NotificationChannel,
        outcome: Result<(), &Failure>,
    ) {
        let namespace = channel.namespace().unwrap_or_default();
        let api: Api<NotificationChannel> = Api::namespaced(self.client.clone(), &namespace);
        // A concurrent writer (the controller, another sender's round) fails the
        // resourceVersion precondition: read again and redo.
        for _ in 0..3 {
            let previous = channel.status.clone().unwrap_or_default();
            let status = delivery_status(&previous, channel.metadata.generation, outcome, now());
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": channel.resource_version()},
                "status": {
                    "lastDeliveryTime": status.last_delivery_time,
                    "lastDeliveryResult": status.last_delivery_result,
                    "consecutiveFailures": status.consecutive_failures,
                    "conditions": status.conditions,
                },
            });
            let params = PatchParams {
                field_manager: Some(OPERATOR_FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            match api
                .patch_status(&channel.name_any(), &params, &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    if let Err(failure) = outcome
                        && find_condition(&previous.conditions, types::READY)
                            .is_none_or(|c| c.reason != reasons::DELIVERY_FAILING)
                    {
                        channels::publish(
                            &self.recorder,
                            &channel,
                            EventType::Warning,
                            reasons::DELIVERY_FAILING,
                            "Deliver",
                            format!(
                                "failed to deliver a notification: {}; it is retried",
                                failure.detail
                            ),
                        )
                        .await;
                    }
                    return;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    match api.get_opt(&channel.name_any()).await {
                        Ok(Some(fresh)) => channel = fresh,
                        Ok(None) => return,
                        Err(err) => {
                            warn!(error = %error_chain(&err), "failed to read the channel to record the delivery result");
                            return;
                        }
                    }
                }
                Err(err) => {
                    warn!(error = %error_chain(&err), "failed to record the delivery result in the channel's status");
                    return;
                }
            }
        }
        warn!("failed to record the delivery result in the channel's status: it kept changing");
    }
}

/// Logs what recording an outcome came to, when it is not the usual.
fn log_recorded(recorded: crate::store::StoreResult<bool>) {
    match recorded {
        Ok(true) => {}
        Ok(false) => debug!("the notification was finished by another sender"),
        Err(err) => {
            warn!(error = %error_chain(&err), "failed to record the delivery outcome; the notification is retried once its claim runs out");
        }
    }
}

/// The channel's status after an attempt: the `lastDelivery*` fields, the failure count
/// and `Ready` (its `lastTransitionTime` moves only when it flips).
fn delivery_status(
    previous: &NotificationChannelStatus,
    generation: Option<i64>,
    outcome: Result<(), &Failure>,
    now: Time,
) -> NotificationChannelStatus {
    let mut status = previous.clone();
    status.last_delivery_time = Some(now.clone());
    let ready = match outcome {
        Ok(()) => {
            status.consecutive_failures = 0;
            status.last_delivery_result = Some(reasons::DELIVERED.to_owned());
            new_condition(
                types::READY,
                true,
                reasons::DELIVERED,
                "the last notification was delivered",
                generation,
                now,
            )
        }
        Err(failure) => {
            status.consecutive_failures = status.consecutive_failures.saturating_add(1);
            status.last_delivery_result = Some(failure.result.clone());
            new_condition(
                types::READY,
                false,
                reasons::DELIVERY_FAILING,
                format!(
                    "the last delivery failed: {}; notifications are retried with backoff",
                    failure.detail
                ),
                generation,
                now,
            )
        }
    };
    set_condition(&mut status.conditions, ready);
    status
}

/// The request for one notification: the queued body as is (webhook) or as a Slack
/// message.
fn build_request(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    notification: &DueNotification,
) -> Result<reqwest::RequestBuilder, Failure> {
    let json = HeaderValue::from_static("application/json");
    match endpoint.type_ {
        ChannelType::Webhook => {
            let body = notification.body.as_bytes().to_vec();
            let mut request = http
                .post(endpoint.url.clone())
                .headers(endpoint.headers.clone())
                .header(CONTENT_TYPE, json)
                .header(DELIVERY_HEADER, notification.id.to_string());
            if let Some(key) = &endpoint.signing_key {
                request = request.header(SIGNATURE_HEADER, signature(key, &body));
            }
            Ok(request.body(body))
        }
        ChannelType::Slack => {
            let alert: AlertNotification =
                serde_json::from_str(&notification.body).map_err(|err| {
                    Failure::new(format!("the queued notification does not parse: {err}"))
                })?;
            let message = slack_message(&alert);
            Ok(http
                .post(endpoint.url.clone())
                .header(CONTENT_TYPE, json)
                .body(message.to_string()))
        }
    }
}

/// Sends `request`: a 2xx answer is success; the body of any other is read up to
/// [`MAX_ERROR_BODY_BYTES`] for the error message.
async fn send(request: reqwest::RequestBuilder, timeout: Duration) -> Result<(), Failure> {
    let mut response = request
        .send()
        .await
        .map_err(|err| transport_failure(err, timeout))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let result = format!("HTTP {status}");
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY_BYTES);
    let said: String = String::from_utf8_lossy(&body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let said = said.trim();
    Err(Failure {
        detail: if said.is_empty() {
            result.clone()
        } else {
            format!("{result}: {said}")
        },
        result,
    })
}

/// A failure to get an answer, without the URL (it often carries a token).
fn transport_failure(err: reqwest::Error, timeout: Duration) -> Failure {
    let err = err.without_url();
    if err.is_timeout() {
        return Failure::new(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ));
    }
    if err.is_connect() {
        let mut root: &dyn std::error::Error = &err;
        while let Some(source) = root.source() {
            root = source;
        }
        return Failure::new(format!("connection failed: {root}"));
    }
    Failure::new(error_chain(&err))
}

/// `sha256=<lowercase hex HMAC-SHA256 of body>`: the `X-Brokkr-Signature` value.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac_sha256(key, body)))
}

/// HMAC-SHA256 (RFC 2104) of `message` with `key`.
//
// A few lines over `sha2` rather than the `hmac` crate: the version that fits the
// workspace's `sha2` 0.10 is hmac 0.12, while the lock file already holds hmac 0.13 (on
// digest 0.11, for another crate); two copies for one function is not worth it.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new()
        .chain_update(block.map(|b| b ^ 0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(block.map(|b| b ^ 0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The Slack message for a notification.
//
// Slack incoming webhooks take a JSON object whose `text` is the message (and the text
// of the push notification); `blocks` lay it out: a `section` with `mrkdwn` text (where
// `&`, `<` and `>` must be escaped, or `<!channel>` in a status message would page a
// whole channel) and a `context` line in small print.
pub fn slack_message(alert: &AlertNotification) -> serde_json::Value {
    let text = slack_text(alert);
    serde_json::json!({
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{
                "type": "mrkdwn",
                "text": format!("Brokkr alert {} · notification {}", escape_mrkdwn(&alert.alert_id), escape_mrkdwn(&alert.id)),
            }]},
        ],
    })
}

/// One line: `:red_circle: [critical] AgentOffline firing: Agent edge-1 — missed three
/// heartbeats (rule team-a/edge-down, since 2026-01-01T00:00:00Z)`, or with
/// `:white_check_mark:` and `resolved` once it cleared.
pub fn slack_text(alert: &AlertNotification) -> String {
    let (icon, what, when) = match alert.state {
        AlertState::Firing => (
            ":red_circle:",
            if alert.reminder {
                "still firing"
            } else {
                "firing"
            },
            format!("since {}", alert.started_at.0),
        ),
        AlertState::Resolved => (
            ":white_check_mark:",
            "resolved",
            match &alert.resolved_at {
                Some(resolved_at) => format!("resolved {}", resolved_at.0),
                None => format!("since {}", alert.started_at.0),
            },
        ),
    };
    let line = format!(
        "{icon} [{}] {} {what}: {} — {} (rule {}, {when})",
        alert.severity.as_str(),
        alert.condition,
        alert.subject,
        alert.message,
        alert.rule,
    );
    brokkr_common::truncate_bytes(&escape_mrkdwn(&line), MAX_SLACK_TEXT_BYTES).to_owned()
}

fn escape_mrkdwn(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use brokkr_crds::{AlertConditionType, AlertSubject, Severity};

    #[test]
    fn hmac_matches_the_rfc_4231_test_vectors() {
        // Test case 1.
        assert_eq!(
            hex::encode(hmac_sha256(&[0x0b; 20], b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 2: a key shorter than the block.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    fn alert(state: AlertState) -> AlertNotification {
        let at = |text: &str| Time(text.parse().unwrap());
        AlertNotification {
            id: "n-1".into(),
            alert_id: "a-1".into(),
            rule: "team-a/edge-down".into(),
            condition: AlertConditionType::AgentOffline,
            state,
            reminder: false,
            subject: AlertSubject {
                kind: "Agent".into(),
                name: "edge-1".into(),
                namespace: None,
            },
            severity: Severity::Critical,
            started_at: at("2026-01-02T03:04:05Z"),
            resolved_at: (state == AlertState::Resolved).then(|| at("2026-01-02T04:00:00Z")),
            message: "missed three heartbeats".into(),
        }
    }

    #[test]
    fn slack_text_says_what_fires_and_what_resolved() {
        assert_eq!(
            slack_text(&alert(AlertState::Firing)),
            ":red_circle: [critical] AgentOffline firing: Agent edge-1 — missed three heartbeats (rule team-a/edge-down, since 2026-01-02T03:04:05Z)"
        );
        let mut reminder = alert(AlertState::Firing);
        reminder.reminder = true;
        assert!(slack_text(&reminder).contains("AgentOffline still firing: "));
        assert_eq!(
            slack_text(&alert(AlertState::Resolved)),
            ":white_check_mark: [critical] AgentOffline resolved: Agent edge-1 — missed three heartbeats (rule team-a/edge-down, resolved 2026-01-02T04:00:00Z)"
        );
    }

    #[test]
    fn slack_text_cannot_mention_or_link() {
        let mut hostile = alert(AlertState::Firing);
        hostile.message = "<!channel> see <http://evil|here> & more".into();
        let text = slack_text(&hostile);
        assert!(text.contains("&lt;!channel&gt; see &lt;http://evil|here&gt; &amp; more"));
        assert!(!text.contains('<'));
        hostile.message = "é".repeat(5000);
        assert!(slack_text(&hostile).len() <= MAX_SLACK_TEXT_BYTES);
        let message = slack_message(&alert(AlertState::Firing));
        assert_eq!(message["text"], message["blocks"][0]["text"]["text"]);
    }

    fn failing(result: &str) -> Failure {
        Failure::new(result)
    }

    #[test]
    fn channel_status_counts_failures_and_flips_ready_only_on_change() {
        let at =
            |s: i64| Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + s).unwrap());
        let start = NotificationChannelStatus::default();
        let failure = failing("HTTP 503 Service Unavailable");
        let once = delivery_status(&start, Some(1), Err(&failure), at(0));
        assert_eq!(once.consecutive_failures, 1);
        assert_eq!(
            once.last_delivery_result.as_deref(),
            Some("HTTP 503 Service Unavailable")
        );
        let twice = delivery_status(&once, Some(1), Err(&failure), at(10));
        assert_eq!(twice.consecutive_failures, 2);
        let ready = find_condition(&twice.conditions, types::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "DeliveryFailing")
        );
        assert_eq!(ready.last_transition_time, at(0));
        assert!(ready.message.contains("HTTP 503") && ready.message.contains("retried"));
        let delivered = delivery_status(&twice, Some(1), Ok(()), at(20));
        assert_eq!(delivered.consecutive_failures, 0);
        assert_eq!(delivered.last_delivery_result.as_deref(), Some("Delivered"));
        assert_eq!(delivered.last_delivery_time, Some(at(20)));
        let ready = find_condition(&delivered.conditions, types::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Delivered")
        );
        assert_eq!(ready.last_transition_time, at(20));
    }
}
