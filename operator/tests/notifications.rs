//! Delivery of alert notifications to NotificationChannels, against a real PostgreSQL,
//! kubesim (or the cluster of $KUBECONFIG) and a real HTTP receiver started by each
//! test: signed webhooks, Slack messages, retries with backoff, abandonment, two senders
//! at once, and the channel controller's `Ready` condition.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brokkr_common::Backoff;
use brokkr_crds::{
    AlertConditionType, AlertNotification, AlertState, AlertSubject, NotificationChannel,
    NotificationChannelSpec, Severity, Time,
};
use brokkr_operator::alerts::{channels, deliver};
use brokkr_operator::metrics::{DeliveryLabels, Metrics};
use brokkr_operator::store::Store;
use brokkr_operator::store::notifications::NotificationRecord;
use brokkr_testdb::TestDb;
use hmac::{KeyInit, Mac};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kubesim::testing::{TestCluster, eventually, eventually_within};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use tokio::sync::oneshot;
use uuid::Uuid;

const SIGNING_KEY: &[u8] = b"k3y-from-the-secret\n";

/// A request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    /// Lower-case names.
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    /// What the receiver answered.
    status: u16,
}

/// An HTTP receiver on 127.0.0.1 that records every request and answers 500 to the
/// first `fail_first` of them, 200 after, each after `delay`.
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(fail_first: usize, delay: Duration) -> Receiver {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let record = received.clone();
        let app = axum::Router::new().route(
            "/hook/{token}",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let record = record.clone();
                    async move {
                        tokio::time::sleep(delay).await;
                        let mut received = record.lock().unwrap();
                        let status = if received.len() < fail_first {
                            500
                        } else {
                            200
                        };
                        received.push(Received {
                            headers: headers
                                .iter()
                                .map(|(k, v)| {
                                    (
                                        k.as_str().to_owned(),
                                        v.to_str().unwrap_or_default().to_owned(),
                                    )
                                })
                                .collect(),
                            body: body.to_vec(),
                            status,
                        });
                        axum::http::StatusCode::from_u16(status).unwrap()
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, app).into_future());
        Receiver {
            url: format!("http://{addr}/hook/s3cr3t-token"),
            received,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    async fn when_received(&self, count: usize) -> Vec<Received> {
        eventually(&format!("{count} requests at the receiver"), || async {
            Some(self.received()).filter(|r| r.len() >= count)
        })
        .await
    }
}

/// kubesim (with the CRDs), a fresh database, and the store over it.
struct Fixture {
    cluster: TestCluster,
    db: TestDb,
    store: Store,
    metrics: Metrics,
}

impl Fixture {
    async fn new() -> Fixture {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let cluster = TestCluster::new().await;
        brokkr_operator::run::install_crds(&cluster.client)
            .await
            .expect("install CRDs");
        let db = TestDb::new().await;
        let store = Store::new(db.conn().clone());
        Fixture {
            cluster,
            db,
            store,
            metrics: Metrics::default(),
        }
    }

    fn namespace(&self) -> &str {
        &self.cluster.namespace
    }

    async fn create_secret(&self, name: &str, key: &str, value: &[u8]) {
        let mut secret = Secret::default();
        secret.metadata.name = Some(name.into());
        secret.data = Some([(key.to_owned(), ByteString(value.to_vec()))].into());
        self.cluster
            .api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
            .expect("create Secret");
    }

    async fn create_channel(&self, name: &str, yaml_spec: &str) {
        let spec: NotificationChannelSpec = serde_yaml::from_str(yaml_spec).unwrap();
        self.cluster
            .api::<NotificationChannel>()
            .create(
                &PostParams::default(),
                &NotificationChannel::new(name, spec),
            )
            .await
            .expect("create NotificationChannel");
    }

    /// The webhook channel `ops`: URL in Secret `hook-url`, signed with the key in
    /// Secret `hook-hmac`, with an extra header.
    async fn create_signed_webhook(&self, receiver: &Receiver) {
        self.create_secret("hook-url", "url", receiver.url.as_bytes())
            .await;
        self.create_secret("hook-hmac", "key", SIGNING_KEY).await;
        self.create_channel(
            "ops",
            "type: webhook\n\
             webhook:\n  \
               urlSecretRef: {name: hook-url, key: url}\n  \
               signingSecretRef: {name: hook-hmac, key: key}\n  \
               headers: {X-Team: team-a}\n",
        )
        .await;
    }

    async fn create_plain_webhook(&self, name: &str, url_secret: &str) {
        self.create_channel(
            name,
            &format!("type: webhook\nwebhook:\n  urlSecretRef: {{name: {url_secret}, key: url}}\n"),
        )
        .await;
    }

    async fn execute(&self, sql: &str, values: Vec<sea_orm::Value>) {
        self.db
            .conn()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                values,
            ))
            .await
            .expect("SQL");
    }

    /// A firing alert and one notification of it to `channel`, queued `age` ago. Returns
    /// the alert id, the notification id and the body as queued.
    async fn queue(
        &self,
        channel: &str,
        state: AlertState,
        age: Duration,
    ) -> (Uuid, Uuid, AlertNotification) {
        let alert_id = Uuid::new_v4();
        let id = Uuid::new_v4();
        let body = notification(
            id,
            alert_id,
            &format!("{}/edge-down", self.namespace()),
            state,
        );
        self.execute(
            "INSERT INTO alerts (id, rule_uid, rule_namespace, rule_name, condition, \
                 subject_kind, subject_uid, subject_name, severity, state, message, \
                 started_at, resolved_at) \
             VALUES ($1, $2, $3, 'edge-down', 'AgentOffline', 'Agent', $4, 'edge-1', \
                 'critical', $5, 'missed three heartbeats', now() - interval '1 hour', \
                 CASE WHEN $5 = 'resolved' THEN now() END)",
            vec![
                alert_id.into(),
                Uuid::new_v4().into(),
                self.namespace().into(),
                Uuid::new_v4().into(),
                state.as_str().into(),
            ],
        )
        .await;
        self.execute(
            "INSERT INTO alert_notifications \
                 (id, alert_id, channel_namespace, channel_name, body, created_at) \
             VALUES ($1, $2, $3, $4, $5, now() - make_interval(secs => $6))",
            vec![
                id.into(),
                alert_id.into(),
                self.namespace().into(),
                channel.into(),
                serde_json::to_value(&body).unwrap().into(),
                age.as_secs_f64().into(),
            ],
        )
        .await;
        (alert_id, id, body)
    }

    /// The body as PostgreSQL holds it: the bytes a webhook must receive.
    async fn stored_body(&self, id: Uuid) -> String {
        let row = self
            .db
            .conn()
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT body::text FROM alert_notifications WHERE id = $1",
                [id.into()],
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get_by_index(0).unwrap()
    }

    async fn notification_row(&self, alert_id: Uuid) -> NotificationRecord {
        let mut rows = self.store.notifications_of_alert(alert_id).await.unwrap();
        assert_eq!(rows.len(), 1);
        rows.remove(0)
    }

    /// `(delivery_attempts, last_notified_at is set)` of an alert.
    async fn alert_bookkeeping(&self, alert_id: Uuid) -> (i32, bool) {
        let row = self
            .db
            .conn()
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT delivery_attempts, last_notified_at IS NOT NULL FROM alerts WHERE id = $1",
                [alert_id.into()],
            ))
            .await
            .unwrap()
            .unwrap();
        (
            row.try_get_by_index(0).unwrap(),
            row.try_get_by_index(1).unwrap(),
        )
    }

    /// Runs a sender (as a leader does) until the returned handle is stopped or dropped.
    fn start_sender(&self, config: deliver::DeliveryConfig) -> Running {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(deliver::deliver_until(
            self.store.clone(),
            self.cluster.client.clone(),
            self.metrics.clone(),
            config,
            async move {
                let _ = stopped.await;
            },
        ));
        Running {
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn channel(&self, name: &str) -> NotificationChannel {
        self.cluster
            .api::<NotificationChannel>()
            .get(name)
            .await
            .unwrap()
    }

    async fn warnings_for(&self, name: &str, reason: &str) -> Vec<Event> {
        self.cluster
            .api::<Event>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.type_.as_deref() == Some("Warning")
                    && e.reason.as_deref() == Some(reason)
            })
            .collect()
    }

    fn deliveries(&self, result: &'static str, channel_type: &'static str) -> u64 {
        self.metrics
            .fleet
            .notification_deliveries
            .get_or_create(&DeliveryLabels {
                result,
                channel_type,
            })
            .get()
    }
}

struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the sender stops")
                .unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn notification(id: Uuid, alert_id: Uuid, rule: &str, state: AlertState) -> AlertNotification {
    let at = |text: &str| Time(text.parse().unwrap());
    AlertNotification {
        id: id.to_string(),
        alert_id: alert_id.to_string(),
        rule: rule.into(),
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

/// Retries after 200–400 ms, then 400–800 ms, at most 1 s apart.
fn fast() -> deliver::DeliveryConfig {
    deliver::DeliveryConfig {
        poll_interval: Duration::from_millis(100),
        retry: Backoff::new(Duration::from_millis(400), Duration::from_secs(1)),
        give_up_after: Duration::from_secs(3600),
        http_timeout: Duration::from_secs(5),
        batch: 20,
        claim_for: Duration::from_secs(60),
    }
}

/// `(status, reason)` of the channel's `Ready` condition.
fn ready(channel: &NotificationChannel) -> Option<(String, String)> {
    channel
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.status.clone(), c.reason.clone()))
}

fn independent_signature(key: &[u8], body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2_for_hmac::Sha256>::new_from_slice(key).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn a_webhook_gets_the_exact_queued_body_signed_with_the_key_from_its_secret() {
    let f = Fixture::new().await;
    let receiver = Receiver::start(0, Duration::ZERO).await;
    f.create_signed_webhook(&receiver).await;
    let (alert_id, id, body) = f.queue("ops", AlertState::Firing, Duration::ZERO).await;
    let sender = f.start_sender(fast());

    let got = receiver.when_received(1).await.remove(0);
    let stored = f.stored_body(id).await;
    assert_eq!(
        String::from_utf8(got.body.clone()).unwrap(),
        stored,
        "the body is the queued JSON, byte for byte"
    );
    let parsed: AlertNotification = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(parsed, body);
    assert_eq!(got.headers["content-type"], "application/json");
    assert_eq!(got.headers["x-brokkr-delivery"], id.to_string());
    assert_eq!(got.headers["x-team"], "team-a");
    assert_eq!(
        got.headers["x-brokkr-signature"],
        independent_signature(SIGNING_KEY, &got.body),
        "HMAC-SHA256 of the body with the Secret's key, byte for byte (trailing newline too)"
    );
    assert_ne!(
        got.headers["x-brokkr-signature"],
        independent_signature(b"k3y-from-the-secret", &got.body)
    );

    let row = eventually("the notification is recorded as delivered", || async {
        Some(f.notification_row(alert_id).await).filter(|r| r.delivered_at.is_some())
    })
    .await;
    assert_eq!(row.attempts, 1);
    assert_eq!(f.alert_bookkeeping(alert_id).await, (1, true));
    let channel = eventually("the channel reports the delivery", || async {
        Some(f.channel("ops").await).filter(|c| {
            c.status
                .as_ref()
                .is_some_and(|s| s.last_delivery_result.is_some())
        })
    })
    .await;
    let status = channel.status.clone().unwrap();
    assert_eq!(status.last_delivery_result.as_deref(), Some("Delivered"));
    assert!(status.last_delivery_time.is_some());
    assert_eq!(ready(&channel), Some(("True".into(), "Delivered".into())));
    assert_eq!(f.deliveries("delivered", "webhook"), 1);
    sender.stop().await;
}

#[tokio::test]
async fn a_receiver_failing_three_times_gets_the_fourth_attempt_and_nothing_more() {
    let f = Fixture::new().await;
    let receiver = Receiver::start(3, Duration::ZERO).await;
    f.create_signed_webhook(&receiver).await;
    let (alert_id, id, _) = f.queue("ops", AlertState::Firing, Duration::ZERO).await;

    // Watch the channel's status while the sender works.
    // (consecutiveFailures, Ready (status, reason), lastDeliveryResult) as seen.
    type Seen = (u32, Option<(String, String)>, Option<String>);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let watcher = {
        let seen = seen.clone();
        let api = f.cluster.api::<NotificationChannel>();
        tokio::spawn(async move {
            loop {
                if let Ok(channel) = api.get("ops").await
                    && let Some(status) = &channel.status
                {
                    seen.lock().unwrap().push((
                        status.consecutive_failures,
                        ready(&channel),
                        status.last_delivery_result.clone(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let sender = f.start_sender(fast());

    let got = receiver.when_received(4).await;
    let row = eventually("the notification is recorded as delivered", || async {
        Some(f.notification_row(alert_id).await).filter(|r| r.delivered_at.is_some())
    })
    .await;
    // A few more rounds: nothing is sent again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    watcher.abort();
    let got_later = receiver.received();
    assert_eq!(got_later.len(), 4, "no request after the success");
    assert_eq!(
        got.iter().map(|r| r.status).collect::<Vec<_>>(),
        [500, 500, 500, 200]
    );
    for request in &got {
        assert_eq!(request.headers["x-brokkr-delivery"], id.to_string());
        assert_eq!(request.body, got[0].body, "every try sends the same bytes");
    }
    assert_eq!(row.attempts, 4);
    assert!(row.abandoned_at.is_none());
    assert_eq!(row.last_error, None);
    assert_eq!(f.alert_bookkeeping(alert_id).await, (4, true));
    assert_eq!(f.deliveries("failed", "webhook"), 3);
    assert_eq!(f.deliveries("delivered", "webhook"), 1);

    let channel = eventually("the channel recovers", || async {
        Some(f.channel("ops").await).filter(|c| {
            c.status
                .as_ref()
                .is_some_and(|s| s.last_delivery_result.as_deref() == Some("Delivered"))
        })
    })
    .await;
    assert_eq!(channel.status.as_ref().unwrap().consecutive_failures, 0);
    assert_eq!(ready(&channel), Some(("True".into(), "Delivered".into())));

    // While it failed, the channel said so, counting the failures.
    let seen = seen.lock().unwrap().clone();
    let failing: Vec<_> = seen.iter().filter(|(count, _, _)| *count > 0).collect();
    assert!(
        failing.iter().any(|(count, _, _)| *count == 3),
        "three failures in a row were shown: {seen:?}"
    );
    for (count, ready, result) in &failing {
        assert!(*count <= 3);
        assert_eq!(
            ready.as_ref(),
            Some(&("False".to_owned(), "DeliveryFailing".to_owned()))
        );
        assert_eq!(result.as_deref(), Some("HTTP 500 Internal Server Error"));
    }
    let counts: Vec<u32> = failing.iter().map(|(count, _, _)| *count).collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    assert_eq!(
        f.warnings_for("ops", "DeliveryFailing").await.len(),
        1,
        "one Warning Event when delivery started failing"
    );
    sender.stop().await;
}

#[tokio::test]
async fn a_notification_waits_for_its_missing_secret_and_is_delivered_once_it_exists() {
    let f = Fixture::new().await;
    let receiver = Receiver::start(0, Duration::ZERO).await;
    f.create_plain_webhook("ops", "hook-url").await;
    let (alert_id, _, _) = f.queue("ops", AlertState::Firing, Duration::ZERO).await;
    let sender = f.start_sender(fast());

    let missing = format!("Secret {}/hook-url not found", f.namespace());
    let row = eventually("a second failed attempt", || async {
        Some(f.notification_row(alert_id).await).filter(|r| r.attempts >= 2)
    })
    .await;
    assert_eq!(row.last_error.as_deref(), Some(missing.as_str()));
    assert!(row.delivered_at.is_none() && row.abandoned_at.is_none());
    let channel = f.channel("ops").await;
    let status = channel.status.clone().unwrap();
    assert_eq!(
        status.last_delivery_result.as_deref(),
        Some(missing.as_str())
    );
    assert!(status.consecutive_failures >= 2);
    assert_eq!(
        ready(&channel),
        Some(("False".into(), "DeliveryFailing".into()))
    );
    assert!(receiver.received().is_empty());

    f.create_secret("hook-url", "url", receiver.url.as_bytes())
        .await;
    receiver.when_received(1).await;
    let row = eventually("the notification is delivered", || async {
        Some(f.notification_row(alert_id).await).filter(|r| r.delivered_at.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(f.alert_bookkeeping(alert_id).await, (row.attempts, true));
    sender.stop().await;
}

#[tokio::test]
async fn a_slack_channel_gets_a_slack_message() {
    let f = Fixture::new().await;
    let receiver = Receiver::start(0, Duration::ZERO).await;
    f.create_secret("slack-url", "url", receiver.url.as_bytes())
        .await;
    f.create_channel(
        "chat",
        "type: slack\nslack:\n  urlSecretRef: {name: slack-url, key: url}\n",
    )
    .await;
    let (alert_id, id, _) = f.queue("chat", AlertState::Resolved, Duration::ZERO).await;
    let sender = f.start_sender(fast());

    let got = receiver.when_received(1).await.remove(0);
    assert_eq!(got.headers["content-type"], "application/json");
    assert!(!got.headers.contains_key("x-brokkr-signature"));
    let message: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    let expected = format!(
        ":white_check_mark: [critical] AgentOffline resolved: Agent edge-1 — missed three \
         heartbeats (rule {}/edge-down, resolved 2026-01-02T04:00:00Z)",
        f.namespace()
    );
    assert_eq!(message["text"], expected.as_str());
    assert_eq!(message["blocks"][0]["type"], "section");
    assert_eq!(message["blocks"][0]["text"]["text"], expected.as_str());
    assert!(
        message["blocks"][1]["elements"][0]["text"]
            .as_str()
            .unwrap()
            .contains(&id.to_string())
    );
    eventually("the notification is recorded as delivered", || async {
        Some(f.notification_row(alert_id).await).filter(|r| r.delivered_at.is_some())
    })
    .await;
    assert_eq!(f.deliveries("delivered", "slack"), 1);
    sender.stop().await;
}

#[tokio::test]
async fn a_notification_past_the_retry_window_is_abandoned_and_never_sent() {
    let f = Fixture::new().await;
    let receiver = Receiver::start(0, Duration::ZERO).await;
    f.create_signed_webhook(&receiver).await;
    let config = deliver::DeliveryConfig {
        give_up_after: Duration::from_secs(3600),
        ..fast()
    };
    // Queued two hours ago (a hub down that long): past the window.
    let (stale, _, _) = f
        .queue("ops", AlertState::Firing, Duration::from_secs(7200))
        .await;
    let (fresh, fresh_id, _) = f.queue("ops", AlertState::Firing, Duration::ZERO).await;
    let sender = f.start_sender(config);

    let row = eventually("the stale notification is abandoned", || async {
        Some(f.notification_row(stale).await).filter(|r| r.abandoned_at.is_some())
    })
    .await;
    eventually("the fresh notification is delivered", || async {
        Some(f.notification_row(fresh).await).filter(|r| r.delivered_at.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.received();
    assert_eq!(got.len(), 1, "only the fresh notification is sent");
    assert_eq!(got[0].headers["x-brokkr-delivery"], fresh_id.to_string());
    assert_eq!(row.attempts, 0);
    assert!(row.delivered_at.is_none());
    assert!(row.last_error.unwrap().contains("not delivered within 1h"));
    assert_eq!(f.alert_bookkeeping(stale).await, (0, false));
    assert_eq!(f.deliveries("abandoned", "webhook"), 1);
    let warnings = eventually("a Warning Event says it was given up", || async {
        Some(f.warnings_for("ops", "DeliveryFailing").await).filter(|w| !w.is_empty())
    })
    .await;
    assert!(
        warnings[0]
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("gave up on notification")
    );
    sender.stop().await;
}

#[tokio::test]
async fn a_receiver_that_never_accepts_is_given_up_on_when_the_window_runs_out() {
    let f = Fixture::new().await;
    let receiver = Receiver::start(usize::MAX, Duration::ZERO).await;
    f.create_signed_webhook(&receiver).await;
    let config = deliver::DeliveryConfig {
        retry: Backoff::new(Duration::from_millis(200), Duration::from_millis(400)),
        give_up_after: Duration::from_secs(2),
        ..fast()
    };
    let (alert_id, _, _) = f.queue("ops", AlertState::Firing, Duration::ZERO).await;
    let sender = f.start_sender(config);

    let row = eventually("the notification is abandoned", || async {
        Some(f.notification_row(alert_id).await).filter(|r| r.abandoned_at.is_some())
    })
    .await;
    let sent = receiver.received().len();
    assert!(sent >= 2, "{sent} attempts");
    assert_eq!(row.attempts as usize, sent, "every attempt is counted");
    assert!(
        row.last_error
            .unwrap()
            .contains("HTTP 500 Internal Server Error")
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        receiver.received().len(),
        sent,
        "nothing is sent after giving up"
    );
    assert_eq!(f.alert_bookkeeping(alert_id).await, (sent as i32, false));
    sender.stop().await;
}

#[tokio::test]
async fn two_senders_at_once_deliver_each_notification_once() {
    let f = Fixture::new().await;
    // A slow receiver, so the senders' rounds overlap.
    let receiver = Receiver::start(0, Duration::from_millis(20)).await;
    f.create_secret("hook-url", "url", receiver.url.as_bytes())
        .await;
    for channel in ["ops", "dev", "sec"] {
        f.create_plain_webhook(channel, "hook-url").await;
    }
    let mut ids = BTreeSet::new();
    for index in 0..30 {
        let channel = ["ops", "dev", "sec"][index % 3];
        let (_, id, _) = f.queue(channel, AlertState::Firing, Duration::ZERO).await;
        ids.insert(id.to_string());
    }
    let config = deliver::DeliveryConfig {
        batch: 4,
        poll_interval: Duration::from_millis(20),
        ..fast()
    };
    let first = f.start_sender(config.clone());
    let second = f.start_sender(config);

    receiver.when_received(30).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.received();
    let delivered: Vec<String> = got
        .iter()
        .map(|r| r.headers["x-brokkr-delivery"].clone())
        .collect();
    assert_eq!(delivered.len(), 30, "no notification is sent twice");
    assert_eq!(delivered.into_iter().collect::<BTreeSet<_>>(), ids);
    let open: i64 =
        f.db.conn()
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT count(*) FROM alert_notifications \
             WHERE delivered_at IS NULL OR attempts <> 1",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index(0)
            .unwrap();
    assert_eq!(open, 0);
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_stopped_sender_leaves_nothing_claimed_for_the_next_leader() {
    let f = Fixture::new().await;
    // Each request takes a while: the stop comes mid-round.
    let receiver = Receiver::start(0, Duration::from_millis(300)).await;
    f.create_secret("hook-url", "url", receiver.url.as_bytes())
        .await;
    f.create_plain_webhook("ops", "hook-url").await;
    for _ in 0..5 {
        f.queue("ops", AlertState::Firing, Duration::ZERO).await;
    }
    let config = deliver::DeliveryConfig {
        // Long claims: without the release, the next leader would wait this long.
        claim_for: Duration::from_secs(600),
        ..fast()
    };
    let old = f.start_sender(config.clone());
    receiver.when_received(1).await;
    old.stop().await;
    let after_stop = receiver.received().len();
    assert!(after_stop < 5, "the old leader stopped mid-round");

    let new = f.start_sender(config);
    let got = eventually_within(Duration::from_secs(15), "all five delivered", || async {
        Some(receiver.received()).filter(|r| r.len() >= 5)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: BTreeSet<String> = got
        .iter()
        .map(|r| r.headers["x-brokkr-delivery"].clone())
        .collect();
    assert_eq!(ids.len(), 5);
    assert_eq!(receiver.received().len(), 5, "none sent twice");
    new.stop().await;
}

#[tokio::test]
async fn the_channel_controller_reports_a_missing_secret_until_it_exists() {
    let f = Fixture::new().await;
    f.create_plain_webhook("ops", "hook-url").await;
    let (stop, stopped) = oneshot::channel::<()>();
    let controller = tokio::spawn(channels::run_with(
        f.cluster.client.clone(),
        f.cluster.api::<NotificationChannel>(),
        f.metrics.clone(),
        Duration::from_millis(300),
        async move {
            let _ = stopped.await;
        },
    ));

    let not_ready = eventually("Ready=False/SecretNotFound", || async {
        Some(f.channel("ops").await)
            .filter(|c| ready(c) == Some(("False".into(), "SecretNotFound".into())))
    })
    .await;
    let condition = &not_ready.status.as_ref().unwrap().conditions[0];
    assert_eq!(
        condition.message,
        format!("Secret {}/hook-url not found", f.namespace())
    );
    assert_eq!(
        not_ready.status.as_ref().unwrap().observed_generation,
        not_ready.metadata.generation
    );
    eventually("a Warning Event", || async {
        Some(f.warnings_for("ops", "SecretNotFound").await).filter(|w| !w.is_empty())
    })
    .await;

    // A Secret without the key named is not enough.
    f.create_secret("hook-url", "endpoint", b"http://127.0.0.1:1/")
        .await;
    eventually("the missing key is named", || async {
        Some(f.channel("ops").await).filter(|c| {
            c.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.message.ends_with("/hook-url has no key url"))
            })
        })
    })
    .await;

    let url = serde_json::to_value(ByteString(b"http://127.0.0.1:1/hook".to_vec())).unwrap();
    f.cluster
        .api::<Secret>()
        .patch(
            "hook-url",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"url": url}})),
        )
        .await
        .unwrap();
    let ready_channel = eventually("Ready=True once the Secret exists", || async {
        Some(f.channel("ops").await)
            .filter(|c| ready(c) == Some(("True".into(), "Reconciled".into())))
    })
    .await;
    assert_eq!(
        ready_channel.status.as_ref().unwrap().conditions[0].message,
        "secrets found; no notification sent yet"
    );
    // One publish per problem, not one per check: kube's Recorder folds the second into
    // the first Event's series.
    let warnings = f.warnings_for("ops", "SecretNotFound").await;
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].series.as_ref().map(|s| s.count), Some(2));

    // An invalid spec says which field is wrong.
    f.create_channel("broken", "type: slack\n").await;
    let broken = eventually("Ready=False/InvalidSpec", || async {
        Some(f.channel("broken").await)
            .filter(|c| ready(c) == Some(("False".into(), "InvalidSpec".into())))
    })
    .await;
    assert!(
        broken.status.unwrap().conditions[0]
            .message
            .contains("spec.slack")
    );
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .expect("the controller stops")
        .unwrap();
}
