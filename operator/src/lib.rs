//! Brokkr's hub: the database entities and store, the controllers that mirror custom
//! resources into it, the agent API, and the status mirror.

pub mod config;
pub mod controllers;
pub mod entity;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod run;
pub mod selector;
pub mod status;
pub mod store;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), as JSON lines when asked.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
pub mod api;
pub mod mirror;
