//! P8: a hub restart under N connected agents. The fleet long-polls a hub; the hub is
//! stopped, a new version of a stack is committed while none runs, and a new hub starts
//! on the same address with nothing cached. Every agent reconnects with its old cursor
//! and must get the new version from the fresh hub, whose first lookups (each agent's key
//! and desired state) all miss at once.
//!
//! The latency is each agent's reconnecting request, from sending it to its answer: what
//! the hub takes. The note adds how long after the new hub was started every agent held the
//! version, which also holds the hub's start-up and the agents' own reconnect backoff (the
//! real agent's policy: 1 s doubling, half of it random). Requests failed while no hub
//! served are retried and counted in the note, not as errors.

use std::time::{Duration, Instant};

use brokkr_operator::store::Store;
use brokkr_testdb::TestDb;

use super::procfs::Monitor;
use super::report::Row;
use super::seed::Seed;
use super::stats::{Summary, ms};
use super::{Bench, BenchError};

pub const NAME: &str = "hub restart: every agent reconnects to a fresh hub";

pub async fn run(
    bench: &Bench,
    db: &TestDb,
    store: &Store,
    seed: &mut Seed,
) -> Result<Row, BenchError> {
    let agents = seed.agents.len();
    let plan = &bench.plan;
    bench.progress(&format!("P8 hub restart, {agents} agents"));
    let quiet = bench.wait_until_quiet().await;
    let first = bench.start_hub(db).await?;
    let api = first.api_addr();
    let mut fleet = bench.start_long_polling_fleet(&first, seed).await?;

    let errors_before = fleet.counters.errors();
    first.stop().await;
    let object = seed.publish(store, 0).await?;
    let started = Instant::now();
    let mut second = bench.spawn_hub(db, Some(api))?;
    let monitor = Monitor::start(
        second.pid(),
        Some(db.conn().clone()),
        Duration::from_millis(100),
    );
    second.wait_until_serving().await?;
    let delivery = fleet
        .await_holds(&[object], started, plan.delivery_timeout)
        .await;
    let usage = monitor.finish().await;
    let lookup_queries = "brokkr_operator_api_lookup_queries_total";
    let key_queries = second
        .metric(&format!("{lookup_queries}{{lookup=\"keys\"}}"))
        .await;
    let desired_queries = second
        .metric(&format!("{lookup_queries}{{lookup=\"desired_states\"}}"))
        .await;
    let errors = fleet.counters.errors() - errors_before;
    fleet.stop().await;
    second.stop().await;

    let mut row = Row::new("P8", NAME, agents);
    row.latency = Summary::of(&delivery.answered_in);
    row.record(&usage);
    row.load = quiet.load1;
    let all_held = delivery.latencies.iter().max().copied().unwrap_or_default();
    row.note = format!(
        "latency: each agent's reconnecting request; every agent held the new version {:.1} s \
         after the new hub was started (with its start-up and the agents' reconnect backoff); \
         first lookups took {key_queries:.0} key and {desired_queries:.0} desired-state \
         queries; {errors} requests failed while no hub served (retried)",
        ms(all_held) / 1000.0,
    );
    if delivery.missing > 0 {
        row.note
            .push_str(&format!("; {} agents timed out", delivery.missing));
    }
    Ok(row)
}
