//! Agents (and, through [`authenticate`], generators) authenticate with their key:
//! `Authorization: Bearer brokkr_<prefix>_<secret>`. The key's row is found by the public
//! prefix, the hash compared in constant time; results are cached so a fleet of long-polls
//! and heartbeats does not turn into a query each. The change feed drops an owner's entries
//! when its keys, suspension or deletion change (on any replica), so the TTL only bounds how
//! long a missed notification can matter. Expiry and revocation times are compared with the
//! clock on every request, so the cache never extends a key's validity.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use moka::sync::Cache;
use uuid::Uuid;

use chrono::{DateTime, Utc};

use super::limits::{KeyLimiter, RateLimit, UnknownKeyLimiter, retry_after_seconds};
use super::{ApiError, ApiState};
use crate::keys::{Scope, key_matches, key_prefix};
use crate::store::{KeyHolder, KeyOwner};

/// The agent a request comes from, and the key it presented.
#[derive(Clone, Debug)]
pub struct AuthenticatedAgent {
    pub id: Uuid,
    pub name: String,
    pub key: PresentedKey,
}

/// The key that authenticated a request: its row and times, never the key itself.
#[derive(Clone, Debug)]
pub struct PresentedKey {
    pub id: Uuid,
    pub prefix: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Whoever a request comes from, with a key that holds the scope the endpoint asked for.
#[derive(Clone, Debug)]
pub struct Authenticated {
    pub owner: KeyOwner,
    /// The agent's or generator's name.
    pub name: String,
    pub key: PresentedKey,
}

type CachedAgent = KeyHolder;

/// Recently looked-up agents by key prefix.
pub struct AuthCache {
    by_prefix: Cache<String, CachedAgent>,
    /// Prefixes no agent had when looked up.
    unknown: Cache<String, ()>,
    /// Counts invalidations: a row read before one is not cached. Held while an entry
    /// is put and while entries are dropped, so the two never interleave.
    generation: Mutex<u64>,
}

/// Beyond this many cached prefixes the least recently used are dropped, bounding the
/// cache's memory.
const MAX_CACHED: u64 = 100_000;

/// How long a prefix no agent had is answered 401 without a query. Any change of an
/// agent's key also drops these entries, so a new key works at once.
const UNKNOWN_TTL: Duration = Duration::from_secs(30);

impl AuthCache {
    pub fn new(ttl: Duration) -> AuthCache {
        AuthCache {
            by_prefix: Cache::builder()
                .max_capacity(MAX_CACHED)
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build(),
            unknown: Cache::builder()
                .max_capacity(MAX_CACHED)
                .time_to_live(UNKNOWN_TTL)
                .build(),
            generation: Mutex::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, u64> {
        super::lock(&self.generation)
    }

    fn get(&self, prefix: &str) -> Option<CachedAgent> {
        self.by_prefix.get(prefix)
    }

    /// Stamp to pass to `put`; take it before reading the row.
    fn generation(&self) -> u64 {
        *self.lock()
    }

    fn put(&self, prefix: &str, agent: CachedAgent, read_at_generation: u64) {
        let generation = self.lock();
        if *generation == read_at_generation {
            self.by_prefix.insert(prefix.to_owned(), agent);
        }
    }

    /// Whether `prefix` was recently looked up and found no agent.
    fn is_unknown(&self, prefix: &str) -> bool {
        self.unknown.contains_key(prefix)
    }

    fn put_unknown(&self, prefix: &str, read_at_generation: u64) {
        let generation = self.lock();
        if *generation == read_at_generation {
            self.unknown.insert(prefix.to_owned(), ());
        }
    }

    /// Drops whatever is cached for `agent_id` (or a generator's id), under any prefix.
    pub fn forget_agent(&self, agent_id: Uuid) {
        let mut generation = self.lock();
        *generation += 1;
        // Only fails when the cache was built without invalidation closures.
        if self
            .by_prefix
            .invalidate_entries_if(move |_, cached| {
                cached.agent_id == Some(agent_id) || cached.generator_id == Some(agent_id)
            })
            .is_err()
        {
            self.by_prefix.invalidate_all();
        }
        // The change may be a new key, whose prefix was unknown until now.
        self.unknown.invalidate_all();
    }

    pub fn forget_all(&self) {
        let mut generation = self.lock();
        *generation += 1;
        self.by_prefix.invalidate_all();
        self.unknown.invalidate_all();
    }
}

impl FromRequestParts<ApiState> for AuthenticatedAgent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let who = authenticate(parts, state, Scope::Agent).await?;
        match who.owner {
            KeyOwner::Agent(id) => Ok(AuthenticatedAgent {
                id,
                name: who.name,
                key: who.key,
            }),
            // `authenticate` checked the scope; a generator key never holds `agent`.
            KeyOwner::Generator(_) => Err(insufficient_scope(Scope::Agent)),
        }
    }
}

fn insufficient_scope(scope: Scope) -> ApiError {
    ApiError::InsufficientScope(format!("this key may not call the {} API", scope.as_str()))
}

/// Authenticates the request's bearer key for an endpoint that needs `scope`: unknown
/// keys are 401 `unauthorized`, revoked ones 401 `key_revoked`, expired ones 401
/// `key_expired`, keys without the scope 403 `insufficient_scope`, keys of suspended or
/// deleted owners 403 `forbidden`, and a key over its rate 429. Times are checked on every
/// request against the key's own, so a cached entry never extends a key's validity.
pub async fn authenticate(
    parts: &Parts,
    state: &ApiState,
    scope: Scope,
) -> Result<Authenticated, ApiError> {
    let authenticated = authenticate_key(parts, state, scope).await;
    if let Err(
        err @ (ApiError::Unauthorized(_) | ApiError::KeyExpired(_) | ApiError::KeyRevoked(_)),
    ) = &authenticated
    {
        let prefix = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .and_then(|key| key_prefix(key.trim()));
        let source = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|peer| peer.0.ip());
        state
            .auth_failures
            .failed(&state.store, prefix, source, err.code());
    }
    authenticated
}

