//! The NotificationChannel controller: checks that a channel's spec is valid and that the
//! Secrets it names hold what it needs, and says so in its `Ready` condition.
//!
//! Delivery results also set `Ready` (see [`super::deliver`]): a channel whose Secrets
//! are fine keeps the condition its last delivery set. The controller writes only
//! `observedGeneration` and `conditions`, never the `lastDelivery*` fields.
//
// Both writers merge-patch the status with the `resourceVersion` they read as a
// precondition: `consecutiveFailures` is read-modify-write, and a merge patch replaces
// the whole `conditions` list, so a write based on a stale read must fail (409) rather
// than undo the other writer's.

use std::sync::Arc;
use std::time::Duration;

use brokkr_crds::conditions::{find_condition, new_condition, reasons, set_condition, types};
use brokkr_crds::{
    ChannelType, NotificationChannel, NotificationChannelStatus, OPERATOR_FIELD_MANAGER,
    SecretKeySelector,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tracing::{instrument, warn};

use crate::metrics::Metrics;
use crate::status::now;

/// How often a channel's Secrets are checked again (the operator may not watch Secrets).
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(60);

/// The name Events of the channel controller and the sender are reported by.
pub(crate) const REPORTER: &str = "brokkr-operator";

/// Where and how a channel's notifications are sent, read from its spec and Secrets.
pub(crate) struct Endpoint {
    pub type_: ChannelType,
    /// Never logged: it often carries a token.
    pub url: reqwest::Url,
    /// The HMAC key, byte for byte as the Secret holds it.
    pub signing_key: Option<Vec<u8>>,
    /// `spec.webhook.headers`.
    pub headers: HeaderMap,
}

/// Why a channel cannot send.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChannelProblem {
    #[error("{0}")]
    InvalidSpec(String),
    #[error("Secret {secret} not found")]
    SecretNotFound { secret: String },
    #[error("Secret {secret} has no key {key}")]
    KeyNotFound { secret: String, key: String },
    #[error("key {key} of Secret {secret} does not hold an http or https URL")]
    NotAnUrl { secret: String, key: String },
    #[error("failed to read Secret {secret}")]
    Unreadable {
        secret: String,
        #[source]
        source: kube::Error,
    },
}

impl ChannelProblem {
    /// The reason of the `Ready=False` condition; `None` for a failure to ask (retried).
    fn reason(&self) -> Option<&'static str> {
        match self {
            ChannelProblem::InvalidSpec(_) | ChannelProblem::NotAnUrl { .. } => {
                Some(reasons::INVALID_SPEC)
            }
            ChannelProblem::SecretNotFound { .. } | ChannelProblem::KeyNotFound { .. } => {
                Some(reasons::SECRET_NOT_FOUND)
            }
            ChannelProblem::Unreadable { .. } => None,
        }
    }
}

