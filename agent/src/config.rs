//! Command line and environment: [`Args`] as clap parses them, resolved and validated into
//! the [`Config`] the agent runs with.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use brokkr_common::backoff::{self, Backoff};
use brokkr_common::parse_interval;
use clap::Parser;

use crate::scope::{SpokeScope, validate_namespace};

/// The environment variable holding the agent's key (the alternative to `--key-file`).
pub const AGENT_KEY_ENV: &str = "BROKKR_AGENT_KEY";

/// The spoke-cluster agent of Brokkr: pulls the objects targeted at this cluster from the
/// hub, applies them with server-side apply, prunes what was dropped, and reports back.
///
/// The agent key comes from `BROKKR_AGENT_KEY` or from `--key-file` (exactly one). The
/// spoke cluster is the one of the in-cluster service account, or of `KUBECONFIG`.
#[derive(Clone, Debug, Parser)]
#[command(name = "brokkr-agent", version, about)]
pub struct Args {
    /// Base URL of the hub, e.g. `https://brokkr.example.com`.
    #[arg(long, env = "BROKKR_HUB_URL")]
    pub hub_url: String,

    /// PEM file of CA certificates to trust for the hub's HTTPS, besides the public roots.
    #[arg(long, env = "BROKKR_HUB_CA_FILE")]
    pub hub_ca_file: Option<PathBuf>,

    /// File holding the agent key (alternative to the BROKKR_AGENT_KEY variable).
    #[arg(long, env = "BROKKR_AGENT_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// This agent's name; the value of the `brokkr.io/agent` label on every applied object.
    #[arg(long, env = "BROKKR_AGENT_NAME")]
    pub agent_name: String,

    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoints.
    #[arg(long, env = "BROKKR_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// How often to send a heartbeat to the hub (e.g. `15s`, `1m`).
    #[arg(long, env = "BROKKR_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = parse_interval)]
    pub heartbeat_interval: Duration,

    /// How often to re-apply everything and prune, whether or not anything changed.
    #[arg(long, env = "BROKKR_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_interval)]
    pub resync_interval: Duration,

    /// How often to re-evaluate the health of applied objects.
    #[arg(long, env = "BROKKR_HEALTH_INTERVAL", default_value = "10s", value_parser = parse_interval)]
    pub health_interval: Duration,

    /// Longest wait of one long-poll for a new desired state (the hub caps it at 60s).
    #[arg(long, env = "BROKKR_POLL_WAIT", default_value = "60s", value_parser = parse_interval)]
    pub poll_wait: Duration,

    /// How long to wait for an applied CustomResourceDefinition to become Established.
    #[arg(long, env = "BROKKR_CRD_ESTABLISH_TIMEOUT", default_value = "30s", value_parser = parse_interval)]
    pub crd_establish_timeout: Duration,

    /// Namespace of the agent's inventories (one ConfigMap per stack recording what the agent
    /// applied). Defaults to the namespace of the agent's service account (or kubeconfig
    /// context); the Helm chart sets it to the release namespace.
    #[arg(long, env = "BROKKR_AGENT_NAMESPACE")]
    pub namespace: Option<String>,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "BROKKR_LOG_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    pub log_json: bool,

    // --- What the agent may touch on its spoke (issue 13, item 2) ---
    /// Namespaces the agent may write to, comma-separated (default: every namespace). An
    /// object of a Stack in another namespace is refused (an Apply Failure naming it), and
    /// the agent lists and watches only in these namespaces.
    #[arg(long, env = "BROKKR_ALLOWED_NAMESPACES", value_name = "NS1,NS2", value_parser = parse_namespaces)]
    pub allowed_namespaces: Option<AllowedNamespaces>,

    /// Whether the agent may write cluster-scoped objects (`true` or `false`). With `false`,
    /// a cluster-scoped object is refused, except a Namespace named in --allowed-namespaces.
    #[arg(
        long,
        env = "BROKKR_ALLOW_CLUSTER_SCOPED",
        default_value = "true",
        value_name = "BOOL",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_cluster_scoped: bool,
    // --- end of the spoke scope ---

    // --- Key self-rotation (issue 13, item 3) ---
    /// Secret in the agent's namespace holding its key. When set, the agent renews its key
    /// once 2/3 of its lifetime has passed and writes the new key there (it needs get and
    /// update on exactly that Secret); when not set, it never renews its key.
    #[arg(long, env = "BROKKR_AGENT_KEY_SECRET")]
    pub key_secret: Option<String>,

