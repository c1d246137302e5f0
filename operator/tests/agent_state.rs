//! The agent's own state (issue 16, item 1): a heartbeat's `Error` and reason are stored
//! (real PostgreSQL), refused when unstorable, and shown on the Agent resource (kubesim) as
//! phase `Error` with `Healthy=False`, until the agent reports it works again.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use brokkr_crds::conditions::{reasons, types};
use brokkr_crds::wire::MAX_STATE_MESSAGE_BYTES;
use brokkr_crds::{Agent, AgentPhase};
use brokkr_operator::api::{self, ApiConfig, ApiState, ChangeFeed};
use brokkr_operator::entity::agents;
use brokkr_operator::store::notify::AGENTS_CHANNEL;
use brokkr_operator::store::{self, HeartbeatReport, Store};
use brokkr_testdb::TestDb;
use http_body_util::BodyExt;
use kube::{Api, ResourceExt};
use kubesim::testing::eventually;
use serde_json::{Value, json};
use tower::ServiceExt;
use uuid::Uuid;

mod common;
use common::{Hub, agent_with_key};

struct Fixture {
    db: TestDb,
    store: Store,
    app: Router,
    agent: Uuid,
    key: String,
}

impl Fixture {
    async fn new() -> Fixture {
        let db = TestDb::new().await;
        let store = Store::new(db.conn().clone());
        let (agent, key) = agent_with_key(&store, "edge-1").await;
        let app = api::app(ApiState::new(
            store.clone(),
            ChangeFeed::default(),
            ApiConfig::default(),
        ));
        Fixture {
            db,
            store,
            app,
            agent,
            key,
        }
    }

