//! The HTTP client of the hub's agent API (`/api/v1/agent/*`), with typed errors.

use std::time::Duration;

use brokkr_crds::wire::{
    API_PREFIX, ApiError, DeploymentObject, DesiredState, EventBatch, EventBatchResult, Heartbeat,
    HeartbeatAck, MAX_WAIT_SECONDS,
};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::config::AgentKey;

/// Time allowed for a request beyond its long-poll wait.
const REQUEST_SLACK: Duration = Duration::from_secs(30);

/// Which hub endpoint a request went to; a label of the hub error metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Desired,
    DeploymentObject,
    Events,
    Heartbeat,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Desired => "desired",
            Endpoint::DeploymentObject => "deployment_object",
            Endpoint::Events => "events",
            Endpoint::Heartbeat => "heartbeat",
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

    /// The key was refused, or the agent is suspended or deleted (401/403).
    pub fn is_auth(&self) -> bool {
        matches!(
            self.status(),
            Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
        )
    }
}

/// A client of one hub, authenticating as one agent.
#[derive(Clone, Debug)]
pub struct HubClient {
    http: reqwest::Client,
    base: String,
    key: AgentKey,
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
            http,
            base: base.trim_end_matches('/').to_owned(),
            key,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{API_PREFIX}/{path}", self.base)
    }

    /// The desired state; with `since`, waits up to `wait` for it to differ from that cursor.
    pub async fn desired(
        &self,
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
        self.send(Endpoint::Desired, request).await
    }

    pub async fn deployment_object(&self, id: Uuid) -> Result<DeploymentObject, HubError> {
        let request = self
            .http
            .get(self.url(&format!("deployment-objects/{id}")))
            .timeout(REQUEST_SLACK);
        self.send(Endpoint::DeploymentObject, request).await
    }

    pub async fn post_events(&self, batch: &EventBatch) -> Result<EventBatchResult, HubError> {
        let request = self
            .http
            .post(self.url("events"))
            .timeout(REQUEST_SLACK)
            .json(batch);
        self.send(Endpoint::Events, request).await
    }

    pub async fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<HeartbeatAck, HubError> {
        let request = self
            .http
            .post(self.url("heartbeat"))
            .timeout(REQUEST_SLACK)
            .json(heartbeat);
        self.send(Endpoint::Heartbeat, request).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        request: reqwest::RequestBuilder,
    ) -> Result<T, HubError> {
        let endpoint = endpoint.as_str();
        let response = request
            .bearer_auth(self.key.expose())
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
        })
    }
}

/// The sources of an error, joined, for logs (the error's own message is logged beside it).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = String::new();
    let mut source = err.source();
    while let Some(cause) = source {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
        };
        assert!(status(StatusCode::UNAUTHORIZED).is_auth());
        assert!(status(StatusCode::FORBIDDEN).is_auth());
        assert!(!status(StatusCode::SERVICE_UNAVAILABLE).is_auth());
    }
}
