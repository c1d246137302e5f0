//! The agent API (`/api/v1/agent/*`): agents pull their desired state (long-poll),
//! fetch deployment objects, and report events and heartbeats. The protocol's bodies
//! are `brokkr_crds::wire`.

mod auth;
mod auth_failures;
mod batch;
pub mod changes;
mod error;
pub mod generator;
mod heartbeats;
mod inline;
mod key_lifecycle;
mod limits;
mod objects;
mod openapi;
mod serve;
mod views;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use brokkr_crds::wire::{
    self, AgentEvent, DeploymentObject, DesiredStack, EventBatch, EventBatchResult, Heartbeat,
    HeartbeatAck, MAX_EVENTS_PER_BATCH, MAX_WAIT_SECONDS,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use uuid::Uuid;

pub use auth::{AuthCache, Authenticated, AuthenticatedAgent, PresentedKey, authenticate};
pub use changes::{Change, ChangeFeed};
pub use error::ApiError;
pub use key_lifecycle::{ClusterAccess, KEY_USE_RESOLUTION};
pub use limits::RateLimit;
pub use serve::{ServeLimits, serve};

use crate::metrics::ApiMetrics;
use crate::store::{DesiredEntry, EventReport, KeyHolder, Store, StoreError, check_agent_version};
use auth::AuthLimits;
use batch::BatchLoader;
use heartbeats::Heartbeats;
use objects::{CachedObject, ObjectCache};
use views::AgentView;

/// Largest request body the API reads.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Memory for deployment objects' response bodies, shared by every agent fetching them.
pub const OBJECT_CACHE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Interval at which agents are told to send heartbeats.
    pub heartbeat_interval: Duration,
    /// Longest long-poll granted (the `wait` parameter is cut to it).
    pub max_wait: Duration,
    /// Deadline of every request but the long-poll, which gets `max_wait` more.
    pub request_timeout: Duration,
    /// Requests of one agent key (after authentication), answered 429 beyond.
    pub key_rate: RateLimit,
    /// Database lookups of key prefixes that turn out unknown; beyond it, requests with
    /// uncached keys are answered 429 without a query.
    pub unknown_key_rate: RateLimit,
    /// Deployment objects whose JSON is at most this many bytes travel inside the
    /// desired-state answer (`DesiredStack.object`), sparing agents the fetch; larger ones
    /// are fetched. 0 inlines none.
    pub inline_object_max_bytes: usize,
}

/// Objects up to 64 KiB inline: most Stacks, and still a small answer.
pub const DEFAULT_INLINE_OBJECT_MAX_BYTES: usize = 64 * 1024;

/// Per agent key: far above what an agent does (one long-poll a minute, a heartbeat every
/// 15 s, a fetch per changed stack and an event batch per change: well under one request a
/// second), so only a runaway or stolen key meets it. `--api-key-rate`/`--api-key-burst`
/// change it.
pub const DEFAULT_KEY_RATE: RateLimit = RateLimit::new(50.0, 500);

/// Lookups of unknown keys: a restart's worth of mistyped keys, not a flood.
pub const DEFAULT_UNKNOWN_KEY_RATE: RateLimit = RateLimit::new(10.0, 100);

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            heartbeat_interval: Duration::from_secs(15),
            max_wait: Duration::from_secs(MAX_WAIT_SECONDS),
            request_timeout: Duration::from_secs(30),
            key_rate: DEFAULT_KEY_RATE,
            unknown_key_rate: DEFAULT_UNKNOWN_KEY_RATE,
            inline_object_max_bytes: DEFAULT_INLINE_OBJECT_MAX_BYTES,
        }
    }
}

#[derive(Clone)]
pub struct ApiState {
    store: Store,
    changes: ChangeFeed,
    objects: Arc<ObjectCache>,
    heartbeats: Arc<Heartbeats>,
    config: Arc<ApiConfig>,
    limits: Arc<AuthLimits>,
    key_use: Arc<key_lifecycle::KeyUse>,
    lookups: FirstLookups,
    auth_failures: Arc<auth_failures::AuthFailures>,
    /// Without it, agents cannot renew their keys here and the generator API cannot
    /// apply Stacks (501).
    cluster_access: Option<Arc<ClusterAccess>>,
    metrics: ApiMetrics,
    /// Becomes `true` when the hub stops: parked long-polls answer at once, so their agents
    /// ask again (another replica, or this hub once restarted) instead of waiting out the
    /// shutdown's grace period.
    stopping: watch::Receiver<bool>,
}

