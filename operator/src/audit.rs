//! The audit log outside the store: `brokkr-operator audit` prints it, and the leader
//! prunes rows older than the retention period.

use std::time::Duration;

use brokkr_common::parse_interval;
use chrono::Utc;
use clap::{Args, ValueEnum};
use tracing::{info, warn};

use crate::store::{AuditQuery, AuditRecord, Store, StoreError};

/// `brokkr-operator audit`: reads `DATABASE_URL` (or `--database-url`).
#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// Only rows recorded within this long before now, e.g. 30m, 1h, 7d
    #[arg(long, value_parser = parse_interval)]
    pub since: Option<Duration>,

    /// Only rows about this resource: `<kind>/<namespace>/<name>` (Stack, AgentTarget,
    /// Generator), `<kind>/<name>` (Agent), or `<kind>` alone
    #[arg(long, value_name = "KIND[/NAMESPACE]/NAME")]
    pub resource: Option<String>,

    /// At most this many rows, the newest
    #[arg(long, default_value_t = 1000)]
    pub limit: u64,

    /// Output format
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One aligned line per row
    Table,
    /// One JSON object per line
    Json,
}

impl AuditArgs {
    /// The store query these arguments ask for.
    pub fn query(&self) -> Result<AuditQuery, String> {
        let since = match self.since {
            Some(since) => Some(
                chrono::Duration::from_std(since)
                    .ok()
                    .and_then(|since| Utc::now().checked_sub_signed(since))
                    .ok_or_else(|| format!("--since {since:?} reaches too far back"))?,
            ),
            None => None,
        };
        let mut query = AuditQuery {
            since,
            limit: Some(self.limit),
            ..AuditQuery::default()
        };
        if let Some(resource) = &self.resource {
            let parts: Vec<&str> = resource.split('/').collect();
            if parts.iter().any(|part| part.is_empty()) || parts.len() > 3 {
                return Err(format!(
                    "--resource {resource:?} is not <kind>, <kind>/<name> or <kind>/<namespace>/<name>"
                ));
            }
            query.kind = Some(parts[0].to_owned());
            match parts[1..] {
                [name] => query.name = Some(name.to_owned()),
                [namespace, name] => {
                    query.namespace = Some(namespace.to_owned());
                    query.name = Some(name.to_owned());
                }
                _ => {}
            }
        }
        Ok(query)
    }
}

/// Connects to `database_url` and prints the rows `args` asks for.
pub async fn print_from(database_url: Option<&str>, args: &AuditArgs) -> Result<(), String> {
    let url = database_url.ok_or("set DATABASE_URL or --database-url")?;
    let db = crate::run::connect(url)
        .await
        .map_err(|err| brokkr_common::error_chain(&err))?;
    print(&Store::new(db), args).await
}

/// Prints the rows `args` asks for to standard output.
pub async fn print(store: &Store, args: &AuditArgs) -> Result<(), String> {
    let query = args.query()?;
    let rows = store
        .audit_entries(&query)
        .await
        .map_err(|err| brokkr_common::error_chain(&err))?;
    let mut out = String::new();
    match args.output {
        Format::Json => {
            for row in &rows {
                out.push_str(&serde_json::to_string(row).map_err(|err| err.to_string())?);
                out.push('\n');
            }
        }
        Format::Table => out.push_str(&table(&rows)),
    }
    print!("{out}");
    Ok(())
}

