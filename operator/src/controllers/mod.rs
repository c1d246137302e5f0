//! The hub's controllers: each custom resource kind mirrored into the database.
//!
//! Every reconcile is a pipeline: read what it refers to → validate (pure) → plan
//! (pure) → one store transaction → Kubernetes writes (server-side apply) → status.
//! Failures reach users as a Warning Event and a condition.

mod agent;
mod agent_target;
mod alert_rule;
mod generator;
pub(crate) mod key_secrets;
mod stack;

use std::sync::Arc;
use std::time::Duration;

use brokkr_crds::conditions::reasons;
use brokkr_crds::{
    Agent, AgentTarget, AlertRule, Generator, NotificationChannel, OPERATOR_FIELD_MANAGER, Stack,
    StackStatus,
};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer;
use kube::runtime::reflector::{ObjectRef, Store as Cache};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::status::{ConditionedStatus, status_changed};
use crate::store::{Store, StoreError};

/// Settings the controllers need.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Namespace of the agents' key Secrets.
    pub namespace: String,
    /// How long a deleted Stack waits for its agents to report the removal.
    pub deletion_timeout: Duration,
    /// How often a Stack's status is refreshed from agent reports.
    pub status_refresh: Duration,
    /// Watch Generators, Stacks and AgentTargets of this namespace only (all when `None`).
    pub watch_namespace: Option<String>,
    /// Watch only the Agents matching this label selector (all when `None`).
    pub agent_selector: Option<String>,
    /// Agents send heartbeats this often; three missed ones mark an agent Offline.
    pub heartbeat_interval: Duration,
    /// Where agent reports are announced (PostgreSQL notifications); without it,
    /// status follows reports only through the periodic refresh.
    pub database_url: Option<String>,
    /// AlertRule evaluation and notification delivery.
    pub alerting: crate::alerts::AlertingConfig,
}

impl ControllerConfig {
    /// The Agents this hub watches (cluster-scoped; filtered by `agent_list_params`).
    fn agents_api(&self, client: &Client) -> Api<Agent> {
        Api::all(client.clone())
    }

    /// Lists exactly the Agents the controllers watch.
    fn agent_list_params(&self) -> kube::api::ListParams {
        match &self.agent_selector {
            Some(selector) => kube::api::ListParams::default().labels(selector),
            None => kube::api::ListParams::default(),
        }
    }

    /// The hub Namespaces whose labels decide which Agents accept AgentTargets from them
    /// (`spec.targetableFrom.namespaceSelector`): every one, or only the watched one.
    fn namespaces_watch(&self, watch: &watcher::Config) -> watcher::Config {
        match &self.watch_namespace {
            Some(namespace) => watch.clone().fields(&format!("metadata.name={namespace}")),
            None => watch.clone(),
        }
    }

    fn namespaced<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.watch_namespace {
            Some(namespace) => Api::namespaced(client.clone(), namespace),
            None => Api::all(client.clone()),
        }
    }
}

impl Context {
    /// The Generator `name` in `namespace`: from the cache of the Stack controller's
    /// Generator watch, else (not seen yet, as right after its creation) from the API.
    async fn generator(&self, namespace: &str, name: &str) -> Result<Option<Arc<Generator>>> {
        let cached = self
            .caches
            .generators
            .get(&ObjectRef::new(name).within(namespace));
        if cached.is_some() {
            return Ok(cached);
        }
        let api: Api<Generator> = Api::namespaced(self.client.clone(), namespace);
        Ok(api.get_opt(name).await?.map(Arc::new))
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub store: Store,
    pub recorder: Recorder,
    pub config: ControllerConfig,
    pub metrics: Metrics,
    caches: Caches,
    /// Resource uids of Stacks released while the database was unreachable.
    released_without_database: tokio::sync::mpsc::UnboundedSender<uuid::Uuid>,
    /// Generators whose Stack count changed, recounted together a moment later.
    recounts: tokio::sync::mpsc::UnboundedSender<ObjectRef<Generator>>,
    /// Statuses written to Stacks whose cached object shows no status yet, by resource
    /// uid (see [`Context::stack_status_shown`]).
    unseen_stack_statuses: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, StackStatus>>,
}

impl Context {
    /// Asks for `generator`'s status to be recounted (its Stacks were added or removed).
    fn recount(&self, generator: ObjectRef<Generator>) {
        let _ = self.recounts.send(generator);
    }

