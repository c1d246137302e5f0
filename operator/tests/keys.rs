//! Key lifecycle against a real PostgreSQL and an API server (kubesim, or a real one given
//! KUBECONFIG): expiry, revocation on every replica, scopes, use tracking, rate limits,
//! self-rotation (also by a real agent), the revoke annotation and `KeyExpiring`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use brokkr_agent::{AgentKey, Config};
use brokkr_crds::conditions::{reasons, types};
use brokkr_crds::wire::RotatedKey;
use brokkr_crds::{Agent, AgentSpec, Generator, GeneratorSpec, KeyPolicy, REVOKE_KEY_ANNOTATION};
use brokkr_operator::api::{self, ApiConfig, ApiState, ChangeFeed, RateLimit};
use brokkr_operator::keys::{issue_key, key_prefix};
use brokkr_operator::store::audit::{AuditQuery, actions};
use brokkr_operator::store::{GeneratorSync, KeyOwner, NewKey, Revoke, Store};
use brokkr_testdb::TestDb;
use chrono::Utc;
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use kubesim::testing::{TestCluster, eventually_within};
use serde_json::Value;
use tower::ServiceExt;
use uuid::Uuid;

mod common;
use common::{Hub, agent_with_key};

const PATIENCE: Duration = Duration::from_secs(30);

/// One hub replica's agent API: its own caches and change feed, on the shared database.
async fn replica(store: &Store, db: &TestDb, config: ApiConfig) -> Router {
    let changes = ChangeFeed::default();
    tokio::spawn(changes.clone().listen(db.url().to_owned(), store.clone()));
    let app = api::app(ApiState::new(store.clone(), changes, config));
    // Give the notification listener a moment to subscribe.
    tokio::time::sleep(Duration::from_millis(200)).await;
    app
}

async fn call(app: &Router, request: Request<Body>) -> (StatusCode, Value, Option<String>) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        retry_after,
    )
}

fn desired(key: &str) -> Request<Body> {
    Request::get("/api/v1/agent/desired")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap()
}

fn rotate(key: &str) -> Request<Body> {
    Request::post("/api/v1/agent/key")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap()
}

async fn status_of(app: &Router, key: &str) -> (StatusCode, Value) {
    let (status, body, _) = call(app, desired(key)).await;
    (status, body)
}

fn assert_error(answer: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"], code, "{}", answer.1);
}

async fn key_id(store: &Store, key: &str) -> Uuid {
    store
        .find_api_key(key_prefix(key).unwrap())
        .await
        .unwrap()
        .unwrap()
        .id
}

#[tokio::test]
async fn an_expired_key_is_refused_with_key_expired_even_while_cached() {
    let db = TestDb::new().await;
    let store = Store::new(db.conn().clone());
    let app = replica(&store, &db, ApiConfig::default()).await;
    let (_, key) = agent_with_key(&store, "edge-1").await;
    let id = key_id(&store, &key).await;
    let now = Utc::now();
    store
        .set_api_key_times(
            id,
            now - chrono::Duration::hours(1),
            now + chrono::Duration::milliseconds(1500),
            None,
        )
        .await
        .unwrap();
    // Let the notification of that change pass, then cache the key with a request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status_of(&app, &key).await.0, StatusCode::OK);
    // Nothing changes in the database: the cached entry alone must not keep it valid.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let refused = status_of(&app, &key).await;
    assert_error(&refused, StatusCode::UNAUTHORIZED, "key_expired");
    assert!(refused.1["message"].as_str().unwrap().contains("revoke"));
}

