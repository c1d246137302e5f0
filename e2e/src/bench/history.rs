//! P5: the desired-state call's latency without history and when every agent has
//! thousands of past events in `agent_events`: it must not grow with history.

use std::time::{Duration, Instant};

use brokkr_operator::store::Store;
use brokkr_testdb::TestDb;

use super::procfs::Monitor;
use super::report::Row;
use super::seed::{self, Seed};
use super::sim::{Fleet, FleetConfig, Mode};
use super::stats::Summary;
use super::{Bench, BenchError, During, HEARTBEAT};

pub async fn run(
    bench: &Bench,
    db: &TestDb,
    store: &Store,
    seed: &Seed,
) -> Result<Vec<Row>, BenchError> {
    let agents = seed.agents.len();
    let events = bench.plan.history_events;
    let mut rows = vec![measure(bench, db, seed, "no past events").await?];

    bench.progress(&format!(
        "P5 seeding {events} past events for each of {agents} agents"
    ));
    let started = Instant::now();
    let written = seed::history(store, &seed.agents, events).await?;
    let seeding = started.elapsed();
    let plan = store
        .explain_desired_for_agent(seed.agents[0].id)
        .await
        .during("explain the desired-state query")?;
    let plan_path = bench.log_dir.join(format!("p5-desired-plan-{agents}.txt"));
    let _ = std::fs::write(&plan_path, &plan);

    let mut row = measure(bench, db, seed, &format!("{events} past events per agent")).await?;
    row.note = format!(
        "{}; {written} events seeded in {:.0} s; query plan in {}",
        row.note,
        seeding.as_secs_f64(),
        plan_path.display()
    );
    rows.push(row);
    Ok(rows)
}

async fn measure(
    bench: &Bench,
    db: &TestDb,
    seed: &Seed,
    history: &str,
) -> Result<Row, BenchError> {
    let agents = seed.agents.len();
    let plan = &bench.plan;
    let name = format!("desired call, {history}");
    bench.progress(&format!("P5 {name}, {agents} agents"));
    let quiet = bench.wait_until_quiet().await;
    let hub = bench.start_hub(db).await?;
    let every = plan.history_poll;
    let mut fleet = Fleet::start(
        &hub.url(),
        &seed.agents,
        FleetConfig {
            mode: Mode::Poll(every),
            heartbeat: Some(HEARTBEAT),
            ramp: Duration::ZERO,
        },
    );
    bench
        .await_fleet(&mut fleet, seed, every + plan.delivery_timeout)
        .await?;
    // One more interval, so that the auth cache and the connection pools are warm.
    tokio::time::sleep(every).await;
    let monitor = Monitor::start(
        hub.pid(),
        Some(db.conn().clone()),
        Duration::from_millis(250),
    );
    fleet.record_desired_latencies(true);
    tokio::time::sleep(plan.history_window).await;
    fleet.record_desired_latencies(false);
    let usage = monitor.finish().await;
    let latencies = fleet.take_desired_latencies();
    let errors = fleet.counters.errors();
    fleet.stop().await;
    hub.stop().await;

    let mut row = Row::new("P5", name, agents);
    row.latency = Summary::of(&latencies);
    row.record(&usage);
    row.load = quiet.load1;
    row.errors = errors;
    row.note = format!(
        "each agent polls every {} s (wait=0), {:.0} calls/s measured at the client",
        every.as_secs(),
        latencies.len() as f64 / usage.elapsed.as_secs_f64()
    );
    Ok(row)
}
