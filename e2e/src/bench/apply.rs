//! P7: what the operator costs the API server when Stacks are applied. N small Stacks
//! are created in kubesim without the operator running and again with it (each set in
//! a namespace of its own, with a registered Generator); reported: how much longer the
//! apply takes with the operator, the time until every Stack is `Accepted`, the hub's
//! CPU meanwhile, and the writes the operator made per Stack (kubesim's request counts).

use std::time::{Duration, Instant};

use brokkr_crds::{Generator, GeneratorRef, GeneratorSpec, Stack, StackSpec};
use futures::{StreamExt, TryStreamExt};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use kubesim::requests::{RequestCounts, RequestKind};

use super::procfs::Monitor;
use super::report::Row;
use super::stats::Summary;
use super::{Bench, BenchError};

pub const NAME: &str = "apply Stacks";

/// Creates in flight at once (a CI job applying a directory, more eager than kubectl).
const IN_FLIGHT: usize = 8;

const CONFIG_MAP: &str =
    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  color: blue\n";

/// How long without a write counts as the operator having settled.
const QUIET: Duration = Duration::from_secs(3);

pub async fn run(bench: &Bench) -> Result<Row, BenchError> {
    let stacks = bench.plan.apply_stacks;
    bench.progress(&format!("P7 applying {stacks} Stacks"));
    let sim = &bench.cluster;
    let client = sim.client();
    brokkr_operator::run::install_crds(&client)
        .await
        .map_err(|err| setup("install the CRDs", err))?;

    // Without the operator: the API server alone.
    let quiet = bench.wait_until_quiet().await;
    let plain = Namespace::create(&client, "p7-plain").await?;
    let without = apply(&client, &plain.name, stacks).await?;
    // Deleted before the hub starts, so that it does not reconcile them.
    Api::<Stack>::namespaced(client.clone(), &plain.name)
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .map_err(|err| setup("delete the Stacks applied without the operator", err))?;

    // With the operator, once it has registered the Generator.
    let db = bench.database().await?;
    let hub = bench.start_hub(&db).await?;
    let with_operator = Namespace::create(&client, "p7-operator").await?;
    let namespace = &with_operator.name;
    wait_until_registered(&client, namespace, bench.plan.delivery_timeout).await?;
    let before = settled(sim, bench.plan.delivery_timeout).await;
    let monitor = Monitor::start(hub.pid(), None, Duration::from_millis(250));
    let started = Instant::now();
    let with = apply(&client, namespace, stacks).await?;
    let accepted = wait_until_accepted(&client, namespace, stacks, bench.plan.delivery_timeout)
        .await
        .map(|()| started.elapsed());
    let usage = monitor.finish().await;
    let after = settled(sim, bench.plan.delivery_timeout).await;
    hub.stop().await;

    let requests = after.since(&before);
    bench.progress(&format!(
        "P7 requests served while the operator worked (the bench's own: {stacks} creates, \
         lists every 100 ms): {requests}"
    ));
    let mut writes = requests.writes();
    writes.0.remove(&RequestKind {
        verb: "create",
        resource: "stacks".to_owned(),
    });
    let per_stack = writes.total() as f64 / stacks as f64;
    let mut row = Row::new("P7", format!("{NAME} (with the operator)"), 0);
    row.latency = Summary::of(&with.latencies);
    row.record(&usage);
    row.load = quiet.load1;
    let accepted = match accepted {
        Ok(elapsed) => format!(
            "all Accepted {:.2} s after the apply began",
            elapsed.as_secs_f64()
        ),
        Err(accepted) => format!(
            "only {accepted} of {stacks} Accepted within {:?}",
            bench.plan.delivery_timeout
        ),
    };
    row.note = format!(
        "{stacks} Stacks, {IN_FLIGHT} creates in flight: applied in {:.2} s without the operator, \
         {:.2} s with it ({:.2}×); {accepted}; {per_stack:.2} operator writes per Stack ({writes})",
        without.elapsed.as_secs_f64(),
        with.elapsed.as_secs_f64(),
        with.elapsed.as_secs_f64() / without.elapsed.as_secs_f64().max(f64::EPSILON),
    );
    Ok(row)
}

fn setup(what: &str, err: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(format!("failed to {what}: {err}"))
}

/// A namespace holding a Generator named `bench`.
struct Namespace {
    name: String,
}

impl Namespace {
    async fn create(client: &Client, name: &str) -> Result<Namespace, BenchError> {
        let mut namespace = k8s_openapi::api::core::v1::Namespace::default();
        namespace.metadata.name = Some(name.to_owned());
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .map_err(|err| setup(&format!("create namespace {name}"), err))?;
        Api::<Generator>::namespaced(client.clone(), name)
            .create(
                &PostParams::default(),
                &Generator::new("bench", GeneratorSpec::default()),
            )
            .await
            .map_err(|err| setup("create the Generator", err))?;
        Ok(Namespace {
            name: name.to_owned(),
        })
    }
}

struct Applied {
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// Creates `count` small Stacks, [`IN_FLIGHT`] at a time.
async fn apply(client: &Client, namespace: &str, count: usize) -> Result<Applied, BenchError> {
    let api: Api<Stack> = Api::namespaced(client.clone(), namespace);
    let started = Instant::now();
    let latencies = futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            async move {
                let spec = StackSpec {
                    generator_ref: GeneratorRef {
                        name: "bench".into(),
                    },
                    manifests: Some(CONFIG_MAP.into()),
                    ..Default::default()
                };
                let sent = Instant::now();
                api.create(
                    &PostParams::default(),
                    &Stack::new(&format!("app-{i}"), spec),
                )
                .await
                .map(|_| sent.elapsed())
                .map_err(|err| setup("create a Stack", err))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(Applied {
        elapsed: started.elapsed(),
        latencies,
    })
}

async fn wait_until_registered(
    client: &Client,
    namespace: &str,
    timeout: Duration,
) -> Result<(), BenchError> {
    let api: Api<Generator> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let registered = api
            .get("bench")
            .await
            .ok()
            .and_then(|g| g.status)
            .is_some_and(|s| s.generator_id.is_some());
        if registered {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(BenchError::Setup(format!(
        "the hub did not register the Generator within {timeout:?}"
    )))
}

/// Waits until every Stack of `namespace` is `Accepted`; on timeout, how many were.
async fn wait_until_accepted(
    client: &Client,
    namespace: &str,
    count: usize,
    timeout: Duration,
) -> Result<(), usize> {
    let api: Api<Stack> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + timeout;
    loop {
        let accepted = api
            .list(&ListParams::default())
            .await
            .map(|list| list.items.iter().filter(|s| is_accepted(s)).count())
            .unwrap_or(0);
        if accepted >= count {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(accepted);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_accepted(stack: &Stack) -> bool {
    stack.status.as_ref().is_some_and(|status| {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Accepted" && c.status == "True")
    })
}

/// The request counts once no write has been made for [`QUIET`] (or at `timeout`).
async fn settled(sim: &kubesim::KubeSim, timeout: Duration) -> RequestCounts {
    let deadline = Instant::now() + timeout;
    let mut last = sim.request_counts();
    let mut unchanged_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sim.request_counts();
        if now.writes() != last.writes() {
            last = now;
            unchanged_since = Instant::now();
        } else if unchanged_since.elapsed() >= QUIET || Instant::now() >= deadline {
            return now;
        }
    }
}
