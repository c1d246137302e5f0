//! The machine the bench runs on, and waiting until it is quiet enough to measure.

use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection};

use super::procfs;

/// What BENCHMARKS.md states about the machine.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgres: String,
}

impl Machine {
    pub async fn describe(db: &DatabaseConnection) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split_once(':'))
            .map_or_else(|| "unknown CPU".to_owned(), |(_, v)| v.trim().to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find(|line| line.starts_with("MemTotal:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |v| v.trim().to_owned());
        let postgres = match db.query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT version() || ' (fsync ' || current_setting('fsync') || ', synchronous_commit ' \
             || current_setting('synchronous_commit') || ', shared_buffers ' \
             || current_setting('shared_buffers') || ')'",
        ))
        .await
        {
            Ok(Some(row)) => row.try_get_by_index::<String>(0).unwrap_or_default(),
            _ => "unknown".to_owned(),
        };
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_gib: memory_kib / 1024.0 / 1024.0,
            kernel,
            postgres,
        }
    }

    pub fn markdown(&self) -> String {
        format!(
            "- CPU: {} × {}\n- RAM: {:.1} GiB\n- Linux {}\n- {}\n",
            self.cores, self.cpu, self.memory_gib, self.kernel, self.postgres
        )
    }
}

/// How busy the machine was when a measurement began.
#[derive(Clone, Copy, Debug)]
pub struct Quiet {
    pub load1: f64,
    /// Cores used by other processes (other people's builds) just before.
    pub foreign_cores: f64,
}

/// Waits until the 1-minute load is at most `max_load`, or nobody else is using the
/// CPU (the load average lags the bench's own previous measurement by a minute or
/// more), giving up after `timeout`. Processes in `ours` are not "somebody else".
pub async fn wait_until_quiet(max_load: f64, timeout: Duration, ours: &[u32]) -> Quiet {
    /// Other processes may use this much without disturbing a measurement.
    const FOREIGN_CORES: f64 = 0.15;
    let start = Instant::now();
    let mut told = false;
    loop {
        let foreign_cores = procfs::foreign_cpu(Duration::from_secs(3), ours).await;
        let load1 = procfs::load1();
        let quiet = load1 <= max_load || foreign_cores <= FOREIGN_CORES;
        if quiet || start.elapsed() >= timeout {
            if !quiet {
                eprintln!(
                    "bench: still busy after {timeout:?} (load {load1:.2}, others use {foreign_cores:.2} cores); measuring anyway"
                );
            }
            return Quiet {
                load1,
                foreign_cores,
            };
        }
        if !told {
            eprintln!(
                "bench: machine busy (load {load1:.2}, others use {foreign_cores:.2} cores); waiting up to {timeout:?}"
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}
