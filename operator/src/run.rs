//! Assembling the hub process: database, CRDs, health and metrics endpoints, leader
//! election and the controllers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use brokkr_crds::OPERATOR_FIELD_MANAGER;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, ResourceExt};
use sea_orm::{Database, DatabaseConnection};
use tokio::sync::watch;
use tracing::{error, info};

use crate::api::{self, ApiConfig, ApiState, ChangeFeed, RateLimit, ServeLimits};

use crate::config::RunArgs;
use crate::controllers::{self, ControllerConfig, error_chain};
use crate::leader::{LeaseConfig, run_when_leader};
use crate::metrics::{ApiMetrics, Metrics};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("DATABASE_URL (or --database-url) is required to run the hub")]
    MissingDatabaseUrl,
    #[error("failed to connect to PostgreSQL")]
    Database(#[source] sea_orm::DbErr),
    #[error("failed to apply the database migrations")]
    Migrate(#[source] sea_orm::DbErr),
    #[error("failed to configure the Kubernetes client")]
    Kube(#[source] kube::Error),
    #[error("failed to install CRD {name}")]
    InstallCrd {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("CRD {name} did not become Established")]
    CrdNotEstablished { name: String },
    #[error("failed to load the TLS certificate and key")]
    Tls {
        #[source]
        source: std::io::Error,
    },
    #[error("failed to serve {addr}")]
    Serve {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the hub until SIGTERM or Ctrl-C.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let database_url = args
        .database_url
        .clone()
        .ok_or(RunError::MissingDatabaseUrl)?;
    let db = connect(&database_url).await?;
    brokkr_migrations::migrate_with_lock(&db)
        .await
        .map_err(RunError::Migrate)?;
    info!("database schema is up to date");

    let client = Client::try_default().await.map_err(RunError::Kube)?;
    if args.install_crds {
        install_crds(&client).await?;
    }

    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let metrics = Metrics::default();
    let ready = Arc::new(AtomicBool::new(false));
    let health = health_app(HealthState {
        metrics: metrics.clone(),
        db: db.clone(),
        ready: ready.clone(),
    });
    let health_listener = bind(args.metrics_addr).await?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(health_listener, health).await {
            error!(error = %err, "the metrics endpoint stopped");
        }
    });

    let store = Store::new(db);
    let changes = ChangeFeed::default().with_metrics(metrics.feed.clone());
    tokio::spawn(changes.clone().listen(database_url.clone(), store.clone()));
    let api = api::app(
        ApiState::new(
            store.clone(),
            changes,
            ApiConfig {
                heartbeat_interval: args.heartbeat_interval,
                inline_object_max_bytes: args.inline_object_max_bytes,
                key_rate: RateLimit::new(args.api_key_rate, args.api_key_burst),
                unknown_key_rate: RateLimit::new(
                    args.api_unknown_key_rate,
                    args.api_unknown_key_burst,
                ),
                ..ApiConfig::default()
            },
        )
        .with_metrics(metrics.api.clone())
        .with_shutdown(stop.clone())
        .with_cluster_access(api::ClusterAccess {
            client: client.clone(),
            namespace: args.namespace(),
        }),
    );
    let api_server = tokio::spawn(serve_api(
        api,
        args.api_addr,
        args.tls_cert.clone().zip(args.tls_key.clone()),
        ServeLimits {
            header_read_timeout: args.api_header_read_timeout,
            idle_timeout: args.api_idle_timeout,
            max_connections: args.api_max_connections,
            ..ServeLimits::default()
        },
        metrics.api.clone(),
        stopped(stop.clone()),
    ));
    ready.store(true, Ordering::Relaxed);

    let controller_config = ControllerConfig {
        namespace: args.namespace(),
        deletion_timeout: args.deletion_timeout,
        status_refresh: args.status_refresh,
        watch_namespace: args.watch_namespace.clone(),
        agent_selector: args.agent_selector.clone(),
        heartbeat_interval: args.heartbeat_interval,
        database_url: Some(database_url),
        alerting: crate::alerts::AlertingConfig {
            evaluate_every: args.alert_evaluation_interval,
            ..crate::alerts::AlertingConfig::default()
        },
    };
    let lease = LeaseConfig {
        name: args.lease_name.clone(),
        namespace: controller_config.namespace.clone(),
        identity: args.identity(),
        duration: Duration::from_secs(15),
        retry: Duration::from_secs(4),
    };
    let audit_retention = args.audit_retention;
    info!(namespace = %controller_config.namespace, identity = %lease.identity, api = %args.api_addr, "starting");
    run_when_leader(client.clone(), lease, metrics.clone(), stopped(stop), {
        move |mut lost| {
            let client = client.clone();
            let store = store.clone();
            let config = controller_config.clone();
            let metrics = metrics.clone();
            async move {
                let stop = async move {
                    let _ = lost.wait_for(|lost| *lost).await;
                };
                let pruning = tokio::spawn(crate::audit::prune_periodically(
                    store.clone(),
                    audit_retention,
                ));
                controllers::run(client, store, config, metrics, stop).await;
                pruning.abort();
            }
        }
    })
    .await;
    match api_server.await {
        Ok(result) => result?,
        Err(err) => error!(error = %err, "the agent API task failed"),
    }
    info!("stopped");
    Ok(())
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, RunError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Serve { addr, source })
}

/// Connections the kernel holds for the API before it accepts them. Tokio's default
/// (1,024) made a fleet reconnecting at once to a restarted hub lose SYNs and retry a
/// second later; the kernel caps this at `net.core.somaxconn` (4,096 by default).
const API_LISTEN_BACKLOG: u32 = 16_384;

fn bind_api(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted hub rebinds at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(API_LISTEN_BACKLOG)
}

/// Serves the agent API until `shutdown`, within `limits`, then lets requests in flight
/// finish for up to `limits.grace`.
pub async fn serve_api(
    app: Router,
    addr: SocketAddr,
    tls: Option<(PathBuf, PathBuf)>,
    limits: ServeLimits,
    metrics: ApiMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let tls = match tls {
        Some((cert, key)) => {
            // One process-wide crypto provider; a second install attempt is harmless.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key)
                .await
                .map_err(|source| RunError::Tls { source })?;
            Some(config)
        }
        None => None,
    };
    let listener = bind_api(addr).map_err(|source| RunError::Serve { addr, source })?;
    api::serve(listener, app, tls, limits, metrics, shutdown).await;
    Ok(())
}

/// The hub's pool, with TCP keepalive on every connection (see [`store::connect_options`]).
pub async fn connect(url: &str) -> Result<DatabaseConnection, RunError> {
    Database::connect(crate::store::connect_options(url))
        .await
        .map_err(RunError::Database)
}

/// Creates or updates Brokkr's CRDs and waits until the API server serves them.
pub async fn install_crds(client: &Client) -> Result<(), RunError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in brokkr_crds::all_crds() {
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(|source| RunError::InstallCrd {
            name: name.clone(),
            source,
        })?;
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(RunError::CrdNotEstablished { name: name.clone() })?;
        info!(crd = %name, "CRD installed");
    }
    Ok(())
}

#[derive(Clone)]
struct HealthState {
    metrics: Metrics,
    db: DatabaseConnection,
    ready: Arc<AtomicBool>,
}

fn health_app(state: HealthState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(
    State(state): State<HealthState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<HealthState>) -> (StatusCode, String) {
    if !state.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting".into());
    }
    match state.db.ping().await {
        Ok(()) => (StatusCode::OK, "ok".into()),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database unreachable: {}", error_chain(&err)),
        ),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("shutting down");
}
