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
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::limits::{KeyLimiter, RateLimit, UnknownKeyLimiter, retry_after_seconds};
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
    /// Prefixes no agent had when looked up, and when.
    unknown: HashMap<String, Instant>,
}

/// Beyond this many cached prefixes the cache starts over, bounding its memory.
const MAX_CACHED: usize = 100_000;

/// How long a prefix no agent had is answered 401 without a query. Any change of an
/// agent's key also drops these entries, so a new key works at once.
const UNKNOWN_TTL: Duration = Duration::from_secs(30);

/// Lookups of uncached prefixes that may use database connections at once.
const MAX_CONCURRENT_LOOKUPS: usize = 8;

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

    /// Whether `prefix` was recently looked up and found no agent.
    fn is_unknown(&self, prefix: &str) -> bool {
        self.lock()
            .unknown
            .get(prefix)
            .is_some_and(|at| at.elapsed() < UNKNOWN_TTL)
    }

    fn put_unknown(&self, prefix: &str, read_at_generation: u64) {
        let mut entries = self.lock();
        if entries.generation != read_at_generation {
            return;
        }
        if entries.unknown.len() >= MAX_CACHED {
            entries.unknown.clear();
        }
        entries.unknown.insert(prefix.to_owned(), Instant::now());
    }

    /// Drops whatever is cached for `agent_id`, under any prefix.
    pub fn forget_agent(&self, agent_id: Uuid) {
        let mut entries = self.lock();
        entries.generation += 1;
        entries.by_prefix.retain(|_, cached| cached.id != agent_id);
        // The change may be a new key, whose prefix was unknown until now.
        entries.unknown.clear();
    }

    pub fn forget_all(&self) {
        let mut entries = self.lock();
        entries.generation += 1;
        entries.by_prefix.clear();
        entries.unknown.clear();
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
            None => look_up(state, prefix).await?,
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
        // Counted only once the key is proven, so nobody can spend another agent's budget.
        if let Err(wait) = state.limits.keys.take(prefix, Instant::now()) {
            state.metrics.requests_limited_because("key_rate");
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "agent {} sent more requests than the hub allows per key",
                    agent.name
                ),
                retry_after_seconds: retry_after_seconds(wait),
            });
        }
        Ok(AuthenticatedAgent {
            id: agent.id,
            name: agent.name,
        })
    }
}

/// Finds the agent of a prefix that is not cached: at most [`MAX_CONCURRENT_LOOKUPS`] at
/// once, answered from the cache of unknown prefixes when possible, and refused without a
/// query while lookups of unknown prefixes are over their rate.
async fn look_up(state: &ApiState, prefix: &str) -> Result<CachedAgent, ApiError> {
    let auth = state.changes.auth();
    let unknown = || ApiError::Unauthorized("unknown agent key".into());
    if auth.is_unknown(prefix) {
        state.metrics.unknown_keys_cached.inc();
        return Err(unknown());
    }
    // The semaphore is never closed.
    let _permit = state.limits.lookups.acquire().await.ok();
    // Another request may have looked it up while this one waited.
    if let Some(agent) = auth.get(prefix) {
        return Ok(agent);
    }
    if auth.is_unknown(prefix) {
        state.metrics.unknown_keys_cached.inc();
        return Err(unknown());
    }
    if let Err(wait) = state.limits.unknown_keys.check(Instant::now()) {
        state.metrics.requests_limited_because("unknown_keys");
        return Err(ApiError::TooManyRequests {
            message: "too many requests with unknown agent keys".into(),
            retry_after_seconds: retry_after_seconds(wait),
        });
    }
    let generation = auth.generation();
    let Some(row) = state.store.find_agent_for_key(prefix).await? else {
        state.metrics.key_looked_up("unknown");
        state.limits.unknown_keys.found_nothing(Instant::now());
        auth.put_unknown(prefix, generation);
        return Err(unknown());
    };
    state.metrics.key_looked_up("found");
    let agent = CachedAgent {
        id: row.id,
        name: row.name,
        pak_hash: row.pak_hash.unwrap_or_default(),
        suspended: row.is_suspended,
        deleted: row.deleted_at.is_some(),
        fetched: Instant::now(),
    };
    auth.put(prefix, agent.clone(), generation);
    Ok(agent)
}

/// The limits [`AuthenticatedAgent`] applies, shared by every request.
pub struct AuthLimits {
    keys: KeyLimiter,
    unknown_keys: UnknownKeyLimiter,
    lookups: Semaphore,
}

impl AuthLimits {
    pub fn new(key_rate: RateLimit, unknown_key_rate: RateLimit) -> AuthLimits {
        AuthLimits {
            keys: KeyLimiter::new(key_rate),
            unknown_keys: UnknownKeyLimiter::new(unknown_key_rate),
            lookups: Semaphore::new(MAX_CONCURRENT_LOOKUPS),
        }
    }
}
