//! Counts of the requests kubesim served, by verb and resource, so that a test or a
//! benchmark can say how many writes a controller made (a real API server has its
//! audit log and metrics for this; tests on a real cluster skip such counts).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// One kind of request: the Kubernetes verb (`create`, `update`, `patch`, `delete`,
/// `deletecollection`, `get`, `list`, `watch`) and the resource, with its subresource
/// after a slash (`stacks`, `stacks/status`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKind {
    pub verb: &'static str,
    pub resource: String,
}

impl RequestKind {
    /// Whether the request changes state (create, update, patch, delete).
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb,
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

impl std::fmt::Display for RequestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)
    }
}

/// A snapshot of request counts; [`RequestCounts::since`] gives those of an interval.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts(pub BTreeMap<RequestKind, u64>);

impl RequestCounts {
    /// The requests counted here and not in `earlier` (a snapshot taken before).
    pub fn since(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts(
            self.0
                .iter()
                .filter_map(|(kind, count)| {
                    let before = earlier.0.get(kind).copied().unwrap_or(0);
                    (*count > before).then(|| (kind.clone(), count - before))
                })
                .collect(),
        )
    }

    /// How many requests of `verb` on `resource` (e.g. `"patch"`, `"stacks/status"`).
    pub fn get(&self, verb: &str, resource: &str) -> u64 {
        self.0
            .iter()
            .filter(|(kind, _)| kind.verb == verb && kind.resource == resource)
            .map(|(_, count)| count)
            .sum()
    }

    /// Only the writes.
    pub fn writes(&self) -> RequestCounts {
        RequestCounts(
            self.0
                .iter()
                .filter(|(kind, _)| kind.is_write())
                .map(|(kind, count)| (kind.clone(), *count))
                .collect(),
        )
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

impl std::fmt::Display for RequestCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (kind, count)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{kind}: {count}")?;
        }
        Ok(())
    }
}

/// The live counters of a server.
#[derive(Default)]
pub(crate) struct RequestLog(Mutex<BTreeMap<RequestKind, u64>>);

impl RequestLog {
    pub(crate) fn record(&self, verb: &'static str, resource: &str, subresource: Option<&str>) {
        let resource = match subresource {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_owned(),
        };
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(RequestKind { verb, resource }).or_default() += 1;
    }

    pub(crate) fn snapshot(&self) -> RequestCounts {
        RequestCounts(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_counts_only_what_happened_in_it() {
        let log = RequestLog::default();
        log.record("create", "stacks", None);
        let before = log.snapshot();
        log.record("create", "stacks", None);
        log.record("patch", "stacks", Some("status"));
        log.record("list", "stacks", None);
        let since = log.snapshot().since(&before);
        assert_eq!(since.get("create", "stacks"), 1);
        assert_eq!(since.get("patch", "stacks/status"), 1);
        assert_eq!(since.writes().total(), 2);
        assert_eq!(
            since.writes().to_string(),
            "create stacks: 1, patch stacks/status: 1"
        );
    }
}
