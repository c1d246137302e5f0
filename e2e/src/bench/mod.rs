//! The benchmark harness: the real hub (`brokkr-operator` as a child process) against
//! a real PostgreSQL, and N simulated agents speaking the real protocol over real HTTP.
//!
//! | id | measures | module |
//! | --- | --- | --- |
//! | P1 | commit → every agent holds the object; long-poll vs polling every 10 s / 1 s | [`delivery`] |
//! | P2 | hub CPU/RSS, PostgreSQL CPU with N idle long-polling agents + heartbeats | [`idle`] |
//! | P3 | agent-event ingest throughput (batched POSTs) | [`ingest`] |
//! | P4 | the real `brokkr-agent`'s idle RSS/CPU with 10 stacks applied | [`agent_idle`] |
//! | P5 | desired-state call p50/p99 without and with 2,000 past events per agent | [`history`] |
//! | P6 | hub RSS before, during and after the herd one push causes | [`idle`] |
//! | P7 | applying N Stacks with and without the operator; API writes per Stack | [`apply`] |
//!
//! Every measurement gets a fresh hub process, so one's memory does not carry into
//! the next; each fleet size gets a fresh database. Goals are measured and reported,
//! never asserted.

pub mod agent_idle;
pub mod apply;
pub mod delivery;
pub mod history;
pub mod idle;
pub mod ingest;
pub mod machine;
pub mod process;
pub mod procfs;
pub mod report;
pub mod restart;
pub mod seed;
pub mod sim;
pub mod stats;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use brokkr_operator::store::{Store, StoreError};
use brokkr_testdb::TestDb;
use clap::{Parser, ValueEnum};
use kubesim::KubeSim;
use sea_orm::ConnectionTrait;

use self::machine::{Machine, Quiet};
use self::process::{Binaries, Hub};
use self::report::Row;
use self::seed::Seed;
use self::sim::Fleet;

/// Heartbeat interval of the simulated agents (the hub's default).
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// Measures Brokkr's hub and agent with simulated fleets; prints a Markdown table and
/// writes a CSV.
#[derive(Clone, Debug, Parser)]
#[command(name = "bench", about)]
pub struct Options {
    /// Fleet sizes, comma-separated [default: 100,1000; 20 with --quick]
    #[arg(long, env = "BROKKR_BENCH_AGENTS", value_delimiter = ',')]
    pub agents: Vec<usize>,

    /// Measurements to run, comma-separated [default: all]
    #[arg(long, env = "BROKKR_BENCH_ONLY", value_delimiter = ',', value_enum)]
    pub only: Vec<Measurement>,

    /// Where to write the CSV
    #[arg(long, env = "BROKKR_BENCH_CSV", default_value = "bench.csv")]
    pub csv: PathBuf,

    /// Small and short: a smoke test of the harness, not a measurement
    #[arg(long, env = "BROKKR_BENCH_QUICK")]
    pub quick: bool,

    /// Largest fleet P5 seeds history for (2,000 events per agent: 2 million rows at
    /// 1,000 agents)
    #[arg(long, env = "BROKKR_BENCH_HISTORY_MAX_AGENTS", default_value_t = 1000)]
    pub history_max_agents: usize,

    /// Stacks P7 applies [default: 1000; 50 with --quick]
    #[arg(long, env = "BROKKR_BENCH_APPLY_STACKS")]
    pub apply_stacks: Option<usize>,

    /// Size of each deployment object's YAML, in KiB
    #[arg(long, env = "BROKKR_BENCH_OBJECT_KIB", default_value_t = 16)]
    pub object_kib: usize,

    /// Before each measurement, wait while the 1-minute load is above this and other
    /// processes use the CPU
    #[arg(long, env = "BROKKR_BENCH_MAX_LOAD", default_value_t = 1.0)]
    pub max_load: f64,

    /// Longest wait for a quiet machine, in seconds (then measure anyway)
    #[arg(long, env = "BROKKR_BENCH_QUIET_TIMEOUT", default_value_t = 600)]
    pub quiet_timeout: u64,

    /// The brokkr-operator binary [default: built next to this one]
    #[arg(long, env = "BROKKR_BENCH_OPERATOR")]
    pub operator_bin: Option<PathBuf>,

    /// The brokkr-agent binary [default: built next to this one]
    #[arg(long, env = "BROKKR_BENCH_AGENT")]
    pub agent_bin: Option<PathBuf>,

    /// Do not run cargo to build the binaries; use what is there
    #[arg(long, env = "BROKKR_BENCH_NO_BUILD")]
    pub no_build: bool,

    /// Experiment: SQL run on every bench database after the migrations (e.g. an index
    /// being considered); the report says so
    #[arg(long, env = "BROKKR_BENCH_EXTRA_SQL")]
    pub extra_sql: Option<PathBuf>,

