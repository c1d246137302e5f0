//! P3: how many agent events per second the hub takes in (batched `POST events`,
//! many agents at once) and stores in PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use brokkr_agent::hub::AgentApi;
use brokkr_crds::wire::{AgentEvent, EventBatch, EventStatus, EventType, Health, health_message};
use brokkr_operator::store::Store;
use brokkr_testdb::TestDb;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use uuid::Uuid;

use super::procfs::Monitor;
use super::report::Row;
use super::seed::{Seed, SeededAgent};
use super::sim::hub_client;
use super::stats::Summary;
use super::{Bench, BenchError, During};

pub async fn run(bench: &Bench) -> Result<Vec<Row>, BenchError> {
    let plan = &bench.plan;
    let db = bench.database().await?;
    let store = Store::new(db.conn().clone());
    let seed = Seed::fleet(&store, plan.ingest_posters, plan.stacks, plan.object_bytes).await?;
    let objects = seed.current_objects();
    let mut rows = Vec::new();
    for &batch in &plan.ingest_batches {
        rows.push(measure(bench, &db, &seed, &objects, batch).await?);
    }
    Ok(rows)
}

async fn measure(
    bench: &Bench,
    db: &TestDb,
    seed: &Seed,
    objects: &[Uuid],
    batch: usize,
) -> Result<Row, BenchError> {
    let posters = seed.agents.len();
    bench.progress(&format!(
        "P3 ingest, batches of {batch}, {posters} agents posting"
    ));
    let quiet = bench.wait_until_quiet().await;
    let hub = bench.start_hub(db).await?;
    let before = count_events(db).await?;
    let accepted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let monitor = Monitor::start(
        hub.pid(),
        Some(db.conn().clone()),
        Duration::from_millis(250),
    );
    let deadline = Instant::now() + bench.plan.ingest_window;
    let mut posters_running = tokio::task::JoinSet::new();
    for agent in seed.agents.clone() {
        posters_running.spawn(post_until(
            hub_client(&hub.url()),
            agent,
            objects.to_vec(),
            batch,
            deadline,
            accepted.clone(),
            errors.clone(),
        ));
    }
    let mut latencies = Vec::new();
    while let Some(result) = posters_running.join_next().await {
        latencies.extend(result.unwrap_or_default());
    }
    let usage = monitor.finish().await;
    hub.stop().await;
    let accepted = accepted.load(Ordering::Relaxed);
    let stored = count_events(db).await? - before;

    let mut row = Row::new("P3", format!("ingest, batches of {batch}"), posters);
    row.latency = Summary::of(&latencies);
    row.rate = Some(accepted as f64 / usage.elapsed.as_secs_f64());
    row.record(&usage);
    row.load = quiet.load1;
    row.errors = errors.load(Ordering::Relaxed);
    row.note = format!(
        "latency is per POST; {accepted} events accepted, {stored} rows found in agent_events"
    );
    Ok(row)
}

/// One agent posting batches back to back until `deadline`; the latency of each POST.
async fn post_until(
    hub: AgentApi,
    agent: SeededAgent,
    objects: Vec<Uuid>,
    batch: usize,
    deadline: Instant,
    accepted: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut n = 0usize;
    while Instant::now() < deadline {
        let events = (0..batch)
            .map(|_| {
                n += 1;
                let object = objects[n % objects.len()];
                if n.is_multiple_of(4) {
                    AgentEvent {
                        id: Uuid::now_v7(),
                        deployment_object_id: object,
                        event_type: EventType::Apply,
                        status: EventStatus::Success,
                        message: None,
                    }
                } else {
                    AgentEvent {
                        id: Uuid::now_v7(),
                        deployment_object_id: object,
                        event_type: EventType::Health,
                        status: Health::Healthy.event_status(),
                        message: Some(health_message(Health::Healthy, "4 objects ready")),
                    }
                }
            })
            .collect();
        let started = Instant::now();
        match hub.post_events(&agent.key, &EventBatch { events }).await {
            Ok(result) => {
                latencies.push(started.elapsed());
                accepted.fetch_add(result.accepted, Ordering::Relaxed);
            }
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    latencies
}

async fn count_events(db: &TestDb) -> Result<u64, BenchError> {
    let row = db
        .conn()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) FROM agent_events",
        ))
        .await
        .during("count agent events")?;
    let count: i64 = row
        .map(|row| row.try_get_by_index(0))
        .transpose()
        .during("read the count of agent events")?
        .unwrap_or(0);
    Ok(count as u64)
}
