//! Helpers the hub (`brokkr-operator`), the agent and the bench share, each defined once so
//! that their behaviour cannot drift apart: duration flags, retry backoff, error chains and
//! logging set-up.

pub mod backoff;
pub mod duration;
pub mod error;
mod logging;
pub mod text;

pub use backoff::Backoff;
pub use duration::{parse_duration, parse_interval};
pub use error::{error_chain, error_sources};
pub use logging::init_tracing;
pub use text::truncate_bytes;
