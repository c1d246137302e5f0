//! The real binaries end to end: brokkr-operator and two brokkr-agents as processes,
//! PostgreSQL, and two kubesim spokes (or real clusters from BROKKR_E2E_HUB_KUBECONFIG
//! and BROKKR_E2E_SPOKE_KUBECONFIG). The same tour the demo narrates.

use brokkr_e2e::fleet::Fleet;
use brokkr_e2e::tour::{self, Narrator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_are_delivered_updated_across_a_restart_broken_deleted_and_agents_go_offline() {
    let mut fleet = Fleet::new(2).await.expect("start the fleet");
    let outcome = tour::run(&mut fleet, &Narrator { narrate: false }).await;
    if let Err(err) = &outcome {
        fleet.print_log_tails(15);
        panic!("{}", brokkr_operator::controllers::error_chain(err));
    }
    fleet.shutdown().await;
}
