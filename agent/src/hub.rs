//! The HTTP client of the hub's agent API (`/api/v1/agent/*`), with typed errors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brokkr_crds::wire::{
    API_PREFIX, ApiError, DeploymentObject, DesiredState, EventBatch, EventBatchResult, Heartbeat,
    HeartbeatAck, KeyLifetime, MAX_WAIT_SECONDS, RotatedKey,
};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::config::AgentKey;

/// Time allowed for a request beyond its long-poll wait.
const REQUEST_SLACK: Duration = Duration::from_secs(30);

/// Longest pause a `Retry-After` can impose, so a misconfigured proxy cannot silence the
/// agent (and have it marked Offline) for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Which hub endpoint a request went to; a label of the hub error metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Desired,
    DeploymentObject,
    Events,
    Heartbeat,
    Key,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Desired => "desired",
            Endpoint::DeploymentObject => "deployment_object",
            Endpoint::Events => "events",
            Endpoint::Heartbeat => "heartbeat",
            Endpoint::Key => "key",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("failed to reach the hub at {endpoint}")]
    Transport {
        endpoint: &'static str,
        source: reqwest::Error,
    },
    /// The hub answered with an error status; `error`/`message` are from its JSON body when it
    /// had one.
    #[error("the hub answered {status} at {endpoint}: {error}: {message}")]
    Status {
        endpoint: &'static str,
        status: StatusCode,
        error: String,
        message: String,
        /// The hub's `Retry-After` (429, 503), capped at [`MAX_RETRY_AFTER`].
        retry_after: Option<Duration>,
    },
    #[error("failed to decode the hub's answer at {endpoint}")]
    Decode {
        endpoint: &'static str,
        source: reqwest::Error,
    },
    #[error("failed to build the HTTP client")]
    Build { source: reqwest::Error },
    #[error("the hub CA file holds no PEM certificate")]
    NoCertificates,
}

impl HubError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HubError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// How long the hub asked to wait before the next request of this kind. The client
    /// itself holds that request back, so callers need not.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            HubError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The key was refused, or the agent is suspended or deleted (401/403).
    pub fn is_auth(&self) -> bool {
        matches!(
            self.status(),
            Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
        )
    }
}

/// The requests and answers of the hub's agent API for any agent: each request carries the
/// key it is sent with. It keeps no state of its own, so one serves many agents (the bench's
/// simulated fleet shares a few); [`HubClient`] adds one agent's key and the pauses the hub
/// asks for. A `Retry-After` is read into [`HubError::Status`] but not acted on here.
#[derive(Clone, Debug)]
pub struct AgentApi {
    http: reqwest::Client,
    base: String,
}