    /// Data key of the agent key in --key-secret.
    #[arg(long, env = "BROKKR_AGENT_KEY_SECRET_KEY", default_value = "pak")]
    pub key_secret_key: String,
    // --- end of key self-rotation ---
}

/// The value of `--allowed-namespaces`: at least one valid namespace name, each once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedNamespaces(pub BTreeSet<String>);

/// Parses `ns1,ns2` (spaces around names allowed); an empty list, an empty entry or a name
/// that is no namespace name is an error naming it.
pub fn parse_namespaces(value: &str) -> Result<AllowedNamespaces, String> {
    if value.trim().is_empty() {
        return Err(
            "it is empty: name at least one namespace, or leave it out to allow every namespace"
                .to_owned(),
        );
    }
    let mut names = BTreeSet::new();
    for name in value.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(format!(
                "{value:?} holds an empty namespace name: list namespaces separated by commas, e.g. shop,payments"
            ));
        }
        validate_namespace(name)
            .map_err(|reason| format!("invalid namespace {name:?}: {reason}"))?;
        names.insert(name.to_owned());
    }
    Ok(AllowedNamespaces(names))
}

/// The agent key. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentKey(String);

impl AgentKey {
    /// Trims surrounding whitespace (a trailing newline in a key file is common); `None` when
    /// nothing is left.
    pub fn new(key: &str) -> Option<AgentKey> {
        let key = key.trim();
        (!key.is_empty()).then(|| AgentKey(key.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentKey(<redacted>)")
    }
}

/// Everything the agent runs with. Built from [`Args`] by [`Config::from_args`]; tests build
/// it with [`Config::new`] and shorten the timings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Hub base URL, without a trailing slash.
    pub hub_url: String,
    /// Extra CA certificates (PEM) for the hub's HTTPS.
    pub hub_ca_pem: Option<Vec<u8>>,
    pub agent_key: AgentKey,
    /// Value of the `brokkr.io/agent` label (a valid label value, non-empty).
    pub agent_name: String,
    pub metrics_addr: SocketAddr,
    pub heartbeat_interval: Duration,
    pub resync_interval: Duration,
    pub health_interval: Duration,
    /// `wait` of each long-poll.
    pub poll_wait: Duration,
    pub crd_establish_timeout: Duration,
    /// Quiet time after a watch event before drift is corrected and health re-evaluated.
    pub drift_debounce: Duration,
    /// Retries of hub requests (desired state, deployment objects, events).
    pub hub_backoff: Backoff,
    /// Retries of a stack whose apply, prune or delete failed.
    pub retry_backoff: Backoff,
    pub log_json: bool,
    /// Namespace of the inventories; `None`: the client's default namespace.
    pub namespace: Option<String>,
    /// What the agent may write, and where it lists and watches (`--allowed-namespaces`,
    /// `--allow-cluster-scoped`).
    pub scope: SpokeScope,
    /// Where the agent writes a renewed key (`--key-secret`); `None`: it never renews it.
    pub key_secret: Option<crate::key_rotation::KeySecret>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid --hub-url {url:?}: it must start with http:// or https://")]
    HubUrl { url: String },
    #[error("no agent key: set {AGENT_KEY_ENV} or pass --key-file (BROKKR_AGENT_KEY_FILE)")]
    NoKey,
    #[error("both {AGENT_KEY_ENV} and --key-file are set: use exactly one")]
    TwoKeys,
    #[error("failed to read the key file {path}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to read the hub CA file {path}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the key in {where_} is empty")]
    EmptyKey { where_: String },
    #[error("invalid --agent-name {name:?}: {reason}")]
    AgentName { name: String, reason: &'static str },
}

impl Config {
    /// A config with the documented defaults.
    pub fn new(
        hub_url: &str,
        agent_key: AgentKey,
        agent_name: &str,
    ) -> Result<Config, ConfigError> {
        Ok(Config {
            hub_url: validate_hub_url(hub_url)?,
            hub_ca_pem: None,
            agent_key,
            agent_name: validate_agent_name(agent_name)?,
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
            heartbeat_interval: Duration::from_secs(15),
            resync_interval: Duration::from_secs(300),
            health_interval: Duration::from_secs(10),
            poll_wait: Duration::from_secs(brokkr_crds::wire::MAX_WAIT_SECONDS),
            crd_establish_timeout: Duration::from_secs(30),
            drift_debounce: Duration::from_secs(1),
            hub_backoff: backoff::AGENT_HUB,
            retry_backoff: backoff::AGENT_RETRY,
            log_json: false,
            namespace: None,
            scope: SpokeScope::everything(),
            key_secret: None,
        })
    }

    /// Resolves the parsed arguments; `env_key` is the value of [`AGENT_KEY_ENV`], if set.
    pub fn from_args(args: Args, env_key: Option<String>) -> Result<Config, ConfigError> {
        let key = match (env_key, &args.key_file) {
            (Some(_), Some(_)) => return Err(ConfigError::TwoKeys),
            (None, None) => return Err(ConfigError::NoKey),
            (Some(key), None) => AgentKey::new(&key).ok_or_else(|| ConfigError::EmptyKey {
                where_: AGENT_KEY_ENV.to_owned(),
            })?,
            (None, Some(path)) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::KeyFile {
                        path: path.clone(),
                        source,
                    })?;
                AgentKey::new(&text).ok_or_else(|| ConfigError::EmptyKey {
                    where_: path.display().to_string(),
                })?
            }
        };
        let mut config = Config::new(&args.hub_url, key, &args.agent_name)?;
        if let Some(path) = &args.hub_ca_file {
            let pem = std::fs::read(path).map_err(|source| ConfigError::CaFile {
                path: path.clone(),
                source,
            })?;
            config.hub_ca_pem = Some(pem);
        }
        config.metrics_addr = args.metrics_addr;
        config.heartbeat_interval = args.heartbeat_interval;
        config.resync_interval = args.resync_interval;
        config.health_interval = args.health_interval;
        config.poll_wait = args.poll_wait;
        config.crd_establish_timeout = args.crd_establish_timeout;
        config.log_json = args.log_json;
        config.namespace = args.namespace.filter(|ns| !ns.is_empty());
        config.scope = SpokeScope::new(
            args.allowed_namespaces.map(|n| n.0),
            args.allow_cluster_scoped,
        );
        config.key_secret = args.key_secret.filter(|name| !name.is_empty()).map(|name| {
            crate::key_rotation::KeySecret {
                name,
                data_key: args.key_secret_key.clone(),
            }
        });
        Ok(config)
    }
}