    /// The Stack's status as last written: the cached object's, or, while the cache
    /// has not yet seen the first status this hub wrote (its watch event comes after
    /// the reconcile that the metadata patch's event triggered), that one, so that the
    /// stale object does not cause the same status to be written again.
    fn stack_status_shown(&self, stack: &Stack, resource_uid: uuid::Uuid) -> Option<StackStatus> {
        let mut unseen = self
            .unseen_stack_statuses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &stack.status {
            Some(status) => {
                unseen.remove(&resource_uid);
                Some(status.clone())
            }
            None => unseen.get(&resource_uid).cloned(),
        }
    }

    /// Remembers the first status written to a Stack whose cached object has none.
    fn stack_status_written(&self, stack: &Stack, resource_uid: uuid::Uuid, status: &StackStatus) {
        if stack.status.is_none() {
            self.unseen_stack_statuses
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(resource_uid, status.clone());
        }
    }

    /// Forgets a released Stack's remembered status.
    fn stack_released(&self, resource_uid: uuid::Uuid) {
        self.unseen_stack_statuses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&resource_uid);
    }
}

/// The watched objects other controllers consult (Agents for target expansion, ...).
#[derive(Clone)]
struct Caches {
    agents: Cache<Agent>,
    agent_targets: Cache<AgentTarget>,
    stacks: Cache<Stack>,
    /// Generators as the Stack controller's Generator watch last saw them: filled before
    /// that watch triggers a Stack, so a reconcile it triggers reads what triggered it.
    generators: Cache<Generator>,
    /// Hub Namespaces, for their labels (`spec.targetableFrom.namespaceSelector`).
    namespaces: Cache<Namespace>,
    agents_listed: Listed,
    stacks_listed: Listed,
    agent_targets_listed: Listed,
    namespaces_listed: Listed,
}

/// Whether a cache holds its first complete list, awaitable by any number of tasks.
///
/// `reflector::Store::wait_until_ready` wakes only the last task that polled it (one
/// waker slot), and the controller's own runner waits on it: a second waiter could
/// leave that controller stalled. This signal is set by the same InitDone event.
#[derive(Clone)]
struct Listed(tokio::sync::watch::Receiver<bool>);

impl Listed {
    async fn wait(&self) -> Result<()> {
        let mut listed = self.0.clone();
        listed
            .wait_for(|listed| *listed)
            .await
            .map(|_| ())
            .map_err(|_| Error::CachesNotSynced)
    }
}

/// What a watched and cached kind is.
trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// A controller of `api`'s objects whose cache readiness is a [`Listed`].
fn controller_with_readiness<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
) -> (Controller<K>, Listed) {
    use kube::runtime::WatchStreamExt;
    let (reader, listed, events) = reflect_with_readiness(api, config);
    (
        Controller::for_stream(events.applied_objects(), reader),
        listed,
    )
}

/// A cache of `api`'s objects, its [`Listed`] readiness, and the watch events that fill
/// it (the cache is filled only while the stream is polled).
fn reflect_with_readiness<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
) -> (
    Cache<K>,
    Listed,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) {
    let (reader, writer) = kube::runtime::reflector::store();
    let (listed_tx, listed) = tokio::sync::watch::channel(false);
    let events = kube::runtime::reflector(writer, watcher(api, config)).inspect(move |event| {
        if matches!(event, Ok(watcher::Event::InitDone)) {
            listed_tx.send_replace(true);
        }
    });
    (reader, Listed(listed), events)
}