impl ApiState {
    /// `changes` must be listening (see [`ChangeFeed::listen`]) for long-polls to wake.
    pub fn new(store: Store, changes: ChangeFeed, config: ApiConfig) -> ApiState {
        let metrics = ApiMetrics::default();
        ApiState {
            lookups: FirstLookups::new(&store, &metrics),
            store,
            changes,
            objects: Arc::new(ObjectCache::new(OBJECT_CACHE_BYTES)),
            heartbeats: Arc::default(),
            limits: Arc::new(AuthLimits::new(config.key_rate, config.unknown_key_rate)),
            key_use: Arc::default(),
            auth_failures: Arc::default(),
            cluster_access: None,
            config: Arc::new(config),
            metrics,
            stopping: watch::channel(false).1,
        }
    }

    /// Answers parked long-polls as soon as `stopping` is `true`.
    pub fn with_shutdown(mut self, stopping: watch::Receiver<bool>) -> ApiState {
        self.stopping = stopping;
        self
    }

    /// Lets agents renew their keys (`POST /api/v1/agent/key`: the Agent resources and the
    /// key Secrets in the operator's namespace) and generators push Stacks
    /// (`/api/v1/generator/*`), with `access.client`.
    pub fn with_cluster_access(mut self, access: ClusterAccess) -> ApiState {
        self.cluster_access = Some(Arc::new(access));
        self
    }

    /// Records the API's limits into `metrics` (by default, into a registry of its own).
    pub fn with_metrics(mut self, metrics: ApiMetrics) -> ApiState {
        self.heartbeats = Arc::new(Heartbeats::counting_drops_in(
            metrics.heartbeats_dropped.clone(),
        ));
        self.lookups = FirstLookups::new(&self.store, &metrics);
        self.metrics = metrics;
        self
    }
}

/// The agent API's router.
pub fn app(state: ApiState) -> Router {
    let long_poll_deadline = state.config.max_wait + state.config.request_timeout;
    let long_poll = Router::new()
        .route("/desired", get(desired))
        .layer(middleware::from_fn_with_state(long_poll_deadline, deadline));
    let requests = Router::new()
        .route("/deployment-objects/{id}", get(deployment_object))
        .route("/events", post(events))
        .route("/heartbeat", post(heartbeat))
        .route("/key", post(key_lifecycle::rotate))
        .layer(middleware::from_fn_with_state(
            state.config.request_timeout,
            deadline,
        ));
    Router::new()
        .nest(wire::API_PREFIX, long_poll.merge(requests))
        .nest(
            "/api/v1/generator",
            generator::routes().layer(DefaultBodyLimit::max(generator::PUSH_BODY_LIMIT)),
        )
        .route("/api/v1/openapi.json", get(openapi::document))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this endpoint does not take that method".into())
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn deadline(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// Locks `mutex`, also after a panic elsewhere: the caches it guards stay consistent
/// between statements, so a poisoned lock holds nothing half-written.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `axum::Json` whose rejections are [`ApiError`]s, so bad bodies get our JSON shape.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<T>::from_request(request, state).await?;
        Ok(ApiJson(value))
    }
}

#[derive(Debug, Deserialize)]
struct DesiredQuery {
    since: Option<String>,
    wait: Option<u64>,
}

/// An agent's cursor: the highest sequence it has seen, and a digest of its set.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cursor {
    sequence: i64,
    digest: String,
}

impl Cursor {
    fn parse(text: &str) -> Result<Cursor, ApiError> {
        let malformed = || {
            ApiError::BadRequest(format!(
                "malformed cursor {text:?}; send back the cursor the hub gave"
            ))
        };
        let (sequence, digest) = text.split_once('.').ok_or_else(malformed)?;
        let sequence = sequence.parse().map_err(|_| malformed())?;
        if digest.len() != 16 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        Ok(Cursor {
            sequence,
            digest: digest.to_owned(),
        })
    }