async fn authenticate_key(
    parts: &Parts,
    state: &ApiState,
    scope: Scope,
) -> Result<Authenticated, ApiError> {
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer <key>".into()))?;
    let key = header
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::Unauthorized("the Authorization header is not a Bearer token".into())
        })?;
    let prefix = key_prefix(key).ok_or_else(|| ApiError::Unauthorized("malformed key".into()))?;

    let auth = state.changes.auth();
    let holder = match auth.get(prefix) {
        Some(holder) => holder,
        None => look_up(state, prefix).await?,
    };
    if !key_matches(key, &holder.key_hash) {
        return Err(ApiError::Unauthorized("unknown key".into()));
    }
    let owner = match (holder.agent_id, holder.generator_id) {
        (Some(id), _) => KeyOwner::Agent(id),
        (None, Some(id)) => KeyOwner::Generator(id),
        (None, None) => return Err(ApiError::Unauthorized("unknown key".into())),
    };
    let now = Utc::now();
    if holder.revoked_at.is_some_and(|revoked| revoked <= now) {
        return Err(ApiError::KeyRevoked(format!(
            "key {prefix} was revoked; use the key in the key Secret on the hub"
        )));
    }
    if holder.expires_at <= now {
        return Err(ApiError::KeyExpired(format!(
            "key {prefix} expired at {}; revoke it to have the hub issue a new one",
            holder.expires_at.to_rfc3339()
        )));
    }
    if !scope.is_in(&holder.scopes) {
        return Err(insufficient_scope(scope));
    }
    let kind = match owner {
        KeyOwner::Agent(_) => "agent",
        KeyOwner::Generator(_) => "generator",
    };
    if holder.deleted {
        return Err(ApiError::Forbidden(format!(
            "{kind} {} was deleted; its key is no longer valid",
            holder.owner_name
        )));
    }
    if holder.suspended {
        let message = format!(
            "{kind} {} is suspended (spec.suspend on its resource)",
            holder.owner_name
        );
        return Err(match owner {
            KeyOwner::Generator(_) => ApiError::GeneratorSuspended(message),
            KeyOwner::Agent(_) => ApiError::Forbidden(message),
        });
    }
    // Counted only once the key is proven, so nobody can spend another key's budget.
    if let Err(wait) = state.limits.keys.take(prefix, Instant::now()) {
        state.metrics.requests_limited_because("key_rate");
        return Err(ApiError::TooManyRequests {
            message: format!(
                "{kind} {} sent more requests than the hub allows per key",
                holder.owner_name
            ),
            retry_after_seconds: retry_after_seconds(wait),
        });
    }
    state
        .key_use
        .used(&state.store, &holder, owner, Instant::now());
    Ok(Authenticated {
        owner,
        name: holder.owner_name,
        key: PresentedKey {
            id: holder.key_id,
            prefix: holder.prefix,
            issued_at: holder.issued_at,
            expires_at: holder.expires_at,
        },
    })
}

