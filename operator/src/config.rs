//! Command line and environment of `brokkr-operator`.

use std::net::SocketAddr;
use std::time::Duration;

use brokkr_common::{parse_duration, parse_interval};
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "brokkr-operator",
    version,
    about = "Brokkr hub: mirrors Generator, Stack, AgentTarget and Agent resources into PostgreSQL and serves agents"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the hub (the default)
    Run,
    /// Print the CustomResourceDefinitions as YAML
    Crd,
    /// Print the audit log: who changed what, oldest first (reads DATABASE_URL)
    Audit(crate::audit::AuditArgs),
}

// Every flag is global: users type them after `run` as often as before it.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// PostgreSQL URL, e.g. postgres://brokkr:secret@postgres:5432/brokkr
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Namespace of the agents' key Secrets and the leader lease [default: the pod's
    /// namespace, else brokkr-system]
    #[arg(long, global = true, env = "BROKKR_NAMESPACE")]
    pub namespace: Option<String>,

    /// Address of /metrics, /healthz and /readyz
    #[arg(
        long,
        global = true,
        env = "BROKKR_METRICS_ADDR",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_addr: SocketAddr,

    /// Address of the agent API (/api/v1/agent/*)
    #[arg(
        long,
        global = true,
        env = "BROKKR_API_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub api_addr: SocketAddr,

    /// PEM certificate chain to serve the agent API over TLS (with --tls-key)
    #[arg(long, global = true, env = "BROKKR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key for --tls-cert
    #[arg(long, global = true, env = "BROKKR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Time a client has to send a request's headers (and to finish a TLS handshake) on
    /// the agent API; slower connections are closed
    #[arg(long, global = true, env = "BROKKR_API_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub api_header_read_timeout: Duration,

    /// Time an agent API connection may stay open between requests; a request in flight
    /// (a long-poll) is never cut by it
    #[arg(long, global = true, env = "BROKKR_API_IDLE_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub api_idle_timeout: Duration,

    /// Agent API connections served at once; more wait in the listen backlog (~30 KiB each)
    #[arg(
        long,
        global = true,
        env = "BROKKR_API_MAX_CONNECTIONS",
        default_value_t = 25_000
    )]
    pub api_max_connections: usize,

    /// Requests per second one agent key may make on average; more get 429 with
    /// Retry-After (0: no limit)
    #[arg(long, global = true, env = "BROKKR_API_KEY_RATE", default_value_t = crate::api::DEFAULT_KEY_RATE.per_second)]
    pub api_key_rate: f64,

    /// Requests one agent key may make in a burst above --api-key-rate
    #[arg(long, global = true, env = "BROKKR_API_KEY_BURST", default_value_t = crate::api::DEFAULT_KEY_RATE.burst)]
    pub api_key_burst: u32,

    /// Deployment objects up to this size (bytes of JSON) travel inside the long-poll
    /// answer of a push, sparing each agent a fetch (0: agents always fetch)
    #[arg(long, global = true, env = "BROKKR_INLINE_OBJECT_MAX_BYTES", default_value_t = crate::api::DEFAULT_INLINE_OBJECT_MAX_BYTES)]
    pub inline_object_max_bytes: usize,

    /// Lookups per second of agent keys the hub does not know; beyond, requests with keys
    /// not yet cached get 429 without a database query (0: no limit)
    #[arg(long, global = true, env = "BROKKR_API_UNKNOWN_KEY_RATE", default_value_t = crate::api::DEFAULT_UNKNOWN_KEY_RATE.per_second)]
    pub api_unknown_key_rate: f64,

    /// Lookups of unknown agent keys allowed in a burst above --api-unknown-key-rate
    #[arg(long, global = true, env = "BROKKR_API_UNKNOWN_KEY_BURST", default_value_t = crate::api::DEFAULT_UNKNOWN_KEY_RATE.burst)]
    pub api_unknown_key_burst: u32,

    /// Interval at which agents send heartbeats; three missed ones mark an agent Offline
    #[arg(long, global = true, env = "BROKKR_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = parse_interval)]
    pub heartbeat_interval: Duration,

    /// Create or update the CRDs at start
    #[arg(long, global = true, env = "BROKKR_INSTALL_CRDS")]
    pub install_crds: bool,

    /// How long a deleted Stack waits for its agents to report the removal (e.g. 300s, 5m)
    #[arg(long, global = true, env = "BROKKR_DELETION_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub deletion_timeout: Duration,

    /// How long audit log rows are kept before the leader prunes them (e.g. 90d, 720h)
    #[arg(long, global = true, env = "BROKKR_AUDIT_RETENTION", default_value = "90d", value_parser = parse_interval)]
    pub audit_retention: Duration,

    /// How often the leader evaluates AlertRules; an alert fires at most this long after
    /// its condition has held for its `for`
    #[arg(long, global = true, env = "BROKKR_ALERT_EVALUATION_INTERVAL", default_value = "5s", value_parser = parse_interval)]
    pub alert_evaluation_interval: Duration,

    /// How often Stack and AgentTarget status is refreshed from the database
    #[arg(long, global = true, env = "BROKKR_STATUS_REFRESH", default_value = "30s", value_parser = parse_interval)]
    pub status_refresh: Duration,

    /// Reconcile Generators, Stacks and AgentTargets of this namespace only [default: all]
    #[arg(long, global = true, env = "BROKKR_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Reconcile only the Agents matching this label selector, e.g. fleet=eu [default: all]
    #[arg(long, global = true, env = "BROKKR_AGENT_SELECTOR")]
    pub agent_selector: Option<String>,

    /// Name of the coordination.k8s.io Lease the replicas elect a leader with
    #[arg(
        long,
        global = true,
        env = "BROKKR_LEASE_NAME",
        default_value = "brokkr-operator"
    )]
    pub lease_name: String,

    /// This replica's identity in the lease [default: $POD_NAME, else the host name]
    #[arg(long, global = true, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Log as JSON lines
    #[arg(long, global = true, env = "BROKKR_LOG_JSON")]
    pub log_json: bool,
}

