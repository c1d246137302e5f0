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
use crate::store::{self, Store};

pub const STATUS_CHANNEL: &str = "brokkr_status";
pub const AGENTS_CHANNEL: &str = "brokkr_agents";

/// Where refresh requests go: the Stack and Agent controllers' `reconcile_on` streams.
#[derive(Clone)]
pub struct Triggers {
    pub stacks: mpsc::Sender<ObjectRef<Stack>>,
    pub agents: mpsc::Sender<ObjectRef<Agent>>,
}

/// The Stack named `<namespace>/<name>` in the database.
pub fn stack_ref(database_name: &str) -> Option<ObjectRef<Stack>> {
    let (namespace, name) = database_name.split_once('/')?;
    Some(ObjectRef::new(name).within(namespace))
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
            STATUS_CHANNEL => match stack_ref(notification.payload()) {
                Some(stack) => triggers.stacks.send(stack).await.is_ok(),
                None => true,
            },
            _ => triggers
                .agents
                .send(ObjectRef::new(notification.payload()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_names_map_to_their_resources() {
        let stack = stack_ref("shop/web").unwrap();
        assert_eq!(stack.name, "web");
        assert_eq!(stack.namespace.as_deref(), Some("shop"));
        assert!(stack_ref("no-namespace").is_none());
    }
}
