//! What the hub's API replicas hold in memory, kept current by PostgreSQL
//! notifications: triggers send one on every write that can change an agent's desired
//! state or its access. Every replica listens, so an agent is served correctly whichever
//! replica it talks to.
//!
//! A stack change is resolved once per notification (one query, however many agents
//! the stack targets) and patched into the agents' views; see [`super::views`].
//!
//! # Bounded staleness
//!
//! Notifications can be missed: the LISTEN connection can be lost, or half-open (the
//! server or the network path gone without a word, which looks exactly like silence). So:
//!
//! - every connection has TCP keepalive ([`crate::store::KEEPALIVE`]);
//! - every [`FeedTiming::listener_check_interval`] (10 s) a query runs on the LISTEN
//!   connection and must answer within [`FeedTiming::listener_check_timeout`] (5 s); if it
//!   does not, or the connection is lost, a new one is opened and every cached view is
//!   dropped, since notifications may have been missed;
//! - every [`FeedTiming::view_revalidation_interval`] (60 s) every cached view of a
//!   connected agent is compared with PostgreSQL and replaced (waking the agent) if stale.
//!
//! So a replica serves a desired state at most about 60 s older than PostgreSQL's
//! (the re-validation interval plus its queries), and after a lost or half-open LISTEN
//! connection at most about 15 s (check interval plus timeout) plus the time to reconnect.
//! Access changes (suspension, new key) follow the same notifications; without them the
//! authentication cache bounds them at [`AUTH_CACHE_TTL`] (5 minutes).

use std::sync::Arc;
use std::time::Duration;

use brokkr_common::backoff;
use tracing::{info, warn};
use uuid::Uuid;

use super::auth::AuthCache;
use super::views::{AgentView, DesiredViews};
use crate::controllers::error_chain;
use crate::metrics::FeedMetrics;
pub use crate::store::notify::Change;
use crate::store::notify::DESIRED_CHANNEL;
use crate::store::{self, Store};

/// How long an agent's authentication is trusted without a notification saying
/// otherwise.
pub const AUTH_CACHE_TTL: Duration = Duration::from_secs(300);

/// Most notifications handled as one batch (one heads query).
const MAX_BATCH: usize = 1000;

/// Agents re-validated per query.
const REVALIDATION_BATCH: usize = 500;

/// How often the change feed proves its LISTEN connection and re-validates cached views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedTiming {
    /// How often a query runs on the LISTEN connection.
    pub listener_check_interval: Duration,
    /// How long that query may take before the connection is replaced.
    pub listener_check_timeout: Duration,
    /// How often every cached view is compared with PostgreSQL.
    pub view_revalidation_interval: Duration,
}

impl Default for FeedTiming {
    fn default() -> Self {
        FeedTiming {
            listener_check_interval: Duration::from_secs(10),
            listener_check_timeout: Duration::from_secs(5),
            view_revalidation_interval: Duration::from_secs(60),
        }
    }
}

struct Held {
    views: DesiredViews,
    auth: AuthCache,
}

/// This replica's views of agents' desired state and access. Cheap to clone.
#[derive(Clone)]
pub struct ChangeFeed {
    held: Arc<Held>,
    timing: FeedTiming,
    metrics: FeedMetrics,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        ChangeFeed {
            held: Arc::new(Held {
                views: DesiredViews::default(),
                auth: AuthCache::new(AUTH_CACHE_TTL),
            }),
            timing: FeedTiming::default(),
            metrics: FeedMetrics::default(),
        }
    }
}

impl ChangeFeed {
    /// Checks and re-validation on this schedule instead of [`FeedTiming::default`].
    pub fn with_timing(mut self, timing: FeedTiming) -> ChangeFeed {
        self.timing = timing;
        self
    }

