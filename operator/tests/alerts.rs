//! Alerting end to end inside the hub: AlertRules evaluated by the controllers against
//! kubesim (or a real cluster) and PostgreSQL, notifications delivered to a real HTTP
//! receiver started by the test.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brokkr_crds::{AlertNotification, AlertRule, AlertState, NotificationChannel, Severity};
use brokkr_operator::store::alerts::{ActiveCondition, RuleObservation};
use brokkr_testdb::TestDb;
use common::Hub;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kubesim::testing::eventually_within;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What the receiver got: headers (lower-case names) and the raw body.
#[derive(Clone, Debug)]
struct Received {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Received {
    fn notification(&self) -> AlertNotification {
        serde_json::from_slice(&self.body).expect("the body is an AlertNotification")
    }
}

/// A webhook receiver on 127.0.0.1 that records every request and answers 200.
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let record = received.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let record = record.clone();
                    async move {
                        let headers = headers
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().to_owned(),
                                    v.to_str().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect();
                        record.lock().unwrap().push(Received {
                            headers,
                            body: body.to_vec(),
                        });
                        "ok"
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            url,
            received,
            task,
        }
    }

    fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    async fn wait_for(&self, count: usize, within: Duration) -> Vec<Received> {
        eventually_within(within, &format!("{count} notifications"), || async {
            let all = self.all();
            (all.len() >= count).then_some(all)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// HMAC-SHA256 (RFC 2104), written here from the definition so that the test does not
/// trust the operator's implementation.
fn hmac_sha256(key: &[u8], message: &[u8]) -> String {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    hex::encode(outer)
}

const SIGNING_KEY: &str = "correct horse battery staple";

/// The webhook channel `ops` (signed, with an extra header) and its Secrets.
async fn create_channel(hub: &Hub, receiver: &Receiver) {
    let secrets: Api<Secret> = hub.api();
    for (name, key, value) in [
        ("hook-url", "url", receiver.url.as_str()),
        ("hook-hmac", "key", SIGNING_KEY),
    ] {
        let mut secret = Secret::default();
        secret.metadata.name = Some(name.into());
        secret.string_data = Some([(key.to_owned(), value.to_owned())].into());
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    let channel: NotificationChannel = serde_yaml::from_str(
        r#"
apiVersion: brokkr.io/v1alpha1
kind: NotificationChannel
metadata: {name: ops}
spec:
  type: webhook
  webhook:
    urlSecretRef: {name: hook-url, key: url}
    signingSecretRef: {name: hook-hmac, key: key}
    headers: {X-Team: a}
"#,
    )
    .unwrap();
    hub.api::<NotificationChannel>()
        .create(&PostParams::default(), &channel)
        .await
        .unwrap();
}

async fn create_rule(hub: &Hub, hold_for: &str) -> AlertRule {
    let rule: AlertRule = serde_yaml::from_str(&format!(
        r#"
apiVersion: brokkr.io/v1alpha1
kind: AlertRule
metadata: {{name: edge-down}}
spec:
  agentSelector: {{matchLabels: {{env: prod}}}}
  conditions:
    - {{type: AgentOffline, for: {hold_for}}}
  severity: critical
  channels: [ops]
"#
    ))
    .unwrap();
    hub.api::<AlertRule>()
        .create(&PostParams::default(), &rule)
        .await
        .unwrap()
}

/// Sends a heartbeat for the agent every 300 ms until the returned task is aborted.
fn keep_beating(hub: &Hub, agent_id: Uuid) -> tokio::task::JoinHandle<()> {
    let store = hub.store.clone();
    tokio::spawn(async move {
        loop {
            let _ = store.heartbeat(agent_id, Some("1.0.0")).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// A prod Agent that has sent heartbeats and is Online; its row id.
async fn online_agent(hub: &Hub) -> (String, Uuid) {
    let agent = hub.create_agent("edge", &[("env", "prod")]).await;
    let uid = Uuid::parse_str(&agent.uid().unwrap()).unwrap();
    let row = eventually_within(Duration::from_secs(30), "agent row", || async {
        hub.store.find_live_agent_by_resource(uid).await.unwrap()
    })
    .await;
    hub.store.heartbeat(row.id, Some("1.0.0")).await.unwrap();
    let api: Api<brokkr_crds::Agent> = Api::all(hub.cluster.client.clone());
    let name = agent.name_any();
    eventually_within(Duration::from_secs(30), "Online", || async {
        api.get(&name).await.ok().filter(|a| {
            a.status.as_ref().and_then(|s| s.phase) == Some(brokkr_crds::AgentPhase::Online)
        })
    })
    .await;
    (name, row.id)
}

fn check_signed(received: &Received) {
    let signature = received
        .headers
        .get("x-brokkr-signature")
        .expect("a signature header");
    assert_eq!(
        signature,
        &format!(
            "sha256={}",
            hmac_sha256(SIGNING_KEY.as_bytes(), &received.body)
        ),
        "the signature is HMAC-SHA256 of the exact body with the Secret's key"
    );
    assert_eq!(
        received.headers.get("x-team").map(String::as_str),
        Some("a")
    );
    assert_eq!(
        received.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        received.headers.get("x-brokkr-delivery"),
        Some(&received.notification().id)
    );
}

#[tokio::test]
async fn an_agent_that_stops_heartbeating_fires_one_signed_notification_and_one_resolved() {
    let receiver = Receiver::start().await;
    let hub = Hub::start_with(Duration::from_secs(60), Duration::from_secs(600)).await;
    create_channel(&hub, &receiver).await;
    let rule = create_rule(&hub, "2s").await;
    let (agent, agent_id) = online_agent(&hub).await;

    // Silent from now: Offline after three missed 1 s heartbeats, firing 2 s after the
    // last heartbeat.
    let silent_at = Instant::now();
    let received = receiver.wait_for(1, Duration::from_secs(2 + 30)).await;
    let fired_after = silent_at.elapsed();
    assert_eq!(received.len(), 1, "one firing notification");
    check_signed(&received[0]);
    let firing = received[0].notification();
    assert_eq!(firing.state, AlertState::Firing);
    assert_eq!(firing.rule, format!("{}/edge-down", hub.namespace()));
    assert_eq!(firing.condition.as_str(), "AgentOffline");
    assert_eq!(firing.severity, Severity::Critical);
    assert_eq!(firing.subject.kind, "Agent");
    assert_eq!(firing.subject.name, agent);
    assert_eq!(firing.subject.namespace, None);
    assert!(firing.message.contains("Offline"), "{}", firing.message);
    println!(
        "firing notification {:.1}s after the last heartbeat: {}",
        fired_after.as_secs_f64(),
        String::from_utf8_lossy(&received[0].body)
    );

    let rules = hub.api::<AlertRule>();
    let status = eventually_within(Duration::from_secs(10), "firing in status", || async {
        rules
            .get(&rule.name_any())
            .await
            .ok()
            .and_then(|r| r.status)
            .filter(|s| s.firing_count == 1)
    })
    .await;
    assert_eq!(status.firing[0].subject.name, agent);

    let beating = keep_beating(&hub, agent_id);
    let received = receiver.wait_for(2, Duration::from_secs(30)).await;
    let resolved = received[1].notification();
    check_signed(&received[1]);
    assert_eq!(resolved.state, AlertState::Resolved);
    assert_eq!(resolved.alert_id, firing.alert_id);
    assert!(resolved.resolved_at.is_some());
    println!(
        "resolved notification: {}",
        String::from_utf8_lossy(&received[1].body)
    );

    // Nothing more: no duplicate of either.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(receiver.all().len(), 2);
    let alerts = hub
        .store
        .alerts_of_rule(Uuid::parse_str(&rule.uid().unwrap()).unwrap())
        .await
        .unwrap();
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].state, "resolved");
    assert_eq!(alerts[0].delivery_attempts, 2);
    assert!(alerts[0].last_notified_at.is_some());
    let status = rules.get(&rule.name_any()).await.unwrap().status.unwrap();
    assert_eq!(status.firing_count, 0);
    beating.abort();
    hub.stop().await;
}

#[tokio::test]
async fn a_hub_restarted_mid_episode_neither_fires_again_nor_loses_the_resolve() {
    let receiver = Receiver::start().await;
    let mut hub = Hub::start_with(Duration::from_secs(60), Duration::from_secs(600)).await;
    create_channel(&hub, &receiver).await;
    create_rule(&hub, "1s").await;
    let (_, agent_id) = online_agent(&hub).await;
    receiver.wait_for(1, Duration::from_secs(30)).await;

    // The hub goes away while the alert fires; the agent comes back meanwhile.
    hub.stop_controllers().await;
    let beating = keep_beating(&hub, agent_id);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.all().len(), 1);
    hub.start_controllers_again();

    let received = receiver.wait_for(2, Duration::from_secs(30)).await;
    assert_eq!(received[0].notification().state, AlertState::Firing);
    assert_eq!(received[1].notification().state, AlertState::Resolved);
    assert_eq!(
        received[1].notification().alert_id,
        received[0].notification().alert_id
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.all().len(), 2, "no duplicate firing, one resolve");

    // A second episode, and a restart while it fires: no second firing notification.
    beating.abort();
    let received = receiver.wait_for(3, Duration::from_secs(30)).await;
    assert_eq!(received[2].notification().state, AlertState::Firing);
    assert_ne!(
        received[2].notification().alert_id,
        received[0].notification().alert_id,
        "a new episode is a new alert"
    );
    let client = hub.cluster.client.clone();
    hub.restart_controllers_with(client).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(receiver.all().len(), 3, "the restart did not fire it again");
    hub.stop().await;
}

#[tokio::test]
async fn a_missing_channel_makes_the_rule_not_ready_with_a_warning_event() {
    let hub = Hub::start_with(Duration::from_secs(60), Duration::from_secs(600)).await;
    let rule = create_rule(&hub, "1m").await;
    let rules = hub.api::<AlertRule>();
    let status = eventually_within(Duration::from_secs(20), "Ready=False", || async {
        rules
            .get(&rule.name_any())
            .await
            .ok()
            .and_then(|r| r.status)
            .filter(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == "Ready" && c.status == "False" && c.reason == "ChannelNotFound"
                })
            })
    })
    .await;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(
        ready.message.contains("NotificationChannel ops not found"),
        "{}",
        ready.message
    );
    eventually_within(Duration::from_secs(10), "Warning Event", || async {
        let events = hub.warning_events_for(&rule.name_any()).await;
        events
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ChannelNotFound"))
    })
    .await;
    hub.stop().await;
}

fn observation<'a>(
    rule_uid: Uuid,
    channels: &'a [String],
    active: &'a [ActiveCondition],
    renotify: Duration,
) -> RuleObservation<'a> {
    RuleObservation {
        rule_uid,
        rule_namespace: "team-a",
        rule_name: "edge-down",
        severity: Severity::Critical,
        channels,
        renotify_interval: renotify,
        active,
    }
}

