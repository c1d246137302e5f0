//! The global `tracing` subscriber.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Logs to stderr (stdout stays free for output such as `brokkr-operator crd`), filtered by
/// `RUST_LOG` (default `info`), as JSON lines when `json`, coloured only on a terminal.
///
/// Safe to call more than once: only the first call installs a subscriber.
pub fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // An error only says a subscriber is already installed, which is what was asked for.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_up_logging_twice_does_not_panic() {
        init_tracing(false);
        init_tracing(true);
        init_tracing(false);
    }
}
