//! End-to-end tooling that runs the real Brokkr binaries: the benchmark harness
//! ([`bench`], run by `cargo run --release -p brokkr-e2e --bin bench`).

pub mod bench;
pub mod fleet;
pub mod receiver;
pub mod tour;
