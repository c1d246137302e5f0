//! The agent's loops: the long-poll of the desired state and the heartbeat (`poll`), the
//! per-stack sync (`sync`), removal of what an inventory lists (`removal`), the drift
//! watch (`drift`), health re-evaluation (`health`) and the periodic resync; what the
//! heartbeat says of the agent itself (`state`).
//!
//! One worker task owns all per-stack state and handles one thing at a time: a new desired
//! state, a due retry, a debounced batch of watch events, the resync tick or the health tick.
//! The long-poll, the heartbeat, event delivery, the watches and the metrics server run beside
//! it and talk to it through channels.

mod drift;
mod health;
mod poll;
mod removal;
mod state;
mod sync;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use brokkr_crds::wire::{DeploymentObject, DesiredState, STATE_READY, StackSummary};
use kube::Client;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use uuid::Uuid;

use self::drift::{Drift, Sighting};
use self::poll::Desired;
use self::removal::Removal;
use self::state::Published;
use self::sync::StackState;
use crate::apply::Applier;
use crate::config::Config;
use crate::hub::{HubClient, HubError};
use crate::inventory::{Inventory, InventoryStore};
use crate::metrics::{self, Metrics};
use crate::reporter::Reporter;

/// How long a stopping agent keeps trying to deliver queued events.
const FLUSH_ON_STOP: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("failed to bind the metrics address {addr}")]
    MetricsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("failed to set up the hub client")]
    Hub(#[from] HubError),
    #[error("failed to connect to the spoke cluster")]
    Kube(#[source] kube::Error),
    #[error("the agent's {task} task stopped unexpectedly")]
    TaskEnded { task: &'static str },
}

/// A running agent. [`AgentHandle::stop`] stops it.
pub struct AgentHandle {
    /// Where `/metrics`, `/healthz` and `/readyz` are served (the bound port when the
    /// configured one was 0).
    pub metrics_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    reporter: Reporter,
    tasks: JoinSet<&'static str>,
    reporter_task: tokio::task::JoinHandle<()>,
}

impl AgentHandle {
    /// Runs until `shutdown` resolves (or a task of the agent ends, which is an error), then
    /// stops.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let result = tokio::select! {
            () = shutdown => Ok(()),
            ended = self.tasks.join_next() => {
                let task = match ended {
                    Some(Ok(task)) => task,
                    Some(Err(err)) => {
                        tracing::error!(error = %err, "an agent task failed");
                        "unknown"
                    }
                    None => "every",
                };
                Err(AgentError::TaskEnded { task })
            }
        };
        self.stop().await;
        result
    }

    /// Stops every loop, giving queued events a short last chance to reach the hub. What is
    /// applied stays applied.
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
        let deadline = Instant::now() + FLUSH_ON_STOP;
        while self.reporter.pending() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.reporter_task.abort();
        tracing::info!(
            undelivered_events = self.reporter.pending(),
            "agent stopped"
        );
    }
}

/// Connects to the spoke cluster by the standard inference (in-cluster, else `KUBECONFIG`)
/// and runs the agent until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let client = Client::try_default().await.map_err(AgentError::Kube)?;
    start(config, client).await?.run_until(shutdown).await
}

