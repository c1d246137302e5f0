//! P2: the hub's (and PostgreSQL's) CPU and the hub's RSS with N idle agents
//! long-polling and sending heartbeats; then, on the same hub and fleet,
//! P6: the hub's RSS during and after the herd one push causes (every agent wakes,
//! asks for its desired state and fetches the new object at the same instant).

use std::time::{Duration, Instant};

use brokkr_operator::store::Store;
use brokkr_testdb::TestDb;

use super::procfs::{self, Monitor, mib};
use super::report::Row;
use super::seed::Seed;
use super::stats::Summary;
use super::{Bench, BenchError};

pub async fn run(
    bench: &Bench,
    db: &TestDb,
    store: &Store,
    seed: &mut Seed,
    idle: bool,
    herd: bool,
) -> Result<Vec<Row>, BenchError> {
    let agents = seed.agents.len();
    let plan = &bench.plan;
    bench.progress(&format!("P2/P6 idle fleet and herd, {agents} agents"));
    let quiet = bench.wait_until_quiet().await;
    let hub = bench.start_hub(db).await?;
    let mut fleet = bench.start_long_polling_fleet(&hub, seed).await?;
    let mut rows = Vec::new();

    if idle {
        // Let the start-up's heartbeats spread out before measuring.
        tokio::time::sleep(plan.settle * 4).await;
        let requests = fleet
            .counters
            .desired
            .load(std::sync::atomic::Ordering::Relaxed);
        let beats = fleet
            .counters
            .heartbeats
            .load(std::sync::atomic::Ordering::Relaxed);
        let monitor = Monitor::start(
            hub.pid(),
            Some(db.conn().clone()),
            Duration::from_millis(250),
        );
        tokio::time::sleep(plan.idle_window).await;
        let usage = monitor.finish().await;
        let seconds = usage.elapsed.as_secs_f64();
        let requests = fleet
            .counters
            .desired
            .load(std::sync::atomic::Ordering::Relaxed)
            - requests;
        let beats = fleet
            .counters
            .heartbeats
            .load(std::sync::atomic::Ordering::Relaxed)
            - beats;
        let mut row = Row::new("P2", "idle: long-polls + heartbeats every 15 s", agents);
        row.record(&usage);
        row.load = quiet.load1;
        row.errors = fleet.counters.errors();
        row.note = format!(
            "over {seconds:.0} s: {:.0} heartbeats/s, {:.0} long-poll renewals/s",
            beats as f64 / seconds,
            requests as f64 / seconds,
        );
        rows.push(row);
    }

    if herd {
        let pid = hub.pid();
        // The baseline: the idle hub just before the push.
        let baseline = mib(procfs::rss_kib(pid).unwrap_or(0));
        let peak_tracked = procfs::reset_peak_rss(pid);
        let monitor = Monitor::start(pid, Some(db.conn().clone()), Duration::from_millis(10));
        let object = seed.publish(store, 0).await?;
        let committed = Instant::now();
        let delivery = fleet
            .await_holds(&[object], committed, plan.delivery_timeout)
            .await;
        let during = monitor.finish().await;
        let peak = if peak_tracked {
            procfs::peak_rss_kib(pid).map_or(during.rss_max_mib, mib)
        } else {
            during.rss_max_mib
        };
        let mut after = Vec::new();
        let mut waited = Duration::ZERO;
        for &mark in &plan.herd_after {
            tokio::time::sleep(mark - waited).await;
            waited = mark;
            after.push((mark, mib(procfs::rss_kib(pid).unwrap_or(0))));
        }
        let mut row = Row::new(
            "P6",
            "herd: every agent fetches a new object at once",
            agents,
        );
        row.latency = Summary::of(&delivery.latencies);
        row.record(&during);
        row.rss_mib = after.last().map(|(_, rss)| *rss);
        row.rss_peak_mib = Some(peak);
        row.load = quiet.load1;
        row.errors = fleet.counters.errors();
        let after_text: Vec<String> = after
            .iter()
            .map(|(mark, rss)| format!("{rss:.0} MiB after {} s", mark.as_secs()))
            .collect();
        row.note = format!(
            "RSS {baseline:.0} MiB before, peak {peak:.0} MiB{}, {}; {}; CPU over the herd ({:.1} s)",
            if peak_tracked {
                " (VmHWM)"
            } else {
                " (sampled every 10 ms)"
            },
            after_text.join(", "),
            super::delivery::announced_note(&delivery.announced),
            during.elapsed.as_secs_f64(),
        );
        if delivery.missing > 0 {
            row.note
                .push_str(&format!("; {} deliveries timed out", delivery.missing));
        }
        rows.push(row);
    }

    fleet.stop().await;
    hub.stop().await;
    Ok(rows)
}
