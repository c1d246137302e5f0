//! Test support: a small in-test hub serving the agent protocol over a real socket, with
//! desired states the test changes as it goes, and helpers to start an agent against it and
//! a spoke cluster (kubesim, or the real cluster of `BROKKR_E2E_SPOKE_KUBECONFIG`).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use brokkr_agent::inventory::{self, Inventory};
use brokkr_agent::{AgentHandle, AgentKey, Config};
use brokkr_common::Backoff;
use brokkr_crds::StackPolicy;
use brokkr_crds::wire::{
    API_PREFIX, AgentEvent, ApiError, DeploymentObject, DesiredStack, DesiredState, EventBatch,
    EventBatchResult, EventStatus, EventType, Heartbeat, HeartbeatAck,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kubesim::testing::{TestCluster, eventually_within, unique_name};
use serde::Deserialize;
use tokio::sync::watch;
use uuid::Uuid;

pub const SPOKE_KUBECONFIG_VAR: &str = "BROKKR_E2E_SPOKE_KUBECONFIG";
pub const KEY: &str = "brokkr_test_0123456789";
/// How long tests wait for the agent to get somewhere.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "brokkr_agent=debug,info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

pub async fn cluster() -> TestCluster {
    init_logs();
    TestCluster::from_env_var(SPOKE_KUBECONFIG_VAR).await
}

/// One `GET desired` as the hub saw it.
#[derive(Clone, Debug)]
pub struct DesiredRequest {
    pub since: Option<String>,
    pub wait: Option<String>,
}

/// Whether the in-test hub's answers carry deployment objects inline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Inline {
    /// Never, as hubs that predate inline objects.
    #[default]
    Off,
    /// Every object but deletion markers.
    On,
    /// Every object but deletion markers, with a checksum other than the stack's.
    WrongChecksum,
}

#[derive(Default)]
struct Inner {
    key: String,
    version: u64,
    sequence: i64,
    stacks: BTreeMap<Uuid, DesiredStack>,
    objects: HashMap<Uuid, DeploymentObject>,
    /// Accepted events, each id once.
    events: Vec<AgentEvent>,
    /// The ids of every POST of events, refused ones included.
    event_posts: Vec<Vec<Uuid>>,
    /// Answer 503 to this many more event POSTs.
    refuse_event_posts: u32,
    heartbeats: Vec<Heartbeat>,
    desired_requests: Vec<DesiredRequest>,
    object_fetches: Vec<Uuid>,
    unauthorized: u64,
    inline: Inline,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Bumped on every change of the desired state; long-polls wait on it.
    version: watch::Sender<u64>,
    /// Set when the server stops, so that long-polls return at once.
    stopping: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The in-test hub.
pub struct FakeHub {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<tokio::task::JoinHandle<()>>,
}

fn cursor_of(version: u64) -> String {
    format!("c{version}")
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(ApiError {
            error: code.into(),
            message: message.into(),
        }),
    )
        .into_response()
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let expected = format!("Bearer {}", shared.lock().key);
    let ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected);
    if !ok {
        shared.lock().unauthorized += 1;
    }
    ok
}

#[derive(Deserialize)]
struct DesiredQuery {
    since: Option<String>,
    wait: Option<String>,
}

fn desired_state(inner: &Inner) -> DesiredState {
    let inline = |stack: &DesiredStack| {
        let mut object = inner.objects.get(&stack.deployment_object_id)?.clone();
        match inner.inline {
            Inline::Off => return None,
            Inline::On => {}
            Inline::WrongChecksum => object.checksum.push_str("-other"),
        }
        (!stack.deletion).then_some(object)
    };
    DesiredState {
        cursor: cursor_of(inner.version),
        stacks: inner
            .stacks
            .values()
            .map(|stack| DesiredStack {
                object: inline(stack),
                ..stack.clone()
            })
            .collect(),
    }
}

async fn desired(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<DesiredQuery>,
) -> Response {
    if !authorized(&shared, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown agent key",
        );
    }
    shared.lock().desired_requests.push(DesiredRequest {
        since: query.since.clone(),
        wait: query.wait.clone(),
    });
    let wait = query
        .wait
        .as_deref()
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or(0)
        .min(60);
    let mut versions = shared.version.subscribe();
    let mut stopping = shared.stopping.subscribe();
    if let Some(since) = &query.since {
        let unchanged = |v: u64| cursor_of(v) == *since;
        if unchanged(*versions.borrow_and_update()) {
            let waiting = async {
                while versions.changed().await.is_ok() {
                    if !unchanged(*versions.borrow_and_update()) {
                        break;
                    }
                }
            };
            tokio::select! {
                () = waiting => {}
                () = tokio::time::sleep(Duration::from_secs(wait)) => {}
                _ = stopping.wait_for(|s| *s) => {}
            }
        }
    }
    let state = desired_state(&shared.lock());
    Json(state).into_response()
}