fn validate_hub_url(url: &str) -> Result<String, ConfigError> {
    let trimmed = url.trim().trim_end_matches('/');
    let parsed = reqwest::Url::parse(trimmed).map_err(|_| ConfigError::HubUrl {
        url: url.to_owned(),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(ConfigError::HubUrl {
            url: url.to_owned(),
        });
    }
    Ok(trimmed.to_owned())
}

/// A Kubernetes label value: at most 63 characters, alphanumerics with `-`, `_` and `.`
/// inside. Empty is a valid label value but not a usable agent name.
pub fn validate_agent_name(name: &str) -> Result<String, ConfigError> {
    let fail = |reason| {
        Err(ConfigError::AgentName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > 63 {
        return fail("a label value has at most 63 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return fail("a label value holds only letters, digits, '-', '_' and '.'");
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !edge_ok(name.chars().next()) || !edge_ok(name.chars().last()) {
        return fail("a label value starts and ends with a letter or digit");
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn args(extra: &[&str]) -> Args {
        try_args(extra).unwrap()
    }

    fn try_args(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec![
            "brokkr-agent",
            "--hub-url",
            "https://hub.example.com/",
            "--agent-name",
            "edge-1",
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::from_args(args(&[]), Some("brokkr_abc_secret".into())).unwrap();
        assert_eq!(config.hub_url, "https://hub.example.com");
        assert_eq!(config.metrics_addr.to_string(), "0.0.0.0:9090");
        assert_eq!(config.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(config.resync_interval, Duration::from_secs(300));
        assert_eq!(config.agent_key.expose(), "brokkr_abc_secret");
    }

    #[test]
    fn json_logs_are_off_unless_asked_for() {
        assert!(!args(&[]).log_json);
        assert!(args(&["--log-json"]).log_json);
    }

    #[test]
    fn exactly_one_key_source_is_required() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "brokkr_p_s\n").unwrap();
        let with_file = args(&["--key-file", path.to_str().unwrap()]);

        let config = Config::from_args(with_file.clone(), None).unwrap();
        assert_eq!(config.agent_key.expose(), "brokkr_p_s");
        assert!(matches!(
            Config::from_args(with_file, Some("k".into())),
            Err(ConfigError::TwoKeys)
        ));
        assert!(matches!(
            Config::from_args(args(&[]), None),
            Err(ConfigError::NoKey)
        ));
        assert!(matches!(
            Config::from_args(args(&[]), Some("  \n".into())),
            Err(ConfigError::EmptyKey { .. })
        ));
        let missing = args(&["--key-file", "/nonexistent/brokkr-key"]);
        let err = Config::from_args(missing, None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/brokkr-key"), "{err}");
        let no_ca = args(&["--hub-ca-file", "/nonexistent/ca.pem"]);
        let err = Config::from_args(no_ca, Some("k".into())).unwrap_err();
        assert!(matches!(err, ConfigError::CaFile { .. }), "{err}");
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let config = Config::from_args(args(&[]), Some("brokkr_abc_topsecret".into())).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn agent_names_must_be_label_values() {
        for good in ["a", "edge-1", "Edge_1.eu", &"x".repeat(63)] {
            assert!(validate_agent_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-edge", "edge-", "edge/1", "edge 1", &"x".repeat(64)] {
            assert!(validate_agent_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hub_urls_must_be_http() {
        assert!(validate_hub_url("http://hub:8080").is_ok());
        assert!(validate_hub_url("ftp://hub").is_err());
        assert!(validate_hub_url("hub.example.com").is_err());
    }

    #[test]
    fn the_spoke_scope_defaults_to_everything() {
        let config = Config::from_args(args(&[]), Some("k".into())).unwrap();
        assert_eq!(config.scope, SpokeScope::everything());
        assert!(config.scope.allows_cluster_scoped());
        assert_eq!(config.scope.namespaces(), None);
    }

    #[test]
    fn allowed_namespaces_and_cluster_scoped_objects_are_flags() {
        let parsed = args(&[
            "--allowed-namespaces",
            "shop, payments,shop",
            "--allow-cluster-scoped=false",
        ]);
        let config = Config::from_args(parsed, Some("k".into())).unwrap();
        let expected: BTreeSet<String> = ["payments".to_owned(), "shop".to_owned()].into();
        assert_eq!(config.scope.namespaces(), Some(&expected));
        assert!(!config.scope.allows_cluster_scoped());
        assert!(args(&["--allow-cluster-scoped", "true"]).allow_cluster_scoped);
        assert!(!args(&["--allow-cluster-scoped", "no"]).allow_cluster_scoped);
    }

    #[test]
    fn bad_scope_flags_are_refused_with_the_reason() {
        let parse = |extra: &[&str]| try_args(extra).map(|_| ()).map_err(|e| e.to_string());
        let err = parse(&["--allowed-namespaces", "shop,Kube_System"]).unwrap_err();
        assert!(err.contains("invalid namespace \"Kube_System\""), "{err}");
        let err = parse(&["--allowed-namespaces", "shop,,pay"]).unwrap_err();
        assert!(err.contains("empty namespace name"), "{err}");
        let err = parse(&["--allowed-namespaces", " "]).unwrap_err();
        assert!(
            err.contains("leave it out to allow every namespace"),
            "{err}"
        );
        let err = parse(&["--allow-cluster-scoped", "maybe"]).unwrap_err();
        assert!(err.contains("maybe"), "{err}");
        // A bare flag takes no implicit value: it must say true or false.
        assert!(parse(&["--allow-cluster-scoped"]).is_err());
    }

    #[test]
    fn interval_flags_take_units_and_refuse_zero() {
        let parsed = args(&["--heartbeat-interval", "42", "--health-interval", "250ms"]);
        assert_eq!(parsed.heartbeat_interval, Duration::from_secs(42));
        assert_eq!(parsed.health_interval, Duration::from_millis(250));
        assert_eq!(
            args(&["--resync-interval", "1h", "--poll-wait", "15s"]).resync_interval,
            Duration::from_secs(3600)
        );
        for flag in [
            "--heartbeat-interval",
            "--resync-interval",
            "--health-interval",
            "--poll-wait",
            "--crd-establish-timeout",
        ] {
            for bad in ["0s", "0", "5 parsecs", ""] {
                let argv = [
                    "brokkr-agent",
                    "--hub-url",
                    "http://hub",
                    "--agent-name",
                    "a",
                ];
                let result = Args::try_parse_from(argv.into_iter().chain([flag, bad]));
                assert!(result.is_err(), "{flag} {bad:?}");
            }
        }
    }
}