    /// Records into `metrics` (e.g. [`crate::metrics::Metrics::feed`]).
    pub fn with_metrics(mut self, metrics: FeedMetrics) -> ChangeFeed {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &FeedMetrics {
        &self.metrics
    }

    pub(crate) fn views(&self) -> &DesiredViews {
        &self.held.views
    }

    pub(crate) fn auth(&self) -> &AuthCache {
        &self.held.auth
    }

    /// Applies a batch of changes.
    async fn apply(&self, store: &Store, changes: &[Change]) {
        if changes.contains(&Change::All) {
            return self.forget_all();
        }
        let mut stacks = Vec::new();
        for change in changes {
            match change {
                Change::Stack(id) if !stacks.contains(id) => stacks.push(*id),
                Change::Stack(_) | Change::All => {}
                Change::Agent(id) => self.views().forget(*id),
                Change::Access(id) => self.auth().forget_agent(*id),
            }
        }
        if stacks.is_empty() {
            return;
        }
        match store.stack_heads(&stacks).await {
            Ok(heads) => self.views().apply_heads(&heads),
            Err(err) => {
                warn!(error = %error_chain(&err), "could not read changed stacks; every agent re-reads its desired state");
                self.views().forget_all();
            }
        }
    }

    fn forget_all(&self) {
        self.views().forget_all();
        self.auth().forget_all();
    }

    /// Listens on PostgreSQL until the process ends, reconnecting after failures
    /// (and forgetting everything then, since notifications may have been missed), and
    /// re-validates the cached views on [`FeedTiming::view_revalidation_interval`].
    pub async fn listen(self, database_url: String, store: Store) {
        tokio::join!(
            self.listen_forever(&database_url, &store),
            self.revalidate_forever(&store)
        );
    }

    async fn listen_forever(&self, database_url: &str, store: &Store) {
        let mut attempt = 0;
        loop {
            match self.listen_once(database_url, store).await {
                Ok(()) => {
                    warn!("lost the PostgreSQL notification connection; reconnecting");
                    attempt = 0;
                }
                Err(err) => {
                    warn!(error = %err, "PostgreSQL notification connection failed; reconnecting");
                }
            }
            self.metrics.listener_reconnects.inc();
            self.forget_all();
            tokio::time::sleep(backoff::RECONNECT.ceiling(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// Returns when the connection is lost or fails its periodic check.
    async fn listen_once(
        &self,
        database_url: &str,
        store: &Store,
    ) -> Result<(), sea_orm::sqlx::Error> {
        let mut listener = store::listen(database_url, &[DESIRED_CHANNEL]).await?;
        info!(
            channel = DESIRED_CHANNEL,
            "listening for desired-state changes"
        );
        // Anything written while we were not listening is unknown.
        self.forget_all();
        let mut check = tokio::time::interval(self.timing.listener_check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.reset();
        let mut batch = Vec::new();
        loop {
            // `try_recv` (unlike `recv`) reports a lost connection, after which
            // notifications may have been missed. It is cancel-safe: a notification
            // half-read when the check comes is read in full afterwards.
            let received = tokio::select! {
                received = listener.try_recv() => received?,
                _ = check.tick() => {
                    store::check_listener(&mut listener, self.timing.listener_check_timeout)
                        .await?;
                    continue;
                }
            };
            let Some(notification) = received else {
                return Ok(());
            };
            batch.clear();
            self.parse_into(&mut batch, notification.payload());
            while batch.len() < MAX_BATCH {
                match listener.next_buffered() {
                    Some(notification) => self.parse_into(&mut batch, notification.payload()),
                    None => break,
                }
            }
            self.apply(store, &batch).await;
        }
    }

    fn parse_into(&self, batch: &mut Vec<Change>, payload: &str) {
        match Change::parse(payload) {
            Some(change) => batch.push(change),
            None => {
                self.metrics.notifications_ignored.inc();
                warn!(
                    channel = DESIRED_CHANNEL,
                    payload_len = payload.len(),
                    "ignored a notification whose payload does not parse"
                );
            }
        }
    }

    async fn revalidate_forever(&self, store: &Store) {
        let mut tick = tokio::time::interval(self.timing.view_revalidation_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            tick.tick().await;
            self.revalidate(store).await;
        }
    }

    /// Compares every cached view of a connected agent with PostgreSQL and replaces (and
    /// wakes) the stale ones. Returns how many were stale. If PostgreSQL cannot answer,
    /// every view is dropped: what cannot be checked is not served from memory.
    pub async fn revalidate(&self, store: &Store) -> usize {
        let candidates = self.views().revalidation_candidates();
        let mut stale = 0;
        for chunk in candidates.chunks(REVALIDATION_BATCH) {
            let agent_ids: Vec<Uuid> = chunk.iter().map(|(agent_id, _)| *agent_id).collect();
            let mut desired = match store.desired_for_agents(&agent_ids).await {
                Ok(desired) => desired,
                Err(err) => {
                    warn!(error = %error_chain(&err), "could not re-validate the cached desired state; every agent re-reads it");
                    self.views().forget_all();
                    return stale;
                }
            };
            for (agent_id, generation) in chunk {
                let entries = desired.remove(agent_id).unwrap_or_default();
                let view = AgentView::new(0, entries);
                if self.views().revalidate(*agent_id, *generation, view) {
                    stale += 1;
                }
            }
            self.metrics.views_revalidated.inc_by(chunk.len() as u64);
        }
        if stale > 0 {
            self.metrics.stale_views_corrected.inc_by(stale as u64);
            warn!(
                stale,
                "re-validation found stale desired-state views (missed notifications) and replaced them"
            );
        }
        stale
    }
}