impl AgentApi {
    /// `http` is the transport (its connection and TLS settings are the caller's); `base` is
    /// the hub's URL, a trailing slash allowed.
    pub fn new(http: reqwest::Client, base: &str) -> AgentApi {
        AgentApi {
            http,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{API_PREFIX}/{path}", self.base)
    }

    /// The desired state; with `since`, waits up to `wait` for it to differ from that cursor.
    pub async fn desired(
        &self,
        key: &str,
        since: Option<&str>,
        wait: Duration,
    ) -> Result<DesiredState, HubError> {
        let wait_seconds = wait.as_secs().min(MAX_WAIT_SECONDS);
        let mut request = self
            .http
            .get(self.url("desired"))
            .timeout(Duration::from_secs(wait_seconds) + REQUEST_SLACK);
        if let Some(since) = since {
            request = request.query(&[("since", since), ("wait", &wait_seconds.to_string())]);
        }
        send(Endpoint::Desired, key, request).await
    }

    pub async fn deployment_object(
        &self,
        key: &str,
        id: Uuid,
    ) -> Result<DeploymentObject, HubError> {
        let request = self
            .http
            .get(self.url(&format!("deployment-objects/{id}")))
            .timeout(REQUEST_SLACK);
        send(Endpoint::DeploymentObject, key, request).await
    }

    pub async fn post_events(
        &self,
        key: &str,
        batch: &EventBatch,
    ) -> Result<EventBatchResult, HubError> {
        let request = self
            .http
            .post(self.url("events"))
            .timeout(REQUEST_SLACK)
            .json(batch);
        send(Endpoint::Events, key, request).await
    }

    pub async fn heartbeat(
        &self,
        key: &str,
        heartbeat: &Heartbeat,
    ) -> Result<HeartbeatAck, HubError> {
        let request = self
            .http
            .post(self.url("heartbeat"))
            .timeout(REQUEST_SLACK)
            .json(heartbeat);
        send(Endpoint::Heartbeat, key, request).await
    }

    /// A new key for the agent holding `key`; `key` stays valid for the Agent's
    /// `keyPolicy.overlap`.
    pub async fn rotate_key(&self, key: &str) -> Result<RotatedKey, HubError> {
        let request = self.http.post(self.url("key")).timeout(REQUEST_SLACK);
        send(Endpoint::Key, key, request).await
    }
}

/// Sends `request` with `key`; a success decodes as `T`, an error status becomes
/// [`HubError::Status`] with the hub's `{error, message}` and `Retry-After`.
async fn send<T: DeserializeOwned>(
    endpoint: Endpoint,
    key: &str,
    request: reqwest::RequestBuilder,
) -> Result<T, HubError> {
    let endpoint = endpoint.as_str();
    let response = request
        .bearer_auth(key)
        .send()
        .await
        .map_err(|source| HubError::Transport { endpoint, source })?;
    let status = response.status();
    if status.is_success() {
        return response
            .json::<T>()
            .await
            .map_err(|source| HubError::Decode { endpoint, source });
    }
    let retry_after = match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            retry_after(response.headers())
        }
        _ => None,
    };
    // A body that is not an ApiError (a proxy's HTML page, say) is not repeated: only its
    // status counts.
    let body = response.bytes().await.unwrap_or_default();
    let (error, message) = match serde_json::from_slice::<ApiError>(&body) {
        Ok(api) => (api.error, api.message),
        Err(_) => (
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_lowercase()
                .replace(' ', "_"),
            "no error details".to_owned(),
        ),
    };
    Err(HubError::Status {
        endpoint,
        status,
        error,
        message,
        retry_after,
    })
}

/// A client of one hub, authenticating as one agent. Clones share the pauses the hub asked
/// for with `Retry-After`: after one, the next request of that kind (desired state,
/// deployment object, events or heartbeat) waits until it has passed, whichever task sends
/// it. Clones also share the key: after [`HubClient::use_key`] every request of every task
/// carries the new one (requests already sent finish with the old one, which the hub
/// still accepts during the overlap).
#[derive(Clone, Debug)]
pub struct HubClient {
    api: AgentApi,
    key: Arc<Mutex<AgentKey>>,
    /// The key's issue and expiry times, as the last heartbeat answer gave them.
    key_lifetime: Arc<Mutex<Option<KeyLifetime>>>,
    paused: Arc<Mutex<HashMap<Endpoint, tokio::time::Instant>>>,
}

