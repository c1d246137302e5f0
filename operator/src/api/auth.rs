//! Agents authenticate with their key: `Authorization: Bearer brokkr_<prefix>_<secret>`.
//! The row is found by the public prefix, the hash compared in constant time; results
//! are cached briefly so a fleet of long-polls does not turn into a query each.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use uuid::Uuid;

use super::{ApiError, ApiState};
use crate::keys::{key_matches, key_prefix};

/// The agent a request comes from.
#[derive(Clone, Debug)]
pub struct AuthenticatedAgent {
    pub id: Uuid,
    pub name: String,
}

#[derive(Clone)]
struct CachedAgent {
    id: Uuid,
    name: String,
    pak_hash: String,
    suspended: bool,
    deleted: bool,
    fetched: Instant,
}

/// Recently looked-up agents by key prefix.
pub struct AuthCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, CachedAgent>>,
}

/// Beyond this many cached prefixes the cache starts over, bounding its memory.
const MAX_CACHED: usize = 100_000;

impl AuthCache {
    pub fn new(ttl: Duration) -> AuthCache {
        AuthCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, prefix: &str) -> Option<CachedAgent> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(prefix)
            .filter(|cached| cached.fetched.elapsed() < self.ttl)
            .cloned()
    }

    fn put(&self, prefix: &str, agent: CachedAgent) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_CACHED {
            entries.clear();
        }
        entries.insert(prefix.to_owned(), agent);
    }
}

impl FromRequestParts<ApiState> for AuthenticatedAgent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized("missing Authorization: Bearer <agent key>".into())
        })?;
        let key = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header is not a Bearer token".into())
            })?;
        let prefix =
            key_prefix(key).ok_or_else(|| ApiError::Unauthorized("malformed agent key".into()))?;

        let agent = match state.auth.get(prefix) {
            Some(agent) => agent,
            None => {
                let row = state
                    .store
                    .find_agent_for_key(prefix)
                    .await?
                    .ok_or_else(|| ApiError::Unauthorized("unknown agent key".into()))?;
                let agent = CachedAgent {
                    id: row.id,
                    name: row.name,
                    pak_hash: row.pak_hash.unwrap_or_default(),
                    suspended: row.is_suspended,
                    deleted: row.deleted_at.is_some(),
                    fetched: Instant::now(),
                };
                state.auth.put(prefix, agent.clone());
                agent
            }
        };
        if !key_matches(key, &agent.pak_hash) {
            return Err(ApiError::Unauthorized("unknown agent key".into()));
        }
        if agent.deleted {
            return Err(ApiError::Forbidden(format!(
                "agent {} was deleted; its key is no longer valid",
                agent.name
            )));
        }
        if agent.suspended {
            return Err(ApiError::Forbidden(format!(
                "agent {} is suspended (spec.suspend on its Agent resource)",
                agent.name
            )));
        }
        Ok(AuthenticatedAgent {
            id: agent.id,
            name: agent.name,
        })
    }
}