#[tokio::test]
async fn a_revoked_key_is_refused_on_both_replicas_within_a_second() {
    let db = TestDb::new().await;
    let store = Store::new(db.conn().clone());
    let first = replica(&store, &db, ApiConfig::default()).await;
    let second = replica(&store, &db, ApiConfig::default()).await;
    let (agent, old) = agent_with_key(&store, "edge-1").await;
    // Both replicas hold the key in their caches.
    assert_eq!(status_of(&first, &old).await.0, StatusCode::OK);
    assert_eq!(status_of(&second, &old).await.0, StatusCode::OK);

    let new = issue_key();
    store
        .change_key(
            KeyOwner::Agent(agent),
            NewKey {
                prefix: &new.prefix,
                hash: &new.hash,
                lifetime: Duration::from_secs(3600),
            },
            Revoke::AllNow,
        )
        .await
        .unwrap();
    let revoked_at = Instant::now();
    for app in [&first, &second] {
        loop {
            let answer = status_of(app, &old).await;
            if answer.0 == StatusCode::UNAUTHORIZED {
                assert_error(&answer, StatusCode::UNAUTHORIZED, "key_revoked");
                break;
            }
            assert!(
                revoked_at.elapsed() < Duration::from_secs(1),
                "still {} a second after the revocation",
                answer.0
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(status_of(&first, &new.key).await.0, StatusCode::OK);
    assert_eq!(status_of(&second, &new.key).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_generator_key_on_the_agent_api_is_insufficient_scope() {
    let db = TestDb::new().await;
    let store = Store::new(db.conn().clone());
    let app = replica(&store, &db, ApiConfig::default()).await;
    let generator = store
        .upsert_generator(&GeneratorSync {
            resource_uid: Uuid::new_v4(),
            name: "ns/ci",
            description: None,
            is_active: true,
        })
        .await
        .unwrap();
    let key = issue_key();
    store
        .change_key(
            KeyOwner::Generator(generator.id),
            NewKey {
                prefix: &key.prefix,
                hash: &key.hash,
                lifetime: Duration::from_secs(3600),
            },
            Revoke::Nothing,
        )
        .await
        .unwrap();
    let refused = status_of(&app, &key.key).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "insufficient_scope");
    // A wrong secret with that prefix is still just unknown.
    let forged = format!("brokkr_{}_{}", key.prefix, "x".repeat(40));
    assert_error(
        &status_of(&app, &forged).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
}

#[tokio::test]
async fn last_used_at_is_written_once_a_minute_not_per_request_and_first_use_is_audited() {
    let db = TestDb::new().await;
    let store = Store::new(db.conn().clone());
    let app = replica(&store, &db, ApiConfig::default()).await;
    let (_, key) = agent_with_key(&store, "edge-1").await;
    let prefix = key_prefix(&key).unwrap().to_owned();
    assert_eq!(status_of(&app, &key).await.0, StatusCode::OK);
    let first = eventually_within(Duration::from_secs(5), "last_used_at written", || async {
        store
            .find_api_key(&prefix)
            .await
            .unwrap()
            .and_then(|k| k.last_used_at)
    })
    .await;
    for _ in 0..20 {
        assert_eq!(status_of(&app, &key).await.0, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the writer's next flushes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = store.find_api_key(&prefix).await.unwrap().unwrap();
    assert_eq!(
        later.last_used_at,
        Some(first),
        "not rewritten within the minute"
    );

    let audit = store.audit_entries(&AuditQuery::default()).await.unwrap();
    let first_uses: Vec<_> = audit
        .iter()
        .filter(|row| row.action == actions::KEY_FIRST_USED)
        .collect();
    assert_eq!(first_uses.len(), 1, "{audit:?}");
    assert_eq!(first_uses[0].details["prefix"], prefix.as_str());
    assert!(!serde_json::to_string(&audit).unwrap().contains(&key));
}

#[tokio::test]
async fn a_flood_of_requests_with_one_key_gets_429_with_retry_after() {
    let db = TestDb::new().await;
    let store = Store::new(db.conn().clone());
    let app = replica(
        &store,
        &db,
        ApiConfig {
            key_rate: RateLimit::new(1.0, 5),
            ..ApiConfig::default()
        },
    )
    .await;
    let (_, key) = agent_with_key(&store, "edge-1").await;
    let mut answers = Vec::new();
    for _ in 0..8 {
        answers.push(call(&app, desired(&key)).await);
    }
    let ok = answers.iter().filter(|a| a.0 == StatusCode::OK).count();
    assert_eq!(ok, 5, "the burst");
    let limited = answers.last().unwrap();
    assert_eq!(limited.0, StatusCode::TOO_MANY_REQUESTS, "{}", limited.1);
    assert_eq!(limited.1["error"], "too_many_requests");
    let retry: u64 = limited.2.as_deref().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
}

/// An Agent of this test with `keyPolicy`.
async fn agent_with_policy(hub: &Hub, short: &str, policy: KeyPolicy) -> Agent {
    let mut agent = Agent::new(
        &format!("{}-{short}", hub.namespace()),
        AgentSpec {
            cluster_name: format!("cluster-{short}"),
            key_policy: Some(policy),
            ..Default::default()
        },
    );
    agent.metadata.labels = Some(BTreeMap::from([(
        "brokkr.io/test".to_owned(),
        hub.agent_label.clone(),
    )]));
    Api::<Agent>::all(hub.cluster.client.clone())
        .create(&PostParams::default(), &agent)
        .await
        .expect("create Agent")
}

async fn secret_key(hub: &Hub, agent: &str) -> Option<String> {
    let secrets: Api<Secret> = Api::namespaced(hub.cluster.client.clone(), hub.namespace());
    secrets
        .get_opt(&format!("brokkr-agent-{agent}"))
        .await
        .ok()
        .flatten()
        .and_then(|s| s.data)
        .and_then(|d| {
            d.get("pak")
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        })
}

/// The key in the Agent's Secret, once the database holds it too (the Secret is written
/// just before the key's row commits).
async fn issued_key(hub: &Hub, name: &str) -> String {
    eventually_within(PATIENCE, "an issued key", || async {
        let key = secret_key(hub, name).await?;
        let prefix = key_prefix(&key)?;
        hub.store.find_api_key(prefix).await.ok()??;
        Some(key)
    })
    .await
}

async fn agent_when(hub: &Hub, name: &str, what: &str, check: impl Fn(&Agent) -> bool) -> Agent {
    let agents: Api<Agent> = Api::all(hub.cluster.client.clone());
    eventually_within(PATIENCE, what, || async {
        agents.get(name).await.ok().filter(|a| check(a))
    })
    .await
}

fn key_condition(agent: &Agent) -> Option<(String, String, String)> {
    let condition = agent
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == types::KEY_EXPIRING)?;
    Some((
        condition.status.clone(),
        condition.reason.clone(),
        condition.message.clone(),
    ))
}

#[tokio::test]
async fn an_agent_rotates_its_key_the_old_one_works_during_the_overlap_and_the_hub_secret_follows()
{
    let hub = Hub::start().await;
    let app = hub.api_app().await;
    let agent = agent_with_policy(
        &hub,
        "edge",
        KeyPolicy {
            lifetime: Some("2h".into()),
            overlap: Some("2s".into()),
        },
    )
    .await;
    let name = agent.name_any();
    let old = issued_key(&hub, &name).await;
    let registered = agent_when(&hub, &name, "key status", |a| {
        a.status.as_ref().and_then(|s| s.key.as_ref()).is_some()
    })
    .await;
    let status = registered.status.unwrap();
    let shown = status.key.unwrap();
    assert_eq!(Some(shown.prefix.as_str()), key_prefix(&old));
    let lifetime = shown.expires_at.unwrap().0.as_second() - shown.issued_at.unwrap().0.as_second();
    assert_eq!(lifetime, 2 * 3600, "issued with the policy's lifetime");
    let condition = key_condition(&registered_agent(&hub, &name).await).unwrap();
    assert_eq!(
        (condition.0.as_str(), condition.1.as_str()),
        ("False", reasons::KEY_VALID)
    );

    let (status, body, _) = call(&app, rotate(&old)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rotated: RotatedKey = serde_json::from_value(body).unwrap();
    assert_eq!(key_prefix(&rotated.key), Some(rotated.prefix.as_str()));
    let expires_in = rotated.expires_at.0.as_second() - Utc::now().timestamp();
    assert!(
        (2 * 3600 - 60..=2 * 3600).contains(&expires_in),
        "{expires_in}"
    );
    assert_eq!(
        secret_key(&hub, &name).await.as_deref(),
        Some(rotated.key.as_str()),
        "the hub's Secret holds the new key"
    );

    // The answer got lost, say: the agent asks again with the old key. The key it never
    // received is retired with the old one; the last answer is the one that counts.
    let (status, body, _) = call(&app, rotate(&old)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let lost = rotated;
    let rotated: RotatedKey = serde_json::from_value(body).unwrap();
    assert_ne!(lost.prefix, rotated.prefix);
    assert_eq!(
        secret_key(&hub, &name).await.as_deref(),
        Some(rotated.key.as_str())
    );

    // Both keys work during the overlap; then only the new one.
    assert_eq!(status_of(&app, &old).await.0, StatusCode::OK);
    assert_eq!(status_of(&app, &rotated.key).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_error(
        &status_of(&app, &old).await,
        StatusCode::UNAUTHORIZED,
        "key_revoked",
    );
    assert_error(
        &status_of(&app, &lost.key).await,
        StatusCode::UNAUTHORIZED,
        "key_revoked",
    );
    assert_eq!(status_of(&app, &rotated.key).await.0, StatusCode::OK);

    // The operator keeps the rotated key (no new issue) and shows it at its next
    // reconcile (within a minute; here, made at once by a change of the Agent).
    poke(&hub, &name, "1").await;
    agent_when(&hub, &name, "status shows the rotated key", |a| {
        a.status
            .as_ref()
            .and_then(|s| s.key.as_ref())
            .map(|k| k.prefix.as_str())
            == Some(rotated.prefix.as_str())
    })
    .await;
    assert_eq!(
        secret_key(&hub, &name).await.as_deref(),
        Some(rotated.key.as_str())
    );
    let audit = hub
        .store
        .audit_entries(&AuditQuery::default())
        .await
        .unwrap();
    assert!(audit.iter().any(|r| r.action == actions::KEY_ROTATED));
    let printed = serde_json::to_string(&audit).unwrap();
    assert!(
        !printed.contains(&old) && !printed.contains(&rotated.key),
        "no key in the audit log"
    );
    hub.stop().await;
}

async fn registered_agent(hub: &Hub, name: &str) -> Agent {
    agent_when(hub, name, "KeyExpiring condition", |a| {
        key_condition(a).is_some()
    })
    .await
}

/// Changes an annotation of the Agent, which makes the operator reconcile it.
async fn poke(hub: &Hub, name: &str, value: &str) {
    Api::<Agent>::all(hub.cluster.client.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"annotations": {"test.brokkr.io/poke": value}}}),
            ),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn the_revoke_annotation_revokes_every_key_at_once_and_issues_a_new_one() {
    let hub = Hub::start().await;
    let app = hub.api_app().await;
    let agent = hub.create_agent("edge", &[]).await;
    let name = agent.name_any();
    let old = issued_key(&hub, &name).await;
    assert_eq!(status_of(&app, &old).await.0, StatusCode::OK);

    Api::<Agent>::all(hub.cluster.client.clone())
        .patch(
            &name,
            &PatchParams::apply("kubectl-annotate"),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "brokkr.io/v1alpha1",
                "kind": "Agent",
                "metadata": {"name": name, "annotations": {REVOKE_KEY_ANNOTATION: "now"}},
            })),
        )
        .await
        .unwrap();
    let new = eventually_within(PATIENCE, "a new key in the Secret", || async {
        secret_key(&hub, &name).await.filter(|key| *key != old)
    })
    .await;
    let refused = eventually_within(Duration::from_secs(5), "the old key refused", || async {
        let answer = status_of(&app, &old).await;
        (answer.0 == StatusCode::UNAUTHORIZED).then_some(answer)
    })
    .await;
    assert_error(&refused, StatusCode::UNAUTHORIZED, "key_revoked");
    assert_eq!(status_of(&app, &new).await.0, StatusCode::OK);
    agent_when(&hub, &name, "annotation removed", |a| {
        !a.annotations().contains_key(REVOKE_KEY_ANNOTATION)
    })
    .await;
    let events = eventually_within(PATIENCE, "KeyRevoked event", || async {
        let events = events_for(&hub, &name).await;
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("KeyRevoked"))
            .then_some(events)
    })
    .await;
    let printed = serde_json::to_string(&events).unwrap();
    assert!(
        !printed.contains(&old) && !printed.contains(&new),
        "no key in events"
    );
    let audit = hub
        .store
        .audit_entries(&AuditQuery::default())
        .await
        .unwrap();
    let revoked = audit
        .iter()
        .find(|r| r.action == actions::KEY_REVOKED)
        .expect("a KeyRevoked audit row");
    assert_eq!(revoked.actor, "kubectl-annotate");
    assert_eq!(
        revoked.details["prefixes"]["items"][0],
        key_prefix(&old).unwrap()
    );
    hub.stop().await;
}

#[tokio::test]
async fn key_expiring_turns_true_near_the_end_and_key_expired_says_how_to_recover() {
    let hub = Hub::start().await;
    let agent = hub.create_agent("edge", &[]).await;
    let name = agent.name_any();
    let key = issued_key(&hub, &name).await;
    registered_agent(&hub, &name).await;
    let id = key_id(&hub.store, &key).await;
    let now = Utc::now();
    hub.store
        .set_api_key_times(
            id,
            now - chrono::Duration::hours(19),
            now + chrono::Duration::hours(1),
            None,
        )
        .await
        .unwrap();
    poke(&hub, &name, "1").await;
    let soon = agent_when(&hub, &name, "KeyExpiresSoon", |a| {
        key_condition(a).is_some_and(|c| c.1 == reasons::KEY_EXPIRES_SOON)
    })
    .await;
    assert_eq!(key_condition(&soon).unwrap().0, "True");

    // Expiring in a moment: the requeue flips the condition without another change.
    hub.store
        .set_api_key_times(
            id,
            now - chrono::Duration::hours(20),
            Utc::now() + chrono::Duration::seconds(2),
            None,
        )
        .await
        .unwrap();
    poke(&hub, &name, "2").await;
    let expired = agent_when(&hub, &name, "KeyExpired", |a| {
        key_condition(a).is_some_and(|c| c.1 == reasons::KEY_EXPIRED)
    })
    .await;
    let (status, _, message) = key_condition(&expired).unwrap();
    assert_eq!(status, "True");
    assert!(
        message.contains(&format!(
            "kubectl annotate agent {name} {REVOKE_KEY_ANNOTATION}=now"
        )),
        "{message}"
    );
    assert!(!message.contains(&key));
    // Not replaced behind the user's back: the Secret keeps the expired key.
    assert_eq!(secret_key(&hub, &name).await.as_deref(), Some(key.as_str()));
    let audit = hub
        .store
        .audit_entries(&AuditQuery::default())
        .await
        .unwrap();
    assert_eq!(
        audit
            .iter()
            .filter(|r| r.action == actions::KEY_EXPIRED)
            .count(),
        1
    );
    hub.stop().await;
}

/// A real agent on a spoke renews its key at 2/3 of its lifetime (its key is made to look
/// 50 minutes old out of 60), writes it to its own Secret and switches, with no failed
/// request.
#[tokio::test]
async fn a_real_agent_renews_its_key_writes_its_secret_and_no_request_fails() {
    // Everything the hub and the agent log, to check that no key is in it.
    let logs = CapturedLogs::install();
    let hub = Hub::start().await;
    let spoke = TestCluster::from_env_var("BROKKR_E2E_SPOKE_KUBECONFIG").await;
    let app = hub.api_app().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, app.clone()).into_future());

    let agent = agent_with_policy(
        &hub,
        "spoke",
        KeyPolicy {
            lifetime: Some("1h".into()),
            overlap: Some("10m".into()),
        },
    )
    .await;
    let name = agent.name_any();
    let old = issued_key(&hub, &name).await;
    let now = Utc::now();
    hub.store
        .set_api_key_times(
            key_id(&hub.store, &old).await,
            now - chrono::Duration::minutes(50),
            now + chrono::Duration::minutes(10),
            None,
        )
        .await
        .unwrap();

    // The agent's own Secret in the spoke, as the chart makes it.
    let spoke_secrets: Api<Secret> = Api::namespaced(spoke.client.clone(), &spoke.namespace);
    let mut secret = Secret::default();
    secret.metadata.name = Some("brokkr-agent-key".into());
    secret.data = Some(BTreeMap::from([(
        "pak".to_owned(),
        k8s_openapi::ByteString(old.clone().into_bytes()),
    )]));
    spoke_secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let mut config = Config::new(&url, AgentKey::new(&old).unwrap(), &name).unwrap();
    config.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.heartbeat_interval = Duration::from_millis(500);
    config.poll_wait = Duration::from_secs(2);
    config.namespace = Some(spoke.namespace.clone());
    config.key_secret = Some(brokkr_agent::key_rotation::KeySecret {
        name: "brokkr-agent-key".into(),
        data_key: "pak".into(),
    });
    let running = brokkr_agent::start(config, spoke.client.clone())
        .await
        .expect("start the agent");

    let renewed = eventually_within(PATIENCE, "the renewed key in the spoke Secret", || async {
        spoke_secrets
            .get("brokkr-agent-key")
            .await
            .ok()
            .and_then(|s| s.data)
            .and_then(|d| {
                d.get("pak")
                    .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            })
            .filter(|key| *key != old)
    })
    .await;
    assert_eq!(
        secret_key(&hub, &name).await.as_deref(),
        Some(renewed.as_str()),
        "the hub's Secret too"
    );
    // The agent switches to it: its heartbeats mark the new key used.
    let prefix = key_prefix(&renewed).unwrap().to_owned();
    eventually_within(PATIENCE, "the new key in use", || async {
        hub.store
            .find_api_key(&prefix)
            .await
            .unwrap()
            .and_then(|k| k.last_used_at)
    })
    .await;
    // Once is enough: the new key is far from due.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent_keys = hub
        .store
        .api_keys_of(KeyOwner::Agent(key_id_owner(&hub.store, &renewed).await))
        .await
        .unwrap();
    assert_eq!(agent_keys.len(), 2, "one rotation");
    let keys = hub
        .store
        .api_keys_of(KeyOwner::Agent(key_id_owner(&hub.store, &renewed).await))
        .await
        .unwrap();
    let printed = logs.text();
    assert!(
        printed.contains(&prefix),
        "the logs name the renewed key by its prefix"
    );
    for key in [&old, &renewed] {
        assert!(!printed.contains(key.as_str()), "a key reached the logs");
    }
    assert!(keys.iter().all(|k| !printed.contains(&k.key_hash)));
    for endpoint in [
        brokkr_agent::hub::Endpoint::Desired,
        brokkr_agent::hub::Endpoint::Heartbeat,
        brokkr_agent::hub::Endpoint::Key,
        brokkr_agent::hub::Endpoint::Events,
    ] {
        assert_eq!(
            running.metrics.hub_errors(endpoint),
            0,
            "{endpoint:?}: no failed request"
        );
    }
    running.stop().await;
    spoke.cleanup().await;
    hub.stop().await;
}

/// Events about `name` in any namespace (an Agent is cluster-scoped).
async fn events_for(hub: &Hub, name: &str) -> Vec<Event> {
    Api::<Event>::all(hub.cluster.client.clone())
        .list(&ListParams::default())
        .await
        .map(|list| {
            list.items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
                .collect()
        })
        .unwrap_or_default()
}

async fn key_id_owner(store: &Store, key: &str) -> Uuid {
    store
        .find_api_key(key_prefix(key).unwrap())
        .await
        .unwrap()
        .unwrap()
        .agent_id
        .unwrap()
}

/// Collects every log line of the process (the hub's and the agent's tasks) in memory.
#[derive(Clone, Default)]
struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Each test runs in a process of its own (nextest), so this is the only subscriber.
    fn install() -> CapturedLogs {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("info,brokkr_operator=debug,brokkr_agent=debug")
            .with_writer(move || writer.clone())
            .try_init()
            .expect("the test's own log subscriber");
        logs
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_generator_gets_a_key_with_its_lifetime_and_the_revoke_annotation_replaces_it() {
    let hub = Hub::start().await;
    let generators = hub.api::<Generator>();
    let mut generator = Generator::new("ci", GeneratorSpec::default());
    generator.spec.key_policy = Some(KeyPolicy {
        lifetime: Some("30d".into()),
        overlap: None,
    });
    generators
        .create(&PostParams::default(), &generator)
        .await
        .unwrap();
    let with_key = |g: &Generator| g.status.as_ref().and_then(|s| s.api_key.clone());
    let shown = eventually_within(PATIENCE, "generator key status", || async {
        generators.get("ci").await.ok().as_ref().and_then(with_key)
    })
    .await;
    let lifetime = shown.expires_at.unwrap().0.as_second() - shown.issued_at.unwrap().0.as_second();
    assert_eq!(lifetime, 30 * 86_400);
    let secrets = hub.api::<Secret>();
    let secret = secrets.get("brokkr-generator-ci").await.unwrap();
    let old = String::from_utf8(secret.data.unwrap()["pak"].0.clone()).unwrap();
    assert_eq!(key_prefix(&old), Some(shown.prefix.as_str()));
    let row = hub
        .store
        .find_api_key(&shown.prefix)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.scopes, "generator");

    generators
        .patch(
            "ci",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"annotations": {REVOKE_KEY_ANNOTATION: "now"}}}),
            ),
        )
        .await
        .unwrap();
    let replaced = eventually_within(PATIENCE, "a new generator key, annotation gone", || async {
        generators.get("ci").await.ok().filter(|g| {
            !g.annotations().contains_key(REVOKE_KEY_ANNOTATION)
                && with_key(g).is_some_and(|k| k.prefix != shown.prefix)
        })
    })
    .await;
    let revoked = hub
        .store
        .find_api_key(&shown.prefix)
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.revoked_at.is_some_and(|at| at <= Utc::now()));
    let new_prefix = with_key(&replaced).unwrap().prefix;
    let secret = secrets.get("brokkr-generator-ci").await.unwrap();
    let new = String::from_utf8(secret.data.unwrap()["pak"].0.clone()).unwrap();
    assert_eq!(key_prefix(&new), Some(new_prefix.as_str()));
    let printed = serde_json::to_string(&replaced).unwrap();
    assert!(
        !printed.contains(&old) && !printed.contains(&new),
        "no key in status"
    );
    hub.stop().await;
}
