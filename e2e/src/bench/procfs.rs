//! CPU and memory of processes, read from `/proc` (Linux only): the hub and agent
//! children, the PostgreSQL backends of the bench database, and the machine as a whole.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Unit of the CPU times in `/proc` (`USER_HZ`): 100 on every architecture Linux
/// reports to user space with.
const TICKS_PER_SECOND: f64 = 100.0;

/// User plus system CPU time of a process, in ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// Peak resident set size in KiB since the process started or since
/// [`reset_peak_rss`].
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmHWM:")
}

/// Resets a process's peak RSS (`VmHWM`) to its current RSS; false when the kernel
/// refuses.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn status_field(pid: u32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Busy CPU time of the whole machine, in ticks (`/proc/stat`: everything but idle
/// and iowait).
fn machine_busy_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = stat.lines().next() else {
        return 0;
    };
    line.split_whitespace()
        .skip(1)
        .enumerate()
        // user nice system idle iowait irq softirq steal (guest time is already in user)
        .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6 | 7))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum()
}

/// Cores busy with work other than `ours` (and this process) over `window`: how much
/// other people's builds would disturb a measurement now.
pub async fn foreign_cpu(window: Duration, ours: &[u32]) -> f64 {
    let own = |pids: &[u32]| -> u64 {
        std::iter::once(std::process::id())
            .chain(pids.iter().copied())
            .filter_map(cpu_ticks)
            .sum()
    };
    let (busy0, own0) = (machine_busy_ticks(), own(ours));
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let (busy1, own1) = (machine_busy_ticks(), own(ours));
    let foreign = busy1.saturating_sub(busy0) as f64 - own1.saturating_sub(own0) as f64;
    (foreign.max(0.0) / TICKS_PER_SECOND) / start.elapsed().as_secs_f64()
}

/// CPU of a process over a stretch of time.
#[derive(Clone, Copy, Debug)]
pub struct CpuMeter {
    pid: u32,
    ticks: u64,
    since: Instant,
}

impl CpuMeter {
    pub fn start(pid: u32) -> CpuMeter {
        CpuMeter {
            pid,
            ticks: cpu_ticks(pid).unwrap_or(0),
            since: Instant::now(),
        }
    }

    /// Average cores used since [`CpuMeter::start`].
    pub fn cores(&self) -> f64 {
        let ticks = cpu_ticks(self.pid).unwrap_or(self.ticks);
        cores(ticks.saturating_sub(self.ticks), self.since.elapsed())
    }
}

fn cores(ticks: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        return 0.0;
    }
    ticks as f64 / TICKS_PER_SECOND / elapsed.as_secs_f64()
}

/// The PostgreSQL processes serving the bench: the backends of its database and the
/// server's background processes (WAL writer, checkpointer, ...). Backends come and go
/// with connection pools, so each is followed from the first time it is seen.
struct PostgresCpu {
    db: DatabaseConnection,
    first: HashMap<u32, u64>,
    last: HashMap<u32, u64>,
}

const POSTGRES_PIDS: &str = "SELECT pid FROM pg_stat_activity \
     WHERE (datname = current_database() OR backend_type <> 'client backend') \
       AND pid <> pg_backend_pid()";

impl PostgresCpu {
    async fn refresh(&mut self) {
        let Ok(rows) = self.db.query_all_raw(statement(POSTGRES_PIDS)).await else {
            return;
        };
        for row in rows {
            let Ok(pid) = row.try_get_by_index::<i32>(0) else {
                continue;
            };
            let pid = pid as u32;
            if let Some(ticks) = cpu_ticks(pid) {
                self.first.entry(pid).or_insert(ticks);
                self.last.insert(pid, ticks);
            }
        }
    }

    /// `None` when no backend could be read (PostgreSQL on another machine).
    fn ticks(&self) -> Option<u64> {
        if self.last.is_empty() {
            return None;
        }
        Some(
            self.last
                .iter()
                .map(|(pid, last)| last.saturating_sub(self.first[pid]))
                .sum(),
        )
    }
}

fn statement(sql: &str) -> sea_orm::Statement {
    sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql)
}

/// What a [`Monitor`] saw.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub elapsed: Duration,
    /// Average cores of the watched process.
    pub cpu_cores: f64,
    pub rss_first_mib: f64,
    pub rss_max_mib: f64,
    pub rss_last_mib: f64,
    /// Average cores of the PostgreSQL processes serving the bench database.
    pub postgres_cores: Option<f64>,
    /// Average cores of the bench itself (the simulated agents, kubesim).
    pub bench_cores: f64,
    /// Average cores used by everything else on the machine (other people's builds):
    /// a measurement with more than a few hundredths here was disturbed.
    pub others_cores: f64,
}

/// Samples one process (and PostgreSQL) in the background until [`Monitor::finish`].
pub struct Monitor {
    stop: watch::Sender<bool>,
    task: JoinHandle<Usage>,
}

impl Monitor {
    /// Samples RSS every `period` and PostgreSQL's processes about every second.
    pub fn start(pid: u32, db: Option<DatabaseConnection>, period: Duration) -> Monitor {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let machine = machine_busy_ticks();
            let cpu = CpuMeter::start(pid);
            let bench = CpuMeter::start(std::process::id());
            let mut postgres = db.map(|db| PostgresCpu {
                db,
                first: HashMap::new(),
                last: HashMap::new(),
            });
            let mut usage = Usage::default();
            let rss0 = mib(rss_kib(pid).unwrap_or(0));
            usage.rss_first_mib = rss0;
            usage.rss_max_mib = rss0;
            usage.rss_last_mib = rss0;
            let mut last_postgres = None::<Instant>;
            loop {
                if last_postgres.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    if let Some(postgres) = &mut postgres {
                        postgres.refresh().await;
                    }
                    last_postgres = Some(Instant::now());
                }
                if let Some(rss) = rss_kib(pid) {
                    usage.rss_last_mib = mib(rss);
                    usage.rss_max_mib = usage.rss_max_mib.max(usage.rss_last_mib);
                }
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stopped.changed() => break,
                }
            }
            if let Some(postgres) = &mut postgres {
                postgres.refresh().await;
            }
            usage.elapsed = cpu.since.elapsed();
            usage.cpu_cores = cpu.cores();
            usage.bench_cores = bench.cores();
            let postgres_ticks = postgres.as_ref().and_then(PostgresCpu::ticks);
            usage.postgres_cores = postgres_ticks.map(|ticks| cores(ticks, usage.elapsed));
            let ours = cpu_ticks(pid)
                .unwrap_or(cpu.ticks)
                .saturating_sub(cpu.ticks)
                + cpu_ticks(bench.pid)
                    .unwrap_or(bench.ticks)
                    .saturating_sub(bench.ticks)
                + postgres_ticks.unwrap_or(0);
            let others = machine_busy_ticks()
                .saturating_sub(machine)
                .saturating_sub(ours);
            usage.others_cores = cores(others, usage.elapsed);
            usage
        });
        Monitor { stop, task }
    }

    pub async fn finish(self) -> Usage {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        let mut spin = 0u64;
        for i in 0..5_000_000u64 {
            spin = spin.wrapping_add(i * i);
        }
        assert!(spin > 0);
        assert!(cpu_ticks(pid).is_some());
        let rss = rss_kib(pid).unwrap();
        assert!(rss > 0);
        assert!(peak_rss_kib(pid).unwrap() >= rss);
        assert!(rss_kib(u32::MAX).is_none(), "no such process");
    }
}