fn offline(subject_uid: Uuid, due: bool) -> ActiveCondition {
    ActiveCondition {
        condition: brokkr_crds::AlertConditionType::AgentOffline,
        subject: brokkr_crds::AlertSubject {
            kind: "Agent".into(),
            name: "edge-1".into(),
            namespace: None,
        },
        subject_uid,
        since: chrono::Utc::now() - chrono::Duration::seconds(60),
        message: "Agent edge-1 is Offline".into(),
        due,
    }
}

async fn notifications(db: &TestDb) -> Vec<(String, serde_json::Value)> {
    use sea_orm::{ConnectionTrait, Statement};
    db.conn()
        .query_all_raw(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT channel_name, body FROM alert_notifications ORDER BY created_at, id",
        ))
        .await
        .unwrap()
        .into_iter()
        .map(|row| {
            (
                row.try_get::<String>("", "channel_name").unwrap(),
                row.try_get::<serde_json::Value>("", "body").unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_episode_fires_once_per_channel_however_often_or_concurrently_it_is_evaluated() {
    let db = TestDb::new().await;
    let store = brokkr_operator::store::Store::new(db.conn().clone());
    let rule = Uuid::new_v4();
    let subject = Uuid::new_v4();
    let channels = vec!["ops".to_owned(), "pager".to_owned()];
    let now = chrono::Utc::now();

    // Holding, but not for long enough yet: nothing.
    let pending = [offline(subject, false)];
    let changes = store
        .apply_rule_observation(
            &observation(rule, &channels, &pending, Duration::from_secs(3600)),
            &[],
            now,
        )
        .await
        .unwrap();
    assert!(changes.is_empty());

    // Due, evaluated by two replicas at once from the same (empty) view of what fires.
    let due = [offline(subject, true)];
    let view = observation(rule, &channels, &due, Duration::from_secs(3600));
    let (a, b) = tokio::join!(
        store.apply_rule_observation(&view, &[], now),
        store.apply_rule_observation(&view, &[], now)
    );
    let fired = a.unwrap().fired.len() + b.unwrap().fired.len();
    assert_eq!(fired, 1, "one episode");
    assert_eq!(
        notifications(&db).await.len(),
        2,
        "one notification per channel"
    );

    // Evaluated again: nothing new.
    let firing = store.firing_alerts().await.unwrap();
    let changes = store
        .apply_rule_observation(&view, &firing, now)
        .await
        .unwrap();
    assert!(changes.is_empty());

    // Still firing after the renotify interval: one reminder per channel.
    let later = now + chrono::Duration::hours(2);
    let view = observation(rule, &channels, &due, Duration::from_secs(3600));
    let changes = store
        .apply_rule_observation(&view, &firing, later)
        .await
        .unwrap();
    assert_eq!(changes.reminded.len(), 1);
    let sent = notifications(&db).await;
    assert_eq!(sent.len(), 4);
    assert_eq!(sent[2].1["reminder"], true);
    assert_eq!(sent[2].1["state"], "firing");

    // Cleared: resolved once, even when two evaluations see it.
    let firing = store.firing_alerts().await.unwrap();
    let view = observation(rule, &channels, &[], Duration::from_secs(3600));
    let (a, b) = tokio::join!(
        store.apply_rule_observation(&view, &firing, later),
        store.apply_rule_observation(&view, &firing, later)
    );
    assert_eq!(a.unwrap().resolved.len() + b.unwrap().resolved.len(), 1);
    let sent = notifications(&db).await;
    assert_eq!(sent.len(), 6);
    assert_eq!(sent[4].1["state"], "resolved");
    assert_eq!(sent[5].1["state"], "resolved");
    let channels_told: Vec<&str> = sent[4..].iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(channels_told.len(), 2);
    assert!(channels_told.contains(&"ops") && channels_told.contains(&"pager"));

    // It holds again: a new episode.
    let changes = store
        .apply_rule_observation(
            &observation(rule, &channels, &due, Duration::from_secs(3600)),
            &[],
            later,
        )
        .await
        .unwrap();
    assert_eq!(changes.fired.len(), 1);
    assert_eq!(store.alerts_of_rule(rule).await.unwrap().len(), 2);

    // The rule is deleted: its alerts resolve without notifications.
    let before = notifications(&db).await.len();
    assert_eq!(store.resolve_alerts_of_deleted_rules(&[]).await.unwrap(), 1);
    assert_eq!(notifications(&db).await.len(), before);
}