    /// Directory for the hub and agent logs [default: a new one under the temp dir]
    #[arg(long, env = "BROKKR_BENCH_LOG_DIR")]
    pub log_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Measurement {
    P1,
    P2,
    P3,
    P4,
    P5,
    P6,
    P7,
    P8,
}

/// Durations and sizes of the measurements: the real ones, or tiny for `--quick`.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Stacks per fleet, each targeted at every agent.
    pub stacks: usize,
    pub object_bytes: usize,
    pub long_poll_rounds: usize,
    pub poll_10s_rounds: usize,
    pub poll_1s_rounds: usize,
    /// Pause after a push has been delivered everywhere, so long-polls park again.
    pub settle: Duration,
    /// Longest wait for a fleet to hold a push (beyond any polling interval).
    pub delivery_timeout: Duration,
    pub idle_window: Duration,
    /// When the hub's RSS is read after a herd.
    pub herd_after: Vec<Duration>,
    pub ingest_posters: usize,
    pub ingest_batches: Vec<usize>,
    pub ingest_window: Duration,
    pub agent_stacks: usize,
    pub agent_window: Duration,
    pub history_events: usize,
    pub history_poll: Duration,
    pub history_window: Duration,
    /// Stacks P7 applies.
    pub apply_stacks: usize,
    pub wait_for_quiet: bool,
}

impl Plan {
    pub fn new(quick: bool, object_kib: usize) -> Plan {
        let secs = Duration::from_secs;
        let full = Plan {
            stacks: 5,
            object_bytes: object_kib * 1024,
            long_poll_rounds: 5,
            poll_10s_rounds: 3,
            poll_1s_rounds: 5,
            settle: Duration::from_secs(2),
            delivery_timeout: secs(120),
            idle_window: secs(60),
            herd_after: vec![secs(5), secs(30)],
            ingest_posters: 64,
            ingest_batches: vec![100, 500],
            ingest_window: secs(20),
            agent_stacks: 10,
            agent_window: secs(60),
            history_events: 2000,
            history_poll: secs(10),
            history_window: secs(30),
            apply_stacks: 1000,
            wait_for_quiet: true,
        };
        if !quick {
            return full;
        }
        Plan {
            long_poll_rounds: 2,
            poll_10s_rounds: 1,
            poll_1s_rounds: 2,
            settle: Duration::from_millis(500),
            delivery_timeout: secs(60),
            idle_window: secs(3),
            herd_after: vec![secs(1)],
            ingest_posters: 8,
            ingest_window: secs(2),
            agent_window: secs(3),
            history_events: 50,
            history_poll: secs(1),
            history_window: secs(3),
            apply_stacks: 50,
            wait_for_quiet: false,
            ..full
        }
    }

    /// Spread of the agents' start (250 agents a second), so that a big fleet does not
    /// start as one herd: P1, P2 and P6 measure a fleet in its steady state.
    pub fn ramp(&self, agents: usize) -> Duration {
        Duration::from_millis(agents as u64 * 4).max(Duration::from_millis(500))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("failed to {what}")]
    Store {
        what: String,
        #[source]
        source: StoreError,
    },
    #[error("failed to {what}")]
    Database {
        what: String,
        #[source]
        source: sea_orm::DbErr,
    },
    #[error("failed to {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to render the bench's manifests")]
    Render(#[from] brokkr_operator::render::RenderError),
    #[error("{0}")]
    Setup(String),
}

/// Says what was being done when an error happened.
pub trait During<T> {
    fn during(self, what: impl Into<String>) -> Result<T, BenchError>;
}

impl<T> During<T> for Result<T, StoreError> {
    fn during(self, what: impl Into<String>) -> Result<T, BenchError> {
        self.map_err(|source| BenchError::Store {
            what: what.into(),
            source,
        })
    }
}

impl<T> During<T> for Result<T, sea_orm::DbErr> {
    fn during(self, what: impl Into<String>) -> Result<T, BenchError> {
        self.map_err(|source| BenchError::Database {
            what: what.into(),
            source,
        })
    }
}

/// What a run produced.
pub struct Report {
    pub machine: Machine,
    pub rows: Vec<Row>,
    pub started: Instant,
}

/// Shared by every measurement of a run.
pub struct Bench {
    pub options: Options,
    pub plan: Plan,
    pub binaries: Binaries,
    pub log_dir: PathBuf,
    /// The hub's Kubernetes API (its controllers need one; the API bench needs no
    /// custom resources).
    cluster: KubeSim,
    hubs: AtomicUsize,
}

impl Bench {
    pub fn progress(&self, what: &str) {
        eprintln!("bench: {what}");
    }

