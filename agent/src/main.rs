//! The `brokkr-agent` binary: parse the configuration, set up logging, run until SIGTERM or
//! Ctrl-C.

use std::process::ExitCode;

use brokkr_agent::{AGENT_KEY_ENV, Args, Config};
use brokkr_common::{error_chain, init_tracing};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_json);
    let config = match Config::from_args(args, std::env::var(AGENT_KEY_ENV).ok()) {
        Ok(config) => config,
        Err(err) => {
            tracing::error!("{}", error_chain(&err));
            return ExitCode::from(2);
        }
    };
    match brokkr_agent::run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!("failed to listen for Ctrl-C: {err}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!("failed to listen for SIGTERM: {err}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
