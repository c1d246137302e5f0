//! The status mirror: what agents report (events, heartbeats) flows back into the
//! Stack and Agent resources. PostgreSQL notifications say which resource to refresh;
//! the controllers' periodic requeue is the safety net for anything missed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use brokkr_common::backoff;
use brokkr_crds::{Agent, Stack};
use kube::runtime::reflector::{ObjectRef, Store as Cache};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::api::changes::FeedTiming;
use crate::store::notify::{AGENTS_CHANNEL, STATUS_CHANNEL, status_agent};
use crate::store::{self, Store};

/// Where refresh requests go: the Stack and Agent controllers' `reconcile_on` streams.
#[derive(Clone)]
pub struct Triggers {
    pub stacks: mpsc::Sender<ObjectRef<Stack>>,
    pub agents: mpsc::Sender<ObjectRef<Agent>>,
    /// The Stack controller's cache: status notifications name Stacks by uid.
    pub stack_cache: Cache<Stack>,
}

/// Stacks by `metadata.uid`, rebuilt from the cache when a uid is not found (a new
/// Stack), at most once per [`StackIndex::REBUILD_INTERVAL`] so reports on deleted
/// Stacks do not rebuild it for every notification.
struct StackIndex {
    by_uid: HashMap<String, ObjectRef<Stack>>,
    built_at: Option<Instant>,
}

impl StackIndex {
    const REBUILD_INTERVAL: Duration = Duration::from_secs(1);

    fn new() -> StackIndex {
        StackIndex {
            by_uid: HashMap::new(),
            built_at: None,
        }
    }

    fn find(&mut self, uid: &str, cache: &Cache<Stack>) -> Option<ObjectRef<Stack>> {
        if let Some(found) = self.by_uid.get(uid) {
            return Some(found.clone());
        }
        if self
            .built_at
            .is_some_and(|at| at.elapsed() < Self::REBUILD_INTERVAL)
        {
            return None;
        }
        self.by_uid = cache
            .state()
            .iter()
            .filter_map(|stack| Some((stack.metadata.uid.clone()?, ObjectRef::from_obj(&**stack))))
            .collect();
        self.built_at = Some(Instant::now());
        self.by_uid.get(uid).cloned()
    }
}

/// Forwards notifications to the controllers until the process ends, reconnecting
/// after failures.
pub async fn listen(database_url: String, triggers: Triggers) {
    let mut attempt = 0;
    loop {
        match listen_once(&database_url, &triggers).await {
            // Lost after it had worked: reconnect promptly.
            Ok(()) => attempt = 0,
            Err(err) => {
                warn!(error = %err, "lost the status notification connection; reconnecting");
            }
        }
        if triggers.stacks.is_closed() {
            return;
        }
        tokio::time::sleep(backoff::RECONNECT.ceiling(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// Returns when the connection is lost or fails its periodic check (the same check as the
/// change feed's: a half-open connection would otherwise go quiet for good).
async fn listen_once(database_url: &str, triggers: &Triggers) -> Result<(), sea_orm::sqlx::Error> {
    let mut listener = store::listen(database_url, &[STATUS_CHANNEL, AGENTS_CHANNEL]).await?;
    info!("listening for agent reports");
    let timing = FeedTiming::default();
    let mut stacks = StackIndex::new();
    let mut check = tokio::time::interval(timing.listener_check_interval);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.reset();
    loop {
        let received = tokio::select! {
            received = listener.try_recv() => received?,
            _ = check.tick() => {
                store::check_listener(&mut listener, timing.listener_check_timeout).await?;
                continue;
            }
        };
        let Some(notification) = received else {
            warn!("lost the status notification connection; reconnecting");
            return Ok(());
        };
        let sent = match notification.channel() {
            // A Stack this replica does not (yet) watch is refreshed by its requeue.
            STATUS_CHANNEL => match stacks.find(notification.payload(), &triggers.stack_cache) {
                Some(stack) => triggers.stacks.send(stack).await.is_ok(),
                None => true,
            },
            _ => triggers
                .agents
                .send(status_agent(notification.payload()))
                .await
                .is_ok(),
        };
        if !sent {
            // The controllers stopped (leadership lost).
            return Ok(());
        }
    }
}

/// Every `interval`, marks agents silent for three intervals `Offline`, also those that
/// last reported `Error`; the status change notifies [`listen`], which refreshes their
/// Agent resources.
pub async fn sweep_offline(store: Store, interval: Duration, triggers: Triggers) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        if triggers.agents.is_closed() {
            return;
        }
        match store.mark_silent_agents_offline(interval * 3).await {
            Ok(names) => {
                for name in names {
                    info!(agent = %name, "agent missed three heartbeats: Offline");
                }
            }
            Err(err) => warn!(error = %err, "failed to mark silent agents Offline"),
        }
    }
}