async fn deployment_object(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !authorized(&shared, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown agent key",
        );
    }
    let Ok(id) = Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "not a UUID");
    };
    let mut inner = shared.lock();
    inner.object_fetches.push(id);
    match inner.objects.get(&id) {
        Some(object) => Json(object.clone()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such deployment object",
        ),
    }
}

async fn events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(batch): Json<EventBatch>,
) -> Response {
    if !authorized(&shared, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown agent key",
        );
    }
    let mut inner = shared.lock();
    inner
        .event_posts
        .push(batch.events.iter().map(|e| e.id).collect());
    if inner.refuse_event_posts > 0 {
        inner.refuse_event_posts -= 1;
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "try again later",
        );
    }
    let known: HashSet<Uuid> = inner.events.iter().map(|e| e.id).collect();
    let mut result = EventBatchResult::default();
    for event in batch.events {
        if known.contains(&event.id) {
            result.duplicates += 1;
        } else {
            result.accepted += 1;
            inner.events.push(event);
        }
    }
    Json(result).into_response()
}

async fn heartbeat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(heartbeat): Json<Heartbeat>,
) -> Response {
    if !authorized(&shared, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown agent key",
        );
    }
    shared.lock().heartbeats.push(heartbeat);
    Json(HeartbeatAck {
        heartbeat_interval_seconds: 30,
        key: None,
    })
    .into_response()
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(&format!("{API_PREFIX}/desired"), get(desired))
        .route(
            &format!("{API_PREFIX}/deployment-objects/{{id}}"),
            get(deployment_object),
        )
        .route(&format!("{API_PREFIX}/events"), post(events))
        .route(&format!("{API_PREFIX}/heartbeat"), post(heartbeat))
        .with_state(shared)
}

impl FakeHub {
    pub async fn start() -> FakeHub {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                key: KEY.into(),
                version: 1,
                ..Inner::default()
            }),
            version: watch::channel(1).0,
            stopping: watch::channel(false).0,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut hub = FakeHub {
            addr,
            shared,
            server: None,
        };
        hub.serve(listener);
        hub
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        self.shared.stopping.send_replace(false);
        let mut stopping = self.shared.stopping.subscribe();
        let app = router(self.shared.clone());
        self.server = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopping.wait_for(|s| *s).await;
                })
                .await;
        }));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving: connections are refused until [`FakeHub::restart`].
    pub async fn stop(&mut self) {
        self.shared.stopping.send_replace(true);
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
    }

    /// Serves again on the same address.
    pub async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn bump(&self, inner: &mut Inner) {
        inner.version += 1;
        self.shared.version.send_replace(inner.version);
    }

    /// Publishes a new deployment object for the stack and returns its id.
    pub fn publish(&self, stack_id: Uuid, yaml: &str) -> Uuid {
        self.publish_object(stack_id, yaml, false)
    }

    /// Publishes the stack's deletion marker and returns its id.
    pub fn publish_deletion(&self, stack_id: Uuid) -> Uuid {
        self.publish_object(stack_id, "", true)
    }

    /// Publishes a deployment object (a deletion marker when `deletion`) and returns its id.
    pub fn publish_object(&self, stack_id: Uuid, yaml: &str, deletion: bool) -> Uuid {
        let mut inner = self.shared.lock();
        inner.sequence += 1;
        let sequence = inner.sequence;
        let id = Uuid::now_v7();
        let checksum = format!("sha256-{sequence}");
        inner.objects.insert(
            id,
            DeploymentObject {
                id,
                stack_id,
                sequence,
                checksum: checksum.clone(),
                deletion,
                yaml: yaml.into(),
            },
        );
        let stack = DesiredStack {
            stack_id,
            stack_name: format!("tests/{stack_id}"),
            deployment_object_id: id,
            sequence,
            checksum,
            deletion,
            object: None,
        };
        inner.stacks.insert(stack_id, stack);
        self.bump(&mut inner);
        id
    }

    /// Takes the stack out of the desired set.
    pub fn untarget(&self, stack_id: Uuid) {
        let mut inner = self.shared.lock();
        inner.stacks.remove(&stack_id);
        self.bump(&mut inner);
    }

    pub fn deployment_object(&self, id: Uuid) -> DeploymentObject {
        self.shared.lock().objects[&id].clone()
    }

    /// Whether answers from now on carry deployment objects inline.
    pub fn inline_objects(&self, inline: Inline) {
        self.shared.lock().inline = inline;
    }

    pub fn set_key(&self, key: &str) {
        self.shared.lock().key = key.into();
    }

    pub fn refuse_event_posts(&self, count: u32) {
        self.shared.lock().refuse_event_posts = count;
    }

    pub fn cursor(&self) -> String {
        cursor_of(self.shared.lock().version)
    }

    pub fn events(&self) -> Vec<AgentEvent> {
        self.shared.lock().events.clone()
    }

    pub fn events_for(&self, deployment_object_id: Uuid) -> Vec<AgentEvent> {
        self.events()
            .into_iter()
            .filter(|e| e.deployment_object_id == deployment_object_id)
            .collect()
    }

    pub fn event_posts(&self) -> Vec<Vec<Uuid>> {
        self.shared.lock().event_posts.clone()
    }

    pub fn heartbeats(&self) -> Vec<Heartbeat> {
        self.shared.lock().heartbeats.clone()
    }

    pub fn desired_requests(&self) -> Vec<DesiredRequest> {
        self.shared.lock().desired_requests.clone()
    }

    pub fn object_fetches(&self) -> Vec<Uuid> {
        self.shared.lock().object_fetches.clone()
    }

    pub fn unauthorized_requests(&self) -> u64 {
        self.shared.lock().unauthorized
    }

    /// Waits for an accepted event about `deployment_object_id` of `event_type` and returns it.
    pub async fn wait_for_event(
        &self,
        deployment_object_id: Uuid,
        event_type: EventType,
        status: EventStatus,
    ) -> AgentEvent {
        let what = format!(
            "a {} {} event for {deployment_object_id}",
            event_type.as_str(),
            status.as_str()
        );
        eventually_within(PATIENCE, &what, || async {
            self.events_for(deployment_object_id)
                .into_iter()
                .find(|e| e.event_type == event_type && e.status == status)
        })
        .await
    }

    /// Waits for a `Health` event about `deployment_object_id` whose message starts with
    /// `health` (e.g. `healthy`).
    pub async fn wait_for_health(&self, deployment_object_id: Uuid, health: &str) -> AgentEvent {
        let what = format!("a Health event '{health}' for {deployment_object_id}");
        eventually_within(PATIENCE, &what, || async {
            self.events_for(deployment_object_id).into_iter().find(|e| {
                e.event_type == EventType::Health
                    && e.message
                        .as_deref()
                        .is_some_and(|m| m.starts_with(&format!("{health}:")) || m == health)
            })
        })
        .await
    }
}