    async fn beat(&self, body: Value) -> (StatusCode, Value) {
        let request = Request::post("/api/v1/agent/heartbeat")
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn row(&self) -> agents::Model {
        self.store.find_agent(self.agent).await.unwrap().unwrap()
    }

    /// The agent's row once `done` holds (heartbeats are written once a second).
    async fn row_when(&self, what: &str, done: impl Fn(&agents::Model) -> bool) -> agents::Model {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let row = self.row().await;
            if done(&row) {
                return row;
            }
            assert!(Instant::now() < deadline, "{what}: still {row:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The payload of the next notification within half a second, if any.
async fn next(listener: &mut sea_orm::sqlx::postgres::PgListener) -> Option<String> {
    let received = tokio::time::timeout(Duration::from_millis(500), listener.try_recv()).await;
    let notification = received.ok()?.expect("the listener works")?;
    Some(notification.payload().to_owned())
}

fn report(state: &str, message: Option<&str>) -> HeartbeatReport {
    HeartbeatReport {
        version: "1.2.3".to_owned(),
        state: state.to_owned(),
        message: message.map(str::to_owned),
    }
}

#[tokio::test]
async fn an_error_heartbeat_stores_the_reason_until_the_agent_is_ready_or_goes_silent() {
    let f = Fixture::new().await;
    let reason = "spoke API server unreachable: tcp connect error: Connection refused";
    let (status, body) = f
        .beat(json!({"version": "1.2.3", "state": "Error", "message": reason, "stacks": []}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let error = f.row_when("Error", |row| row.status == "Error").await;
    assert_eq!(error.state_message.as_deref(), Some(reason));
    let since = error
        .state_since
        .expect("state_since set when the status changes");
    assert!(error.last_heartbeat.is_some());

    // Still in Error: the status began when it did.
    f.store
        .record_heartbeats(&[(f.agent, report("Error", Some("another reason")))])
        .await
        .unwrap();
    let still = f.row().await;
    assert_eq!(still.state_message.as_deref(), Some("another reason"));
    assert_eq!(still.state_since, Some(since));

    // Ready again: Online, without a reason, since now.
    let (status, body) = f
        .beat(json!({"version": "1.2.3", "state": "Ready", "stacks": []}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let online = f.row_when("Online", |row| row.status == "Online").await;
    assert_eq!(online.state_message, None);
    assert!(online.state_since.unwrap() > since);

    // An agent in Error that goes silent is marked Offline like any other, keeping the
    // last thing it said.
    f.store
        .record_heartbeats(&[(f.agent, report("Error", Some(reason)))])
        .await
        .unwrap();
    let error_since = f.row().await.state_since.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let marked = f
        .store
        .mark_silent_agents_offline(Duration::from_millis(10))
        .await
        .unwrap();
    assert_eq!(marked, ["edge-1"]);
    let offline = f.row().await;
    assert_eq!(offline.status, "Offline");
    assert!(offline.state_since.unwrap() > error_since);
    assert_eq!(offline.state_message.as_deref(), Some(reason));
}

#[tokio::test]
async fn a_new_reason_while_in_error_notifies_the_agent_controller() {
    let f = Fixture::new().await;
    let mut listener = store::listen(f.db.url(), &[AGENTS_CHANNEL]).await.unwrap();
    let beat = |state: &'static str, message: Option<&'static str>| {
        let store = f.store.clone();
        let agent = f.agent;
        async move {
            store
                .record_heartbeats(&[(agent, report(state, message))])
                .await
                .unwrap()
        }
    };
    beat("Error", Some("first")).await;
    assert_eq!(next(&mut listener).await.as_deref(), Some("edge-1"));
    beat("Error", Some("second")).await;
    assert_eq!(
        next(&mut listener).await.as_deref(),
        Some("edge-1"),
        "a new reason is news"
    );
    beat("Error", Some("second")).await;
    assert_eq!(next(&mut listener).await, None, "the same reason is not");
    beat("Ready", None).await;
    assert_eq!(next(&mut listener).await.as_deref(), Some("edge-1"));
}

#[tokio::test]
async fn a_reason_too_long_or_holding_nul_is_refused_with_422_and_nothing_is_stored() {
    let f = Fixture::new().await;
    for message in [
        "x".repeat(5000),
        "é".repeat(MAX_STATE_MESSAGE_BYTES / 2 + 1),
        "refused\u{0}".to_owned(),
    ] {
        let (status, body) = f
            .beat(json!({"version": "1.2.3", "state": "Error", "message": message}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"], "unprocessable", "{body}");
        let text = body["message"].as_str().unwrap();
        assert!(text.starts_with("message "), "{text}");
    }
    // Past the next flush of the heartbeat buffer: nothing was recorded.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let row = f.row().await;
    assert_eq!(row.status, "Pending");
    assert!(row.last_heartbeat.is_none());
    assert_eq!(row.state_message, None);

    // At the limit, it is accepted.
    let (status, body) = f
        .beat(json!({"version": "1.2.3", "state": "Error",
                     "message": "é".repeat(MAX_STATE_MESSAGE_BYTES / 2)}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    f.row_when("Error", |row| row.status == "Error").await;
}

fn condition(agent: &Agent, type_: &str) -> Option<(String, String, String)> {
    agent
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn an_agent_reporting_an_error_shows_phase_error_with_its_reason_and_recovers() {
    // Refreshed by notifications only (the periodic refresh is ten minutes away).
    let hub = Hub::start_with(Duration::from_secs(60), Duration::from_secs(600)).await;
    let agent = hub.create_agent("edge", &[]).await;
    let name = agent.name_any();
    let api: Api<Agent> = Api::all(hub.cluster.client.clone());
    let uid = Uuid::parse_str(&agent.uid().unwrap()).unwrap();
    let row = eventually("agent row", || async {
        hub.store.find_live_agent_by_resource(uid).await.unwrap()
    })
    .await;
    let reason = "RBAC refuses watching deployments.apps in namespace shop: forbidden";
    // The test hub expects a heartbeat every second: keep beating while waiting.
    let beating_as = |state: &'static str, message: Option<&'static str>, phase: AgentPhase| {
        let (api, name, store) = (api.clone(), name.clone(), hub.store.clone());
        eventually(phase.as_str(), move || {
            let (api, name, store) = (api.clone(), name.clone(), store.clone());
            async move {
                store
                    .record_heartbeats(&[(row.id, report(state, message))])
                    .await
                    .unwrap();
                api.get(&name)
                    .await
                    .ok()
                    .filter(|a| a.status.as_ref().and_then(|s| s.phase) == Some(phase))
            }
        })
    };

    let error = beating_as("Error", Some(reason), AgentPhase::Error).await;
    assert_eq!(
        condition(&error, types::HEALTHY),
        Some(("False".into(), reasons::AGENT_ERROR.into(), reason.into()))
    );
    let (online, online_reason, _) = condition(&error, types::ONLINE).unwrap();
    assert_eq!(
        (online.as_str(), online_reason.as_str()),
        ("True", reasons::HEARTBEAT),
        "heartbeats arrive"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(hub.cluster.client.clone());
    eventually("a Warning Event naming the reason", || async {
        events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                    && e.reason.as_deref() == Some(reasons::AGENT_ERROR)
                    && e.note.as_deref() == Some(reason)
            })
    })
    .await;

    let ready = beating_as("Ready", None, AgentPhase::Online).await;
    let (healthy, healthy_reason, _) = condition(&ready, types::HEALTHY).unwrap();
    assert_eq!(
        (healthy.as_str(), healthy_reason.as_str()),
        ("True", reasons::AGENT_READY)
    );
    let row = hub.store.find_agent(row.id).await.unwrap().unwrap();
    assert_eq!((row.status.as_str(), row.state_message), ("Online", None));
    hub.stop().await;
}
