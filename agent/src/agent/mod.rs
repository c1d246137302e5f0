//! The agent's loops: the long-poll of the desired state, the per-stack sync (fetch, apply,
//! prune, delete, report), the periodic resync, the drift watch, health re-evaluation and the
//! heartbeat.
//!
//! One worker task owns all per-stack state and handles one thing at a time: a new desired
//! state, a due retry, a debounced batch of watch events, the resync tick or the health tick.
//! The long-poll, the heartbeat, event delivery, the watches and the metrics server run beside
//! it and talk to it through channels.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use brokkr_crds::STACK_LABEL;
use brokkr_crds::wire::{
    DesiredStack, DesiredState, EventStatus, EventType, Health, Heartbeat, StackSummary,
    health_message,
};
use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;
use uuid::Uuid;

use crate::apply::{AppliedObject, Applier, KindKey, ObjectFailure, Resolved};
use crate::config::Config;
use crate::health::{self, ObjectHealth};
use crate::hub::{Endpoint, HubClient, HubError, error_chain};
use crate::manifest::{self, Manifest, ObjectKey, Ownership};
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
    let status = Arc::new(Mutex::new(Heartbeat {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        state: "Starting".to_owned(),
        stacks: Vec::new(),
    }));
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
    tasks.spawn(poll_desired(
        hub.clone(),
        config.clone(),
        desired_tx,
        metrics.clone(),
    ));
    tasks.spawn(send_heartbeats(
        hub.clone(),
        config.heartbeat_interval,
        status.clone(),
        metrics.clone(),
    ));
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

