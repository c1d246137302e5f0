//! The agent's conversation with the hub beside the worker: the long-poll of the desired
//! state and the heartbeat.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use brokkr_common::error_sources;
use brokkr_crds::wire::DesiredState;
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;

use super::lock;
use super::state::{Published, probe_api_server};
use crate::config::Config;
use crate::hub::{Endpoint, HubClient};
use crate::metrics::Metrics;

/// The long-poll: fetches the desired state, then waits on the hub for changes from its
/// cursor. A hub that cannot be reached is retried with jittered backoff from the same
/// cursor; nothing is deleted meanwhile (the worker only hears of successful answers).
pub(super) async fn poll_desired(
    hub: HubClient,
    config: Arc<Config>,
    desired: watch::Sender<Option<DesiredState>>,
    metrics: Arc<Metrics>,
) -> &'static str {
    let mut cursor: Option<String> = None;
    let mut failures = 0u32;
    // Two identical answers less than this apart mean the hub did not wait: pause.
    let floor = config.poll_wait.min(Duration::from_secs(1));
    loop {
        let started = Instant::now();
        match hub.desired(cursor.as_deref(), config.poll_wait).await {
            Ok(state) => {
                if failures > 0 {
                    tracing::info!(after_failures = failures, "reached the hub again");
                }
                failures = 0;
                metrics.set_ready();
                cursor = Some(state.cursor.clone());
                let changed = desired.send_if_modified(|current| {
                    let differs = current.as_ref().is_none_or(|c| c.stacks != state.stacks);
                    if differs {
                        tracing::info!(
                            stacks = state.stacks.len(),
                            cursor = %state.cursor,
                            "new desired state"
                        );
                        *current = Some(state);
                    }
                    differs
                });
                if !changed && started.elapsed() < floor {
                    tokio::time::sleep(floor).await;
                }
            }
            Err(err) => {
                metrics.hub_error(Endpoint::Desired);
                let delay = config.hub_backoff.jittered(failures);
                failures = failures.saturating_add(1);
                if err.is_auth() {
                    tracing::error!(
                        error = %err,
                        retry_in = ?delay,
                        "the hub refused the agent key (wrong key, or the agent is suspended or deleted); keeping everything applied"
                    );
                } else {
                    tracing::warn!(
                        error = %err,
                        source = %error_sources(&err),
                        retry_in = ?delay,
                        "failed to fetch the desired state; keeping everything applied"
                    );
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The heartbeat: every `interval` (or the hub's shorter one), probes the spoke API server
/// (at most [`super::state::PROBE_TIMEOUT`]) and sends what the worker published, as
/// `Error` with the reason when the agent cannot do its job.
pub(super) async fn send_heartbeats(
    hub: HubClient,
    client: Client,
    interval: Duration,
    status: Arc<Mutex<Published>>,
    metrics: Arc<Metrics>,
) -> &'static str {
    let mut period = interval;
    let mut reported: Option<String> = None;
    loop {
        let started = Instant::now();
        let unreachable = probe_api_server(&client).await;
        let heartbeat = lock(&status).heartbeat(unreachable.as_deref());
        if heartbeat.message != reported {
            match &heartbeat.message {
                Some(reason) => {
                    tracing::warn!(%reason, "the agent cannot do its job on the spoke: reporting Error")
                }
                None => tracing::info!(state = %heartbeat.state, "the agent's Error cleared"),
            }
            reported = heartbeat.message.clone();
        }
        match hub.heartbeat(&heartbeat).await {
            Ok(ack) => {
                // Never slower than the hub expects.
                if ack.heartbeat_interval_seconds > 0 {
                    period = interval.min(Duration::from_secs(ack.heartbeat_interval_seconds));
                }
            }
            Err(err) => {
                metrics.hub_error(Endpoint::Heartbeat);
                if err.is_auth() {
                    tracing::error!(error = %err, "the hub refused the agent key for a heartbeat");
                } else {
                    tracing::warn!(error = %err, source = %error_sources(&err), "failed to send a heartbeat");
                }
            }
        }
        tokio::time::sleep_until(started + period).await;
    }
}
