//! A whole Brokkr fleet on this machine, made of the real binaries: PostgreSQL, a hub
//! API server (kubesim, or the cluster of `BROKKR_E2E_HUB_KUBECONFIG`) running
//! `brokkr-operator`, and spoke API servers (kubesim, or `BROKKR_E2E_SPOKE_KUBECONFIG`)
//! each running a `brokkr-agent`. Used by the scenario tests and the demo.

use std::collections::BTreeMap;
use std::time::Duration;

use brokkr_crds::Stack;
use brokkr_testdb::TestDb;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};
use kube::{Api, Client, ResourceExt};
use kubesim::testing::TestCluster;

use crate::bench::BenchError;
use crate::bench::process::{Binaries, ChildProcess, free_addr};

pub const HUB_KUBECONFIG_VAR: &str = "BROKKR_E2E_HUB_KUBECONFIG";
pub const SPOKE_KUBECONFIG_VAR: &str = "BROKKR_E2E_SPOKE_KUBECONFIG";
/// Field manager of what the fleet applies, as `kubectl apply --server-side` would.
const APPLIER: &str = "kubectl";

pub type FleetResult<T> = Result<T, BenchError>;

pub struct Fleet {
    pub db: TestDb,
    pub hub: TestCluster,
    pub spokes: Vec<TestCluster>,
    binaries: Binaries,
    logs: tempfile::TempDir,
    /// Running hub replicas by index; replica 0 serves `api_url`.
    operators: BTreeMap<usize, Operator>,
    operator_starts: usize,
    pub api_url: String,
    api_addr: std::net::SocketAddr,
    agents: BTreeMap<String, ChildProcess>,
    agent_metrics: BTreeMap<String, std::net::SocketAddr>,
}

/// One running `brokkr-operator` replica.
struct Operator {
    process: ChildProcess,
    api_addr: std::net::SocketAddr,
    metrics_addr: std::net::SocketAddr,
}

impl Fleet {
    /// PostgreSQL, a hub and `spokes` spoke clusters; no binaries running yet.
    pub async fn new(spokes: usize) -> FleetResult<Fleet> {
        let binaries = Binaries::locate(None, None, true)?;
        if let Err(reason) = &binaries.agent {
            return Err(BenchError::Setup(format!("brokkr-agent: {reason}")));
        }
        let db = TestDb::new().await;
        let hub = TestCluster::from_env_var(HUB_KUBECONFIG_VAR).await;
        let mut clusters = Vec::new();
        for _ in 0..spokes {
            clusters.push(TestCluster::from_env_var(SPOKE_KUBECONFIG_VAR).await);
        }
        let logs = tempfile::tempdir().map_err(|source| BenchError::Io {
            what: "create the log directory".into(),
            source,
        })?;
        let api_addr = free_addr()?;
        Ok(Fleet {
            db,
            hub,
            spokes: clusters,
            binaries,
            logs,
            operators: BTreeMap::new(),
            operator_starts: 0,
            api_url: format!("http://{api_addr}"),
            api_addr,
            agents: BTreeMap::new(),
            agent_metrics: BTreeMap::new(),
        })
    }

    /// The `brokkr-operator` binary under test (for its other commands, e.g. `audit`).
    pub fn operator_binary(&self) -> &std::path::Path {
        &self.binaries.operator
    }

    /// Where the binaries' logs are.
    pub fn log_dir(&self) -> &std::path::Path {
        self.logs.path()
    }