impl HubClient {
    /// `base` is the hub's URL without a trailing slash (as [`crate::Config`] holds it);
    /// `ca_pem` adds CA certificates to trust for it.
    pub fn new(base: &str, key: AgentKey, ca_pem: Option<&[u8]>) -> Result<HubClient, HubError> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("brokkr-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10));
        if let Some(pem) = ca_pem {
            let certificates = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|source| HubError::Build { source })?;
            if certificates.is_empty() {
                return Err(HubError::NoCertificates);
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder
            .build()
            .map_err(|source| HubError::Build { source })?;
        Ok(HubClient {
            api: AgentApi::new(http, base),
            key: Arc::new(Mutex::new(key)),
            key_lifetime: Arc::default(),
            paused: Arc::default(),
        })
    }

    /// The key requests are sent with now.
    pub fn key(&self) -> AgentKey {
        lock(&self.key).clone()
    }

    /// Sends every later request with `key`, whose times are `lifetime`.
    pub fn use_key(&self, key: AgentKey, lifetime: Option<KeyLifetime>) {
        *lock(&self.key) = key;
        *lock(&self.key_lifetime) = lifetime;
    }

    /// The current key's issue and expiry times, once a heartbeat answer gave them (hubs
    /// that predate key lifetimes never do).
    pub fn key_lifetime(&self) -> Option<KeyLifetime> {
        lock(&self.key_lifetime).clone()
    }

    /// A new key from the hub, for the key requests are sent with now. It is not used
    /// until [`HubClient::use_key`].
    pub async fn rotate_key(&self) -> Result<RotatedKey, HubError> {
        self.wait_if_paused(Endpoint::Key).await;
        let answer = self.api.rotate_key(self.key().expose()).await;
        self.honour(Endpoint::Key, answer)
    }

    #[cfg(test)]
    fn url(&self, path: &str) -> String {
        self.api.url(path)
    }

    /// The desired state; with `since`, waits up to `wait` for it to differ from that cursor.
    pub async fn desired(
        &self,
        since: Option<&str>,
        wait: Duration,
    ) -> Result<DesiredState, HubError> {
        self.wait_if_paused(Endpoint::Desired).await;
        let answer = self.api.desired(self.key().expose(), since, wait).await;
        self.honour(Endpoint::Desired, answer)
    }

    pub async fn deployment_object(&self, id: Uuid) -> Result<DeploymentObject, HubError> {
        self.wait_if_paused(Endpoint::DeploymentObject).await;
        let answer = self.api.deployment_object(self.key().expose(), id).await;
        self.honour(Endpoint::DeploymentObject, answer)
    }

    pub async fn post_events(&self, batch: &EventBatch) -> Result<EventBatchResult, HubError> {
        self.wait_if_paused(Endpoint::Events).await;
        let answer = self.api.post_events(self.key().expose(), batch).await;
        self.honour(Endpoint::Events, answer)
    }

    pub async fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<HeartbeatAck, HubError> {
        self.wait_if_paused(Endpoint::Heartbeat).await;
        let key = self.key();
        let answer = self.api.heartbeat(key.expose(), heartbeat).await;
        if let Ok(HeartbeatAck {
            key: Some(lifetime),
            ..
        }) = &answer
        {
            // Only if the key was not replaced meanwhile: the answer is about the key sent.
            let current = lock(&self.key);
            if *current == key {
                *lock(&self.key_lifetime) = Some(lifetime.clone());
            }
        }
        self.honour(Endpoint::Heartbeat, answer)
    }

    /// Holds the next request of `endpoint`'s kind back when the hub answered with a
    /// `Retry-After` (plus jitter).
    fn honour<T>(&self, endpoint: Endpoint, answer: Result<T, HubError>) -> Result<T, HubError> {
        if let Err(HubError::Status {
            status,
            retry_after: Some(wait),
            ..
        }) = &answer
        {
            let wait = jittered(*wait, rand::random::<f64>());
            tracing::info!(endpoint = endpoint.as_str(), %status, wait = ?wait, "the hub asked to wait before the next request of this kind");
            self.pause(endpoint, wait);
        }
        answer
    }

    fn paused(&self) -> std::sync::MutexGuard<'_, HashMap<Endpoint, tokio::time::Instant>> {
        lock(&self.paused)
    }

    fn pause(&self, endpoint: Endpoint, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        let mut paused = self.paused();
        let entry = paused.entry(endpoint).or_insert(until);
        *entry = (*entry).max(until);
    }

