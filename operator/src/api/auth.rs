//! Agents authenticate with their key: `Authorization: Bearer brokkr_<prefix>_<secret>`.
//! The row is found by the public prefix, the hash compared in constant time; results
//! are cached so a fleet of long-polls and heartbeats does not turn into a query each.
//! The change feed drops an agent's entry when its key, suspension or deletion changes
//! (on any replica), so the TTL only bounds how long a missed notification can matter.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
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
    inner: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    /// Counts invalidations: a row read before one is not cached.
    generation: u64,
    by_prefix: HashMap<String, CachedAgent>,
}

/// Beyond this many cached prefixes the cache starts over, bounding its memory.
const MAX_CACHED: usize = 100_000;

impl AuthCache {
    pub fn new(ttl: Duration) -> AuthCache {
        AuthCache {
            ttl,
            inner: Mutex::new(Entries::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        super::lock(&self.inner)
    }

    fn get(&self, prefix: &str) -> Option<CachedAgent> {
        self.lock()
            .by_prefix
            .get(prefix)
            .filter(|cached| cached.fetched.elapsed() < self.ttl)
            .cloned()
    }

    /// Stamp to pass to `put`; take it before reading the row.
    fn generation(&self) -> u64 {
        self.lock().generation
    }

    fn put(&self, prefix: &str, agent: CachedAgent, read_at_generation: u64) {
        let mut entries = self.lock();
        if entries.generation != read_at_generation {
            return;
        }
        if entries.by_prefix.len() >= MAX_CACHED {
            entries.by_prefix.clear();
        }
        entries.by_prefix.insert(prefix.to_owned(), agent);
    }

    /// Drops whatever is cached for `agent_id`, under any prefix.
    pub fn forget_agent(&self, agent_id: Uuid) {
        let mut entries = self.lock();
        entries.generation += 1;
        entries.by_prefix.retain(|_, cached| cached.id != agent_id);
    }

    pub fn forget_all(&self) {
        let mut entries = self.lock();
        entries.generation += 1;
        entries.by_prefix.clear();
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

        let auth = state.changes.auth();
        let agent = match auth.get(prefix) {
            Some(agent) => agent,
            None => {
                let generation = auth.generation();
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
                auth.put(prefix, agent.clone(), generation);
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