/// Reads `channel`'s spec and Secrets (by name: the operator may get Secrets, never list
/// or watch them) into an [`Endpoint`].
pub(crate) async fn resolve(
    client: &Client,
    channel: &NotificationChannel,
) -> Result<Endpoint, ChannelProblem> {
    let spec = &channel.spec;
    spec.validate()
        .map_err(|err| ChannelProblem::InvalidSpec(err.to_string()))?;
    let namespace = channel.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    // `validate` made sure the section of the type is there.
    let (url_ref, signing_ref, extra) = match (spec.type_, &spec.webhook, &spec.slack) {
        (ChannelType::Webhook, Some(webhook), _) => (
            &webhook.url_secret_ref,
            webhook.signing_secret_ref.as_ref(),
            Some(&webhook.headers),
        ),
        (ChannelType::Slack, _, Some(slack)) => (&slack.url_secret_ref, None, None),
        _ => {
            return Err(ChannelProblem::InvalidSpec(format!(
                "spec.{0} is required with type {0}",
                spec.type_.as_str()
            )));
        }
    };
    let url_bytes = secret_key(&secrets, &namespace, url_ref).await?;
    let url = std::str::from_utf8(&url_bytes)
        .ok()
        .and_then(|text| reqwest::Url::parse(text.trim()).ok())
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
        .ok_or_else(|| ChannelProblem::NotAnUrl {
            secret: format!("{namespace}/{}", url_ref.name),
            key: url_ref.key.clone(),
        })?;
    let signing_key = match signing_ref {
        Some(selector) => Some(secret_key(&secrets, &namespace, selector).await?),
        None => None,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in extra.into_iter().flatten() {
        let name = HeaderName::from_bytes(name.as_bytes());
        let value = HeaderValue::from_str(value);
        let (Ok(name), Ok(value)) = (name, value) else {
            return Err(ChannelProblem::InvalidSpec(
                "spec.webhook.headers holds a header that cannot be sent".into(),
            ));
        };
        headers.insert(name, value);
    }
    Ok(Endpoint {
        type_: spec.type_,
        url,
        signing_key,
        headers,
    })
}

/// The bytes of one Secret key.
async fn secret_key(
    secrets: &Api<Secret>,
    namespace: &str,
    selector: &SecretKeySelector,
) -> Result<Vec<u8>, ChannelProblem> {
    let secret = format!("{namespace}/{}", selector.name);
    let found = secrets
        .get_opt(&selector.name)
        .await
        .map_err(|source| ChannelProblem::Unreadable {
            secret: secret.clone(),
            source,
        })?
        .ok_or_else(|| ChannelProblem::SecretNotFound {
            secret: secret.clone(),
        })?;
    found
        .data
        .and_then(|mut data| data.remove(&selector.key))
        .map(|bytes| bytes.0)
        .ok_or_else(|| ChannelProblem::KeyNotFound {
            secret,
            key: selector.key.clone(),
        })
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("failed to call the Kubernetes API")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Secret(#[from] ChannelProblem),
}

struct Context {
    client: Client,
    recorder: Recorder,
    metrics: Metrics,
    recheck: Duration,
}

/// Runs the NotificationChannel controller for `api`'s channels until `shutdown`
/// resolves: on every change of a channel, and every [`RECHECK_INTERVAL`].
pub async fn run(
    client: Client,
    api: Api<NotificationChannel>,
    metrics: Metrics,
    shutdown: impl Future + Send + Sync + 'static,
) {
    run_with(client, api, metrics, RECHECK_INTERVAL, shutdown).await
}

/// [`run`], checking every channel's Secrets every `recheck`.
pub async fn run_with(
    client: Client,
    api: Api<NotificationChannel>,
    metrics: Metrics,
    recheck: Duration,
    shutdown: impl Future + Send + Sync + 'static,
) {
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), Reporter::from(REPORTER)),
        client,
        metrics,
        recheck,
    });
    Controller::new(api, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(async move {
            shutdown.await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

fn error_policy(_channel: Arc<NotificationChannel>, err: &Error, _ctx: Arc<Context>) -> Action {
    warn!(error = %brokkr_common::error_chain(err), "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

#[instrument(skip_all, fields(channel = %ObjectKeyDisplay(&channel)))]
async fn reconcile(channel: Arc<NotificationChannel>, ctx: Arc<Context>) -> Result<Action, Error> {
    let timer = ctx.metrics.reconcile_started("notificationchannel");
    let outcome = check(&channel, &ctx).await;
    timer.finish(
        outcome
            .as_ref()
            .err()
            .map(|_| crate::controllers::categories::KUBERNETES),
    );
    outcome
}

async fn check(channel: &NotificationChannel, ctx: &Context) -> Result<Action, Error> {
    let previous = channel.status.clone().unwrap_or_default();
    let problem = match resolve(&ctx.client, channel).await {
        Ok(_) => None,
        Err(problem) => match problem.reason() {
            Some(reason) => Some((reason, problem.to_string())),
            None => return Err(problem.into()),
        },
    };
    let (conditions, refused) = channel_conditions(
        &previous,
        channel.metadata.generation,
        problem
            .as_ref()
            .map(|(reason, message)| (*reason, message.as_str())),
        now(),
    );
    let changed =
        !brokkr_crds::conditions::conditions_eq_ignoring_time(&previous.conditions, &conditions)
            || previous.observed_generation != channel.metadata.generation;
    if !changed {
        return Ok(Action::requeue(ctx.recheck));
    }
    if refused && let Some((reason, message)) = &problem {
        publish(
            &ctx.recorder,
            channel,
            EventType::Warning,
            reason,
            "Validate",
            message.clone(),
        )
        .await;
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": channel.resource_version()},
        "status": {
            "observedGeneration": channel.metadata.generation,
            "conditions": conditions,
        },
    });
    let api: Api<NotificationChannel> =
        Api::namespaced(ctx.client.clone(), &channel.namespace().unwrap_or_default());
    match api
        .patch_status(
            &channel.name_any(),
            &PatchParams {
                field_manager: Some(OPERATOR_FIELD_MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(Action::requeue(ctx.recheck)),
        // Someone (the sender) wrote the status since this copy was read; the watch
        // brings the new one.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Err(err) => Err(err.into()),
    }
}

/// The channel's conditions after a check that found `problem` (`(reason, message)`),
/// and whether `Ready` newly says that problem (worth a Warning Event).
///
/// Without a problem, a `Ready` set by a delivery (`Delivered` or `DeliveryFailing`)
/// stays: it says more than "the Secrets exist".
pub(crate) fn channel_conditions(
    previous: &NotificationChannelStatus,
    generation: Option<i64>,
    problem: Option<(&str, &str)>,
    now: brokkr_crds::Time,
) -> (Vec<brokkr_crds::Condition>, bool) {
    let mut conditions = previous.conditions.clone();
    let existing = find_condition(&previous.conditions, types::READY);
    let ready = match problem {
        Some((reason, message)) => {
            new_condition(types::READY, false, reason, message, generation, now)
        }
        None => match existing {
            Some(kept)
                if kept.reason == reasons::DELIVERED
                    || kept.reason == reasons::DELIVERY_FAILING =>
            {
                brokkr_crds::Condition {
                    observed_generation: generation,
                    ..kept.clone()
                }
            }
            _ => new_condition(
                types::READY,
                true,
                reasons::RECONCILED,
                if previous.last_delivery_time.is_none() {
                    "secrets found; no notification sent yet"
                } else {
                    "secrets found"
                },
                generation,
                now,
            ),
        },
    };
    let refused = problem.is_some()
        && !existing.is_some_and(|c| {
            c.status == brokkr_crds::conditions::STATUS_FALSE
                && c.reason == ready.reason
                && c.message == ready.message
        });
    set_condition(&mut conditions, ready);
    (conditions, refused)
}

/// Publishes an Event about `channel`; a failure to publish is only logged.
pub(crate) async fn publish(
    recorder: &Recorder,
    channel: &NotificationChannel,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let reference = channel.object_ref(&());
    crate::controllers::publish_with(recorder, &reference, type_, reason, action, &note).await;
}

/// `namespace/name` of a channel, for spans.
struct ObjectKeyDisplay<'a>(&'a NotificationChannel);

impl std::fmt::Display for ObjectKeyDisplay<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            self.0.namespace().unwrap_or_default(),
            self.0.name_any()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> brokkr_crds::Time {
        brokkr_crds::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + seconds).unwrap(),
        )
    }

    #[test]
    fn a_missing_secret_makes_the_channel_not_ready_once() {
        let status = NotificationChannelStatus::default();
        let problem = Some((reasons::SECRET_NOT_FOUND, "Secret a/hook not found"));
        let (conditions, refused) = channel_conditions(&status, Some(1), problem, at(0));
        assert!(refused);
        let ready = find_condition(&conditions, types::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "SecretNotFound")
        );
        let status = NotificationChannelStatus {
            conditions,
            ..Default::default()
        };
        let (again, refused) = channel_conditions(&status, Some(1), problem, at(60));
        assert!(!refused, "no second Event for the same problem");
        assert_eq!(again[0].last_transition_time, at(0));
        let (fixed, refused) = channel_conditions(&status, Some(1), None, at(90));
        assert!(!refused);
        assert_eq!(fixed[0].reason, reasons::RECONCILED);
        assert_eq!(fixed[0].message, "secrets found; no notification sent yet");
        assert_eq!(fixed[0].last_transition_time, at(90));
    }

    #[test]
    fn a_delivery_result_is_kept_while_the_secrets_are_fine() {
        let failing = new_condition(
            types::READY,
            false,
            reasons::DELIVERY_FAILING,
            "HTTP 503",
            Some(1),
            at(0),
        );
        let status = NotificationChannelStatus {
            conditions: vec![failing.clone()],
            last_delivery_time: Some(at(0)),
            consecutive_failures: 2,
            ..Default::default()
        };
        let (conditions, _) = channel_conditions(&status, Some(2), None, at(30));
        assert_eq!(conditions[0].reason, reasons::DELIVERY_FAILING);
        assert_eq!(conditions[0].observed_generation, Some(2));
        assert_eq!(conditions[0].last_transition_time, at(0));
    }
}
