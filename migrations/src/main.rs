//! `brokkr-migrate`: apply, roll back or inspect Brokkr's schema by hand.
//!
//! Not `sea_orm_migration::cli::run_cli`: its `up` runs without the advisory lock of
//! [`brokkr_migrations::migrate_with_lock`], so a hand-run `up` could race hub replicas
//! migrating at start; its `init` and `generate` commands write Rust sources into the
//! working directory (a development tool, not an operations one); and its `cli` feature
//! adds sea-orm-cli to every build. The four commands here are the ones operators need.

use brokkr_migrations::{Migrator, MigratorTrait};
use clap::{Parser, Subcommand};
use sea_orm_migration::sea_orm::Database;

#[derive(Parser, Debug)]
#[command(
    name = "brokkr-migrate",
    version,
    about = "Apply, roll back or inspect Brokkr's PostgreSQL schema"
)]
struct Cli {
    /// PostgreSQL URL, e.g. postgres://user:password@host:5432/brokkr
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply pending migrations (all, or the next N)
    Up {
        #[arg(long, short = 'n')]
        steps: Option<u32>,
    },
    /// Roll back applied migrations (the last one, or the last N)
    Down {
        #[arg(long, short = 'n', default_value_t = 1)]
        steps: u32,
    },
    /// List every migration and whether it is applied
    Status,
    /// Drop every table and apply all migrations again (destroys all data)
    Fresh,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("brokkr-migrate: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), sea_orm_migration::DbErr> {
    let db = Database::connect(&cli.database_url).await?;
    match cli.command {
        Command::Up { steps: None } => brokkr_migrations::migrate_with_lock(&db).await?,
        Command::Up { steps } => Migrator::up(&db, steps).await?,
        Command::Down { steps } => Migrator::down(&db, Some(steps)).await?,
        Command::Fresh => Migrator::fresh(&db).await?,
        Command::Status => {}
    }
    for migration in Migrator::get_migration_with_status(&db).await? {
        println!("{:<45} {}", migration.name(), migration.status());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