    pub async fn wait_until_quiet(&self) -> Quiet {
        if !self.plan.wait_for_quiet {
            return Quiet {
                load1: procfs::load1(),
                foreign_cores: 0.0,
            };
        }
        machine::wait_until_quiet(
            self.options.max_load,
            Duration::from_secs(self.options.quiet_timeout),
            &[],
        )
        .await
    }

    /// A fresh, migrated database (plus `--extra-sql`).
    pub async fn database(&self) -> Result<TestDb, BenchError> {
        let db = TestDb::new().await;
        if let Some(path) = &self.options.extra_sql {
            let sql = std::fs::read_to_string(path).map_err(|source| BenchError::Io {
                what: format!("read {}", path.display()),
                source,
            })?;
            db.conn()
                .execute_unprepared(&sql)
                .await
                .during(format!("run {}", path.display()))?;
        }
        Ok(db)
    }

    pub async fn start_hub(&self, db: &TestDb) -> Result<Hub, BenchError> {
        let mut hub = self.spawn_hub(db, None)?;
        hub.wait_until_serving().await?;
        Ok(hub)
    }

    /// A hub to serve the agent API at `api` (a free port when `None`), not waited for.
    pub fn spawn_hub(
        &self,
        db: &TestDb,
        api: Option<std::net::SocketAddr>,
    ) -> Result<Hub, BenchError> {
        let n = self.hubs.fetch_add(1, Ordering::Relaxed);
        Hub::spawn(
            &self.binaries.operator,
            db.url(),
            self.cluster.kubeconfig(),
            &self.log_dir,
            &format!("hub-{n:02}"),
            api,
        )
    }

    /// Starts `seed`'s agents long-polling `hub` and sending heartbeats, ramped up, and
    /// waits until they hold the current objects and their long-polls have parked.
    pub async fn start_long_polling_fleet(
        &self,
        hub: &Hub,
        seed: &Seed,
    ) -> Result<Fleet, BenchError> {
        let agents = seed.agents.len();
        let mut fleet = Fleet::start(
            &hub.url(),
            &seed.agents,
            sim::FleetConfig {
                mode: sim::Mode::LongPoll,
                heartbeat: Some(HEARTBEAT),
                ramp: self.plan.ramp(agents),
            },
        );
        let timeout = self.plan.ramp(agents) + self.plan.delivery_timeout;
        self.await_fleet(&mut fleet, seed, timeout).await?;
        Ok(fleet)
    }

    /// Waits until every agent of a just-started fleet holds the current objects, and
    /// for its long-polls to park.
    pub async fn await_fleet(
        &self,
        fleet: &mut Fleet,
        seed: &Seed,
        timeout: Duration,
    ) -> Result<(), BenchError> {
        let delivery = fleet
            .await_holds(&seed.current_objects(), Instant::now(), timeout)
            .await;
        if delivery.missing > 0 {
            return Err(BenchError::Setup(format!(
                "{} of {} initial deliveries did not arrive within {timeout:?} ({} failed requests)",
                delivery.missing,
                delivery.missing + delivery.latencies.len(),
                fleet.counters.errors()
            )));
        }
        tokio::time::sleep(self.plan.settle).await;
        Ok(())
    }

    fn wants(&self, measurement: Measurement) -> bool {
        self.options.only.is_empty() || self.options.only.contains(&measurement)
    }
}

/// Runs the measurements the options ask for.
pub async fn run(mut options: Options) -> Result<Report, BenchError> {
    let started = Instant::now();
    if options.agents.is_empty() {
        options.agents = if options.quick {
            vec![20]
        } else {
            vec![100, 1000]
        };
    }
    raise_open_files(options.agents.iter().copied().max().unwrap_or(0))?;
    let mut plan = Plan::new(options.quick, options.object_kib);
    if let Some(stacks) = options.apply_stacks {
        plan.apply_stacks = stacks;
    }
    let binaries = Binaries::locate(
        options.operator_bin.clone(),
        options.agent_bin.clone(),
        !options.no_build,
    )?;
    let log_dir = match &options.log_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("brokkr-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&log_dir).map_err(|source| BenchError::Io {
        what: format!("create {}", log_dir.display()),
        source,
    })?;
    eprintln!("bench: logs in {}", log_dir.display());
    let cluster = KubeSim::start()
        .await
        .map_err(|err| BenchError::Setup(format!("failed to start kubesim: {err}")))?;
    let bench = Bench {
        options,
        plan,
        binaries,
        log_dir,
        cluster,
        hubs: AtomicUsize::new(0),
    };

