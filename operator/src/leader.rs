//! Leader election through a `coordination.k8s.io/v1` Lease: of several replicas,
//! only the holder runs the controllers; when it stops renewing, another takes over
//! once the lease expires.
//!
//! Lease updates use `replace` with the read `resourceVersion` — optimistic
//! concurrency is the point here, so two candidates can never both win a round.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's name in the lease (its pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub duration: Duration,
    /// How often the holder renews, and candidates retry.
    pub retry: Duration,
}

impl LeaseConfig {
    /// Longest a single call to the API server about the lease may take.
    fn call_timeout(&self) -> Duration {
        self.retry.min(self.duration / 5)
    }

    /// A leader that has not renewed for this long steps down, leaving the rest of the
    /// lease (a sixth of it at least) for the controllers to stop before anyone else
    /// may take over.
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// How long stepping down waits for the controllers before aborting them.
    fn stop_grace(&self) -> Duration {
        self.duration / 6
    }
}

/// Runs `lead` whenever this replica holds the lease, until `shutdown` resolves.
/// `lead` receives a signal that turns true when leadership is lost and must return
/// promptly then; it is aborted if it has not within a sixth of the lease duration.
///
/// Two leaders never overlap: every lease call has a timeout, a leader that cannot
/// renew within two thirds of the lease duration steps down, and its controllers are
/// stopped before the lease it last wrote expires.
pub async fn run_when_leader<F, Fut>(
    client: Client,
    config: LeaseConfig,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
    lead: F,
) where
    F: Fn(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let attempt_started = Instant::now();
        let acquired = tokio::select! {
            _ = &mut shutdown => return,
            acquired = acquire_in_time(&api, &config) => acquired,
        };
        if !acquired {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(config.retry) => continue,
            }
        }
        info!(identity = %config.identity, lease = %config.name, "became leader");
        metrics.leader.set(1);
        let (lost_tx, lost_rx) = watch::channel(false);
        let mut work = tokio::spawn(lead(lost_rx));
        // Measured from before the write: the lease runs from the time it holds.
        let mut renewed_at = attempt_started;
        let stop_reason = loop {
            let renew_by = renewed_at + config.renew_deadline();
            let renewal = async {
                tokio::time::sleep(config.retry).await;
                let started = Instant::now();
                (
                    started,
                    try_acquire(&api, &config, config.call_timeout()).await,
                )
            };
            tokio::select! {
                _ = &mut shutdown => break "shutdown",
                _ = &mut work => break "controllers stopped",
                _ = tokio::time::sleep_until(renew_by) => break "could not renew the lease in time",
                (started, outcome) = renewal => match outcome {
                    Ok(true) => renewed_at = started,
                    Ok(false) => break "lost the lease",
                    Err(err) => warn!(error = %err, "failed to renew the leader lease; retrying"),
                },
            }
        };
        warn!(reason = stop_reason, "stepping down as leader");
        let _ = lost_tx.send(true);
        if tokio::time::timeout(config.stop_grace(), &mut work)
            .await
            .is_err()
        {
            warn!("controllers did not stop in time; aborting them");
            work.abort();
            let _ = (&mut work).await;
        }
        metrics.leader.set(0);
        if stop_reason == "shutdown" {
            release(&api, &config).await;
            return;
        }
    }
}

async fn acquire_in_time(api: &Api<Lease>, config: &LeaseConfig) -> bool {
    match try_acquire(api, config, config.call_timeout()).await {
        Ok(acquired) => acquired,
        Err(err) => {
            warn!(error = %err, "failed to take the leader lease");
            false
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum LeaseError {
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("failed to read or write the lease")]
    Kube(#[from] kube::Error),
}

async fn in_time<T>(timeout: Duration, call: impl Future<Output = T>) -> Result<T, LeaseError> {
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| LeaseError::Timeout(timeout))
}

/// Takes or renews the lease: `Ok(false)` when someone else holds a valid one or won
/// this round; an error when the API server could not be asked in time.
async fn try_acquire(
    api: &Api<Lease>,
    config: &LeaseConfig,
    timeout: Duration,
) -> Result<bool, LeaseError> {
    let now = Timestamp::now();
    let duration_seconds = i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX);
    let existing = in_time(timeout, api.get_opt(&config.name)).await??;
    let Some(mut lease) = existing else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match in_time(timeout, api.create(&PostParams::default(), &lease)).await? {
            Ok(_) => Ok(true),
            // Another replica created it first.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err.into()),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let ours = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    if !ours && !expired(spec, now) {
        return Ok(false);
    }
    if !ours {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(duration_seconds);
    match in_time(
        timeout,
        api.replace(&config.name, &PostParams::default(), &lease),
    )
    .await?
    {
        Ok(_) => Ok(true),
        // A conflict means another replica wrote the lease since we read it.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => Err(err.into()),
    }
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(holder) = spec.holder_identity.as_deref() else {
        return true;
    };
    if holder.is_empty() {
        return true;
    }
    let Some(renewed) = spec.renew_time.as_ref() else {
        return true;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    renewed.0 + duration < now
}

/// Gives the lease up on a clean shutdown, so the next leader need not wait it out.
async fn release(api: &Api<Lease>, config: &LeaseConfig) {
    let read = tokio::time::timeout(config.call_timeout(), api.get_opt(&config.name)).await;
    let Ok(Ok(Some(mut lease))) = read else {
        return;
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    let params = PostParams::default();
    let write = api.replace(&config.name, &params, &lease);
    match tokio::time::timeout(config.call_timeout(), write).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => warn!(error = %err, "failed to release the leader lease"),
        Err(_) => warn!("the API server did not answer in time; the lease expires by itself"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: Some(MicroTime(
                Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago),
            )),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    #[test]
    fn a_leader_steps_down_and_stops_before_its_lease_expires() {
        let config = LeaseConfig {
            name: "l".into(),
            namespace: "n".into(),
            identity: "i".into(),
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(4),
        };
        // The last renewal may have been written as late as a call timeout after it
        // started; stepping down and stopping must still end before the lease does.
        assert!(config.renew_deadline() + config.stop_grace() < config.duration);
        assert!(config.call_timeout() < config.renew_deadline() - config.retry);
        assert_eq!(config.call_timeout(), Duration::from_secs(3));
    }

    #[test]
    fn a_lease_expires_after_its_duration_without_renewal() {
        let now = Timestamp::now();
        assert!(!expired(&spec(Some("a"), 5, 15), now));
        assert!(expired(&spec(Some("a"), 20, 15), now));
        assert!(expired(&spec(None, 0, 15), now), "a released lease is free");
        assert!(expired(&spec(Some(""), 0, 15), now));
    }
}
