//! The status mirror: what agents report (events, heartbeats) flows back into the
//! Stack and Agent resources. PostgreSQL notifications say which resource to refresh;
//! the controllers' periodic requeue is the safety net for anything missed.

use std::time::Duration;

use brokkr_common::backoff;
use brokkr_crds::{Agent, Stack};
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::api::changes::FeedTiming;
use crate::store::notify::{AGENTS_CHANNEL, STATUS_CHANNEL, status_agent, status_stack};
use crate::store::{self, Store};

/// Where refresh requests go: the Stack and Agent controllers' `reconcile_on` streams.
#[derive(Clone)]
pub struct Triggers {
    pub stacks: mpsc::Sender<ObjectRef<Stack>>,
    pub agents: mpsc::Sender<ObjectRef<Agent>>,
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
            STATUS_CHANNEL => match status_stack(notification.payload()) {
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

/// Every `interval`, marks agents silent for three intervals `Offline`; the status
/// change notifies [`listen`], which refreshes their Agent resources.
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