    let mut rows = Vec::new();
    let mut machine = None;
    for &agents in &bench.options.agents.clone() {
        let per_fleet = [
            Measurement::P1,
            Measurement::P2,
            Measurement::P5,
            Measurement::P6,
            Measurement::P8,
        ];
        if !per_fleet.iter().any(|m| bench.wants(*m)) {
            break;
        }
        let db = bench.database().await?;
        if machine.is_none() {
            machine = Some(Machine::describe(db.conn()).await);
        }
        let store = Store::new(db.conn().clone());
        bench.progress(&format!("seeding {agents} agents"));
        let mut seed =
            Seed::fleet(&store, agents, bench.plan.stacks, bench.plan.object_bytes).await?;
        if bench.wants(Measurement::P1) {
            rows.extend(delivery::run(&bench, &db, &store, &mut seed).await);
            bench.checkpoint(&rows);
        }
        let (p2, p6) = (bench.wants(Measurement::P2), bench.wants(Measurement::P6));
        if p2 || p6 {
            match idle::run(&bench, &db, &store, &mut seed, p2, p6).await {
                Ok(measured) => rows.extend(measured),
                Err(err) => {
                    let wanted = [(p2, "P2", "idle fleet"), (p6, "P6", "herd")];
                    for (_, id, name) in wanted.iter().filter(|(wanted, _, _)| *wanted) {
                        rows.push(Row::failed(id, name, agents, &err));
                    }
                }
            }
            bench.checkpoint(&rows);
        }
        if bench.wants(Measurement::P8) {
            match restart::run(&bench, &db, &store, &mut seed).await {
                Ok(row) => rows.push(row),
                Err(err) => rows.push(Row::failed("P8", restart::NAME, agents, &err)),
            }
            bench.checkpoint(&rows);
        }
        if bench.wants(Measurement::P5) {
            if agents <= bench.options.history_max_agents {
                match history::run(&bench, &db, &store, &seed).await {
                    Ok(measured) => rows.extend(measured),
                    Err(err) => rows.push(Row::failed("P5", "desired call", agents, &err)),
                }
                bench.checkpoint(&rows);
            } else {
                rows.push(Row::not_measured(
                    "P5",
                    "desired call with past events",
                    agents,
                    &format!(
                        "{} past events would be {} rows; raise --history-max-agents to seed them",
                        bench.plan.history_events,
                        agents * bench.plan.history_events
                    ),
                ));
            }
        }
    }
    if bench.wants(Measurement::P3) {
        match ingest::run(&bench).await {
            Ok(measured) => rows.extend(measured),
            Err(err) => rows.push(Row::failed("P3", "ingest", 0, &err)),
        }
        bench.checkpoint(&rows);
    }
    if bench.wants(Measurement::P4) {
        match agent_idle::run(&bench).await {
            Ok(row) => rows.push(row),
            Err(err) => rows.push(Row::failed("P4", agent_idle::NAME, 1, &err)),
        }
    }
    if bench.wants(Measurement::P7) {
        match apply::run(&bench).await {
            Ok(row) => rows.push(row),
            Err(err) => rows.push(Row::failed("P7", apply::NAME, 0, &err)),
        }
        bench.checkpoint(&rows);
    }
    let machine = match machine {
        Some(machine) => machine,
        None => Machine::describe(TestDb::new().await.conn()).await,
    };
    Ok(Report {
        machine,
        rows,
        started,
    })
}

/// An error and its sources on one line.
pub use brokkr_common::error_chain;

impl Bench {
    /// Prints the rows so far and writes them to the CSV, so that an interrupted run
    /// keeps what it measured.
    fn checkpoint(&self, rows: &[Row]) {
        eprintln!("{}", report::markdown(rows));
        if let Err(err) = std::fs::write(&self.options.csv, report::csv(rows)) {
            eprintln!(
                "bench: failed to write {}: {err}",
                self.options.csv.display()
            );
        }
    }
}

/// Each simulated agent holds a socket in this process (plus the heartbeats in
/// flight) and one in the hub, which inherits this process's open-file limit: raise
/// it (to the hard limit, or past it when allowed) and check it holds the largest fleet.
fn raise_open_files(agents: usize) -> Result<(), BenchError> {
    let needed = (agents + sim::MAX_HEARTBEATS_IN_FLIGHT + 1000) as libc::rlim_t;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Ok(());
        }
        if limit.rlim_cur < needed {
            let wanted = libc::rlimit {
                rlim_cur: needed,
                rlim_max: limit.rlim_max.max(needed),
            };
            // Raising the hard limit needs privileges; without them, go to the hard limit.
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    if limit.rlim_cur < needed {
        return Err(BenchError::Setup(format!(
            "{agents} agents need about {needed} open files but the limit is {}: raise it (ulimit -n {needed})",
            limit.rlim_cur
        )));
    }
    Ok(())
}