/// Rows as aligned columns: time, actor, action, resource, details.
pub fn table(rows: &[AuditRecord]) -> String {
    let resource = |row: &AuditRecord| match &row.resource_namespace {
        Some(namespace) => format!("{}/{namespace}/{}", row.resource_kind, row.resource_name),
        None => format!("{}/{}", row.resource_kind, row.resource_name),
    };
    let lines: Vec<[String; 5]> = rows
        .iter()
        .map(|row| {
            [
                row.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                row.actor.clone(),
                row.action.clone(),
                resource(row),
                row.details.to_string(),
            ]
        })
        .collect();
    let header = ["TIME", "ACTOR", "ACTION", "RESOURCE", "DETAILS"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in std::iter::once(&header).chain(&lines) {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, width))| {
                if i + 1 == line.len() {
                    cell.clone()
                } else {
                    format!("{cell:width$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Rows deleted per statement when pruning.
const PRUNE_BATCH: u64 = 1000;
/// How often the leader prunes.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Deletes rows older than `retention`, in batches, every [`PRUNE_INTERVAL`] until the
/// task is dropped (run it only on the leader).
pub async fn prune_periodically(store: Store, retention: Duration) {
    let mut ticker = tokio::time::interval(PRUNE_INTERVAL);
    loop {
        ticker.tick().await;
        match prune(&store, retention).await {
            Ok(0) => {}
            Ok(pruned) => info!(pruned, "pruned audit rows past their retention"),
            Err(err) => {
                warn!(error = %brokkr_common::error_chain(&err), "failed to prune the audit log")
            }
        }
    }
}

/// Deletes every row older than `retention`; returns how many.
pub async fn prune(store: &Store, retention: Duration) -> Result<u64, StoreError> {
    let Some(before) = chrono::Duration::from_std(retention)
        .ok()
        .and_then(|retention| Utc::now().checked_sub_signed(retention))
    else {
        return Ok(0);
    };
    let mut pruned = 0;
    loop {
        let deleted = store.prune_audit(before, PRUNE_BATCH).await?;
        pruned += deleted;
        if deleted < PRUNE_BATCH {
            return Ok(pruned);
        }
        // Let the hub's own writes through between batches.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        audit: AuditArgs,
    }

    fn query(args: &[&str]) -> Result<AuditQuery, String> {
        let cli = Cli::try_parse_from(std::iter::once("audit").chain(args.iter().copied()))
            .map_err(|err| err.to_string())?;
        cli.audit.query()
    }

    #[test]
    fn resources_name_a_kind_a_namespace_and_a_name() {
        let q = query(&["--resource", "stack/team-a/web"]).unwrap();
        assert_eq!(q.kind.as_deref(), Some("stack"));
        assert_eq!(q.namespace.as_deref(), Some("team-a"));
        assert_eq!(q.name.as_deref(), Some("web"));
        let q = query(&["--resource", "agent/edge-1"]).unwrap();
        assert_eq!((q.namespace, q.name.as_deref()), (None, Some("edge-1")));
        let q = query(&["--resource", "key"]).unwrap();
        assert_eq!((q.kind.as_deref(), q.name), (Some("key"), None));
        for bad in ["stack//web", "a/b/c/d", "/web", ""] {
            assert!(query(&["--resource", bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn since_is_a_positive_duration() {
        let q = query(&["--since", "1h"]).unwrap();
        let since = q.since.unwrap();
        let age = Utc::now() - since;
        assert!(age >= chrono::Duration::minutes(59) && age <= chrono::Duration::minutes(61));
        assert!(query(&["--since", "0"]).is_err());
        assert!(query(&["--since", "yesterday"]).is_err());
    }

    #[test]
    fn the_table_aligns_columns_and_shows_details_as_json() {
        let row = |actor: &str, namespace: Option<&str>| AuditRecord {
            id: 1,
            at: "2026-11-29T10:00:00Z".parse().unwrap(),
            actor: actor.into(),
            action: "KeyRotated".into(),
            resource_kind: "Agent".into(),
            resource_namespace: namespace.map(str::to_owned),
            resource_name: "edge-1".into(),
            resource_id: None,
            details: serde_json::json!({"prefix": "abc"}),
        };
        let printed = table(&[row("agent/edge-1", None), row("kubectl", Some("ns"))]);
        let lines: Vec<&str> = printed.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("TIME "));
        assert_eq!(lines[1].find("KeyRotated"), lines[2].find("KeyRotated"));
        assert!(lines[1].contains("Agent/edge-1") && lines[1].ends_with(r#"{"prefix":"abc"}"#));
        assert!(lines[2].contains("Agent/ns/edge-1"));
    }
}
