//! The agent API against a real PostgreSQL: in-process with `oneshot`, and over a real
//! socket for the long-poll.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use brokkr_crds::wire::{self, DesiredState};
use brokkr_operator::api::changes::FeedTiming;
use brokkr_operator::api::{self, ApiConfig, ApiState, ChangeFeed};
use brokkr_operator::keys::issue_key;
use brokkr_operator::metrics::FeedMetrics;
use brokkr_operator::store;
use brokkr_operator::store::notify::DESIRED_CHANNEL;
use brokkr_operator::store::{AgentKey, AgentSync, GeneratorSync, StackContent, StackSync, Store};
use brokkr_testdb::TestDb;
use http_body_util::BodyExt;
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};
use tower::ServiceExt;
use uuid::Uuid;

mod common;
use common::agent_with_key;

struct Fixture {
    _db: TestDb,
    store: Store,
    app: Router,
    generator: Uuid,
    stack: Uuid,
    object: Uuid,
    agent: Uuid,
    key: String,
    /// The proxy the change feed listens through, if any.
    proxy: Option<FreezingProxy>,
}

fn content(yaml: &str) -> (String, String) {
    use sha2::Digest;
    (yaml.to_owned(), hex::encode(sha2::Sha256::digest(yaml)))
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture::with_feed(ChangeFeed::default(), false).await
    }

    /// A fixture whose change feed is `changes`, listening through a [`FreezingProxy`]
    /// when `through_proxy`.
    async fn with_feed(changes: ChangeFeed, through_proxy: bool) -> Fixture {
        let db = TestDb::new().await;
        let store = Store::new(db.conn().clone());
        let (listen_url, proxy) = if through_proxy {
            let proxy = FreezingProxy::start(postgres_addr(db.url())).await;
            (proxy.url(db.url()), Some(proxy))
        } else {
            (db.url().to_owned(), None)
        };
        tokio::spawn(changes.clone().listen(listen_url, store.clone()));
        let generator = store
            .upsert_generator(&GeneratorSync {
                resource_uid: Uuid::new_v4(),
                name: "ns/ci",
                description: None,
                is_active: true,
            })
            .await
            .unwrap()
            .id;
        let (yaml, checksum) = content("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n");
        let synced = store
            .sync_stack(&StackSync {
                resource_uid: Uuid::new_v4(),
                name: "ns/app",
                description: None,
                generator_id: generator,
                labels: None,
                annotations: None,
                content: Some(StackContent {
                    yaml: &yaml,
                    checksum: &checksum,
                }),
                author: None,
                progressive: false,
            })
            .await
            .unwrap();
        let (agent, key) = agent_with_key(&store, "edge-1").await;
        store
            .replace_stack_targets(synced.stack.id, &BTreeSet::from([agent]))
            .await
            .unwrap();
        let app = api::app(ApiState::new(store.clone(), changes, ApiConfig::default()));
        // Give the notification listener a moment to subscribe.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Fixture {
            _db: db,
            store,
            app,
            generator,
            stack: synced.stack.id,
            object: synced.deployment_object.unwrap().id,
            agent,
            key,
            proxy,
        }
    }

    async fn call(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, body)
    }

    fn get(&self, uri: &str) -> Request<Body> {
        Request::get(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
            .body(Body::empty())
            .unwrap()
    }

    fn post(&self, uri: &str, body: Value) -> Request<Body> {
        Request::post(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    async fn desired(&self, query: &str) -> DesiredState {
        self.desired_as(&self.key, query).await
    }

    async fn desired_as(&self, key: &str, query: impl std::fmt::Display) -> DesiredState {
        let request = Request::get(format!("/api/v1/agent/desired{query}"))
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap();
        let (status, body) = self.call(request).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).unwrap()
    }

    async fn new_version(&self, yaml: &str) -> Uuid {
        let (yaml, checksum) = content(yaml);
        self.store
            .record_deployment_object(
                self.stack,
                StackContent {
                    yaml: &yaml,
                    checksum: &checksum,
                },
            )
            .await
            .unwrap()
            .0
            .id
    }
}

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn requests_without_a_valid_key_are_refused_with_json() {
    let f = Fixture::new().await;
    let uri = "/api/v1/agent/desired";
    let (status, body) = f.call(Request::get(uri).body(Body::empty()).unwrap()).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    for bad in [
        "Bearer not-a-key",
        "Basic abc",
        "Bearer brokkr_abc",
        "Bearer brokkr_zzzz_wrongsecret",
    ] {
        let (status, body) = f
            .call(
                Request::get(uri)
                    .header(header::AUTHORIZATION, bad)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    // The right prefix with the wrong secret.
    let prefix = brokkr_operator::keys::key_prefix(&f.key).unwrap();
    let forged = format!("Bearer brokkr_{prefix}_{}", "x".repeat(40));
    let (status, body) = f
        .call(
            Request::get(uri)
                .header(header::AUTHORIZATION, forged)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn suspended_and_deleted_agents_are_refused_with_a_reason() {
    let f = Fixture::new().await;
    let (suspended, key) = agent_with_key(&f.store, "edge-suspended").await;
    f.store
        .sync_agent(&AgentSync {
            resource_uid: f
                .store
                .find_agent(suspended)
                .await
                .unwrap()
                .unwrap()
                .resource_uid
                .unwrap(),
            name: "edge-suspended",
            cluster_name: "edge",
            is_suspended: true,
            labels: &[],
            annotations: &BTreeMap::new(),
        })
        .await
        .unwrap();
    let request = |key: &str| {
        Request::get("/api/v1/agent/desired")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap()
    };
    let (status, body) = f.call(request(&key)).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    assert!(body["message"].as_str().unwrap().contains("suspended"));

    let (deleted, key) = agent_with_key(&f.store, "edge-deleted").await;
    f.store.soft_delete_agent(deleted).await.unwrap();
    let (status, body) = f.call(request(&key)).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    assert!(body["message"].as_str().unwrap().contains("deleted"));
}

#[tokio::test]
async fn an_agent_suspended_or_rekeyed_after_its_key_was_cached_is_refused_at_once() {
    let f = Fixture::new().await;
    f.desired("").await;
    let agent = f.store.find_agent(f.agent).await.unwrap().unwrap();
    let no_annotations = BTreeMap::new();
    let suspend = |is_suspended| AgentSync {
        resource_uid: agent.resource_uid.unwrap(),
        name: "edge-1",
        cluster_name: "edge",
        is_suspended,
        labels: &[],
        annotations: &no_annotations,
    };
    f.store.sync_agent(&suspend(true)).await.unwrap();
    let refused = eventually_status(&f, &f.key, StatusCode::FORBIDDEN).await;
    assert!(refused["message"].as_str().unwrap().contains("suspended"));
    f.store.sync_agent(&suspend(false)).await.unwrap();
    eventually_status(&f, &f.key, StatusCode::OK).await;

    let issued = issue_key();
    f.store
        .set_agent_key(
            f.agent,
            &AgentKey {
                prefix: issued.prefix.clone(),
                hash: issued.hash.clone(),
            },
        )
        .await
        .unwrap();
    eventually_status(&f, &f.key, StatusCode::UNAUTHORIZED).await;
    eventually_status(&f, &issued.key, StatusCode::OK).await;
}

/// Polls `desired` with `key` until it answers `expected` (the change feed applies
/// notifications asynchronously); fails after 5 s.
async fn eventually_status(f: &Fixture, key: &str, expected: StatusCode) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = f
            .call(
                Request::get("/api/v1/agent/desired")
                    .header(header::AUTHORIZATION, format!("Bearer {key}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        if status == expected {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "still {status} instead of {expected}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_stack_targeted_before_it_had_content_wakes_the_long_poll_with_its_first_version() {
    let f = Fixture::new().await;
    let empty = f
        .store
        .sync_stack(&StackSync {
            resource_uid: Uuid::new_v4(),
            name: "ns/later",
            description: None,
            generator_id: f.generator,
            labels: None,
            annotations: None,
            content: None,
            author: None,
            progressive: false,
        })
        .await
        .unwrap();
    assert!(empty.deployment_object.is_none());
    f.store
        .replace_stack_targets(empty.stack.id, &BTreeSet::from([f.agent]))
        .await
        .unwrap();
    let before = f.desired("").await;
    assert_eq!(
        before.stacks.len(),
        1,
        "a stack without content is not listed"
    );

    let query = format!("?since={}&wait=20", before.cursor);
    let poll = f.desired(&query);
    let write = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (yaml, checksum) = content("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: l\n");
        f.store
            .record_deployment_object(
                empty.stack.id,
                StackContent {
                    yaml: &yaml,
                    checksum: &checksum,
                },
            )
            .await
            .unwrap()
            .0
    };
    let started = Instant::now();
    let (desired, first) = tokio::join!(poll, write);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken, not timed out"
    );
    let later = desired
        .stacks
        .iter()
        .find(|s| s.stack_id == empty.stack.id)
        .expect("the stack's first version is delivered");
    assert_eq!(later.deployment_object_id, first.id);
}

#[tokio::test]
async fn every_parked_agent_gets_a_push_and_its_object() {
    let f = Fixture::new().await;
    let mut keys = vec![f.key.clone()];
    let mut agents = BTreeSet::from([f.agent]);
    for n in 2..=20 {
        let (agent, key) = agent_with_key(&f.store, &format!("edge-{n}")).await;
        agents.insert(agent);
        keys.push(key);
    }
    f.store
        .replace_stack_targets(f.stack, &agents)
        .await
        .unwrap();
    let cursors = futures::future::join_all(keys.iter().map(|key| f.desired_as(key, ""))).await;
    let polls = futures::future::join_all(
        keys.iter()
            .zip(&cursors)
            .map(|(key, desired)| f.desired_as(key, format!("?since={}&wait=20", desired.cursor))),
    );
    let write = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        f.new_version("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: herd\n")
            .await
    };
    let (answers, pushed) = tokio::join!(polls, write);
    for (key, answer) in keys.iter().zip(&answers) {
        assert_eq!(answer.stacks[0].deployment_object_id, pushed);
        let (status, body) = f
            .call(
                Request::get(format!("/api/v1/agent/deployment-objects/{pushed}"))
                    .header(header::AUTHORIZATION, format!("Bearer {key}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body["yaml"].as_str().unwrap().contains("name: herd"));
    }
    // Re-parking with the new cursor waits: the pushed set is the current one.
    let started = Instant::now();
    let again = f
        .desired_as(&keys[0], format!("?since={}&wait=1", answers[0].cursor))
        .await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(again.cursor, answers[0].cursor);
}

#[tokio::test]
async fn desired_state_lists_targeted_stacks_with_a_cursor() {
    let f = Fixture::new().await;
    let desired = f.desired("").await;
    assert_eq!(desired.stacks.len(), 1);
    let stack = &desired.stacks[0];
    assert_eq!(
        (stack.stack_id, stack.deployment_object_id),
        (f.stack, f.object)
    );
    assert_eq!(stack.stack_name, "ns/app");
    assert!(!stack.deletion);
    let again = f.desired(&format!("?since={}", desired.cursor)).await;
    assert_eq!(again.cursor, desired.cursor, "no change, same cursor");
    // The same stacks; the object the first answer carried inline is not carried again.
    assert!(desired.stacks[0].object.is_some());
    let mut without_object = desired.clone();
    without_object.stacks[0].object = None;
    assert_eq!(again, without_object);

    let (status, body) = f.call(f.get("/api/v1/agent/desired?since=garbage")).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    let (status, body) = f.call(f.get("/api/v1/agent/desired?wait=soon")).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_a_new_version_is_recorded() {
    let f = Fixture::new().await;
    let cursor = f.desired("").await.cursor;
    let started = Instant::now();
    let query = format!("?since={cursor}&wait=20");
    let poll = f.desired(&query);
    let write = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        f.new_version("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n")
            .await
    };
    let (desired, new_object) = tokio::join!(poll, write);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken, not timed out"
    );
    assert_ne!(desired.cursor, cursor);
    assert_eq!(desired.stacks[0].deployment_object_id, new_object);
}

#[tokio::test]
async fn a_long_poll_returns_when_the_agents_targets_change_and_otherwise_waits_it_out() {
    let f = Fixture::new().await;
    let cursor = f.desired("").await.cursor;
    let started = Instant::now();
    let unchanged = f.desired(&format!("?since={cursor}&wait=1")).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited for a change"
    );
    assert_eq!(unchanged.cursor, cursor);

    let query = format!("?since={cursor}&wait=20");
    let poll = f.desired(&query);
    let untarget = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        f.store
            .replace_stack_targets(f.stack, &BTreeSet::new())
            .await
            .unwrap();
    };
    let started = Instant::now();
    let (desired, ()) = tokio::join!(poll, untarget);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        desired.stacks.is_empty(),
        "the stack left the set: remove it"
    );
}

#[tokio::test]
async fn a_deleted_stack_arrives_as_a_deletion_marker() {
    let f = Fixture::new().await;
    let cursor = f.desired("").await.cursor;
    let marker = f.store.soft_delete_stack(f.stack).await.unwrap().unwrap();
    let desired = f.desired(&format!("?since={cursor}&wait=5")).await;
    assert_eq!(desired.stacks.len(), 1);
    assert!(desired.stacks[0].deletion);
    assert_eq!(desired.stacks[0].deployment_object_id, marker.id);
    let _ = f.generator;
}

#[tokio::test]
async fn a_deletion_marker_waits_for_an_agent_that_was_away_and_leaves_once_it_reports_the_removal()
{
    let f = Fixture::new().await;
    // The agent polls once, then is away (busy, offline, restarting) while the stack is
    // deleted; this replica keeps its view and patches it.
    let first = f.desired("").await;
    let marker = f.store.soft_delete_stack(f.stack).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let back = f.desired(&format!("?since={}", first.cursor)).await;
    let is_marker = |d: &DesiredState| {
        d.stacks.len() == 1 && d.stacks[0].deletion && d.stacks[0].deployment_object_id == marker.id
    };
    assert!(is_marker(&back), "{back:?}");
    // Its cursor has passed the marker now; the marker is still there (an agent that
    // crashed before acting on the answer must find it again), and the poll waits.
    let started = Instant::now();
    let again = f.desired(&format!("?since={}&wait=1", back.cursor)).await;
    assert!(is_marker(&again), "{again:?}");
    assert_eq!(again.cursor, back.cursor);
    assert!(started.elapsed() >= Duration::from_millis(900));
    let fresh = f.desired("").await;
    assert!(
        is_marker(&fresh),
        "a restarted agent without a cursor gets it too"
    );

    let report = json!({"events": [{"id": Uuid::now_v7(), "deploymentObjectId": marker.id,
        "type": "Delete", "status": "Success", "message": "removed"}]});
    let (status, body) = f.call(f.post("/api/v1/agent/events", report)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The parked poll wakes: its set changed (the marker left it).
    let started = Instant::now();
    let after = f.desired(&format!("?since={}&wait=10", back.cursor)).await;
    assert!(after.stacks.is_empty(), "{after:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(f.desired("").await.stacks.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Bounded staleness: the change feed's LISTEN connection and cached views

/// A TCP proxy to PostgreSQL whose connections can be frozen: they stay open and pass
/// nothing more, like a connection whose server or network path is gone without a word
/// (half-open). Connections made after a freeze work.
struct FreezingProxy {
    addr: std::net::SocketAddr,
    freeze: tokio::sync::watch::Sender<u64>,
}

impl FreezingProxy {
    async fn start(upstream: std::net::SocketAddr) -> FreezingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (freeze, _) = tokio::sync::watch::channel(0u64);
        let freezes = freeze.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut frozen = freezes.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = frozen.changed() => {
                            // Hold both ends open, passing nothing, until the test ends.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        FreezingProxy { addr, freeze }
    }

    /// `url` (the test database's) through this proxy.
    fn url(&self, url: &str) -> String {
        let (_, database) = url.rsplit_once('/').unwrap();
        format!("postgres://postgres@{}/{database}", self.addr)
    }

    /// Freezes every connection open now.
    fn freeze(&self) {
        self.freeze.send_modify(|n| *n += 1);
    }
}

fn postgres_addr(url: &str) -> std::net::SocketAddr {
    let host = url
        .split_once('@')
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(host, _)| host)
        .unwrap();
    host.parse().unwrap()
}

/// Checks and re-validation fast enough for tests.
fn fast(view_revalidation_interval: Duration) -> FeedTiming {
    FeedTiming {
        listener_check_interval: Duration::from_millis(500),
        listener_check_timeout: Duration::from_millis(500),
        view_revalidation_interval,
    }
}

#[tokio::test]
async fn a_change_made_while_the_listeners_backend_is_terminated_still_reaches_a_long_poll() {
    let f = Fixture::new().await;
    let cursor = f.desired("").await.cursor;
    let query = format!("?since={cursor}&wait=20");
    let poll = f.desired(&query);
    let kill_then_change = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = f
            .store
            .connection()
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name = '{}'",
                    store::LISTENER_APPLICATION_NAME
                ),
            ))
            .await
            .unwrap();
        assert_eq!(killed.len(), 1, "the feed's LISTEN connection");
        f.new_version("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n")
            .await
    };
    let started = Instant::now();
    let (desired, object) = tokio::join!(poll, kill_then_change);
    assert_eq!(desired.stacks[0].deployment_object_id, object);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_half_open_listener_connection_is_replaced_and_the_change_arrives_within_the_bound() {
    // Re-validation effectively off: only the listener's check can notice.
    let metrics = FeedMetrics::default();
    let changes = ChangeFeed::default()
        .with_timing(fast(Duration::from_secs(3600)))
        .with_metrics(metrics.clone());
    let f = Fixture::with_feed(changes, true).await;
    let cursor = f.desired("").await.cursor;
    let reconnects_before = metrics.listener_reconnects.get();

    f.proxy.as_ref().unwrap().freeze();
    let query = format!("?since={cursor}&wait=20");
    let poll = f.desired(&query);
    let change = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        f.new_version("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n")
            .await
    };
    let started = Instant::now();
    let (desired, object) = tokio::join!(poll, change);
    assert_eq!(
        desired.stacks[0].deployment_object_id,
        object,
        "the change arrived after {:?}",
        started.elapsed()
    );
    // Check interval + timeout (1 s here) plus reconnecting, well under the 20 s wait.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(metrics.listener_reconnects.get() > reconnects_before);
}

#[tokio::test]
async fn a_change_whose_notification_was_lost_reaches_a_long_poll_by_revalidation() {
    let metrics = FeedMetrics::default();
    let changes = ChangeFeed::default()
        .with_timing(fast(Duration::from_secs(1)))
        .with_metrics(metrics.clone());
    let f = Fixture::with_feed(changes, false).await;
    let cursor = f.desired("").await.cursor;
    // A write whose notification is lost: the trigger is off while it is made.
    let exec = |sql: &'static str| {
        let conn = f.store.connection().clone();
        async move { conn.execute_unprepared(sql).await.unwrap() }
    };
    exec("ALTER TABLE deployment_objects DISABLE TRIGGER notify_deployment_objects_inserted").await;
    let object = f
        .new_version("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n")
        .await;
    exec("ALTER TABLE deployment_objects ENABLE TRIGGER notify_deployment_objects_inserted").await;

    let started = Instant::now();
    let desired = f.desired(&format!("?since={cursor}&wait=20")).await;
    assert_eq!(desired.stacks[0].deployment_object_id, object);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(metrics.stale_views_corrected.get() >= 1);
    assert!(metrics.views_revalidated.get() >= 1);
}

#[tokio::test]
async fn a_notification_that_does_not_parse_is_ignored_and_counted() {
    let metrics = FeedMetrics::default();
    let changes = ChangeFeed::default().with_metrics(metrics.clone());
    let f = Fixture::with_feed(changes, false).await;
    let cursor = f.desired("").await.cursor;
    f.store
        .connection()
        .execute_unprepared(&format!(
            "NOTIFY {DESIRED_CHANNEL}, 'garbage'; NOTIFY {DESIRED_CHANNEL}, 's:not-a-uuid'"
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics.notifications_ignored.get() < 2 {
        assert!(Instant::now() < deadline, "both notifications counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metrics.listener_reconnects.get(), 0, "the feed carried on");
    // And it still works.
    let query = format!("?since={cursor}&wait=20");
    let poll = f.desired(&query);
    let change = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        f.new_version("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n")
            .await
    };
    let (desired, object) = tokio::join!(poll, change);
    assert_eq!(desired.stacks[0].deployment_object_id, object);
}

#[tokio::test]
async fn deployment_objects_are_served_only_to_targeted_agents() {
    let f = Fixture::new().await;
    let (status, body) = f
        .call(f.get(&format!("/api/v1/agent/deployment-objects/{}", f.object)))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let object: wire::DeploymentObject = serde_json::from_value(body).unwrap();
    assert!(object.yaml.contains("kind: ConfigMap"));
    assert_eq!(object.stack_id, f.stack);

    let (_, other_key) = agent_with_key(&f.store, "edge-2").await;
    let (status, body) = f
        .call(
            Request::get(format!("/api/v1/agent/deployment-objects/{}", f.object))
                .header(header::AUTHORIZATION, format!("Bearer {other_key}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = f.call(f.get("/api/v1/agent/deployment-objects/nope")).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn event_batches_are_recorded_once_and_bad_ones_get_clear_4xx() {
    let f = Fixture::new().await;
    let event = |t: &str| json!({"id": Uuid::now_v7(), "deploymentObjectId": f.object, "type": t, "status": "Success", "message": "ok"});
    let batch = json!({"events": [event("Apply"), event("Health")]});
    let (status, body) = f.call(f.post("/api/v1/agent/events", batch.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"accepted": 2, "duplicates": 0}));
    let (_, body) = f.call(f.post("/api/v1/agent/events", batch)).await;
    assert_eq!(
        body,
        json!({"accepted": 0, "duplicates": 2}),
        "a retry never duplicates"
    );

    let (status, body) = f
        .call(f.post(
            "/api/v1/agent/events",
            json!({"events": [event("Explode")]}),
        ))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable",
    );

    let foreign = json!({"events": [{"id": Uuid::now_v7(), "deploymentObjectId": Uuid::now_v7(), "type": "Apply", "status": "Success"}]});
    let (status, body) = f.call(f.post("/api/v1/agent/events", foreign)).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable",
    );
    assert!(body["message"].as_str().unwrap().contains("not targeted"));

    let too_many = json!({"events": (0..501).map(|_| event("Apply")).collect::<Vec<_>>()});
    let (status, body) = f.call(f.post("/api/v1/agent/events", too_many)).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable",
    );

    let long_message = json!({"events": [{"id": Uuid::now_v7(), "deploymentObjectId": f.object, "type": "Apply", "status": "Failure", "message": "x".repeat(5000)}]});
    let (status, body) = f.call(f.post("/api/v1/agent/events", long_message)).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable",
    );

    let malformed = Request::post("/api/v1/agent/events")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.key))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"events\": ["))
        .unwrap();
    let (status, body) = f.call(malformed).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");

    let wrong_type = Request::post("/api/v1/agent/events")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.key))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("{}"))
        .unwrap();
    let (status, body) = f.call(wrong_type).await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    let huge = Request::post("/api/v1/agent/events")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.key))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(format!(
            "{{\"events\": [], \"pad\": \"{}\"}}",
            "x".repeat(api::BODY_LIMIT)
        )))
        .unwrap();
    let (status, body) = f.call(huge).await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
}