/// The long-poll: fetches the desired state, then waits on the hub for changes from its
/// cursor. A hub that cannot be reached is retried with jittered backoff from the same
/// cursor; nothing is deleted meanwhile (the worker only hears of successful answers).
async fn poll_desired(
    hub: HubClient,
    config: Arc<Config>,
    desired: watch::Sender<Option<DesiredState>>,
    metrics: Arc<Metrics>,
) -> &'static str {
    let mut cursor: Option<String> = None;
    let mut failures = 0u32;
    // Two identical answers less than this apart mean the hub did not wait: pause.
    let floor = config.poll_wait.min(Duration::from_secs(1));
    loop {
        let started = Instant::now();
        match hub.desired(cursor.as_deref(), config.poll_wait).await {
            Ok(state) => {
                if failures > 0 {
                    tracing::info!(after_failures = failures, "reached the hub again");
                }
                failures = 0;
                metrics.set_ready();
                cursor = Some(state.cursor.clone());
                let changed = desired.send_if_modified(|current| {
                    let differs = current.as_ref().is_none_or(|c| c.stacks != state.stacks);
                    if differs {
                        tracing::info!(
                            stacks = state.stacks.len(),
                            cursor = %state.cursor,
                            "new desired state"
                        );
                        *current = Some(state);
                    }
                    differs
                });
                if !changed && started.elapsed() < floor {
                    tokio::time::sleep(floor).await;
                }
            }
            Err(err) => {
                metrics.hub_error(Endpoint::Desired);
                let delay = config.hub_backoff.jittered(failures);
                failures = failures.saturating_add(1);
                if err.is_auth() {
                    tracing::error!(
                        error = %err,
                        retry_in = ?delay,
                        "the hub refused the agent key (wrong key, or the agent is suspended or deleted); keeping everything applied"
                    );
                } else {
                    tracing::warn!(
                        error = %err,
                        source = %error_chain(&err),
                        retry_in = ?delay,
                        "failed to fetch the desired state; keeping everything applied"
                    );
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn send_heartbeats(
    hub: HubClient,
    interval: Duration,
    status: Arc<Mutex<Heartbeat>>,
    metrics: Arc<Metrics>,
) -> &'static str {
    let mut period = interval;
    loop {
        let heartbeat = lock(&status).clone();
        match hub.heartbeat(&heartbeat).await {
            Ok(ack) => {
                // Never slower than the hub expects.
                if ack.heartbeat_interval_seconds > 0 {
                    period = interval.min(Duration::from_secs(ack.heartbeat_interval_seconds));
                }
            }
            Err(err) => {
                metrics.hub_error(Endpoint::Heartbeat);
                if err.is_auth() {
                    tracing::error!(error = %err, "the hub refused the agent key for a heartbeat");
                } else {
                    tracing::warn!(error = %err, source = %error_chain(&err), "failed to send a heartbeat");
                }
            }
        }
        tokio::time::sleep(period).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a watch saw happen to objects the agent labelled.
enum Sighting {
    Changed {
        key: ObjectKey,
        live: serde_json::Value,
    },
    Deleted {
        key: ObjectKey,
    },
    /// A (re-)list finished with exactly these objects of the kind: any applied object of the
    /// kind missing from it was deleted while the watch was down.
    Listed {
        kind: KindKey,
        keys: BTreeSet<ObjectKey>,
    },
}

/// Watches one kind for objects labelled with this agent's name.
async fn watch_kind(
    client: Client,
    resolved: Resolved,
    selector: String,
    sightings: mpsc::UnboundedSender<Sighting>,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &resolved.resource);
    let stream =
        watcher::watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listing: BTreeSet<ObjectKey> = BTreeSet::new();
    while let Some(event) = stream.next().await {
        let sighting = match event {
            Ok(Event::Apply(object)) | Ok(Event::InitApply(object)) => {
                let key = resolved.key_of(&object);
                listing.insert(key.clone());
                match serde_json::to_value(&object) {
                    Ok(live) => Sighting::Changed { key, live },
                    Err(_) => continue,
                }
            }
            Ok(Event::Delete(object)) => Sighting::Deleted {
                key: resolved.key_of(&object),
            },
            Ok(Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(Event::InitDone) => Sighting::Listed {
                kind: resolved.kind_key(),
                keys: std::mem::take(&mut listing),
            },
            Err(err) => {
                tracing::debug!(kind = %resolved.resource.kind, error = %err, "watch interrupted");
                continue;
            }
        };
        if sightings.send(sighting).is_err() {
            return;
        }
    }
}

/// The fetched content of a deployment object.
struct Content {
    id: Uuid,
    /// The parsed objects, or why they could not be parsed.
    manifests: Result<Vec<Manifest>, String>,
}

/// (deployment object, event type, status, message) of the last report, to report changes only.
type Report = (Uuid, EventType, EventStatus, Option<String>);

struct StackState {
    desired: DesiredStack,
    content: Option<Content>,
    applied: BTreeMap<ObjectKey, AppliedObject>,
    /// Objects that failed in the last attempt.
    failed: u32,
    health: Health,
    last_report: Option<Report>,
    last_health: Option<(Uuid, Health)>,
    /// The deletion marker this state has carried out.
    deleted_for: Option<Uuid>,
    retry_at: Option<Instant>,
    attempt: u32,
}

impl StackState {
    fn new(desired: DesiredStack) -> StackState {
        StackState {
            desired,
            content: None,
            applied: BTreeMap::new(),
            failed: 0,
            health: Health::Unknown,
            last_report: None,
            last_health: None,
            deleted_for: None,
            retry_at: None,
            attempt: 0,
        }
    }

    fn ownership(&self, agent_name: &str) -> Ownership {
        Ownership {
            stack_id: self.desired.stack_id,
            agent_name: agent_name.to_owned(),
            deployment_object_id: self.desired.deployment_object_id,
            checksum: self.desired.checksum.clone(),
        }
    }

    /// Queues an event unless it repeats the last one.
    fn report(
        &mut self,
        reporter: &Reporter,
        event_type: EventType,
        status: EventStatus,
        message: String,
    ) {
        let report = (
            self.desired.deployment_object_id,
            event_type,
            status,
            Some(message),
        );
        if self.last_report.as_ref() == Some(&report) {
            return;
        }
        tracing::info!(
            event = event_type.as_str(),
            status = status.as_str(),
            message = report.3.as_deref().unwrap_or_default(),
            "reporting"
        );
        reporter.report(report.0, event_type, status, report.3.clone());
        self.last_report = Some(report);
    }

    fn schedule_retry(&mut self, delay: Duration) {
        self.retry_at = Some(Instant::now() + delay);
        self.attempt = self.attempt.saturating_add(1);
    }

    fn is_settled(&self) -> bool {
        self.retry_at.is_none()
            && self.failed == 0
            && self.content.as_ref().is_none_or(|c| c.manifests.is_ok())
    }
}

/// A stack that left the desired set and still has objects to delete.
struct Removal {
    retry_at: Instant,
    attempt: u32,
    kinds: Vec<Resolved>,
}

struct Worker {
    config: Arc<Config>,
    hub: HubClient,
    applier: Applier,
    reporter: Reporter,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<Heartbeat>>,
    desired: Option<DesiredState>,
    stacks: BTreeMap<Uuid, StackState>,
    removals: BTreeMap<Uuid, Removal>,
    /// Every kind applied in this process, looked through when pruning.
    known_kinds: BTreeMap<KindKey, Resolved>,
    swept: bool,
    /// A periodic resync is running.
    resyncing: bool,
    watchers: HashMap<KindKey, AbortHandle>,
    watch_tasks: JoinSet<()>,
    sightings_tx: mpsc::UnboundedSender<Sighting>,
    drifted: BTreeSet<Uuid>,
    health_due: BTreeSet<Uuid>,
    debounce_until: Option<Instant>,
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

/// `M of N objects failed: A: why; B: why`.
fn failure_message(failures: &[ObjectFailure], total: usize) -> String {
    let details: Vec<String> = failures.iter().map(ObjectFailure::summary).collect();
    format!(
        "{} of {total} objects failed: {}",
        failures.len(),
        details.join("; ")
    )
}

impl Worker {
    fn new(
        config: Arc<Config>,
        hub: HubClient,
        client: Client,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        status: Arc<Mutex<Heartbeat>>,
    ) -> (Worker, mpsc::UnboundedReceiver<Sighting>) {
        let (sightings_tx, sightings_rx) = mpsc::unbounded_channel();
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
                stacks: BTreeMap::new(),
                removals: BTreeMap::new(),
                known_kinds: BTreeMap::new(),
                swept: false,
                resyncing: false,
                watchers: HashMap::new(),
                watch_tasks: JoinSet::new(),
                sightings_tx,
                drifted: BTreeSet::new(),
                health_due: BTreeSet::new(),
                debounce_until: None,
            },
            sightings_rx,
        )
    }

    async fn run(
        mut self,
        mut desired: watch::Receiver<Option<DesiredState>>,
        mut sightings: mpsc::UnboundedReceiver<Sighting>,
    ) -> &'static str {
        let mut resync = interval(self.config.resync_interval);
        let mut health = interval(self.config.health_interval);
        loop {
            let retry_at = self.next_retry();
            let debounce_until = self.debounce_until;
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() {
                        return "desired-state poll";
                    }
                    let state = desired.borrow_and_update().clone();
                    if let Some(state) = state {
                        self.on_desired(state).await;
                    }
                }
                Some(sighting) = sightings.recv() => self.on_sighting(sighting),
                () = sleep_until(debounce_until) => self.on_debounce().await,
                () = sleep_until(retry_at) => self.retry_due().await,
                _ = resync.tick() => self.resync().await,
                _ = health.tick() => self.evaluate_all_health().await,
            }
            self.publish_status();
        }
    }

    fn next_retry(&self) -> Option<Instant> {
        let stacks = self.stacks.values().filter_map(|s| s.retry_at);
        let removals = self.removals.values().map(|r| r.retry_at);
        stacks.chain(removals).min()
    }

    async fn on_desired(&mut self, state: DesiredState) {
        let wanted: BTreeSet<Uuid> = state.stacks.iter().map(|s| s.stack_id).collect();
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
                    "stack left the desired set: deleting its objects"
                );
                self.removals.insert(
                    id,
                    Removal {
                        retry_at: Instant::now(),
                        attempt: 0,
                        kinds: stack.applied.values().map(|a| a.resource.clone()).collect(),
                    },
                );
            }
        }
        self.desired = Some(state);
        self.process_removals(true).await;
        if !self.swept {
            self.swept = true;
            self.sweep_orphans().await;
        }
        self.ensure_watchers();
        self.mark_sync_time();
    }

    /// Brings one stack to its desired state: delete (deletion marker), or fetch (if its
    /// deployment object changed), apply, prune and report.
    async fn sync_stack(&mut self, id: Uuid) {
        let Some(mut stack) = self.stacks.remove(&id) else {
            return;
        };
        let span = tracing::info_span!(
            "stack",
            stack = %id,
            name = %stack.desired.stack_name,
            deployment_object = %stack.desired.deployment_object_id
        );
        self.sync_stack_state(&mut stack).instrument(span).await;
        self.stacks.insert(id, stack);
    }

    async fn sync_stack_state(&mut self, stack: &mut StackState) {
        stack.retry_at = None;
        if stack.desired.deletion {
            // Done once; the periodic resync checks again that nothing of it came back.
            if self.resyncing || stack.deleted_for != Some(stack.desired.deployment_object_id) {
                self.delete_stack(stack).await;
            }
            return;
        }
        stack.deleted_for = None;
        let do_id = stack.desired.deployment_object_id;
        if stack.content.as_ref().map(|c| c.id) != Some(do_id) {
            match self.hub.deployment_object(do_id).await {
                Ok(object) => {
                    if object.checksum != stack.desired.checksum {
                        tracing::warn!(
                            "the deployment object's checksum differs from the desired state's"
                        );
                    }
                    let manifests = manifest::parse(&object.yaml).map_err(|e| e.to_string());
                    stack.content = Some(Content {
                        id: do_id,
                        manifests,
                    });
                }
                Err(err) => {
                    self.metrics.hub_error(Endpoint::DeploymentObject);
                    let delay = self.config.hub_backoff.jittered(stack.attempt);
                    tracing::warn!(error = %err, source = %error_chain(&err), retry_in = ?delay, "failed to fetch the deployment object");
                    stack.schedule_retry(delay);
                    return;
                }
            }
        }
        let manifests = match stack.content.as_ref().map(|c| &c.manifests) {
            Some(Ok(manifests)) => manifests.clone(),
            Some(Err(message)) => {
                // Nothing is applied or pruned: what is there stays until a good version.
                let message = format!("failed to parse the deployment object: {message}");
                stack.report(
                    &self.reporter,
                    EventType::Apply,
                    EventStatus::Failure,
                    message,
                );
                return;
            }
            None => return,
        };
        let ownership = stack.ownership(&self.config.agent_name);
        let outcome = self.applier.apply_all(&manifests, &ownership).await;
        self.metrics.applies.inc_by(outcome.applied.len() as u64);
        self.metrics
            .apply_failures
            .inc_by(outcome.failures.len() as u64);
        self.known_kinds
            .extend(outcome.kinds.iter().map(|(k, r)| (k.clone(), r.clone())));
        let previous = stack.applied.values().map(|a| a.resource.clone());
        let kinds = self
            .applier
            .listable_kinds(
                previous
                    .chain(self.known_kinds.values().cloned())
                    .collect::<Vec<_>>(),
            )
            .await;
        let pruned = self
            .applier
            .delete_matching(
                &ownership.selector(),
                &kinds,
                &outcome.unresolved,
                |key, _| !outcome.desired.contains(key),
            )
            .await;
        self.metrics
            .prune_deletes
            .inc_by(pruned.deleted.len() as u64);
        if !pruned.deleted.is_empty() {
            tracing::info!(
                deleted = pruned.deleted.len(),
                "pruned objects dropped from the stack"
            );
        }
        let applied = outcome.applied.len();
        stack.applied = outcome.applied;
        let failures: Vec<ObjectFailure> = outcome
            .failures
            .into_iter()
            .chain(pruned.failures)
            .collect();
        stack.failed = u32::try_from(failures.len()).unwrap_or(u32::MAX);
        if failures.is_empty() {
            stack.attempt = 0;
            let plural = if applied == 1 { "object" } else { "objects" };
            stack.report(
                &self.reporter,
                EventType::Apply,
                EventStatus::Success,
                format!("applied {applied} {plural}"),
            );
        } else {
            let message = failure_message(&failures, manifests.len());
            stack.report(
                &self.reporter,
                EventType::Apply,
                EventStatus::Failure,
                message,
            );
            let delay = self.config.retry_backoff.jittered(stack.attempt);
            tracing::info!(retry_in = ?delay, "will retry the stack");
            stack.schedule_retry(delay);
        }
        self.evaluate_health(stack).await;
    }

    /// Carries out a deletion marker: deletes everything of the stack and reports `Delete`.
    async fn delete_stack(&mut self, stack: &mut StackState) {
        let mut extra: Vec<Resolved> = stack.applied.values().map(|a| a.resource.clone()).collect();
        extra.extend(self.known_kinds.values().cloned());
        let kinds = self.applier.listable_kinds(extra).await;
        let selector = manifest::stack_selector(stack.desired.stack_id, &self.config.agent_name);
        let outcome = self
            .applier
            .delete_matching(&selector, &kinds, &BTreeSet::new(), |_, _| true)
            .await;
        self.metrics
            .prune_deletes
            .inc_by(outcome.deleted.len() as u64);
        if outcome.failures.is_empty() {
            stack.applied.clear();
            stack.failed = 0;
            stack.attempt = 0;
            let count = outcome.deleted.len();
            let plural = if count == 1 { "object" } else { "objects" };
            let first_time = stack.deleted_for != Some(stack.desired.deployment_object_id);
            stack.deleted_for = Some(stack.desired.deployment_object_id);
            if first_time {
                stack.report(
                    &self.reporter,
                    EventType::Delete,
                    EventStatus::Success,
                    format!("deleted {count} {plural}"),
                );
            }
        } else {
            stack.failed = u32::try_from(outcome.failures.len()).unwrap_or(u32::MAX);
            let failures: Vec<String> = outcome
                .failures
                .iter()
                .map(ObjectFailure::summary)
                .collect();
            let message = format!("failed to delete: {}", failures.join("; "));
            stack.report(
                &self.reporter,
                EventType::Delete,
                EventStatus::Failure,
                message,
            );
            let delay = self.config.retry_backoff.jittered(stack.attempt);
            stack.schedule_retry(delay);
        }
    }

    /// Deletes the objects of stacks that left the desired set (`all`: every one, else the
    /// ones whose retry is due). No event: there is no deployment object to report on.
    async fn process_removals(&mut self, all: bool) {
        let now = Instant::now();
        let due: Vec<Uuid> = self
            .removals
            .iter()
            .filter(|(_, r)| all || r.retry_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(mut removal) = self.removals.remove(&id) else {
                continue;
            };
            let mut extra = removal.kinds.clone();
            extra.extend(self.known_kinds.values().cloned());
            let kinds = self.applier.listable_kinds(extra).await;
            let selector = manifest::stack_selector(id, &self.config.agent_name);
            let outcome = self
                .applier
                .delete_matching(&selector, &kinds, &BTreeSet::new(), |_, _| true)
                .await;
            self.metrics
                .prune_deletes
                .inc_by(outcome.deleted.len() as u64);
            if outcome.failures.is_empty() {
                tracing::info!(stack = %id, deleted = outcome.deleted.len(), "removed a stack that left the desired set");
            } else {
                let delay = self.config.retry_backoff.jittered(removal.attempt);
                tracing::warn!(
                    stack = %id,
                    failures = outcome.failures.len(),
                    retry_in = ?delay,
                    "failed to remove every object of a stack that left the desired set"
                );
                removal.retry_at = Instant::now() + delay;
                removal.attempt = removal.attempt.saturating_add(1);
                self.removals.insert(id, removal);
            }
        }
    }

    /// Deletes objects labelled with this agent for stacks the hub no longer lists (they left
    /// while the agent was not running). Objects without a stack label are left alone.
    async fn sweep_orphans(&mut self) {
        let Some(state) = &self.desired else {
            return;
        };
        let live: BTreeSet<String> = state
            .stacks
            .iter()
            .map(|s| s.stack_id.to_string())
            .collect();
        let pending: BTreeSet<String> = self.removals.keys().map(Uuid::to_string).collect();
        let kinds = self
            .applier
            .listable_kinds(self.known_kinds.values().cloned().collect::<Vec<_>>())
            .await;
        let selector = manifest::agent_selector(&self.config.agent_name);
        let outcome = self
            .applier
            .delete_matching(&selector, &kinds, &BTreeSet::new(), |_, object| {
                object.labels().get(STACK_LABEL).is_some_and(|stack| {
                    Uuid::parse_str(stack).is_ok()
                        && !live.contains(stack)
                        && !pending.contains(stack)
                })
            })
            .await;
        self.metrics
            .prune_deletes
            .inc_by(outcome.deleted.len() as u64);
        if !outcome.deleted.is_empty() {
            tracing::info!(
                deleted = outcome.deleted.len(),
                "deleted objects of stacks no longer targeted"
            );
        }
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
        self.process_removals(false).await;
        self.ensure_watchers();
        self.mark_sync_time();
    }

    /// The periodic full resync: fresh discovery, every stack re-applied and pruned, orphans
    /// swept.
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
        self.process_removals(true).await;
        self.sweep_orphans().await;
        self.ensure_watchers();
        self.mark_sync_time();
    }

    fn owner_of(&self, key: &ObjectKey) -> Option<(Uuid, &AppliedObject)> {
        self.stacks
            .iter()
            .find_map(|(id, s)| s.applied.get(key).map(|a| (*id, a)))
    }

    fn on_sighting(&mut self, sighting: Sighting) {
        let mut touched = BTreeSet::new();
        match sighting {
            Sighting::Changed { key, live } => {
                if let Some((id, applied)) = self.owner_of(&key) {
                    if !manifest::live_matches(&applied.desired, &live) {
                        tracing::info!(stack = %id, object = %key, "drift: the object was changed");
                        self.drifted.insert(id);
                    }
                    touched.insert(id);
                }
            }
            Sighting::Deleted { key } => {
                if let Some((id, _)) = self.owner_of(&key) {
                    tracing::info!(stack = %id, object = %key, "drift: the object was deleted");
                    self.drifted.insert(id);
                    touched.insert(id);
                }
            }
            Sighting::Listed { kind, keys } => {
                for (id, stack) in &self.stacks {
                    let missing = stack.applied.keys().find(|key| {
                        key.group == kind.0 && key.kind == kind.1 && !keys.contains(key)
                    });
                    if let Some(key) = missing {
                        tracing::info!(stack = %id, object = %key, "drift: the object is gone");
                        self.drifted.insert(*id);
                        touched.insert(*id);
                    }
                }
            }
        }
        if touched.is_empty() {
            return;
        }
        self.health_due.extend(touched);
        if self.debounce_until.is_none() {
            self.debounce_until = Some(Instant::now() + self.config.drift_debounce);
        }
    }

    async fn on_debounce(&mut self) {
        self.debounce_until = None;
        let drifted = std::mem::take(&mut self.drifted);
        let health_due = std::mem::take(&mut self.health_due);
        for id in &drifted {
            self.sync_stack(*id).await;
        }
        for id in health_due.difference(&drifted) {
            if let Some(mut stack) = self.stacks.remove(id) {
                self.evaluate_health(&mut stack).await;
                self.stacks.insert(*id, stack);
            }
        }
    }

    async fn evaluate_all_health(&mut self) {
        let ids: Vec<Uuid> = self.stacks.keys().copied().collect();
        for id in ids {
            if let Some(mut stack) = self.stacks.remove(&id) {
                self.evaluate_health(&mut stack).await;
                self.stacks.insert(id, stack);
            }
        }
    }

    /// Reads every applied object of the stack, rolls up their health, and reports a
    /// `Health` event when it changed (or the deployment object did).
    async fn evaluate_health(&mut self, stack: &mut StackState) {
        let current = stack
            .content
            .as_ref()
            .is_some_and(|c| c.id == stack.desired.deployment_object_id && c.manifests.is_ok());
        if stack.desired.deletion || !current {
            return;
        }
        let mut objects = Vec::with_capacity(stack.applied.len());
        for (key, applied) in &stack.applied {
            let (health, detail) = match self.applier.get(key, &applied.resource).await {
                Ok(Some(live)) => health::evaluate(&key.group, &key.kind, &live),
                Ok(None) => (Health::Progressing, "missing: being re-applied".to_owned()),
                Err(message) => (Health::Unknown, format!("failed to read: {message}")),
            };
            objects.push(ObjectHealth {
                object: key.to_string(),
                health,
                detail,
            });
        }
        let (health, detail) = health::roll_up(&objects);
        stack.health = health;
        let now = (stack.desired.deployment_object_id, health);
        if stack.last_health != Some(now) {
            tracing::info!(health = health.as_str(), %detail, "health changed");
            self.reporter.report(
                stack.desired.deployment_object_id,
                EventType::Health,
                health.event_status(),
                Some(health_message(health, &detail)),
            );
            stack.last_health = Some(now);
        }
    }

    /// Starts a watch for every kind currently applied and stops the ones no longer needed.
    fn ensure_watchers(&mut self) {
        let mut needed: BTreeMap<KindKey, Resolved> = BTreeMap::new();
        for stack in self.stacks.values() {
            for applied in stack.applied.values() {
                needed.insert(applied.resource.kind_key(), applied.resource.clone());
            }
        }
        self.watchers.retain(|kind, handle| {
            let keep = needed.contains_key(kind);
            if !keep {
                handle.abort();
            }
            keep
        });
        let selector = manifest::agent_selector(&self.config.agent_name);
        for (kind, resolved) in needed {
            if self.watchers.contains_key(&kind) {
                continue;
            }
            tracing::debug!(kind = %resolved.resource.kind, "watching for drift");
            let handle = self.watch_tasks.spawn(watch_kind(
                self.applier.client().clone(),
                resolved,
                selector.clone(),
                self.sightings_tx.clone(),
            ));
            self.watchers.insert(kind, handle);
        }
        // Reap finished (aborted) watch tasks.
        while self.watch_tasks.try_join_next().is_some() {}
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
        let state = if self.desired.is_none() {
            "Starting"
        } else if self.stacks.values().all(StackState::is_settled) && self.removals.is_empty() {
            "Ready"
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
        let mut status = lock(&self.status);
        status.state = state.to_owned();
        status.stacks = stacks;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_messages_count_and_name_each_object() {
        let failures = [
            ObjectFailure {
                object: "Widget shop/w1".into(),
                message: "spec.size: Invalid value".into(),
            },
            ObjectFailure {
                object: "Gadget shop/g".into(),
                message: "no matches for kind".into(),
            },
        ];
        assert_eq!(
            failure_message(&failures, 5),
            "2 of 5 objects failed: Widget shop/w1: spec.size: Invalid value; Gadget shop/g: no matches for kind"
        );
    }
}