const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

impl RunArgs {
    pub fn namespace(&self) -> String {
        self.namespace
            .clone()
            .or_else(|| {
                std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
                    .ok()
                    .map(|ns| ns.trim().to_owned())
                    .filter(|ns| !ns.is_empty())
            })
            .unwrap_or_else(|| "brokkr-system".to_owned())
    }

    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "brokkr-operator".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_take_the_common_units_and_intervals_refuse_zero() {
        let parse = |args: &[&str]| Cli::try_parse_from(["brokkr-operator"].iter().chain(args));
        for (text, expected) in [
            ("90", Duration::from_secs(90)),
            ("90s", Duration::from_secs(90)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("250ms", Duration::from_millis(250)),
        ] {
            let cli = parse(&["--deletion-timeout", text, "--status-refresh", text]).unwrap();
            assert_eq!(cli.run.deletion_timeout, expected, "{text}");
            assert_eq!(cli.run.status_refresh, expected, "{text}");
        }
        assert!(parse(&["--deletion-timeout", ""]).is_err());
        assert!(parse(&["--deletion-timeout", "5 parsecs"]).is_err());
        // A timeout of zero is a choice; a zero period would requeue or beat in a hot loop.
        let cli = parse(&["--deletion-timeout", "0", "--api-idle-timeout", "0s"]).unwrap();
        assert_eq!(cli.run.deletion_timeout, Duration::ZERO);
        assert!(parse(&["--status-refresh", "0s"]).is_err());
        assert!(parse(&["--heartbeat-interval", "0"]).is_err());
    }

    #[test]
    fn run_is_the_default_and_flags_come_from_the_environment_too() {
        let cli = Cli::try_parse_from(["brokkr-operator", "--deletion-timeout", "2m"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.deletion_timeout, Duration::from_secs(120));
        let cli = Cli::try_parse_from(["brokkr-operator", "crd"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Crd)));
    }

    #[test]
    fn flags_are_accepted_before_and_after_the_subcommand() {
        for args in [
            &[
                "brokkr-operator",
                "run",
                "--database-url",
                "postgres://db/x",
                "--deletion-timeout",
                "2m",
            ][..],
            &[
                "brokkr-operator",
                "--database-url",
                "postgres://db/x",
                "run",
                "--deletion-timeout",
                "2m",
            ],
            &[
                "brokkr-operator",
                "--database-url",
                "postgres://db/x",
                "--deletion-timeout",
                "2m",
            ],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(
                cli.run.database_url.as_deref(),
                Some("postgres://db/x"),
                "{args:?}"
            );
            assert_eq!(
                cli.run.deletion_timeout,
                Duration::from_secs(120),
                "{args:?}"
            );
        }
        let err = Cli::try_parse_from(["brokkr-operator", "run", "--no-such-flag"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
    }
}