/// A config for tests: a unique agent name, the metrics server on a free port, and short
/// timings.
pub fn config(hub: &FakeHub) -> Config {
    let mut config = Config::new(
        &hub.url(),
        AgentKey::new(KEY).unwrap(),
        &unique_name("agent-"),
    )
    .unwrap();
    config.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.heartbeat_interval = Duration::from_millis(300);
    config.resync_interval = Duration::from_secs(60);
    config.health_interval = Duration::from_millis(500);
    config.poll_wait = Duration::from_secs(2);
    config.crd_establish_timeout = Duration::from_secs(20);
    config.drift_debounce = Duration::from_millis(200);
    config.hub_backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
    config.retry_backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
    config
}

/// [`config`] with the agent's inventories in the test's namespace.
pub fn config_in(hub: &FakeHub, cluster: &TestCluster) -> Config {
    let mut config = config(hub);
    config.namespace = Some(cluster.namespace.clone());
    config
}

/// The stack's inventory as the agent recorded it in the test's namespace, if any.
pub async fn inventory_of(cluster: &TestCluster, stack: Uuid) -> Option<Inventory> {
    let config_maps: kube::Api<ConfigMap> = cluster.api();
    let config_map = config_maps
        .get_opt(&inventory::name_of(stack))
        .await
        .unwrap()?;
    let json = config_map.data.unwrap_or_default()[inventory::DATA_KEY].clone();
    Some(Inventory::from_json(&json).unwrap())
}

/// The deployment-object YAML of `documents` with the hub's policy line first.
pub fn with_policy(policy: &StackPolicy, documents: &[String]) -> String {
    format!("{}{}", policy.header().unwrap_or_default(), join(documents))
}

pub async fn start_agent(config: Config, client: Client) -> AgentHandle {
    brokkr_agent::start(config, client).await.unwrap()
}

/// A plain HTTP GET against the agent's metrics server.
pub async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

// Manifests.

pub fn namespace_yaml(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
}

pub fn config_map_yaml(name: &str, namespace: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    app: shop\ndata:\n  mode: {value}\n"
    )
}

/// A unique API group for a test's CRD.
pub fn unique_group() -> String {
    format!("{}.brokkr.test", unique_name("w"))
}

/// A namespaced `Widget` kind whose `spec.size` must be an integer.
pub fn widget_crd_yaml(group: &str) -> String {
    format!(
        r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.{group}
spec:
  group: {group}
  scope: Namespaced
  names:
    kind: Widget
    plural: widgets
    singular: widget
    listKind: WidgetList
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size:
                type: integer
"#
    )
}

/// `size` is written as is: `3` is valid, `big` is not.
pub fn widget_yaml(group: &str, name: &str, namespace: &str, size: &str) -> String {
    format!(
        "apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  size: {size}\n"
    )
}

pub fn join(documents: &[String]) -> String {
    documents.join("---\n")
}
