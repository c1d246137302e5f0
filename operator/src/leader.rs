//! Leader election through a `coordination.k8s.io/v1` Lease: of several replicas,
//! only the holder runs the controllers; when it stops renewing, another takes over
//! once the lease expires.
//!
//! Lease updates use `replace` with the read `resourceVersion` — optimistic
//! concurrency is the point here, so two candidates can never both win a round.

use std::future::Future;
use std::time::Duration;

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

/// Runs `lead` whenever this replica holds the lease, until `shutdown` resolves.
/// `lead` receives a signal that turns true when leadership is lost and must return
/// promptly then.
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
        let acquired = tokio::select! {
            _ = &mut shutdown => return,
            acquired = try_acquire(&api, &config) => acquired,
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
        let stop_reason = loop {
            tokio::select! {
                _ = &mut shutdown => break "shutdown",
                _ = &mut work => break "controllers stopped",
                _ = tokio::time::sleep(config.retry) => {
                    if !try_acquire(&api, &config).await {
                        break "lost the lease";
                    }
                }
            }
        };
        warn!(reason = stop_reason, "stepping down as leader");
        let _ = lost_tx.send(true);
        let _ = (&mut work).await;
        metrics.leader.set(0);
        if stop_reason == "shutdown" {
            release(&api, &config).await;
            return;
        }
    }
}

/// Takes or renews the lease; false when someone else holds a valid one.
async fn try_acquire(api: &Api<Lease>, config: &LeaseConfig) -> bool {
    let now = Timestamp::now();
    let duration_seconds = i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX);
    let existing = match api.get_opt(&config.name).await {
        Ok(existing) => existing,
        Err(err) => {
            warn!(error = %err, "failed to read the leader lease");
            return false;
        }
    };
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
        return api.create(&PostParams::default(), &lease).await.is_ok();
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let ours = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    if !ours && !expired(spec, now) {
        return false;
    }
    if !ours {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(duration_seconds);
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => true,
        Err(err) => {
            // A conflict means another replica won this round.
            tracing::debug!(error = %err, "failed to write the leader lease");
            false
        }
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
    let Ok(Some(mut lease)) = api.get_opt(&config.name).await else {
        return;
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    if let Err(err) = api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        warn!(error = %err, "failed to release the leader lease");
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
    fn a_lease_expires_after_its_duration_without_renewal() {
        let now = Timestamp::now();
        assert!(!expired(&spec(Some("a"), 5, 15), now));
        assert!(expired(&spec(Some("a"), 20, 15), now));
        assert!(expired(&spec(None, 0, 15), now), "a released lease is free");
        assert!(expired(&spec(Some(""), 0, 15), now));
    }
}
