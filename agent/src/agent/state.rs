//! The agent's own state, as its heartbeat reports it: what the worker is doing
//! (`Starting`, `Ready`, `Syncing`, `Degraded`), or `Error` with the reason when the agent
//! cannot do its job on the spoke. Each cause of an `Error` is re-checked all the time and
//! clears by itself when it goes away:
//! - the spoke API server does not answer `GET /version` (probed before every heartbeat);
//! - the inventories cannot be read (nothing is applied or deleted until they are);
//! - RBAC refuses a drift watch (until the watch lists again, or is no longer needed).

use std::time::Duration;

use brokkr_common::error_chain;
use brokkr_crds::wire::{Heartbeat, MAX_STATE_MESSAGE_CHARS, STATE_ERROR, StackSummary, storable};
use kube::Client;

use crate::reporter::truncate;

/// How long the heartbeat waits for the spoke API server's `/version`.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the worker last published for the heartbeat.
#[derive(Clone, Debug)]
pub(super) struct Published {
    /// `Starting`, `Ready`, `Syncing` or `Degraded`.
    pub(super) activity: &'static str,
    pub(super) stacks: Vec<StackSummary>,
    /// Why the worker cannot do its job (unreadable inventories, refused watches); empty
    /// when it can.
    pub(super) problems: Vec<String>,
}

impl Default for Published {
    fn default() -> Published {
        Published {
            activity: "Starting",
            stacks: Vec::new(),
            problems: Vec::new(),
        }
    }
}

impl Published {
    /// The heartbeat to send, with `unreachable` (the probe's finding) first among the
    /// problems.
    pub(super) fn heartbeat(&self, unreachable: Option<&str>) -> Heartbeat {
        let problems: Vec<&str> = unreachable
            .into_iter()
            .chain(self.problems.iter().map(String::as_str))
            .collect();
        let (state, message) = heartbeat_state(self.activity, &problems);
        Heartbeat {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            state,
            message,
            stacks: self.stacks.clone(),
        }
    }
}

/// The heartbeat's state and message: `Error` naming every problem (joined by `"; "`, cut
/// to [`MAX_STATE_MESSAGE_CHARS`] on a character boundary) when there is one, whatever the
/// worker is doing; else the worker's activity, without a message.
pub(super) fn heartbeat_state(activity: &str, problems: &[&str]) -> (String, Option<String>) {
    if problems.is_empty() {
        return (activity.to_owned(), None);
    }
    let message = storable(&problems.join("; ")).into_owned();
    (
        STATE_ERROR.to_owned(),
        Some(truncate(&message, MAX_STATE_MESSAGE_CHARS)),
    )
}

/// Asks the spoke API server for its version: `None` when it answers within
/// [`PROBE_TIMEOUT`], else why the agent cannot reach it.
pub(super) async fn probe_api_server(client: &Client) -> Option<String> {
    match tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(_)) => None,
        Ok(Err(err @ kube::Error::Api(_))) => Some(format!(
            "spoke API server refuses the agent: {}",
            error_chain(&err)
        )),
        Ok(Err(err)) => Some(format!(
            "spoke API server unreachable: {}",
            error_chain(&err)
        )),
        Err(_) => Some(format!(
            "spoke API server unreachable: no answer to GET /version within {}s",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use brokkr_crds::wire::{MAX_STATE_MESSAGE_BYTES, STATE_READY};

    use super::*;

    #[test]
    fn an_agent_without_problems_reports_what_it_is_doing() {
        assert_eq!(
            heartbeat_state(STATE_READY, &[]),
            ("Ready".to_owned(), None)
        );
        assert_eq!(
            heartbeat_state("Degraded", &[]),
            ("Degraded".to_owned(), None)
        );
    }

    #[test]
    fn any_problem_makes_the_state_error_with_every_cause_named() {
        for activity in ["Starting", "Ready", "Syncing", "Degraded"] {
            let (state, message) = heartbeat_state(
                activity,
                &[
                    "spoke API server unreachable: connection refused",
                    "RBAC refuses watching configmaps in namespace shop: forbidden",
                ],
            );
            assert_eq!(state, STATE_ERROR, "Error takes precedence over {activity}");
            assert_eq!(
                message.as_deref(),
                Some(
                    "spoke API server unreachable: connection refused; \
                     RBAC refuses watching configmaps in namespace shop: forbidden"
                )
            );
        }
    }

    #[test]
    fn the_unreachable_api_server_comes_first_and_the_error_clears_with_its_causes() {
        let published = Published {
            activity: "Ready",
            stacks: Vec::new(),
            problems: vec!["failed to list the inventories: forbidden".to_owned()],
        };
        let beat = published.heartbeat(Some("spoke API server unreachable: timeout"));
        assert_eq!(beat.state, STATE_ERROR);
        assert!(
            beat.message
                .as_deref()
                .unwrap()
                .starts_with("spoke API server unreachable: timeout; failed to list")
        );
        assert_eq!(beat.version, env!("CARGO_PKG_VERSION"));
        let cleared = Published {
            problems: Vec::new(),
            ..published
        };
        let beat = cleared.heartbeat(None);
        assert_eq!((beat.state.as_str(), beat.message), ("Ready", None));
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary_and_nul_is_replaced() {
        let long = "ü".repeat(3 * MAX_STATE_MESSAGE_CHARS);
        let (_, message) = heartbeat_state("Ready", &[&long]);
        let message = message.unwrap();
        assert_eq!(message.chars().count(), MAX_STATE_MESSAGE_CHARS);
        assert!(message.chars().all(|c| c == 'ü'));
        // Whatever the agent sends, the hub accepts.
        let beat = Heartbeat {
            state: STATE_ERROR.into(),
            message: Some(message),
            ..Default::default()
        };
        assert!(beat.message.as_ref().unwrap().len() <= MAX_STATE_MESSAGE_BYTES);
        assert!(beat.validate().is_ok());

        let (_, message) = heartbeat_state("Ready", &["bad\0byte"]);
        assert_eq!(message.as_deref(), Some("bad\u{FFFD}byte"));
    }
}