/// Drives the Namespace cache and asks for the AgentTargets of a namespace to be
/// reconciled when its labels change: they decide which Agents accept its AgentTargets.
async fn follow_namespace_labels(
    events: impl Stream<Item = Result<watcher::Event<Namespace>, watcher::Error>>,
    targets: Cache<AgentTarget>,
    requests: tokio::sync::mpsc::Sender<ObjectRef<AgentTarget>>,
) {
    use kube::runtime::WatchStreamExt;
    let mut known =
        std::collections::HashMap::<String, std::collections::BTreeMap<String, String>>::new();
    let mut events = std::pin::pin!(events.default_backoff());
    while let Some(event) = events.next().await {
        let namespace = match event {
            Ok(watcher::Event::Apply(namespace) | watcher::Event::InitApply(namespace)) => {
                namespace
            }
            Ok(watcher::Event::Delete(namespace)) => {
                known.remove(&namespace.name_any());
                continue;
            }
            Ok(_) => continue,
            Err(err) => {
                // Without the Namespace list no AgentTarget is reconciled: say why.
                warn!(error = %error_chain(&err), "failed to watch hub Namespaces (the operator needs get/list/watch on namespaces)");
                continue;
            }
        };
        let name = namespace.name_any();
        let labels = namespace.labels().clone();
        if known.get(&name) == Some(&labels) {
            continue;
        }
        known.insert(name.clone(), labels);
        for target in targets.state() {
            if target.namespace().as_deref() == Some(name.as_str()) {
                let _ = requests.send(ObjectRef::from_obj(&*target)).await;
            }
        }
    }
}

/// How long a reconcile waits for the caches it reads to hold their first full list.
const CACHE_SYNC_WAIT: Duration = Duration::from_secs(10);

