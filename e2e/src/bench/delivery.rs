//! P1: time from a deployment object committed to every targeted agent holding it,
//! with long-polls and, as the baseline, with plain polling every 10 s and every 1 s.

use std::time::{Duration, Instant};

use brokkr_operator::store::Store;
use brokkr_testdb::TestDb;

use super::procfs::Monitor;
use super::report::Row;
use super::seed::Seed;
use super::sim::{Fleet, FleetConfig, Mode};
use super::stats::Summary;
use super::{Bench, BenchError, HEARTBEAT};

/// One row per mode; a mode that fails gets a row saying why.
pub async fn run(bench: &Bench, db: &TestDb, store: &Store, seed: &mut Seed) -> Vec<Row> {
    let plan = &bench.plan;
    let modes = [
        (Mode::LongPoll, plan.long_poll_rounds),
        (Mode::Poll(Duration::from_secs(10)), plan.poll_10s_rounds),
        (Mode::Poll(Duration::from_secs(1)), plan.poll_1s_rounds),
    ];
    let mut rows = Vec::new();
    for (mode, rounds) in modes {
        let row = match measure(bench, db, store, seed, mode, rounds).await {
            Ok(row) => row,
            Err(err) => Row::failed("P1", &name(mode), seed.agents.len(), &err),
        };
        rows.push(row);
    }
    rows
}

fn name(mode: Mode) -> String {
    format!("delivery, {}", mode.describe())
}

async fn measure(
    bench: &Bench,
    db: &TestDb,
    store: &Store,
    seed: &mut Seed,
    mode: Mode,
    rounds: usize,
) -> Result<Row, BenchError> {
    let agents = seed.agents.len();
    let name = name(mode);
    bench.progress(&format!("P1 {name}, {agents} agents"));
    let quiet = bench.wait_until_quiet().await;
    let hub = bench.start_hub(db).await?;
    let mut fleet = Fleet::start(
        &hub.url(),
        &seed.agents,
        FleetConfig {
            mode,
            heartbeat: Some(HEARTBEAT),
            ramp: bench.plan.ramp(agents),
        },
    );
    let interval = match mode {
        Mode::LongPoll => Duration::ZERO,
        Mode::Poll(every) => every,
    };
    let timeout = bench.plan.ramp(agents) + interval + bench.plan.delivery_timeout;
    bench.await_fleet(&mut fleet, seed, timeout).await?;

    let monitor = Monitor::start(
        hub.pid(),
        Some(db.conn().clone()),
        Duration::from_millis(100),
    );
    let mut latencies = Vec::new();
    let mut announced = Vec::new();
    let mut missing = 0;
    for _ in 0..rounds {
        let object = seed.publish(store, 0).await?;
        let committed = Instant::now();
        let delivery = fleet
            .await_holds(&[object], committed, interval + bench.plan.delivery_timeout)
            .await;
        let round = delivery.latencies.iter().max().copied().unwrap_or_default();
        missing += delivery.missing;
        latencies.extend(delivery.latencies);
        announced.extend(delivery.announced);
        // Long-polls: let every agent ask again (and park) before the next push.
        tokio::time::sleep(bench.plan.settle + round).await;
    }
    let usage = monitor.finish().await;
    let errors = fleet.counters.errors();
    fleet.stop().await;
    hub.stop().await;

    let mut row = Row::new("P1", name, agents);
    row.latency = Summary::of(&latencies);
    row.record(&usage);
    row.load = quiet.load1;
    row.errors = errors;
    row.note = format!(
        "{rounds} pushes; {}; CPU averaged over {:.0} s of pushes and quiet",
        announced_note(&announced),
        usage.elapsed.as_secs_f64()
    );
    if missing > 0 {
        row.note
            .push_str(&format!("; {missing} deliveries timed out"));
    }
    Ok(row)
}

/// The first half of a delivery: when the desired set naming the object arrived.
pub fn announced_note(announced: &[Duration]) -> String {
    match Summary::of(announced) {
        Some(s) => format!(
            "desired set answered p50 {:.0} ms / p99 {:.0} ms",
            super::stats::ms(s.p50),
            super::stats::ms(s.p99)
        ),
        None => "nothing delivered".to_owned(),
    }
}