    async fn wait_if_paused(&self, endpoint: Endpoint) {
        let until = self.paused().get(&endpoint).copied();
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
            let mut paused = self.paused();
            if paused
                .get(&endpoint)
                .is_some_and(|u| *u <= tokio::time::Instant::now())
            {
                paused.remove(&endpoint);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A `Retry-After` in seconds (the form the hub sends), capped at [`MAX_RETRY_AFTER`]. An
/// HTTP date is not understood and leaves the caller's own backoff in charge.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// `wait` plus up to a quarter more, for a random `unit` in `[0, 1)`, so agents told the
/// same thing at once do not come back at once; never less than `wait`, never past the cap.
fn jittered(wait: Duration, unit: f64) -> Duration {
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    (wait + wait.mul_f64(unit / 4.0)).min(MAX_RETRY_AFTER.max(wait))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AgentKey {
        AgentKey::new("brokkr_p_s").unwrap()
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        assert!(HubClient::new("https://hub", key(), None).is_ok());
        assert!(matches!(
            HubClient::new("https://hub", key(), Some(b"not a certificate")),
            Err(HubError::NoCertificates | HubError::Build { .. })
        ));
    }

    #[test]
    fn urls_are_under_the_agent_api_prefix() {
        let hub = HubClient::new("https://hub.example.com/brokkr/", key(), None).unwrap();
        assert_eq!(
            hub.url("desired"),
            "https://hub.example.com/brokkr/api/v1/agent/desired"
        );
    }

    #[test]
    fn only_401_and_403_are_key_problems() {
        let status = |status| HubError::Status {
            endpoint: "desired",
            status,
            error: String::new(),
            message: String::new(),
            retry_after: None,
        };
        assert!(status(StatusCode::UNAUTHORIZED).is_auth());
        assert!(status(StatusCode::FORBIDDEN).is_auth());
        assert!(!status(StatusCode::SERVICE_UNAVAILABLE).is_auth());
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, value.parse().unwrap());
            headers
        };
        assert_eq!(retry_after(&headers("3")), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(&headers(" 0 ")), Some(Duration::ZERO));
        assert_eq!(retry_after(&headers("86400")), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&headers("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
        let three = Duration::from_secs(3);
        assert_eq!(jittered(three, 0.0), three);
        assert_eq!(jittered(three, 1.0), Duration::from_millis(3750));
        assert_eq!(jittered(three, f64::NAN), three);
        assert_eq!(jittered(MAX_RETRY_AFTER, 1.0), MAX_RETRY_AFTER);
    }

    /// A hub that answers the first heartbeat 429 with `Retry-After: 2`, and records when
    /// each request arrived.
    async fn limiting_hub() -> (String, Arc<Mutex<Vec<(String, std::time::Instant)>>>) {
        use axum::Json;
        use axum::http::HeaderValue;
        use axum::response::IntoResponse;
        use axum::routing::{get, post};

        let seen: Arc<Mutex<Vec<(String, std::time::Instant)>>> = Arc::default();
        let record = |seen: &Arc<Mutex<Vec<_>>>, what: &str| {
            let mut seen = seen.lock().unwrap();
            seen.push((what.to_owned(), std::time::Instant::now()));
            seen.iter().filter(|(w, _)| w == what).count()
        };
        let app = axum::Router::new()
            .route(
                "/api/v1/agent/heartbeat",
                post({
                    let seen = seen.clone();
                    move || async move {
                        if record(&seen, "heartbeat") == 1 {
                            let body = ApiError {
                                error: "too_many_requests".into(),
                                message: "slow down".into(),
                            };
                            let mut response =
                                (axum::http::StatusCode::TOO_MANY_REQUESTS, Json(body))
                                    .into_response();
                            response
                                .headers_mut()
                                .insert("retry-after", HeaderValue::from_static("2"));
                            return response;
                        }
                        Json(HeartbeatAck {
                            heartbeat_interval_seconds: 15,
                            key: None,
                        })
                        .into_response()
                    }
                }),
            )
            .route(
                "/api/v1/agent/desired",
                get({
                    let seen = seen.clone();
                    move || async move {
                        record(&seen, "desired");
                        Json(DesiredState {
                            cursor: "0.0000000000000000".into(),
                            stacks: vec![],
                        })
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), seen)
    }

    #[tokio::test]
    async fn after_a_429_the_next_request_of_that_kind_waits_for_retry_after() {
        let (url, seen) = limiting_hub().await;
        let hub = HubClient::new(&url, key(), None).unwrap();
        let beat = Heartbeat::default();

        let refused = hub.heartbeat(&beat).await.unwrap_err();
        assert_eq!(refused.status(), Some(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(refused.retry_after(), Some(Duration::from_secs(2)));

        // Another kind of request is not held back.
        let started = std::time::Instant::now();
        hub.desired(None, Duration::ZERO).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));

        // The next heartbeat, sent at once by a clone (as another task would), reaches the
        // hub only once the two seconds have passed.
        hub.clone().heartbeat(&beat).await.unwrap();
        let seen = seen.lock().unwrap();
        let beats: Vec<_> = seen
            .iter()
            .filter(|(what, _)| what == "heartbeat")
            .map(|(_, at)| *at)
            .collect();
        assert_eq!(beats.len(), 2);
        let gap = beats[1] - beats[0];
        assert!(
            gap >= Duration::from_secs(2) && gap < Duration::from_secs(4),
            "the second heartbeat came {gap:?} after the 429"
        );
    }
}