    /// Prints the last `lines` lines of every binary's log, for a failed test.
    pub fn print_log_tails(&self, lines: usize) {
        for entry in std::fs::read_dir(self.log_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            eprintln!(
                "--- {}\n{}",
                entry.path().display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// Starts `brokkr-operator` (installing the CRDs) and waits until it is ready.
    pub async fn start_operator(&mut self) -> FleetResult<()> {
        self.start_replica(0).await.map(|_| ())
    }

    /// Starts hub replica `index` (replica 0 serves [`Fleet::api_url`], others an address
    /// of their own) against the same database and hub cluster, and waits until it is
    /// ready. Returns the URL of its agent API.
    pub async fn start_replica(&mut self, index: usize) -> FleetResult<String> {
        let api_addr = if index == 0 {
            self.api_addr
        } else {
            free_addr()?
        };
        let metrics = free_addr()?;
        self.operator_starts += 1;
        let name = format!("brokkr-operator-{index}-{}", self.operator_starts);
        let env = [
            ("DATABASE_URL", self.db.url().to_owned()),
            ("KUBECONFIG", self.hub.kubeconfig().display().to_string()),
            ("BROKKR_NAMESPACE", self.hub.namespace.clone()),
            ("BROKKR_API_ADDR", api_addr.to_string()),
            ("BROKKR_METRICS_ADDR", metrics.to_string()),
            ("BROKKR_INSTALL_CRDS", "true".to_owned()),
            ("BROKKR_HEARTBEAT_INTERVAL", "1s".to_owned()),
            ("BROKKR_STATUS_REFRESH", "5s".to_owned()),
            ("BROKKR_DELETION_TIMEOUT", "60s".to_owned()),
            ("POD_NAME", name.clone()),
            ("RUST_LOG", "info".to_owned()),
        ];
        let mut process =
            ChildProcess::spawn(&name, &self.binaries.operator, &env, self.logs.path())?;
        process
            .wait_until_serving(&format!("http://{metrics}/readyz"), Duration::from_secs(60))
            .await?;
        self.operators.insert(
            index,
            Operator {
                process,
                api_addr,
                metrics_addr: metrics,
            },
        );
        Ok(format!("http://{api_addr}"))
    }

    /// Kills the operator at once (SIGKILL: no goodbye, as when a node dies).
    pub async fn kill_operator(&mut self) {
        self.kill_replica(0).await;
    }

    /// Kills hub replica `index` at once (SIGKILL).
    pub async fn kill_replica(&mut self, index: usize) {
        if let Some(operator) = self.operators.remove(&index) {
            operator.process.stop(Duration::ZERO).await;
        }
    }

    pub async fn stop_operator(&mut self) {
        let replicas: Vec<usize> = self.operators.keys().copied().collect();
        for index in replicas {
            if let Some(operator) = self.operators.remove(&index) {
                operator.process.stop(Duration::from_secs(10)).await;
            }
        }
    }

    /// Process id of hub replica `index`, while it runs.
    pub fn replica_pid(&self, index: usize) -> Option<u32> {
        self.operators.get(&index).map(|o| o.process.pid())
    }

    /// Whether hub replica `index` is running (it has not exited, e.g. by a panic).
    pub fn replica_running(&mut self, index: usize) -> bool {
        self.operators
            .get_mut(&index)
            .is_some_and(|o| o.process.is_running())
    }

    /// URL of replica `index`'s agent API.
    pub fn replica_api_url(&self, index: usize) -> Option<String> {
        self.operators
            .get(&index)
            .map(|o| format!("http://{}", o.api_addr))
    }

    /// Replica `index`'s Prometheus metrics text.
    pub async fn replica_metrics(&self, index: usize) -> Option<String> {
        let operator = self.operators.get(&index)?;
        metrics_text(operator.metrics_addr).await
    }

    /// Agent `name`'s Prometheus metrics text, while it runs.
    pub async fn agent_metrics(&self, name: &str) -> Option<String> {
        if !self.agents.contains_key(name) {
            return None;
        }
        metrics_text(*self.agent_metrics.get(name)?).await
    }

    /// The key the hub issued to Agent `name`, once it has.
    pub async fn agent_key(&self, name: &str) -> FleetResult<String> {
        let secrets: Api<Secret> = self.hub.api();
        let secret_name = format!("brokkr-agent-{name}");
        wait_for(
            Duration::from_secs(60),
            &format!("Secret {secret_name}"),
            || async {
                secrets
                    .get_opt(&secret_name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|s| s.data)
                    .and_then(|d| {
                        d.get("pak")
                            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                    })
            },
        )
        .await
    }

    /// Starts `brokkr-agent` for Agent `name` against spoke `spoke`.
    pub async fn start_agent(&mut self, name: &str, spoke: usize) -> FleetResult<()> {
        let hub = self.api_url.clone();
        self.start_agent_via(name, spoke, &hub).await
    }

    /// Starts `brokkr-agent` for Agent `name` against spoke `spoke`, talking to the hub
    /// replica at `hub_url`.
    pub async fn start_agent_via(
        &mut self,
        name: &str,
        spoke: usize,
        hub_url: &str,
    ) -> FleetResult<()> {
        self.start_agent_with(name, spoke, hub_url, &[]).await
    }

    /// [`Fleet::start_agent_via`] with more environment variables (e.g. the key Secret the
    /// agent renews its key into).
    pub async fn start_agent_with(
        &mut self,
        name: &str,
        spoke: usize,
        hub_url: &str,
        extra_env: &[(&str, String)],
    ) -> FleetResult<()> {
        let key = self.agent_key(name).await?;
        let metrics = free_addr()?;
        let mut env = vec![
            ("BROKKR_HUB_URL", hub_url.to_owned()),
            ("BROKKR_AGENT_KEY", key),
            ("BROKKR_AGENT_NAME", name.to_owned()),
            (
                "KUBECONFIG",
                self.spokes[spoke].kubeconfig().display().to_string(),
            ),
            ("BROKKR_METRICS_ADDR", metrics.to_string()),
            ("BROKKR_HEARTBEAT_INTERVAL", "1s".to_owned()),
            ("BROKKR_HEALTH_INTERVAL", "1s".to_owned()),
            ("BROKKR_POLL_WAIT", "30s".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ];
        env.extend(extra_env.iter().cloned());
        let program = self
            .binaries
            .agent
            .as_ref()
            .map_err(|reason| BenchError::Setup(reason.clone()))?;
        let mut agent = ChildProcess::spawn(
            &format!("brokkr-agent-{name}"),
            program,
            &env,
            self.logs.path(),
        )?;
        agent
            .wait_until_serving(
                &format!("http://{metrics}/healthz"),
                Duration::from_secs(60),
            )
            .await?;
        self.agents.insert(name.to_owned(), agent);
        self.agent_metrics.insert(name.to_owned(), metrics);
        Ok(())
    }

    pub async fn stop_agent(&mut self, name: &str) {
        if let Some(agent) = self.agents.remove(name) {
            agent.stop(Duration::from_secs(5)).await;
        }
    }

    /// Stops every process; the clusters and database go when the fleet is dropped.
    pub async fn shutdown(mut self) {
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for name in names {
            self.stop_agent(&name).await;
        }
        self.stop_operator().await;
        for spoke in self.spokes.drain(..) {
            spoke.cleanup().await;
        }
    }

    /// `kubectl get stacks -A`, as the hub's printer columns show it.
    pub async fn stacks_table(&self) -> String {
        let stacks: Api<Stack> = Api::all(self.hub.client.clone());
        let list = stacks
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let mut rows = vec![
            [
                "NAMESPACE",
                "NAME",
                "GENERATOR",
                "TARGETS",
                "READY",
                "REVISION",
                "PINNED",
                "ROLLOUT",
                "ACCEPTED",
            ]
            .map(str::to_owned),
        ];
        for stack in list {
            let status = stack.status.clone().unwrap_or_default();
            let accepted = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Accepted")
                .map(|c| format!("{} ({})", c.status, c.reason))
                .unwrap_or_default();
            rows.push([
                stack.namespace().unwrap_or_default(),
                stack.name_any(),
                stack.spec.generator_ref.name.clone(),
                status.targeted_agents.to_string(),
                status.ready.unwrap_or_default(),
                status
                    .deployment_object
                    .map(|d| d.sequence.to_string())
                    .unwrap_or_default(),
                stack
                    .spec
                    .pinned_revision
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                status.rollout.and_then(|r| r.summary).unwrap_or_default(),
                accepted,
            ]);
        }
        table(&rows)
    }
}

impl Fleet {
    /// `kubectl get agents`, as the hub's printer columns show it.
    pub async fn agents_table(&self) -> String {
        use brokkr_crds::Agent;
        let agents: Api<Agent> = Api::all(self.hub.client.clone());
        let list = agents
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let mut rows = vec![["NAME", "CLUSTER", "STATUS", "LAST-HEARTBEAT"].map(str::to_owned)];
        for agent in list {
            let status = agent.status.clone().unwrap_or_default();
            rows.push([
                agent.name_any(),
                agent.spec.cluster_name.clone(),
                status
                    .phase
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default(),
                status
                    .last_heartbeat
                    .map(|t| t.0.to_string())
                    .unwrap_or_default(),
            ]);
        }
        table(&rows)
    }
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// Server-side applies every document of `yaml` (as `kubectl apply --server-side`),
/// putting namespaced objects without a namespace into `default_namespace`.
pub async fn apply_yaml(
    client: &Client,
    yaml: &str,
    default_namespace: &str,
) -> FleetResult<Vec<String>> {
    use serde::Deserialize;
    let mut applied = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(document)
            .map_err(|err| BenchError::Setup(format!("invalid YAML: {err}")))?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_json::from_value(value.clone())
            .map_err(|err| BenchError::Setup(format!("not a Kubernetes object: {err}")))?;
        let types = object
            .types
            .clone()
            .ok_or_else(|| BenchError::Setup("a document has no apiVersion/kind".into()))?;
        let gvk = GroupVersionKind::try_from(&types)
            .map_err(|err| BenchError::Setup(format!("bad apiVersion: {err}")))?;
        let (resource, capabilities) = pinned_kind(client, &gvk)
            .await
            .map_err(|err| BenchError::Setup(format!("unknown kind {}: {err}", gvk.kind)))?;
        let name = object.name_any();
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Namespaced => Api::namespaced_with(
                client.clone(),
                object
                    .metadata
                    .namespace
                    .as_deref()
                    .unwrap_or(default_namespace),
                &resource,
            ),
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        api.patch(
            &name,
            &PatchParams::apply(APPLIER).force(),
            &Patch::Apply(&value),
        )
        .await
        .map_err(|err| BenchError::Setup(format!("failed to apply {} {name}: {err}", gvk.kind)))?;
        applied.push(format!("{}/{name}", gvk.kind.to_lowercase()));
    }
    Ok(applied)
}

/// Polls `check` every 200 ms until it gives a value, or fails naming `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> FleetResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BenchError::Setup(format!(
                "timed out after {timeout:?} waiting for {what}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// kubesim runs no controllers: where a spoke is simulated, write the status a
/// Deployment controller would once its pods run, so that health can become healthy.
pub async fn roll_out_deployments(spoke: &TestCluster) {
    if !spoke.is_real() {
        roll_out_client(&spoke.client).await;
    }
}

/// [`roll_out_deployments`] for a simulated cluster's client.
pub async fn roll_out_client(client: &Client) {
    use k8s_openapi::api::apps::v1::Deployment;
    let deployments: Api<Deployment> = Api::all(client.clone());
    let Ok(list) = deployments.list(&ListParams::default()).await else {
        return;
    };
    for deployment in list {
        let replicas = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        let generation = deployment.metadata.generation.unwrap_or(1);
        let current = deployment.status.as_ref();
        if current.and_then(|s| s.observed_generation) == Some(generation)
            && current.and_then(|s| s.available_replicas) == Some(replicas)
        {
            continue;
        }
        let status = serde_json::json!({"status": {
            "observedGeneration": generation,
            "replicas": replicas, "readyReplicas": replicas,
            "updatedReplicas": replicas, "availableReplicas": replicas,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
            ]
        }});
        let namespaced: Api<Deployment> =
            Api::namespaced(client.clone(), &deployment.namespace().unwrap_or_default());
        let _ = namespaced
            .patch_status(
                &deployment.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await;
    }
}

/// The Prometheus text a process serves at `/metrics` on `addr`.
async fn metrics_text(addr: std::net::SocketAddr) -> Option<String> {
    let response = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .ok()?;
    response.text().await.ok()
}
