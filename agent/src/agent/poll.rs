//! The agent's conversation with the hub beside the worker: the long-poll of the desired
//! state and the heartbeat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brokkr_common::error_sources;
use brokkr_crds::wire::{DeploymentObject, DesiredState};
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use super::lock;
use super::state::{Published, probe_api_server};
use crate::config::Config;
use crate::hub::{Endpoint, HubClient};
use crate::metrics::Metrics;

/// A desired state as the long-poll hands it to the worker: the hub's answer without the
/// deployment objects it carried inline, which come beside it by id. Answers are compared
/// without them, so an answer that carries an object and one that does not (a later
/// answer, or an older hub) are the same desired state.
#[derive(Clone, Debug, Default)]
pub(super) struct Desired {
    pub(super) state: DesiredState,
    pub(super) inline: Arc<HashMap<Uuid, DeploymentObject>>,
}

impl Desired {
    pub(super) fn from_answer(mut state: DesiredState) -> Desired {
        let inline = state
            .stacks
            .iter_mut()
            .filter_map(|stack| stack.object.take())
            .map(|object| (object.id, object))
            .collect();
        Desired {
            state,
            inline: Arc::new(inline),
        }
    }

    /// Adds the inline objects of `earlier` (an answer the worker may not have read yet)
    /// that this state still wants, so that they are not fetched after all.
    fn keep_unread(&mut self, earlier: &Desired) {
        let missing: Vec<&DeploymentObject> = earlier
            .inline
            .values()
            .filter(|object| !self.inline.contains_key(&object.id))
            .filter(|object| {
                self.state
                    .stacks
                    .iter()
                    .any(|stack| stack.deployment_object_id == object.id)
            })
            .collect();
        if !missing.is_empty() {
            let inline = Arc::make_mut(&mut self.inline);
            for object in missing {
                inline.insert(object.id, object.clone());
            }
        }
    }
}

/// The long-poll: fetches the desired state, then waits on the hub for changes from its
/// cursor. A hub that cannot be reached is retried with jittered backoff from the same
/// cursor; nothing is deleted meanwhile (the worker only hears of successful answers).
pub(super) async fn poll_desired(
    hub: HubClient,
    config: Arc<Config>,
    desired: watch::Sender<Option<Desired>>,
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
                let mut answer = Desired::from_answer(state);
                let changed = desired.send_if_modified(|current| {
                    let differs = current
                        .as_ref()
                        .is_none_or(|c| c.state.stacks != answer.state.stacks);
                    if differs {
                        tracing::info!(
                            stacks = answer.state.stacks.len(),
                            inline_objects = answer.inline.len(),
                            cursor = %answer.state.cursor,
                            "new desired state"
                        );
                        if let Some(earlier) = current.as_ref() {
                            answer.keep_unread(earlier);
                        }
                        *current = Some(answer);
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

#[cfg(test)]
mod tests {
    use brokkr_crds::wire::DesiredStack;

    use super::*;

    fn answer(cursor: &str, objects: &[(u128, bool)]) -> DesiredState {
        let stacks = objects
            .iter()
            .map(|&(n, inline)| {
                let id = Uuid::from_u128(100 + n);
                DesiredStack {
                    stack_id: Uuid::from_u128(n),
                    stack_name: format!("ns/app-{n}"),
                    deployment_object_id: id,
                    sequence: 1,
                    checksum: format!("sum-{n}"),
                    deletion: false,
                    object: inline.then(|| DeploymentObject {
                        id,
                        stack_id: Uuid::from_u128(n),
                        sequence: 1,
                        checksum: format!("sum-{n}"),
                        deletion: false,
                        yaml: "kind: ConfigMap\n".into(),
                    }),
                }
            })
            .collect();
        DesiredState {
            cursor: cursor.into(),
            stacks,
        }
    }

    #[test]
    fn answers_with_and_without_inline_objects_are_the_same_desired_state() {
        let with = Desired::from_answer(answer("c1", &[(1, true), (2, false)]));
        let without = Desired::from_answer(answer("c1", &[(1, false), (2, false)]));
        assert_eq!(with.state, without.state);
        assert!(with.state.stacks.iter().all(|s| s.object.is_none()));
        assert_eq!(
            with.inline.keys().copied().collect::<Vec<_>>(),
            [Uuid::from_u128(101)]
        );
    }

    #[test]
    fn an_unread_answers_inline_objects_still_wanted_are_kept() {
        let earlier = Desired::from_answer(answer("c1", &[(1, true), (2, true)]));
        // The next answer no longer carries them (older than its cursor), and stack 2 has
        // left the set.
        let mut next = Desired::from_answer(answer("c2", &[(1, false), (3, true)]));
        next.keep_unread(&earlier);
        let mut kept: Vec<Uuid> = next.inline.keys().copied().collect();
        kept.sort();
        assert_eq!(kept, [Uuid::from_u128(101), Uuid::from_u128(103)]);
    }
}