    fn of(stacks: &[DesiredStack], sequence: i64) -> Cursor {
        let mut hasher = Sha256::new();
        for stack in stacks {
            hasher.update(stack.stack_id.as_bytes());
            hasher.update(stack.deployment_object_id.as_bytes());
        }
        let digest = hex::encode(&hasher.finalize()[..8]);
        Cursor { sequence, digest }
    }

    fn text(&self) -> String {
        format!("{}.{}", self.sequence, self.digest)
    }
}

async fn desired(
    agent: AuthenticatedAgent,
    State(state): State<ApiState>,
    query: Result<Query<DesiredQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let since = query.since.as_deref().map(Cursor::parse).transpose()?;
    let since_sequence = since.as_ref().map_or(0, |c| c.sequence);
    let wait = Duration::from_secs(query.wait.unwrap_or(0)).min(state.config.max_wait);
    let mut deadline = tokio::time::Instant::now() + wait;
    let mut stopping = state.stopping.clone();
    // Subscribe before reading, so a change between the read and the wait is not lost.
    let mut wake = state.changes.views().subscribe(agent.id);
    loop {
        let view = current_view(&state, agent.id, since_sequence).await?;
        let (stacks, max_sequence) = view.answer(since_sequence);
        let cursor = Cursor::of(&stacks, max_sequence);
        if since.as_ref() != Some(&cursor) || tokio::time::Instant::now() >= deadline {
            let body = inline::desired_body(&state, &cursor.text(), &stacks, since_sequence).await;
            return Ok(inline::into_response(body));
        }
        // Parked with only the cursor and the subscription held.
        drop((view, stacks));
        tokio::select! {
            woken = wake.changed() => {
                if woken.is_err() {
                    // The view was dropped with its sender: subscribe anew and re-read.
                    wake = state.changes.views().subscribe(agent.id);
                }
            }
            _ = tokio::time::sleep_until(deadline) => {}
            // Without a sender (no shutdown wired) the branch is disabled.
            Ok(_) = stopping.wait_for(|stopping| *stopping) => {
                deadline = tokio::time::Instant::now();
            }
        }
    }
}

/// The agent's desired state: the view the change feed keeps, or a query (batched with
/// the other agents' asked for meanwhile).
async fn current_view(
    state: &ApiState,
    agent_id: Uuid,
    since_sequence: i64,
) -> Result<Arc<AgentView>, ApiError> {
    let views = state.changes.views();
    if let Some(view) = views.get(agent_id, since_sequence) {
        return Ok(view);
    }
    let generation = views.generation(agent_id);
    let entries = state
        .lookups
        .desired_states
        .load(agent_id)
        .await?
        .unwrap_or_default();
    let view = Arc::new(AgentView::new(since_sequence, entries));
    views.remember(agent_id, generation, view.clone());
    Ok(view)
}

/// First-time lookups of keys and of agents' desired states, in batches (see [`batch`]).
#[derive(Clone)]
struct FirstLookups {
    key_holders: BatchLoader<String, KeyHolder>,
    desired_states: BatchLoader<Uuid, Vec<DesiredEntry>>,
}

/// Key prefixes, and agents whose desired states, are looked up in one query.
const KEY_LOOKUP_BATCH: usize = 1000;
const DESIRED_STATE_BATCH: usize = 500;

impl FirstLookups {
    fn new(store: &Store, metrics: &ApiMetrics) -> FirstLookups {
        let (keys_store, desired_store) = (store.clone(), store.clone());
        FirstLookups {
            key_holders: BatchLoader::new(
                KEY_LOOKUP_BATCH,
                metrics.lookup_queries_of("keys"),
                move |prefixes: Vec<String>| {
                    let store = keys_store.clone();
                    async move { store.find_key_holders(&prefixes).await }
                },
            ),
            desired_states: BatchLoader::new(
                DESIRED_STATE_BATCH,
                metrics.lookup_queries_of("desired_states"),
                move |agent_ids: Vec<Uuid>| {
                    let store = desired_store.clone();
                    async move { store.desired_for_agents(&agent_ids).await }
                },
            ),
        }
    }
}

