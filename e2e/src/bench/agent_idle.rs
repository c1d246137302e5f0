//! P4: the real `brokkr-agent`'s RSS and CPU, idle, against a kubesim spoke with
//! ten stacks applied.

use std::path::Path;
use std::time::Duration;

use brokkr_operator::store::Store;
use brokkr_testdb::TestDb;
use kubesim::KubeSim;
use sea_orm::{ConnectionTrait, DbBackend, Statement};

use super::process::{ChildProcess, free_addr};
use super::procfs::Monitor;
use super::report::Row;
use super::seed::Seed;
use super::{Bench, BenchError, During};

pub const NAME: &str = "idle brokkr-agent, 10 stacks applied";

pub async fn run(bench: &Bench) -> Result<Row, BenchError> {
    let binary = match &bench.binaries.agent {
        Ok(path) => path.clone(),
        Err(why) => return Ok(Row::not_measured("P4", NAME, 1, why)),
    };
    bench.progress("P4 idle brokkr-agent");
    let plan = &bench.plan;
    let db = bench.database().await?;
    let store = Store::new(db.conn().clone());
    let seed = Seed::fleet(&store, 1, plan.agent_stacks, plan.object_bytes).await?;
    let quiet = bench.wait_until_quiet().await;
    let hub = bench.start_hub(&db).await?;
    let spoke = KubeSim::start()
        .await
        .map_err(|err| BenchError::Setup(format!("failed to start the spoke kubesim: {err}")))?;
    let agent = start_agent(bench, &binary, &hub.url(), &seed, spoke.kubeconfig()).await?;

    let applied = wait_until_applied(&db, plan.agent_stacks, plan.delivery_timeout).await;
    let row = match applied {
        Ok(()) => {
            // Let start-up work (first health checks, watches) finish.
            tokio::time::sleep(plan.settle * 5).await;
            let monitor = Monitor::start(agent.pid(), None, Duration::from_millis(250));
            tokio::time::sleep(plan.agent_window).await;
            let usage = monitor.finish().await;
            let mut row = Row::new("P4", NAME, 1);
            row.process = "agent";
            row.record(&usage);
            row.load = quiet.load1;
            row.note = format!(
                "{} stacks × 4 objects applied to kubesim; sampled {:.0} s",
                plan.agent_stacks,
                usage.elapsed.as_secs_f64()
            );
            row
        }
        Err(applied) => Row::not_measured(
            "P4",
            NAME,
            1,
            &format!(
                "the agent applied {applied} of {} stacks within {:?}",
                plan.agent_stacks, plan.delivery_timeout
            ),
        ),
    };
    agent.stop(Duration::from_secs(10)).await;
    hub.stop().await;
    drop(spoke);
    Ok(row)
}

async fn start_agent(
    bench: &Bench,
    binary: &Path,
    hub_url: &str,
    seed: &Seed,
    kubeconfig: &Path,
) -> Result<ChildProcess, BenchError> {
    let metrics = free_addr()?;
    let agent = &seed.agents[0];
    let env = [
        ("BROKKR_HUB_URL", hub_url.to_owned()),
        ("BROKKR_AGENT_KEY", agent.key.clone()),
        ("BROKKR_AGENT_NAME", agent.name.clone()),
        ("BROKKR_METRICS_ADDR", metrics.to_string()),
        ("KUBECONFIG", kubeconfig.display().to_string()),
    ];
    let mut process = ChildProcess::spawn("brokkr-agent", binary, &env, &bench.log_dir)?;
    process
        .wait_until_serving(
            &format!("http://{metrics}/healthz"),
            Duration::from_secs(30),
        )
        .await?;
    Ok(process)
}

/// Waits until the agent reported a successful apply of `stacks` deployment objects;
/// on timeout, how many it did report.
async fn wait_until_applied(db: &TestDb, stacks: usize, timeout: Duration) -> Result<(), u64> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let applied = applied_objects(db).await.unwrap_or(0);
        if applied >= stacks as u64 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(applied);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn applied_objects(db: &TestDb) -> Result<u64, BenchError> {
    let row = db
        .conn()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(DISTINCT deployment_object_id) FROM agent_events \
             WHERE event_type = 'Apply' AND status = 'Success'",
        ))
        .await
        .during("count applied deployment objects")?;
    let count: i64 = row
        .map(|row| row.try_get_by_index(0))
        .transpose()
        .during("read the count of applied deployment objects")?
        .unwrap_or(0);
    Ok(count as u64)
}
