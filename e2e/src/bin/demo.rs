//! The no-cluster demo: PostgreSQL, a simulated hub and two simulated spokes on this
//! machine, the real brokkr-operator and two real brokkr-agents, and a narrated tour.

use brokkr_e2e::fleet::Fleet;
use brokkr_e2e::tour::{self, Narrator};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    println!("Brokkr demo: PostgreSQL, a simulated hub cluster and two simulated spoke clusters,");
    println!("with the real brokkr-operator and brokkr-agent binaries.");
    let mut fleet = match Fleet::new(2).await {
        Ok(fleet) => fleet,
        Err(err) => {
            eprintln!("demo: {}", brokkr_operator::controllers::error_chain(&err));
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "hub kubeconfig: {}  (kubectl --kubeconfig ... get stacks -A works while the demo runs)",
        fleet.hub.kubeconfig().display()
    );
    println!("logs: {}", fleet.log_dir().display());
    let outcome = tour::run(&mut fleet, &Narrator { narrate: true }).await;
    fleet.shutdown().await;
    match outcome {
        Ok(()) => {
            println!(
                "\nDone: delivered, updated across an operator restart, refused a broken manifest, deleted, and saw an agent go Offline."
            );
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!(
                "\ndemo failed: {}",
                brokkr_operator::controllers::error_chain(&err)
            );
            std::process::ExitCode::FAILURE
        }
    }
}