async fn deployment_object(
    agent: AuthenticatedAgent,
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a deployment object id")))?;
    // The same answer whether the object does not exist or is someone else's.
    let not_targeted = || {
        ApiError::NotFound(format!(
            "deployment object {id} is not targeted at this agent"
        ))
    };
    let object = state
        .objects
        .get_or_load(id, || load_object(&state.store, id))
        .await
        .map_err(|err| match Arc::try_unwrap(err) {
            Ok(err) => ApiError::from(err),
            // Shared by the requests that waited for one load: the database failed.
            Err(shared) => ApiError::Unavailable(Box::new(shared)),
        })?
        .ok_or_else(not_targeted)?;
    let targeted = state.changes.views().holds(agent.id, object.stack_id)
        || state.store.is_targeted(agent.id, object.stack_id).await?;
    if !targeted {
        return Err(not_targeted());
    }
    Ok(([(CONTENT_TYPE, "application/json")], object.body).into_response())
}

async fn load_object(store: &Store, id: Uuid) -> Result<Option<CachedObject>, StoreError> {
    let Some(object) = store.deployment_object(id).await? else {
        return Ok(None);
    };
    let body = serde_json::to_vec(&DeploymentObject {
        id: object.id,
        stack_id: object.stack_id,
        sequence: object.sequence_id,
        checksum: object.yaml_checksum,
        deletion: object.is_deletion_marker,
        yaml: object.yaml_content,
    })
    .expect("a deployment object serialises to JSON");
    Ok(Some(CachedObject {
        stack_id: object.stack_id,
        body: body.into(),
    }))
}

async fn events(
    agent: AuthenticatedAgent,
    State(state): State<ApiState>,
    ApiJson(batch): ApiJson<EventBatch>,
) -> Result<Json<EventBatchResult>, ApiError> {
    if batch.events.len() > MAX_EVENTS_PER_BATCH {
        return Err(ApiError::Unprocessable(format!(
            "a batch holds at most {MAX_EVENTS_PER_BATCH} events; this one has {}",
            batch.events.len()
        )));
    }
    batch
        .validate()
        .map_err(|err| ApiError::Unprocessable(err.to_string()))?;
    let reports: Vec<EventReport> = batch.events.iter().map(report).collect();
    let recorded = state.store.record_agent_events(agent.id, &reports).await?;
    Ok(Json(EventBatchResult {
        accepted: recorded.inserted,
        duplicates: recorded.duplicates,
    }))
}

fn report(event: &AgentEvent) -> EventReport {
    EventReport {
        id: event.id,
        deployment_object_id: event.deployment_object_id,
        event_type: event.event_type.as_str().to_owned(),
        status: event.status.as_str().to_owned(),
        message: event.message.clone(),
    }
}

async fn heartbeat(
    agent: AuthenticatedAgent,
    State(state): State<ApiState>,
    ApiJson(beat): ApiJson<Heartbeat>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    // Checked here because the write happens later, in a batch that one bad row
    // must not fail.
    beat.validate()
        .map_err(|err| ApiError::Unprocessable(err.to_string()))?;
    check_agent_version(&beat.version)?;
    state.heartbeats.record(&state.store, agent.id, beat.into());
    let key = match (
        crate::status::to_time(agent.key.issued_at),
        crate::status::to_time(agent.key.expires_at),
    ) {
        (Some(issued_at), Some(expires_at)) => Some(wire::KeyLifetime {
            prefix: agent.key.prefix,
            issued_at,
            expires_at,
        }),
        _ => None,
    };
    Ok(Json(HeartbeatAck {
        heartbeat_interval_seconds: state.config.heartbeat_interval.as_secs(),
        key,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_malformed_ones_are_refused() {
        let cursor = Cursor::of(&[], 42);
        assert_eq!(Cursor::parse(&cursor.text()).unwrap(), cursor);
        for bad in [
            "",
            "42",
            "x.0123456789abcdef",
            "42.short",
            "42.0123456789abcdeg",
        ] {
            assert!(
                matches!(Cursor::parse(bad), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
    }
}
