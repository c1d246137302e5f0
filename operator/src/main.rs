use std::process::ExitCode;

use brokkr_common::{error_chain, init_tracing};
use brokkr_operator::config::{Cli, Command};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.run.log_json);
    match cli.command.unwrap_or(Command::Run) {
        Command::Crd => {
            print!("{}", brokkr_crds::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Audit(args) => {
            match brokkr_operator::audit::print_from(cli.run.database_url.as_deref(), &args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("brokkr-operator audit: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run => match brokkr_operator::run::run(cli.run).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = %error_chain(&err), "brokkr-operator failed");
                ExitCode::FAILURE
            }
        },
    }
}