/// Starts the agent against the spoke cluster behind `client`: binds the metrics address and
/// spawns its loops.
pub async fn start(config: Config, client: Client) -> Result<AgentHandle, AgentError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| AgentError::MetricsBind {
            addr: config.metrics_addr,
            source,
        })?;
    let metrics_addr = listener
        .local_addr()
        .map_err(|source| AgentError::MetricsBind {
            addr: config.metrics_addr,
            source,
        })?;
    let hub = HubClient::new(
        &config.hub_url,
        config.agent_key.clone(),
        config.hub_ca_pem.as_deref(),
    )?;
    let reporter = Reporter::new();
    let status = Arc::new(Mutex::new(Published::default()));
    let (desired_tx, desired_rx) = watch::channel(None);

    tracing::info!(
        agent = %config.agent_name,
        hub = %config.hub_url,
        metrics = %metrics_addr,
        "starting the agent"
    );
    let reporter_task = tokio::spawn(reporter.clone().run(
        hub.clone(),
        config.hub_backoff,
        metrics.clone(),
    ));
    let mut tasks = JoinSet::new();
    let app = metrics::app(metrics.clone());
    tasks.spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(error = %err, "the metrics server failed");
        }
        "metrics server"
    });
    tasks.spawn(poll::poll_desired(
        hub.clone(),
        config.clone(),
        desired_tx,
        metrics.clone(),
    ));
    tasks.spawn(poll::send_heartbeats(
        hub.clone(),
        client.clone(),
        config.heartbeat_interval,
        status.clone(),
        metrics.clone(),
    ));
    // --- Key self-rotation (issue 13, item 3) ---
    if let Some(secret) = config.key_secret.clone() {
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        tasks.spawn(crate::key_rotation::renew_keys(
            hub.clone(),
            kube::Api::namespaced(client.clone(), &namespace),
            secret,
            config.heartbeat_interval,
        ));
    }
    // --- end of key self-rotation ---
    let (worker, sightings) = Worker::new(
        config,
        hub,
        client,
        reporter.clone(),
        metrics.clone(),
        status,
    );
    tasks.spawn(worker.run(desired_rx, sightings));
    Ok(AgentHandle {
        metrics_addr,
        metrics,
        reporter,
        tasks,
        reporter_task,
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The one task that owns all per-stack state and does one thing at a time.
struct Worker {
    config: Arc<Config>,
    hub: HubClient,
    applier: Applier,
    reporter: Reporter,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<Published>>,
    desired: Option<DesiredState>,
    /// The deployment objects the answer being handled carried inline, by id: used instead
    /// of fetching them. Dropped once the answer is handled (a retry fetches).
    inline: Arc<HashMap<Uuid, DeploymentObject>>,
    stacks: BTreeMap<Uuid, StackState>,
    removals: BTreeMap<Uuid, Removal>,
    /// Where the inventories live, and what they hold (as last read or written).
    inventory_store: InventoryStore,
    inventories: BTreeMap<Uuid, Inventory>,
    /// The inventories were read from the cluster (once, before anything is applied).
    inventories_loaded: bool,
    /// Why the last attempt to read the inventories failed, until one succeeds.
    inventories_unreadable: Option<String>,
    /// A periodic resync is running.
    resyncing: bool,
    drift: Drift,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn interval(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl Worker {
    fn new(
        config: Arc<Config>,
        hub: HubClient,
        client: Client,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        status: Arc<Mutex<Published>>,
    ) -> (Worker, mpsc::UnboundedReceiver<Sighting>) {
        let (drift, sightings_rx) = Drift::new();
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let inventory_store = InventoryStore::new(client.clone(), &namespace, &config.agent_name);
        let applier = Applier::new(client, config.crd_establish_timeout);
        (
            Worker {
                config,
                hub,
                applier,
                reporter,
                metrics,
                status,
                desired: None,
                inline: Arc::default(),
                stacks: BTreeMap::new(),
                removals: BTreeMap::new(),
                inventory_store,
                inventories: BTreeMap::new(),
                inventories_loaded: false,
                inventories_unreadable: None,
                resyncing: false,
                drift,
            },
            sightings_rx,
        )
    }

    async fn run(
        mut self,
        mut desired: watch::Receiver<Option<Desired>>,
        mut sightings: mpsc::UnboundedReceiver<Sighting>,
    ) -> &'static str {
        let mut resync = interval(self.config.resync_interval);
        let mut health = interval(self.config.health_interval);
        loop {
            let retry_at = self.next_retry();
            let debounce_until = self.drift.debounce_until;
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() {
                        return "desired-state poll";
                    }
                    let state = desired.borrow_and_update().clone();
                    if let Some(Desired { state, inline }) = state {
                        self.inline = inline;
                        self.on_desired(state).await;
                        self.inline = Arc::default();
                    }
                }
                Some(sighting) = sightings.recv() => self.on_sighting(sighting),
                () = sleep_until(debounce_until) => self.on_debounce().await,
                () = sleep_until(retry_at) => self.retry_due().await,
                _ = resync.tick() => self.resync().await,
                _ = health.tick() => {
                    // Unreadable inventories are tried again here too, so that an agent
                    // with nothing to retry leaves `Error` soon after the cause is gone.
                    if self.inventories_unreadable.is_some() {
                        self.retry_due().await;
                    }
                    self.evaluate_all_health().await
                }
            }
            self.publish_status();
        }
    }

    fn next_retry(&self) -> Option<Instant> {
        let stacks = self.stacks.values().filter_map(|s| s.retry_at);
        let removals = self.removals.values().map(|r| r.retry_at);
        stacks.chain(removals).min()
    }

    /// Reads the agent's inventories from the cluster, once. `false` when they could not be
    /// read: nothing is applied or deleted until they are.
    async fn load_inventories(&mut self) -> bool {
        if self.inventories_loaded {
            return true;
        }
        match self.inventory_store.load_all().await {
            Ok(inventories) => {
                tracing::info!(stacks = inventories.len(), "read the inventories");
                self.inventories = inventories;
                self.inventories_loaded = true;
                self.inventories_unreadable = None;
                true
            }
            Err(message) => {
                tracing::warn!(%message, "failed to read the inventories; will retry");
                self.inventories_unreadable = Some(message);
                false
            }
        }
    }

    /// Writes the stack's inventory when it changed.
    async fn save_inventory(&mut self, inventory: &Inventory) -> Result<(), String> {
        if self.inventories.get(&inventory.stack_id) == Some(inventory) {
            return Ok(());
        }
        self.inventory_store.save(inventory).await?;
        self.inventories
            .insert(inventory.stack_id, inventory.clone());
        Ok(())
    }

    /// Deletes the stack's inventory (nothing of it is left).
    async fn drop_inventory(&mut self, stack_id: Uuid) -> Result<(), String> {
        self.inventory_store.delete(stack_id).await?;
        self.inventories.remove(&stack_id);
        Ok(())
    }

    async fn on_desired(&mut self, state: DesiredState) {
        let wanted: BTreeSet<Uuid> = state.stacks.iter().map(|s| s.stack_id).collect();
        self.desired = Some(state.clone());
        let loaded = self.load_inventories().await;
        for desired in &state.stacks {
            let id = desired.stack_id;
            self.removals.remove(&id);
            let stack = self
                .stacks
                .entry(id)
                .or_insert_with(|| StackState::new(desired.clone()));
            let fresh = stack.last_report.is_none() && stack.retry_at.is_none();
            if stack.desired != *desired || fresh {
                if stack.desired.deployment_object_id != desired.deployment_object_id {
                    stack.attempt = 0;
                }
                stack.desired = desired.clone();
                self.sync_stack(id).await;
            }
        }
        let gone: Vec<Uuid> = self
            .stacks
            .keys()
            .filter(|id| !wanted.contains(id))
            .copied()
            .collect();
        for id in gone {
            if let Some(stack) = self.stacks.remove(&id) {
                tracing::info!(
                    stack = %id,
                    name = %stack.desired.stack_name,
                    "stack left the desired set: removing what its inventory lists"
                );
                self.removals.insert(
                    id,
                    Removal {
                        retry_at: Instant::now(),
                        attempt: 0,
                    },
                );
            }
        }
        if loaded {
            self.sweep_inventories();
            self.process_removals(true).await;
        }
        self.ensure_watchers();
        self.mark_sync_time();
    }

    async fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<Uuid> = self
            .stacks
            .iter()
            .filter(|(_, s)| s.retry_at.is_some_and(|at| at <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.sync_stack(id).await;
        }
        if self.load_inventories().await {
            self.sweep_inventories();
            self.process_removals(false).await;
        }
        self.ensure_watchers();
        self.mark_sync_time();
    }

    /// The periodic full resync: fresh discovery, every stack re-applied and pruned, and
    /// every inventory of a stack the hub no longer lists removed.
    async fn resync(&mut self) {
        if self.desired.is_none() {
            return;
        }
        tracing::debug!("periodic resync");
        self.applier.clear_discovery();
        let ids: Vec<Uuid> = self.stacks.keys().copied().collect();
        self.resyncing = true;
        for id in ids {
            self.sync_stack(id).await;
        }
        self.resyncing = false;
        if self.load_inventories().await {
            self.sweep_inventories();
            self.process_removals(true).await;
        }
        self.ensure_watchers();
        self.mark_sync_time();
    }

    fn mark_sync_time(&self) {
        let settled = self.desired.is_some()
            && self.removals.is_empty()
            && self.stacks.values().all(StackState::is_settled);
        if settled {
            self.metrics.last_successful_sync.set(unix_now());
        }
    }

    /// Refreshes what the heartbeat reports.
    fn publish_status(&self) {
        let activity = if self.desired.is_none() {
            "Starting"
        } else if self.stacks.values().all(StackState::is_settled) && self.removals.is_empty() {
            STATE_READY
        } else if self.stacks.values().any(|s| s.failed > 0) {
            "Degraded"
        } else {
            "Syncing"
        };
        let stacks = self
            .stacks
            .values()
            .filter(|s| !s.desired.deletion)
            .map(|s| StackSummary {
                stack_id: s.desired.stack_id,
                deployment_object_id: s.desired.deployment_object_id,
                health: s.health,
                objects: u32::try_from(s.applied.len()).unwrap_or(u32::MAX),
                failed: s.failed,
            })
            .collect();
        let drifted: usize = self
            .stacks
            .values()
            .map(|s| s.drift.uncorrected.len())
            .sum();
        self.metrics
            .drifted_objects
            .set(i64::try_from(drifted).unwrap_or(i64::MAX));
        let problems = self
            .inventories_unreadable
            .iter()
            .chain(self.drift.refused.values())
            .cloned()
            .collect();
        *lock(&self.status) = Published {
            activity,
            stacks,
            problems,
        };
    }
}
