//! `bench`: measures the real hub and agent with simulated fleets, prints a Markdown
//! table and writes a CSV. See BENCHMARKS.md for the figures and how to read them.

use std::process::ExitCode;

use brokkr_e2e::bench::{self, Options, report};
use clap::Parser;

fn main() -> ExitCode {
    let options = Options::parse();
    let csv_path = options.csv.clone();
    let extra_sql = options.extra_sql.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bench: failed to start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // On Ctrl-C or SIGTERM the run is dropped: hubs and agents are killed with their
    // handles and the bench databases dropped.
    let result = runtime.block_on(async {
        tokio::select! {
            result = bench::run(options) => Some(result),
            () = interrupted() => None,
        }
    });
    let Some(result) = result else {
        eprintln!("bench: interrupted");
        return ExitCode::FAILURE;
    };
    // Children (hubs, agents) and databases are gone with their handles; kubesim's
    // server tasks end with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    let report = match result {
        Ok(report) => report,
        Err(err) => {
            eprintln!("bench: {}", bench::error_chain(&err));
            return ExitCode::FAILURE;
        }
    };
    let command: Vec<String> = std::env::args().collect();
    println!("## Machine\n\n{}", report.machine.markdown());
    if let Some(path) = extra_sql {
        let sql = std::fs::read_to_string(&path).unwrap_or_default();
        println!(
            "## Experiment\n\nEvery bench database also ran `{}`:\n\n```sql\n{}\n```\n",
            path.display(),
            sql.trim()
        );
    }
    println!(
        "## Results\n\n`{}` ({:.0} s)\n\n{}",
        command.join(" "),
        report.started.elapsed().as_secs_f64(),
        report::markdown(&report.rows)
    );
    if let Err(err) = std::fs::write(&csv_path, report::csv(&report.rows)) {
        eprintln!("bench: failed to write {}: {err}", csv_path.display());
        return ExitCode::FAILURE;
    }
    eprintln!("bench: wrote {}", csv_path.display());
    ExitCode::SUCCESS
}

async fn interrupted() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
