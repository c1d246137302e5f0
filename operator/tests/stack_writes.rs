//! How many API-server writes the operator makes per Stack: each one is a request the
//! API server serves and a watch event for every watcher of Stacks, so a burst of new
//! Stacks must not cost many of them. Counted by kubesim; on a real cluster the count
//! is skipped (the Stacks are still checked to be Accepted).

use std::time::Duration;

use brokkr_crds::{Generator, Stack};
use kube::api::ListParams;
use kubesim::requests::RequestCounts;
use kubesim::testing::{TestCluster, eventually_within};

mod common;
use common::Hub;

const STACKS: usize = 20;

const CONFIG_MAP: &str =
    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  color: blue\n";

fn accepted(stack: &Stack) -> bool {
    stack.status.as_ref().is_some_and(|status| {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Accepted" && c.status == "True")
    })
}

/// Waits until no write has been served for `quiet`, and returns the counts then.
async fn counts_once_quiet(cluster: &TestCluster, quiet: Duration) -> Option<RequestCounts> {
    let mut last = cluster.request_counts()?;
    let mut unchanged_since = tokio::time::Instant::now();
    let deadline = unchanged_since + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = cluster.request_counts()?;
        if now.writes() == last.writes() && unchanged_since.elapsed() >= quiet {
            return Some(now);
        }
        if now.writes() != last.writes() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the operator kept writing: {}",
                now.since(&last).writes()
            );
            last = now;
            unchanged_since = tokio::time::Instant::now();
        }
    }
}

#[tokio::test]
async fn a_new_stack_costs_few_api_writes() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    // The Stacks come to a registered Generator (as when a team adds Stacks), so that
    // none is refused for a Generator not registered yet.
    let generators = hub.api::<Generator>();
    eventually_within(
        Duration::from_secs(30),
        "the Generator to be registered",
        || async {
            let status = generators.get("ci").await.ok()?.status?;
            status.generator_id.map(|_| ())
        },
    )
    .await;
    let _ = counts_once_quiet(&hub.cluster, Duration::from_millis(500)).await;
    let before = hub.cluster.request_counts();
    for i in 0..STACKS {
        hub.create_stack(&format!("app-{i}"), "ci", CONFIG_MAP)
            .await;
    }
    let stacks = hub.api::<Stack>();
    eventually_within(
        Duration::from_secs(60),
        "every Stack to be Accepted",
        || async {
            let list = stacks.list(&ListParams::default()).await.ok()?;
            (list.items.len() == STACKS && list.items.iter().all(accepted)).then_some(())
        },
    )
    .await;

    // The Generator counts its Stacks a moment later, once for the burst.
    eventually_within(
        Duration::from_secs(30),
        "the Generator to count every Stack",
        || async {
            // Listed, not read, so that the Generator reads counted below are the operator's.
            let list = generators.list(&ListParams::default()).await.ok()?;
            let status = list.items.into_iter().next()?.status?;
            (status.stacks == STACKS as i32).then_some(())
        },
    )
    .await;
    if let (Some(before), Some(after)) = (
        before,
        counts_once_quiet(&hub.cluster, Duration::from_secs(3)).await,
    ) {
        let mut writes = after.since(&before).writes();
        // The test's own: the Stacks it created.
        let created = kubesim::requests::RequestKind {
            verb: "create",
            resource: "stacks".to_owned(),
        };
        writes.0.remove(&created);
        // The Stack controller reads Generators from its watch's cache, not one GET per
        // reconcile (four per Stack before).
        let generator_reads = after.since(&before).get("get", "generators");
        assert!(
            generator_reads <= STACKS as u64 / 4,
            "{generator_reads} Generator reads for {STACKS} Stacks"
        );
        let per_stack = writes.total() as f64 / STACKS as f64;
        println!("operator writes for {STACKS} Stacks: {writes}");
        println!("writes per Stack: {per_stack:.2}");
        // Per Stack: one metadata patch (finalizer and owner), one status patch, one
        // `Recorded` Event; the Generator's recount is shared by the burst.
        assert!(
            per_stack <= 3.25,
            "{per_stack:.2} writes per Stack ({writes})"
        );
    }
    hub.stop().await;
}