/// Finds the agent of a prefix that is not cached: answered from the cache of unknown
/// prefixes when possible, refused without a query while lookups of unknown prefixes are
/// over their rate, and otherwise looked up together with the other prefixes asked for
/// meanwhile (one query for a whole fleet reconnecting to a fresh hub).
async fn look_up(state: &ApiState, prefix: &str) -> Result<CachedAgent, ApiError> {
    let auth = state.changes.auth();
    let unknown = || ApiError::Unauthorized("unknown key".into());
    if auth.is_unknown(prefix) {
        state.metrics.unknown_keys_cached.inc();
        return Err(unknown());
    }
    if let Err(wait) = state.limits.unknown_keys.check(Instant::now()) {
        state.metrics.requests_limited_because("unknown_keys");
        return Err(ApiError::TooManyRequests {
            message: "too many requests with unknown keys".into(),
            retry_after_seconds: retry_after_seconds(wait),
        });
    }
    // Taken before the batch's query reads the row.
    let generation = auth.generation();
    let Some(holder) = state.lookups.key_holders.load(prefix.to_owned()).await? else {
        state.metrics.key_looked_up("unknown");
        state.limits.unknown_keys.found_nothing(Instant::now());
        auth.put_unknown(prefix, generation);
        return Err(unknown());
    };
    state.metrics.key_looked_up("found");
    auth.put(prefix, holder.clone(), generation);
    Ok(holder)
}

/// The limits [`AuthenticatedAgent`] applies, shared by every request.
pub struct AuthLimits {
    keys: KeyLimiter,
    unknown_keys: UnknownKeyLimiter,
}

impl AuthLimits {
    pub fn new(key_rate: RateLimit, unknown_key_rate: RateLimit) -> AuthLimits {
        AuthLimits {
            keys: KeyLimiter::new(key_rate),
            unknown_keys: UnknownKeyLimiter::new(unknown_key_rate),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: Uuid, hash: &str) -> CachedAgent {
        CachedAgent {
            key_id: Uuid::now_v7(),
            agent_id: Some(id),
            generator_id: None,
            prefix: "old".into(),
            key_hash: hash.into(),
            scopes: "agent".into(),
            issued_at: Utc::now(),
            expires_at: Utc::now(),
            revoked_at: None,
            owner_name: "edge".into(),
            suspended: false,
            deleted: false,
        }
    }

    #[test]
    fn a_row_read_before_an_invalidation_is_not_cached() {
        let cache = AuthCache::new(Duration::from_secs(60));
        let id = Uuid::now_v7();
        let stale = cache.generation();
        cache.forget_agent(id);
        cache.put("old", agent(id, "old-hash"), stale);
        cache.put_unknown("new", stale);
        assert!(cache.get("old").is_none(), "a stale row");
        assert!(!cache.is_unknown("new"), "a stale miss");

        let fresh = cache.generation();
        cache.put("old", agent(id, "old-hash"), fresh);
        cache.put_unknown("new", fresh);
        assert!(cache.get("old").is_some());
        assert!(cache.is_unknown("new"));
        cache.forget_agent(id);
        assert!(cache.get("old").is_none(), "dropped with its agent");
        assert!(!cache.is_unknown("new"), "a new key works at once");
    }
}
