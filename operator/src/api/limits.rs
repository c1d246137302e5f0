//! Request rate limits of the agent API: a token bucket per agent key (by its public
//! prefix), and one shared bucket for looking up keys the hub does not know, so that a
//! flood of made-up keys cannot turn into a database query each.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A sustained rate and the burst allowed above it. A rate of zero turns the limit off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl RateLimit {
    pub const fn new(per_second: f64, burst: u32) -> RateLimit {
        RateLimit { per_second, burst }
    }

    pub fn is_off(&self) -> bool {
        self.per_second.is_nan() || self.per_second <= 0.0 || self.burst == 0
    }
}

/// A token bucket: full at `burst`, refilled at `per_second`, one token per request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn full(limit: RateLimit, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(limit.burst),
            updated: now,
        }
    }

    fn refill(&mut self, limit: RateLimit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        self.updated = now;
    }

    /// Takes a token, or tells how long until one is available.
    pub fn take(&mut self, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        if limit.is_off() {
            return Ok(());
        }
        self.refill(limit, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64(
            (1.0 - self.tokens) / limit.per_second,
        ))
    }

    /// Whether a token is available now, without taking it.
    pub fn check(&self, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let mut probe = *self;
        probe.take(limit, now)
    }

    /// Whether the bucket is full, i.e. no different from a fresh one.
    fn is_full(&self, limit: RateLimit, now: Instant) -> bool {
        let mut probe = *self;
        probe.refill(limit, now);
        probe.tokens >= f64::from(limit.burst)
    }
}

/// Beyond this many keys, buckets that have refilled are dropped (a full bucket is the
/// same as none); if that is not enough, all are.
const MAX_BUCKETS: usize = 100_000;

/// A token bucket per agent key prefix.
pub struct KeyLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl KeyLimiter {
    pub fn new(limit: RateLimit) -> KeyLimiter {
        KeyLimiter {
            limit,
            buckets: Mutex::default(),
        }
    }

    /// Takes a token from `prefix`'s bucket, or tells how long until one is available.
    pub fn take(&self, prefix: &str, now: Instant) -> Result<(), Duration> {
        if self.limit.is_off() {
            return Ok(());
        }
        let mut buckets = super::lock(&self.buckets);
        if let Some(bucket) = buckets.get_mut(prefix) {
            return bucket.take(self.limit, now);
        }
        if buckets.len() >= MAX_BUCKETS {
            buckets.retain(|_, bucket| !bucket.is_full(self.limit, now));
            if buckets.len() >= MAX_BUCKETS {
                buckets.clear();
            }
        }
        let mut bucket = TokenBucket::full(self.limit, now);
        let taken = bucket.take(self.limit, now);
        buckets.insert(prefix.to_owned(), bucket);
        taken
    }
}

/// One bucket shared by every lookup of a key prefix the hub does not know: each lookup
/// that finds nothing takes a token, and while the bucket is empty, prefixes that are not
/// cached are refused without a query.
pub struct UnknownKeyLimiter {
    limit: RateLimit,
    bucket: Mutex<TokenBucket>,
}

impl UnknownKeyLimiter {
    pub fn new(limit: RateLimit) -> UnknownKeyLimiter {
        UnknownKeyLimiter {
            limit,
            bucket: Mutex::new(TokenBucket::full(limit, Instant::now())),
        }
    }

    /// Whether a lookup may go to the database now.
    pub fn check(&self, now: Instant) -> Result<(), Duration> {
        super::lock(&self.bucket).check(self.limit, now)
    }

    /// Records a lookup that found no agent.
    pub fn found_nothing(&self, now: Instant) {
        let _ = super::lock(&self.bucket).take(self.limit, now);
    }
}

/// Seconds for a `Retry-After` header: rounded up, at least one.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: RateLimit = RateLimit::new(2.0, 4);

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(LIMIT, start);
        for _ in 0..4 {
            assert_eq!(bucket.take(LIMIT, start), Ok(()));
        }
        let wait = bucket.take(LIMIT, start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Half a second later one token is back, and only one.
        let later = start + Duration::from_millis(500);
        assert_eq!(bucket.take(LIMIT, later), Ok(()));
        assert!(bucket.take(LIMIT, later).is_err());
        // Refills stop at the burst.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..4 {
            assert_eq!(bucket.take(LIMIT, much_later), Ok(()));
        }
        assert!(bucket.take(LIMIT, much_later).is_err());
    }

    #[test]
    fn a_rate_of_zero_is_no_limit() {
        let off = RateLimit::new(0.0, 10);
        let now = Instant::now();
        let mut bucket = TokenBucket::full(off, now);
        for _ in 0..1000 {
            assert_eq!(bucket.take(off, now), Ok(()));
        }
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let limiter = KeyLimiter::new(LIMIT);
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(limiter.take("a", now), Ok(()));
        }
        assert!(limiter.take("a", now).is_err());
        assert_eq!(limiter.take("b", now), Ok(()));
    }

    #[test]
    fn only_lookups_that_find_nothing_drain_the_unknown_key_bucket() {
        let limiter = UnknownKeyLimiter::new(LIMIT);
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(limiter.check(now), Ok(()));
        }
        for _ in 0..4 {
            limiter.found_nothing(now);
        }
        assert!(limiter.check(now).is_err());
        assert_eq!(limiter.check(now + Duration::from_millis(500)), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(20)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2001)), 3);
    }
}
