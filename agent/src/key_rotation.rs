//! Self-rotation of the agent key. Each heartbeat answer tells when the key in use was
//! issued and when it expires; once 2/3 of that lifetime has passed, the agent asks the hub
//! for a new key (`POST /api/v1/agent/key`, which also updates the hub's copy), writes it to
//! its own Secret in the spoke (`--key-secret`), and then sends every request with it. The
//! old key stays valid for the Agent's `keyPolicy.overlap`, so requests in flight and a
//! restart in between keep working. A failed Secret write is retried; the key itself is
//! never logged.

use std::time::{Duration, Instant};

use brokkr_common::error_chain;
use brokkr_crds::wire::{KeyLifetime, RotatedKey};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

use crate::config::AgentKey;
use crate::hub::HubClient;

/// Where the agent keeps its key in the spoke: Secret `name` in the agent's namespace, data
/// key `data_key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySecret {
    pub name: String,
    pub data_key: String,
}

/// How long a renewed key whose Secret cannot be written waits at most before the agent
/// uses it anyway (sooner when the previous key's overlap ends sooner).
const SWITCH_ANYWAY: Duration = Duration::from_secs(10 * 60);

/// Longest pause between attempts to write the Secret, or to renew the key.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Whether a key issued at `issued` and expiring at `expires` is due for renewal at `now`:
/// once 2/3 of its lifetime has passed.
pub fn rotation_due(issued: Timestamp, expires: Timestamp, now: Timestamp) -> bool {
    let issued = i128::from(issued.as_millisecond());
    let lifetime = i128::from(expires.as_millisecond()) - issued;
    i128::from(now.as_millisecond()) >= issued + lifetime * 2 / 3
}

/// Renews the key whenever it is due, checking every `check_every`; runs until dropped.
pub async fn renew_keys(
    hub: HubClient,
    secrets: Api<Secret>,
    secret: KeySecret,
    check_every: Duration,
) -> &'static str {
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(check_every).await;
        let Some(lifetime) = hub.key_lifetime() else {
            continue;
        };
        if !rotation_due(
            lifetime.issued_at.0,
            lifetime.expires_at.0,
            Timestamp::now(),
        ) {
            continue;
        }
        tracing::info!(prefix = %lifetime.prefix, expires = %lifetime.expires_at.0, "renewing the agent key: 2/3 of its lifetime has passed");
        match hub.rotate_key().await {
            Ok(rotated) => {
                failures = 0;
                store_and_use(&hub, &secrets, &secret, rotated).await;
            }
            Err(err) => {
                failures += 1;
                tracing::warn!(error = %error_chain(&err), "failed to renew the agent key; retrying");
                let pause = Duration::from_secs(2u64.saturating_pow(failures.min(6)));
                tokio::time::sleep(pause.min(MAX_RETRY)).await;
            }
        }
    }
}

/// How long to keep trying to store a renewed key before using it anyway: half of what is
/// left of the previous key's validity, at most [`SWITCH_ANYWAY`]. An unstored key in use
/// beats being locked out when the previous one ends.
fn switch_anyway_after(
    previous_valid_until: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    now: Timestamp,
) -> Duration {
    previous_valid_until
        // Already past: at once.
        .map(|until| Duration::try_from(now.duration_until(until.0)).unwrap_or(Duration::ZERO))
        .map_or(SWITCH_ANYWAY, |left| (left / 2).min(SWITCH_ANYWAY))
}

/// Writes the new key to the Secret (retrying), then switches to it.
async fn store_and_use(
    hub: &HubClient,
    secrets: &Api<Secret>,
    secret: &KeySecret,
    rotated: RotatedKey,
) {
    let Some(key) = AgentKey::new(&rotated.key) else {
        tracing::error!(prefix = %rotated.prefix, "the hub answered an empty key; keeping the current one");
        return;
    };
    let lifetime = KeyLifetime {
        prefix: rotated.prefix.clone(),
        issued_at: rotated.issued_at.clone(),
        expires_at: rotated.expires_at.clone(),
    };
    let started = Instant::now();
    let switch_anyway =
        switch_anyway_after(rotated.previous_key_valid_until.as_ref(), Timestamp::now());
    let mut switched = false;
    let mut pause = Duration::from_secs(1);
    loop {
        match write_key(secrets, secret, &key).await {
            Ok(()) => {
                tracing::info!(prefix = %rotated.prefix, secret = %secret.name, expires = %rotated.expires_at.0, "stored the renewed agent key; using it from now on");
                break;
            }
            Err(err) => {
                tracing::warn!(prefix = %rotated.prefix, secret = %secret.name, error = %error_chain(&err), "failed to write the renewed agent key to its Secret; retrying");
                if !switched && started.elapsed() >= switch_anyway {
                    tracing::warn!(prefix = %rotated.prefix, secret = %secret.name, "using the renewed key before it is stored: an agent restarted before the Secret is written starts with the previous key, valid only for the overlap");
                    hub.use_key(key.clone(), Some(lifetime.clone()));
                    switched = true;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_RETRY);
            }
        }
    }
    if !switched {
        hub.use_key(key, Some(lifetime));
    }
}

/// Puts `key` into the Secret with a get and an update, the two rights the agent chart
/// grants on it.
async fn write_key(
    secrets: &Api<Secret>,
    secret: &KeySecret,
    key: &AgentKey,
) -> Result<(), kube::Error> {
    let mut current = secrets.get(&secret.name).await?;
    current.data.get_or_insert_default().insert(
        secret.data_key.clone(),
        ByteString(key.expose().as_bytes().to_vec()),
    );
    if let Some(strings) = current.string_data.as_mut() {
        strings.remove(&secret.data_key);
    }
    secrets
        .replace(&secret.name, &PostParams::default(), &current)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unstored_key_is_used_before_the_previous_one_ends() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let now = Timestamp::from_second(1_000_000).unwrap();
        let until = |seconds: i64| Time(Timestamp::from_second(1_000_000 + seconds).unwrap());
        assert_eq!(
            switch_anyway_after(Some(&until(40)), now),
            Duration::from_secs(20)
        );
        assert_eq!(switch_anyway_after(Some(&until(3600)), now), SWITCH_ANYWAY);
        assert_eq!(switch_anyway_after(Some(&until(-5)), now), Duration::ZERO);
        assert_eq!(
            switch_anyway_after(None, now),
            SWITCH_ANYWAY,
            "an older hub"
        );
    }

    #[test]
    fn a_key_is_due_once_two_thirds_of_its_lifetime_have_passed() {
        let issued = Timestamp::from_second(1_000_000).unwrap();
        let expires = Timestamp::from_second(1_000_000 + 3 * 3600).unwrap();
        let at = |seconds: i64| Timestamp::from_second(1_000_000 + seconds).unwrap();
        assert!(!rotation_due(issued, expires, at(0)));
        assert!(!rotation_due(issued, expires, at(2 * 3600 - 1)));
        assert!(rotation_due(issued, expires, at(2 * 3600)));
        assert!(
            rotation_due(issued, expires, at(4 * 3600)),
            "and after expiry"
        );
    }
}
