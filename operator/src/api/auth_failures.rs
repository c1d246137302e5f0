//! Failed authentications, for the audit log: counted per key prefix, source address and
//! error code, and written once a minute as one `AuthenticationFailed` row per prefix and
//! source. A flood of bad keys costs a map entry each, up to a bound, then one shared
//! entry: never a write per request, and never the presented key (only its public prefix).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use serde_json::json;
use tracing::warn;

use super::lock;
use crate::store::Store;
use crate::store::audit::{AuditEntry, AuditResource, actions};

/// How often the counts are written.
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Distinct (prefix, source) pairs counted in one window; beyond, failures are counted
/// under [`OVERFLOW`].
const MAX_PAIRS: usize = 1000;

/// The prefix failures beyond [`MAX_PAIRS`] are counted under.
const OVERFLOW: &str = "(more prefixes)";

/// The prefix of failures whose header held no well-formed key.
const NO_KEY: &str = "(no key)";

type Pair = (String, String);

#[derive(Default)]
pub struct AuthFailures {
    counts: Mutex<HashMap<Pair, HashMap<&'static str, u64>>>,
    writer: OnceLock<()>,
}

impl AuthFailures {
    /// Counts one failure; the first starts the writer, which ends with the API.
    pub fn failed(
        self: &Arc<Self>,
        store: &Store,
        prefix: Option<&str>,
        source: Option<IpAddr>,
        code: &'static str,
    ) {
        let source = source.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
        self.count(prefix, source, code);
        self.writer.get_or_init(|| {
            tokio::spawn(write_until_dropped(Arc::downgrade(self), store.clone()));
        });
    }

    fn count(&self, prefix: Option<&str>, source: String, code: &'static str) {
        let mut counts = lock(&self.counts);
        let mut pair = (prefix.unwrap_or(NO_KEY).to_owned(), source);
        if !counts.contains_key(&pair) && counts.len() >= MAX_PAIRS {
            pair.0 = OVERFLOW.to_owned();
        }
        *counts.entry(pair).or_default().entry(code).or_default() += 1;
    }

    /// The window's counts as audit rows, emptying it.
    fn take(&self) -> Vec<AuditEntry> {
        let counts = std::mem::take(&mut *lock(&self.counts));
        let mut entries: Vec<AuditEntry> = counts
            .into_iter()
            .map(|((prefix, source), codes)| entry(&prefix, &source, &codes))
            .collect();
        entries.sort_by(|a, b| a.resource.name.cmp(&b.resource.name));
        entries
    }
}

fn entry(prefix: &str, source: &str, codes: &HashMap<&'static str, u64>) -> AuditEntry {
    let failures: u64 = codes.values().sum();
    AuditEntry {
        actor: source.to_owned(),
        action: actions::AUTHENTICATION_FAILED,
        resource: AuditResource {
            kind: "Key",
            namespace: None,
            name: prefix.to_owned(),
            id: None,
        },
        details: json!({
            "source": source,
            "failures": failures,
            "codes": codes,
            "windowSeconds": AUTH_FAILURE_WINDOW.as_secs(),
        }),
    }
}

async fn write_until_dropped(failures: Weak<AuthFailures>, store: Store) {
    let mut ticker = tokio::time::interval(AUTH_FAILURE_WINDOW);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(failures) = failures.upgrade() else {
            return;
        };
        let entries = failures.take();
        if entries.is_empty() {
            continue;
        }
        if let Err(err) = store.record_audit(&entries).await {
            warn!(error = %brokkr_common::error_chain(&err), rows = entries.len(), "could not record failed authentications");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(failures: &AuthFailures, prefix: Option<&str>, source: &str, code: &'static str) {
        failures.count(prefix, source.to_owned(), code);
    }

    #[test]
    fn failures_are_aggregated_per_prefix_and_source_and_bounded() {
        let failures = AuthFailures::default();
        for _ in 0..3 {
            count(&failures, Some("abc"), "10.0.0.1", "unauthorized");
        }
        count(&failures, Some("abc"), "10.0.0.1", "key_expired");
        count(&failures, None, "10.0.0.2", "unauthorized");
        for n in 0..(MAX_PAIRS + 10) {
            count(
                &failures,
                Some(&format!("p{n}")),
                "10.0.0.3",
                "unauthorized",
            );
        }
        let entries = failures.take();
        assert_eq!(
            entries.len(),
            MAX_PAIRS + 1,
            "bounded, plus the overflow row"
        );
        let abc = entries.iter().find(|e| e.resource.name == "abc").unwrap();
        assert_eq!(abc.details["failures"], 4);
        assert_eq!(abc.details["codes"]["key_expired"], 1);
        assert_eq!(abc.actor, "10.0.0.1");
        let overflow = entries
            .iter()
            .find(|e| e.resource.name == OVERFLOW)
            .unwrap();
        assert!(overflow.details["failures"].as_u64().unwrap() >= 10);
        assert!(entries.iter().any(|e| e.resource.name == NO_KEY));
        assert!(failures.take().is_empty(), "the window starts again");
    }
}