#[tokio::test]
async fn heartbeats_mark_the_agent_online() {
    let f = Fixture::new().await;
    let (status, body) = f
        .call(f.post(
            "/api/v1/agent/heartbeat",
            json!({"version": "0.1.0", "state": "Ready", "stacks": []}),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["heartbeatIntervalSeconds"], 15);
    // Heartbeats are written in batches, once a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let agent = f.store.find_agent(f.agent).await.unwrap().unwrap();
        if agent.status == "Online" {
            assert_eq!(agent.agent_version.as_deref(), Some("0.1.0"));
            break;
        }
        assert!(Instant::now() < deadline, "still {}", agent.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = f
        .call(f.post(
            "/api/v1/agent/heartbeat",
            json!({"version": "v".repeat(65), "state": "Ready", "stacks": []}),
        ))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable",
    );
}

#[tokio::test]
async fn nul_characters_and_invalid_unicode_are_refused_naming_the_field_and_others_still_beat() {
    let f = Fixture::new().await;
    let (status, body) = f
        .call(f.post(
            "/api/v1/agent/heartbeat",
            json!({"version": "0.1.0\u{0}", "state": "Ready", "stacks": []}),
        ))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable",
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("version contains a NUL"),
        "{body}"
    );

    // A lone surrogate is not Unicode: refused by the JSON parser, never stored.
    let request = Request::post("/api/v1/agent/heartbeat")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.key))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"version":"\ud800","state":"Ready"}"#))
        .unwrap();
    let (status, body) = f.call(request).await;
    assert!(status.is_client_error(), "{status} {body}");

    // An event whose message holds a NUL (health messages quote spoke objects) is a
    // 422 naming it, not a 503 the agent would retry forever.
    let event = |id: Uuid, message: &str| {
        json!({"id": id, "deploymentObjectId": f.object, "type": "Health",
               "status": "Success", "message": message})
    };
    let (good, bad) = (Uuid::now_v7(), Uuid::now_v7());
    let (status, body) = f
        .call(f.post(
            "/api/v1/agent/events",
            json!({"events": [event(good, "healthy"), event(bad, "degraded: \u{0}boom")]}),
        ))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable",
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("events[1].message"),
        "{body}"
    );
    // The good event alone goes through (the agent narrows a refused batch down).
    let (status, body) = f
        .call(f.post(
            "/api/v1/agent/events",
            json!({"events": [event(good, "healthy")]}),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 1);

    // Another agent's heartbeats are still written after the refused ones.
    let (other, other_key) = agent_with_key(&f.store, "edge-2").await;
    let request = Request::post("/api/v1/agent/heartbeat")
        .header(header::AUTHORIZATION, format!("Bearer {other_key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"version": "0.2.0", "state": "Ready"}).to_string(),
        ))
        .unwrap();
    let (status, body) = f.call(request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let row = f.store.find_agent(other).await.unwrap().unwrap();
        if row.status == "Online" {
            assert_eq!(row.agent_version.as_deref(), Some("0.2.0"));
            break;
        }
        assert!(Instant::now() < deadline, "still {}", row.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json() {
    let f = Fixture::new().await;
    let (status, body) = f.call(f.get("/api/v1/agent/nothing-here")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = f.call(f.post("/api/v1/agent/desired", json!({}))).await;
    assert_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

#[tokio::test]
async fn the_openapi_document_describes_every_endpoint() {
    let f = Fixture::new().await;
    let (status, body) = f
        .call(
            Request::get("/api/v1/openapi.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["openapi"], "3.1.0");
    for path in [
        "/api/v1/agent/desired",
        "/api/v1/agent/deployment-objects/{id}",
        "/api/v1/agent/events",
        "/api/v1/agent/heartbeat",
        "/api/v1/agent/key",
    ] {
        assert!(body["paths"][path].is_object(), "{path} documented");
    }
    assert!(body["components"]["schemas"]["RotatedKey"].is_object());
    let unauthorized =
        body["paths"]["/api/v1/agent/key"]["post"]["responses"]["401"]["description"]
            .as_str()
            .unwrap();
    assert!(unauthorized.contains("key_expired") && unauthorized.contains("key_revoked"));
    assert!(body["components"]["schemas"]["EventBatch"].is_object());
    let desired_stack = &body["components"]["schemas"]["DesiredState"]["$defs"]["DesiredStack"];
    let object = &desired_stack["properties"]["object"];
    assert!(
        object["description"]
            .as_str()
            .is_some_and(|d| d.contains("64 KiB") && d.contains("fetches")),
        "{desired_stack}"
    );
    assert!(
        !desired_stack["required"]
            .as_array()
            .unwrap()
            .contains(&"object".into()),
        "optional: {desired_stack}"
    );
}

#[tokio::test]
async fn over_a_real_socket_a_long_poll_wakes_on_a_change() {
    let f = Fixture::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, f.app.clone()).into_future());
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/api/v1/agent/desired");
    let first: DesiredState = client
        .get(&url)
        .bearer_auth(&f.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let poll = client
        .get(format!("{url}?since={}&wait=20", first.cursor))
        .bearer_auth(&f.key)
        .send();
    let write = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        f.new_version("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n")
            .await
    };
    let started = Instant::now();
    let (response, new_object) = tokio::join!(poll, write);
    let desired: DesiredState = response.unwrap().json().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(desired.stacks[0].deployment_object_id, new_object);

    let unauthorized = client.get(&url).send().await.unwrap();
    assert_eq!(unauthorized.status(), reqwest::StatusCode::UNAUTHORIZED);
    let body: Value = unauthorized.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
}
