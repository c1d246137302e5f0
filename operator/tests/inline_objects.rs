//! Small deployment objects inside the desired-state answer, against a real PostgreSQL:
//! which objects travel inline, that they are the fetch's own bytes, and that agents that
//! predate the field still read the answer.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use brokkr_crds::wire::{DeploymentObject, DesiredStack, DesiredState};
use brokkr_operator::api::{self, ApiConfig, ApiState, ChangeFeed};
use brokkr_operator::store::{GeneratorSync, StackContent, Store};
use brokkr_testdb::TestDb;
use http_body_util::BodyExt;
use serde::Deserialize;
use tower::ServiceExt;
use uuid::Uuid;

mod common;
use common::{agent_with_key, targeted_stack};

struct Fixture {
    _db: TestDb,
    store: Store,
    app: Router,
    key: String,
    /// A stack whose object is well under the threshold, and one whose object is over it.
    small: Uuid,
    large: Uuid,
}

fn content(yaml: &str) -> (String, String) {
    use sha2::Digest;
    (yaml.to_owned(), hex::encode(sha2::Sha256::digest(yaml)))
}

fn config_map(name: &str, padding: usize) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  pad: \"{}\"\n",
        "x".repeat(padding)
    )
}

impl Fixture {
    async fn new() -> Fixture {
        let db = TestDb::new().await;
        let store = Store::new(db.conn().clone());
        let changes = ChangeFeed::default();
        tokio::spawn(changes.clone().listen(db.url().to_owned(), store.clone()));
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
        let (agent, key) = agent_with_key(&store, "edge-1").await;
        let mut stacks = Vec::new();
        for (name, padding) in [
            ("small", 100),
            ("large", api::DEFAULT_INLINE_OBJECT_MAX_BYTES),
        ] {
            let yaml = config_map(name, padding);
            let (name, agents) = (format!("ns/{name}"), BTreeSet::from([agent]));
            stacks.push(targeted_stack(&store, generator, &name, &yaml, &agents).await);
        }
        let app = api::app(ApiState::new(store.clone(), changes, ApiConfig::default()));
        // Give the notification listener a moment to subscribe.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Fixture {
            _db: db,
            store,
            app,
            key,
            small: stacks[0],
            large: stacks[1],
        }
    }

    async fn get(&self, uri: &str) -> (StatusCode, Vec<u8>) {
        let request = Request::get(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
            .body(Body::empty())
            .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body.to_vec())
    }

    async fn desired_body(&self, query: &str) -> Vec<u8> {
        let (status, body) = self.get(&format!("/api/v1/agent/desired{query}")).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        body
    }

    async fn desired(&self, query: &str) -> DesiredState {
        serde_json::from_slice(&self.desired_body(query).await).unwrap()
    }

    fn stack<'a>(&self, state: &'a DesiredState, id: Uuid) -> &'a DesiredStack {
        state.stacks.iter().find(|s| s.stack_id == id).unwrap()
    }

    async fn push(&self, stack: Uuid, yaml: &str) -> Uuid {
        let (yaml, checksum) = content(yaml);
        self.store
            .record_deployment_object(
                stack,
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

#[tokio::test]
async fn a_small_object_travels_inline_as_the_fetch_answers_it_and_a_large_one_does_not() {
    let f = Fixture::new().await;
    let desired = f.desired("").await;
    let small = f.stack(&desired, f.small);
    let large = f.stack(&desired, f.large);
    assert!(large.object.is_none(), "over 64 KiB: fetched, not inline");
    let inline = small.object.as_ref().expect("the small object is inline");
    assert_eq!(inline.id, small.deployment_object_id);
    assert_eq!(inline.checksum, small.checksum);
    assert!(inline.yaml.contains("name: small"));

    // The same object the fetch answers.
    let (status, fetched) = f
        .get(&format!(
            "/api/v1/agent/deployment-objects/{}",
            small.deployment_object_id
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let fetched: DeploymentObject = serde_json::from_slice(&fetched).unwrap();
    assert_eq!(&fetched, inline);
    let (status, large_object) = f
        .get(&format!(
            "/api/v1/agent/deployment-objects/{}",
            large.deployment_object_id
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let large_object: DeploymentObject = serde_json::from_slice(&large_object).unwrap();
    assert!(large_object.yaml.len() > api::DEFAULT_INLINE_OBJECT_MAX_BYTES);
}

#[tokio::test]
async fn only_objects_newer_than_the_cursor_travel_inline_and_deletion_markers_never() {
    let f = Fixture::new().await;
    let first = f.desired("").await;
    // A renewal that finds nothing new carries no object: the agent holds them.
    let renewal = f.desired(&format!("?since={}&wait=1", first.cursor)).await;
    assert_eq!(renewal.cursor, first.cursor);
    assert!(
        renewal.stacks.iter().all(|s| s.object.is_none()),
        "{renewal:?}"
    );

    // A push wakes the long-poll with the new object inline, and only that one.
    let query = format!("?since={}&wait=10", first.cursor);
    let (answer, pushed) = tokio::join!(f.desired(&query), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        f.push(f.small, &config_map("small", 200)).await
    });
    let small = f.stack(&answer, f.small);
    assert_eq!(small.deployment_object_id, pushed);
    assert_eq!(small.object.as_ref().map(|o| o.id), Some(pushed));
    assert!(f.stack(&answer, f.large).object.is_none());

    let marker = f.store.soft_delete_stack(f.small).await.unwrap().unwrap();
    let deleted = f
        .desired(&format!("?since={}&wait=10", answer.cursor))
        .await;
    let small = f.stack(&deleted, f.small);
    assert!(small.deletion);
    assert_eq!(small.deployment_object_id, marker.id);
    assert!(small.object.is_none(), "a deletion marker carries nothing");
}

#[tokio::test]
async fn an_agent_that_predates_inline_objects_reads_the_answer() {
    // `DesiredStack` as agents before inline objects had it.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct OldDesiredStack {
        stack_id: Uuid,
        deployment_object_id: Uuid,
        checksum: String,
        deletion: bool,
    }
    #[derive(Debug, Deserialize)]
    struct OldDesiredState {
        cursor: String,
        stacks: Vec<OldDesiredStack>,
    }
    let f = Fixture::new().await;
    let body = f.desired_body("").await;
    assert!(
        String::from_utf8_lossy(&body).contains("\"object\":{"),
        "the answer carries an object"
    );
    let old: OldDesiredState = serde_json::from_slice(&body).unwrap();
    let new: DesiredState = serde_json::from_slice(&body).unwrap();
    assert_eq!(old.cursor, new.cursor);
    let old: Vec<(Uuid, Uuid, String, bool)> = old
        .stacks
        .into_iter()
        .map(|s| (s.stack_id, s.deployment_object_id, s.checksum, s.deletion))
        .collect();
    let new: Vec<(Uuid, Uuid, String, bool)> = new
        .stacks
        .into_iter()
        .map(|s| (s.stack_id, s.deployment_object_id, s.checksum, s.deletion))
        .collect();
    assert_eq!(old, new);
}