impl Caches {
    /// Waits until the Agent, AgentTarget and Namespace caches hold a complete list.
    ///
    /// kube-runtime starts a controller once its *own* cache is listed, not the caches
    /// it reads from other controllers; before they are, an AgentTarget would select no
    /// Agents and empty its Stack's target set. After the first list a re-list swaps in
    /// atomically, so a ready cache is never partial.
    async fn wait_until_complete(&self) -> Result<()> {
        let ready = async {
            self.agents_listed.wait().await?;
            self.agent_targets_listed.wait().await?;
            self.namespaces_listed.wait().await
        };
        tokio::time::timeout(CACHE_SYNC_WAIT, ready)
            .await
            .map_err(|_| Error::CachesNotSynced)?
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read or write the database")]
    Store(#[from] StoreError),
    #[error("failed to call the Kubernetes API")]
    Kube(#[from] kube::Error),
    #[error("object has no {0}")]
    MissingMetadata(&'static str),
    #[error("waiting for agents to report the deletion")]
    DeletionPending,
    #[error("the database did not answer in time")]
    DatabaseTimeout,
    #[error("waiting for the first complete list of Agents, AgentTargets and Namespaces")]
    CachesNotSynced,
    #[error(transparent)]
    Finalizer(#[from] Box<finalizer::Error<Error>>),
}

impl Error {
    /// The kind of failure in one PascalCase word: the reason of the Warning Event and
    /// the `category` label of the `reconcile_failures` metric.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Store(_) | Error::DatabaseTimeout => categories::DATABASE,
            Error::Kube(_) => categories::KUBERNETES,
            Error::MissingMetadata(_) => categories::MISSING_METADATA,
            Error::DeletionPending => categories::DELETION_PENDING,
            Error::CachesNotSynced => categories::CACHES_NOT_SYNCED,
            Error::Finalizer(inner) => match &**inner {
                finalizer::Error::ApplyFailed(err) | finalizer::Error::CleanupFailed(err) => {
                    err.category()
                }
                finalizer::Error::AddFinalizer(_) | finalizer::Error::RemoveFinalizer(_) => {
                    categories::KUBERNETES
                }
                _ => reasons::RECONCILE_ERROR,
            },
        }
    }

    /// Whether this is the normal state of waiting, not a failure worth an Event.
    fn is_waiting(&self) -> bool {
        match self {
            Error::DeletionPending | Error::CachesNotSynced => true,
            Error::Finalizer(inner) => match &**inner {
                finalizer::Error::ApplyFailed(err) | finalizer::Error::CleanupFailed(err) => {
                    err.is_waiting()
                }
                _ => false,
            },
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What [`Error::category`] returns, besides `reasons::RECONCILE_ERROR` for the rest.
pub mod categories {
    pub const DATABASE: &str = "DatabaseError";
    pub const KUBERNETES: &str = "KubernetesError";
    pub const MISSING_METADATA: &str = "MissingMetadata";
    pub const DELETION_PENDING: &str = "DeletionPending";
    pub const CACHES_NOT_SYNCED: &str = "CachesNotSynced";
}

/// The error chain as one line, for Events and conditions (never content or keys:
/// nothing in our errors carries them).
pub use brokkr_common::error_chain;

/// Runs every controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    store: Store,
    config: ControllerConfig,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    let watch = watcher::Config::default().any_semantic();
    let watch_agents = match &config.agent_selector {
        Some(selector) => watch.clone().labels(selector),
        None => watch.clone(),
    };

    let (agents, agents_listed) =
        controller_with_readiness(Api::<Agent>::all(client.clone()), watch_agents.clone());
    let (agent_targets, agent_targets_listed) =
        controller_with_readiness(config.namespaced::<AgentTarget>(&client), watch.clone());
    let (namespaces, namespaces_listed, namespace_events) = reflect_with_readiness(
        Api::<Namespace>::all(client.clone()),
        config.namespaces_watch(&watch),
    );
    let (namespace_triggers, namespace_requests) = tokio::sync::mpsc::channel(1024);
    let agent_targets = agent_targets.reconcile_on(tokio_stream::wrappers::ReceiverStream::new(
        namespace_requests,
    ));
    let (stacks, stacks_listed) =
        controller_with_readiness(config.namespaced::<Stack>(&client), watch.clone());
    let (recounts, recount_requests) = tokio::sync::mpsc::unbounded_channel();
    let (recount_triggers, generator_requests) = tokio::sync::mpsc::channel(1024);
    // A Generator is reconciled when more than its status changed (its own status
    // writes would otherwise recount it again and again while Stacks are added), when
    // its Stacks were recounted, and every few minutes.
    let generators = {
        use kube::runtime::WatchStreamExt;
        let (cache, writer) = kube::runtime::reflector::store();
        let changes = kube::runtime::reflector(
            writer,
            watcher(config.namespaced::<Generator>(&client), watch.clone()),
        )
        .applied_objects()
        .predicate_filter(generator_but_status, Default::default());
        Controller::for_stream(changes, cache).reconcile_on(
            tokio_stream::wrappers::ReceiverStream::new(generator_requests),
        )
    };
    let stacks_api = config.namespaced::<Stack>(&client);
    let (stack_triggers, stack_requests) = tokio::sync::mpsc::channel(1024);
    let (agent_triggers, agent_requests) = tokio::sync::mpsc::channel(1024);
    let agents = agents.reconcile_on(tokio_stream::wrappers::ReceiverStream::new(agent_requests));
    let stacks = stacks.reconcile_on(tokio_stream::wrappers::ReceiverStream::new(stack_requests));
    let triggers = crate::mirror::Triggers {
        stacks: stack_triggers,
        agents: agent_triggers,
        stack_cache: stacks.store(),
    };
    // Aborted when the controllers stop, and also when this future is dropped mid-way
    // (a task aborted during shutdown would otherwise leave them running).
    let mut mirror = AbortOnDrop(Vec::new());
    if let Some(url) = &config.database_url {
        mirror.0.push(tokio::spawn(crate::mirror::listen(
            url.clone(),
            triggers.clone(),
        )));
    }
    mirror.0.push(tokio::spawn(crate::mirror::sweep_offline(
        store.clone(),
        config.heartbeat_interval,
        triggers,
    )));
    let generators_api = config.namespaced::<Generator>(&client);
    mirror.0.push(tokio::spawn(batch_recounts(
        recount_requests,
        recount_triggers,
        RECOUNT_DELAY,
    )));

    let (generator_cache, generator_writer) = kube::runtime::reflector::store();
    let caches = Caches {
        agents: agents.store(),
        agent_targets: agent_targets.store(),
        stacks: stacks.store(),
        generators: generator_cache,
        namespaces,
        agents_listed,
        stacks_listed,
        agent_targets_listed,
        namespaces_listed,
    };
    mirror.0.push(tokio::spawn(follow_namespace_labels(
        namespace_events,
        caches.agent_targets.clone(),
        namespace_triggers,
    )));
    let (released_without_database, retirements) = tokio::sync::mpsc::unbounded_channel();
    let ctx = Arc::new(Context {
        released_without_database,
        recounts,
        unseen_stack_statuses: Default::default(),
        recorder: Recorder::new(client.clone(), Reporter::from("brokkr-operator")),
        client: client.clone(),
        store,
        config,
        metrics,
        caches: caches.clone(),
    });

    // Any Agent change (labels, spec.targetableFrom) may change which agents an
    // AgentTarget selects and may deliver to.
    let targets_for_agents = caches.agent_targets.clone();
    let targets_for_stacks = caches.agent_targets.clone();
    let stacks_for_generators = caches.stacks.clone();

    let agents = agents
        .graceful_shutdown_on(shutdown.clone())
        .run(agent::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let agent_targets = agent_targets
        .watches(Api::<Agent>::all(client.clone()), watch_agents, move |_| {
            targets_for_agents
                .state()
                .iter()
                .map(|t| ObjectRef::from_obj(&**t))
                .collect::<Vec<_>>()
        })
        .watches(stacks_api, watch.clone(), move |stack| {
            let namespace = stack.namespace();
            let name = stack.name_any();
            targets_for_stacks
                .state()
                .iter()
                .filter(|t| t.namespace() == namespace && t.spec.stack_ref.name == name)
                .map(|t| ObjectRef::from_obj(&**t))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown.clone())
        .run(agent_target::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    // Only what a Stack reads of its Generator triggers its Stacks: not the Generator's
    // own status writes (its Stack count), which would reconcile every Stack of the
    // Generator each time one more is counted.
    let generator_changes = {
        use kube::runtime::WatchStreamExt;
        kube::runtime::reflector(generator_writer, watcher(generators_api, watch.clone()))
            .touched_objects()
            .predicate_filter(generator_as_stacks_see_it, Default::default())
    };
    let stacks = stacks
        .watches_stream(generator_changes, move |generator| {
            let namespace = generator.namespace();
            let name = generator.name_any();
            stacks_for_generators
                .state()
                .iter()
                .filter(|s| s.namespace() == namespace && s.spec.generator_ref.name == name)
                .map(|s| ObjectRef::from_obj(&**s))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown.clone())
        .run(stack::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    // A Generator's status counts its Stacks: the Stack controller asks for a recount
    // when it records or releases one (no watch of its own on Stacks, and one status
    // write for a burst of new Stacks, not one per Stack).
    let generators = generators
        .graceful_shutdown_on(shutdown.clone())
        .run(generator::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});

    mirror.0.push(tokio::spawn(retire_released_stacks(
        retirements,
        ctx.store.clone(),
    )));
    mirror
        .0
        .extend(start_alerting(&ctx, &watch, shutdown.clone()));
    tokio::join!(agents, agent_targets, stacks, generators);
    drop(mirror);
}

/// Starts what alerting needs on the leader: caches of AlertRules and NotificationChannels,
/// the rules' evaluation, the channel controller and the notification delivery.
fn start_alerting(
    ctx: &Arc<Context>,
    watch: &watcher::Config,
    shutdown: impl std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
) -> Vec<tokio::task::JoinHandle<()>> {
    let client = &ctx.client;
    let config = &ctx.config;
    let (rules, rules_listed, rule_events) =
        reflect_with_readiness(config.namespaced::<AlertRule>(client), watch.clone());
    let (channels, channels_listed, channel_events) = reflect_with_readiness(
        config.namespaced::<NotificationChannel>(client),
        watch.clone(),
    );
    let caches = &ctx.caches;
    let sources = alert_rule::Sources {
        rules,
        channels,
        listed: vec![
            rules_listed,
            channels_listed,
            caches.agents_listed.clone(),
            caches.stacks_listed.clone(),
            caches.namespaces_listed.clone(),
        ],
    };
    vec![
        tokio::spawn(fill_cache(rule_events)),
        tokio::spawn(fill_cache(channel_events)),
        tokio::spawn(alert_rule::evaluate_until(
            ctx.clone(),
            sources,
            shutdown.clone(),
        )),
        tokio::spawn(crate::alerts::channels::run(
            client.clone(),
            config.namespaced::<NotificationChannel>(client),
            ctx.metrics.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(crate::alerts::deliver::deliver_until(
            ctx.store.clone(),
            client.clone(),
            ctx.metrics.clone(),
            config.alerting.delivery.clone(),
            shutdown,
        )),
    ]
}

/// Tasks that live as long as the controllers.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Polls a reflector's watch events, which is what fills its cache.
async fn fill_cache<K>(events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>) {
    use kube::runtime::WatchStreamExt;
    let mut events = std::pin::pin!(events.default_backoff());
    while events.next().await.is_some() {}
}

/// What of a Generator its Stacks depend on: which object it is, its spec (suspended or
/// not), its registration (the row Stacks are recorded under) and its deletion.
fn generator_as_stacks_see_it(generator: &Generator) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    generator.metadata.uid.hash(&mut hasher);
    generator.metadata.generation.hash(&mut hasher);
    generator
        .metadata
        .deletion_timestamp
        .is_some()
        .hash(&mut hasher);
    generator
        .status
        .as_ref()
        .and_then(|status| status.generator_id.as_deref())
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// A Generator but its status: its spec (generation), the metadata its reconcile acts
/// on (annotations such as the key revocation, finalizers, deletion) and its identity.
fn generator_but_status(generator: &Generator) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let meta = &generator.metadata;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    meta.uid.hash(&mut hasher);
    meta.generation.hash(&mut hasher);
    meta.annotations.hash(&mut hasher);
    meta.labels.hash(&mut hasher);
    meta.finalizers.hash(&mut hasher);
    meta.deletion_timestamp.is_some().hash(&mut hasher);
    Some(hasher.finish())
}

/// How long a Generator's recount waits for more of its Stacks to come or go.
const RECOUNT_DELAY: Duration = Duration::from_secs(1);

/// Forwards the Generators asked to be recounted to their controller, each at most
/// once per `delay`: the first request of a batch waits `delay` for the others.
async fn batch_recounts(
    mut requests: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<Generator>>,
    reconciles: tokio::sync::mpsc::Sender<ObjectRef<Generator>>,
    delay: Duration,
) {
    while let Some(first) = requests.recv().await {
        tokio::time::sleep(delay).await;
        let mut batch = std::collections::HashSet::from([first]);
        while let Ok(next) = requests.try_recv() {
            batch.insert(next);
        }
        for generator in batch {
            if reconciles.send(generator).await.is_err() {
                return;
            }
        }
    }
}

/// How often rows of Stacks released without the database are retried.
const RETIREMENT_RETRY: Duration = Duration::from_secs(5);

/// Soft-deletes the rows of Stacks (by resource uid) that were released after the
/// deletion timeout while the database was unreachable, once it answers again, so that
/// their agents get the deletion marker after all. Kept in memory: a hub that restarts
/// before the database returns leaves such a row live (logged when it is released).
async fn retire_released_stacks(
    mut released: tokio::sync::mpsc::UnboundedReceiver<uuid::Uuid>,
    store: Store,
) {
    let mut pending = std::collections::BTreeSet::new();
    loop {
        if pending.is_empty() {
            match released.recv().await {
                Some(resource_uid) => pending.insert(resource_uid),
                None => return,
            };
        }
        while let Ok(resource_uid) = released.try_recv() {
            pending.insert(resource_uid);
        }
        let mut retired = Vec::new();
        for resource_uid in &pending {
            let outcome = match store.find_live_stack_by_resource(*resource_uid).await {
                Ok(Some(row)) => store
                    .soft_delete_stack(row.id)
                    .await
                    .map(|_| Some(row.name)),
                Ok(None) => Ok(None),
                Err(err) => Err(err),
            };
            match outcome {
                Ok(name) => {
                    if let Some(name) = name {
                        tracing::info!(stack = %name, "retired the row of a Stack released without the database");
                    }
                    retired.push(*resource_uid);
                }
                Err(err) => debug!(error = %error_chain(&err), "the database is still unreachable"),
            }
        }
        for resource_uid in retired {
            pending.remove(&resource_uid);
        }
        if !pending.is_empty() {
            tokio::time::sleep(RETIREMENT_RETRY).await;
        }
    }
}

fn error_policy<K>(_object: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action {
    if err.is_waiting() {
        debug!("{}", error_chain(err));
        Action::requeue(Duration::from_secs(2))
    } else {
        warn!(error = %error_chain(err), "reconcile failed");
        Action::requeue(Duration::from_secs(10))
    }
}

/// Runs `reconcile` for `object` behind the `brokkr.io/cleanup` finalizer, counting it
/// and telling the object's users about failures through a Warning Event.
async fn with_finalizer<K, Apply, Cleanup, ApplyFut, CleanupFut>(
    ctx: &Context,
    controller: &'static str,
    api: Api<K>,
    object: Arc<K>,
    apply: Apply,
    cleanup: Cleanup,
) -> Result<Action>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    Apply: FnOnce(Arc<K>) -> ApplyFut,
    Cleanup: FnOnce(Arc<K>) -> CleanupFut,
    ApplyFut: std::future::Future<Output = Result<Action>>,
    CleanupFut: std::future::Future<Output = Result<Action>>,
{
    let prepare = |object| async { Ok(object) };
    with_finalizer_prepared(ctx, controller, api, object, prepare, apply, cleanup).await
}

/// [`with_finalizer`] after `prepare`, which may write the object first (e.g. add the
/// finalizer together with other metadata, in one request) and returns it as written;
/// kube's helper then finds the finalizer in place and applies in the same reconcile.
async fn with_finalizer_prepared<K, Prepare, Apply, Cleanup, PrepareFut, ApplyFut, CleanupFut>(
    ctx: &Context,
    controller: &'static str,
    api: Api<K>,
    object: Arc<K>,
    prepare: Prepare,
    apply: Apply,
    cleanup: Cleanup,
) -> Result<Action>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    Prepare: FnOnce(Arc<K>) -> PrepareFut,
    Apply: FnOnce(Arc<K>) -> ApplyFut,
    Cleanup: FnOnce(Arc<K>) -> CleanupFut,
    PrepareFut: std::future::Future<Output = Result<Arc<K>>>,
    ApplyFut: std::future::Future<Output = Result<Action>>,
    CleanupFut: std::future::Future<Output = Result<Action>>,
{
    let reference = object.object_ref(&());
    let timer = ctx.metrics.reconcile_started(controller);
    let outcome = match prepare(object).await {
        Ok(object) => finalizer::finalizer(&api, brokkr_crds::FINALIZER, object, |event| async {
            match event {
                finalizer::Event::Apply(object) => apply(object).await,
                finalizer::Event::Cleanup(object) => cleanup(object).await,
            }
        })
        .await
        .map_err(|err| Error::Finalizer(Box::new(err))),
        Err(err) => Err(err),
    };
    let failure = outcome.as_ref().err().filter(|err| !err.is_waiting());
    timer.finish(failure.map(Error::category));
    if let Some(err) = failure {
        let note = error_chain(err);
        publish(
            ctx,
            &reference,
            EventType::Warning,
            err.category(),
            "Reconcile",
            note,
        )
        .await;
    }
    outcome
}

/// Publishes a Kubernetes Event about an object; a failure to publish is only logged.
async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    publish_with(&ctx.recorder, reference, type_, reason, action, &note).await;
}

/// Publishes a Kubernetes Event through `recorder`, its note cut to
/// [`brokkr_common::error::MAX_ERROR_CHAIN`] bytes; a failure to publish is only logged.
pub(crate) async fn publish_with(
    recorder: &Recorder,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let note = brokkr_common::truncate_bytes(note, brokkr_common::error::MAX_ERROR_CHAIN);
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.to_owned()),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&event, reference).await {
        warn!(error = %error_chain(&err), reason, "failed to publish an Event");
    }
}

/// Writes `status` unless nothing but condition timestamps changed since `previous`
/// (`None`: the object has no status yet).
async fn write_status<K, S>(
    api: &Api<K>,
    object: &K,
    previous: Option<&S>,
    status: &S,
) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: ConditionedStatus + Serialize,
{
    if previous.is_none_or(|previous| status_changed(previous, status)) {
        apply_status(api, object, status).await?;
    }
    Ok(())
}

/// Writes `status` to the object's status subresource with server-side apply.
async fn apply_status<K>(api: &Api<K>, object: &K, status: impl Serialize) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": object.name_any() },
        "status": status,
    });
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// The resource's `metadata.uid` as a UUID.
fn resource_uid<K: Resource>(object: &K) -> Result<uuid::Uuid> {
    object
        .meta()
        .uid
        .as_deref()
        .and_then(|uid| uuid::Uuid::parse_str(uid).ok())
        .ok_or(Error::MissingMetadata("uid"))
}

/// `key=value` strings of the resource's labels, as the database keeps them.
fn label_strings<K: Resource>(object: &K) -> Vec<String> {
    object
        .meta()
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

/// The field manager that last changed the object's spec (from `metadata.managedFields`):
/// who made a change, as far as the API server knows. `None` when no entry owns a spec
/// field (an object created without field tracking).
pub fn spec_field_manager<K: Resource>(object: &K) -> Option<String> {
    object
        .meta()
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| entry.subresource.as_deref().is_none_or(str::is_empty))
        .filter(|entry| {
            entry
                .fields_v1
                .as_ref()
                .is_some_and(|fields| fields.0.get("f:spec").is_some())
        })
        .max_by_key(|entry| entry.time.as_ref().map(|time| time.0))
        .and_then(|entry| entry.manager.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_manager_is_the_newest_entry_owning_spec_fields() {
        let stack: brokkr_crds::Stack = serde_json::from_value(serde_json::json!({
            "apiVersion": "brokkr.io/v1alpha1",
            "kind": "Stack",
            "metadata": {"name": "web", "namespace": "apps", "managedFields": [
                {"manager": "kubectl-client-side-apply", "operation": "Update",
                 "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:spec": {"f:manifests": {}}}},
                {"manager": "helm", "operation": "Apply",
                 "time": "2026-01-02T00:00:00Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:spec": {"f:description": {}}}},
                {"manager": "brokkr.io/operator", "operation": "Apply",
                 "time": "2026-01-03T00:00:00Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:finalizers": {}}}},
                {"manager": "brokkr.io/operator", "operation": "Apply", "subresource": "status",
                 "time": "2026-01-04T00:00:00Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:status": {}}},
            ]},
            "spec": {"generatorRef": {"name": "ci"}, "manifests": "a: 1"},
        }))
        .unwrap();
        assert_eq!(spec_field_manager(&stack).as_deref(), Some("helm"));
    }

    #[test]
    fn an_error_is_named_by_its_category_through_the_finalizer() {
        assert_eq!(Error::DatabaseTimeout.category(), "DatabaseError");
        assert_eq!(
            Error::Store(StoreError::not_found("stack")).category(),
            "DatabaseError"
        );
        let applying = finalizer::Error::ApplyFailed(Error::MissingMetadata("uid"));
        assert_eq!(
            Error::Finalizer(Box::new(applying)).category(),
            "MissingMetadata"
        );
        let unnamed = finalizer::Error::<Error>::UnnamedObject;
        assert_eq!(
            Error::Finalizer(Box::new(unnamed)).category(),
            reasons::RECONCILE_ERROR
        );
    }
}
