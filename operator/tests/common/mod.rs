//! Shared by the controller and end-to-end tests: a hub (controllers, optionally the
//! agent API) against an API server and a fresh database.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use brokkr_crds::{Agent, AgentSpec, Generator, GeneratorSpec, Stack, StackSpec, TargetableFrom};
use brokkr_operator::controllers::{self, ControllerConfig};
use brokkr_operator::entity::{deployment_objects, stacks};
use brokkr_operator::metrics::Metrics;
use brokkr_operator::store::Store;
use brokkr_testdb::TestDb;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use kubesim::testing::{TestCluster, eventually};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use tokio::sync::oneshot;

/// Delays the answers to LIST requests of one resource (see [`Hub::client_with_slow_lists`]).
struct SlowLists<S> {
    inner: S,
    plural: &'static str,
    delay: Duration,
}

impl<S, B> tower::Service<axum::http::Request<B>> for SlowLists<S>
where
    S: tower::Service<axum::http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let is_list = request.method() == axum::http::Method::GET
            && request.uri().path().ends_with(&format!("/{}", self.plural))
            && !request.uri().query().unwrap_or_default().contains("watch=");
        let delay = if is_list { self.delay } else { Duration::ZERO };
        let answer = self.inner.call(request);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            answer.await
        })
    }
}

pub struct Hub {
    pub cluster: TestCluster,
    pub db: TestDb,
    pub store: Store,
    pub agent_label: String,
    config: ControllerConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Hub {
    pub async fn start() -> Hub {
        Hub::start_with(Duration::from_secs(60), Duration::from_millis(500)).await
    }

    /// A hub whose operator namespace is this test's namespace: AgentTargets here may
    /// deliver to Agents without `spec.targetableFrom`.
    pub async fn start_with(deletion_timeout: Duration, status_refresh: Duration) -> Hub {
        Hub::start_configured(deletion_timeout, status_refresh, false).await
    }

    /// A hub whose operator runs in a namespace of its own (`<test namespace>-op`, which
    /// holds the agents' key Secrets), so that this test's namespace is a tenant's: its
    /// AgentTargets may deliver only to Agents whose `spec.targetableFrom` admits it.
    pub async fn start_for_tenant(status_refresh: Duration) -> Hub {
        Hub::start_configured(Duration::from_secs(60), status_refresh, true).await
    }

    async fn start_configured(
        deletion_timeout: Duration,
        status_refresh: Duration,
        operator_elsewhere: bool,
    ) -> Hub {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let cluster = TestCluster::new().await;
        brokkr_operator::run::install_crds(&cluster.client)
            .await
            .expect("install CRDs");
        let db = TestDb::new().await;
        let store = Store::new(db.conn().clone());
        // On a shared real cluster, this test's controllers see only this test's objects.
        let agent_label = cluster.namespace.clone();
        let operator_namespace = if operator_elsewhere {
            let name = format!("{}-op", cluster.namespace);
            let mut namespace = Namespace::default();
            namespace.metadata.name = Some(name.clone());
            Api::<Namespace>::all(cluster.client.clone())
                .create(&PostParams::default(), &namespace)
                .await
                .expect("create the operator's namespace");
            cluster.delete_on_drop::<Namespace>(&name);
            name
        } else {
            cluster.namespace.clone()
        };
        let config = ControllerConfig {
            namespace: operator_namespace,
            deletion_timeout,
            status_refresh,
            watch_namespace: Some(cluster.namespace.clone()),
            agent_selector: Some(format!("brokkr.io/test={agent_label}")),
            heartbeat_interval: Duration::from_secs(1),
            database_url: Some(db.url().to_owned()),
            alerting: brokkr_operator::alerts::AlertingConfig {
                evaluate_every: Duration::from_millis(500),
                ..Default::default()
            },
        };
        let mut hub = Hub {
            cluster,
            db,
            store,
            agent_label,
            config,
            stop: None,
            task: None,
        };
        hub.start_controllers();
        hub
    }

    fn start_controllers(&mut self) {
        self.start_controllers_with(self.cluster.client.clone());
    }

    fn start_controllers_with(&mut self, client: kube::Client) {
        let (stop, stopped) = oneshot::channel::<()>();
        self.stop = Some(stop);
        self.task = Some(tokio::spawn(controllers::run(
            client,
            self.store.clone(),
            self.config.clone(),
            Metrics::default(),
            async move {
                let _ = stopped.await;
            },
        )));
    }

    /// Stops the controllers as a hub shutdown does and starts new ones, with empty
    /// caches, against the same API server and database, through `client`.
    pub async fn restart_controllers_with(&mut self, client: kube::Client) {
        self.stop_controllers().await;
        self.start_controllers_with(client);
    }

    /// Stops the controllers as a hub shutdown does (the database and the API server stay).
    pub async fn stop_controllers(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Starts new controllers, with empty caches, after [`Hub::stop_controllers`].
    pub fn start_controllers_again(&mut self) {
        self.start_controllers();
    }

    /// A client of this test's cluster whose LISTs of `plural` (not its watches) are
    /// answered `delay` late, as by a slow or large API server: client-side, so it
    /// works the same on kubesim and on a real cluster.
    pub async fn client_with_slow_lists(
        &self,
        plural: &'static str,
        delay: Duration,
    ) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.cluster.kubeconfig())
            .expect("read the test cluster's kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("a client config for the test cluster");
        let builder = kube::client::ClientBuilder::try_from(config).expect("a client builder");
        builder
            .with_layer(&tower::layer::layer_fn(move |inner| SlowLists {
                inner,
                plural,
                delay,
            }))
            .build()
    }

    /// The hub's HTTP API (agent and generator routes) for this hub's database, able to
    /// rotate keys and apply Stacks with the cluster's client, once its change feed listens.
    pub async fn api_app(&self) -> axum::Router {
        use brokkr_operator::api::{self, ApiConfig, ApiState, ChangeFeed, ClusterAccess};
        let changes = ChangeFeed::default();
        tokio::spawn(
            changes
                .clone()
                .listen(self.db.url().to_owned(), self.store.clone()),
        );
        let app = api::app(
            ApiState::new(
                self.store.clone(),
                changes,
                ApiConfig {
                    heartbeat_interval: Duration::from_secs(1),
                    ..ApiConfig::default()
                },
            )
            .with_cluster_access(ClusterAccess {
                client: self.cluster.client.clone(),
                namespace: self.operator_namespace().to_owned(),
            }),
        );
        // The feed's LISTEN is set up in the background; give it a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        app
    }

    /// Serves [`Hub::api_app`] on 127.0.0.1; returns its URL.
    pub async fn serve_api(&self) -> String {
        let app = self.api_app().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the agent API");
        let addr = listener.local_addr().expect("API address");
        tokio::spawn(axum::serve(listener, app).into_future());
        format!("http://{addr}")
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        // Agents are cluster-scoped: remove this test's before the namespace goes.
        let agents: Api<Agent> = Api::all(self.cluster.client.clone());
        let selector = format!("brokkr.io/test={}", self.agent_label);
        if let Ok(list) = agents.list(&ListParams::default().labels(&selector)).await {
            for agent in list {
                let _ = agents
                    .patch(
                        &agent.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
                let _ = agents
                    .delete(&agent.name_any(), &DeleteParams::default())
                    .await;
            }
        }
        self.cluster.cleanup().await;
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        self.cluster.api()
    }

    pub fn namespace(&self) -> &str {
        &self.cluster.namespace
    }

    pub async fn create_generator(&self, name: &str) -> Generator {
        self.api::<Generator>()
            .create(
                &PostParams::default(),
                &Generator::new(name, GeneratorSpec::default()),
            )
            .await
            .expect("create Generator")
    }

    pub async fn create_stack(&self, name: &str, generator: &str, manifests: &str) -> Stack {
        let spec = StackSpec {
            generator_ref: brokkr_crds::GeneratorRef {
                name: generator.into(),
            },
            manifests: Some(manifests.into()),
            ..Default::default()
        };
        self.api::<Stack>()
            .create(&PostParams::default(), &Stack::new(name, spec))
            .await
            .expect("create Stack")
    }

    /// The namespace the operator runs in (its agents' key Secrets are there).
    pub fn operator_namespace(&self) -> &str {
        &self.config.namespace
    }

    /// An Agent (cluster-scoped) whose name is unique to this test, without
    /// `spec.targetableFrom`: only AgentTargets in the operator's namespace (with
    /// [`Hub::start`], this test's namespace) may deliver to it.
    pub async fn create_agent(&self, short: &str, labels: &[(&str, &str)]) -> Agent {
        self.create_agent_targetable_from(short, labels, None).await
    }

    /// An Agent whose name is unique to this test, with `spec.targetableFrom`.
    pub async fn create_agent_targetable_from(
        &self,
        short: &str,
        labels: &[(&str, &str)],
        targetable_from: Option<TargetableFrom>,
    ) -> Agent {
        let mut agent = Agent::new(
            &format!("{}-{short}", self.namespace()),
            AgentSpec {
                cluster_name: format!("cluster-{short}"),
                targetable_from,
                ..Default::default()
            },
        );
        let mut all: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all.insert("brokkr.io/test".into(), self.agent_label.clone());
        agent.metadata.labels = Some(all);
        Api::<Agent>::all(self.cluster.client.clone())
            .create(&PostParams::default(), &agent)
            .await
            .expect("create Agent")
    }

    pub async fn stack_when(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&Stack) -> bool,
    ) -> Stack {
        let api = self.api::<Stack>();
        eventually(what, || {
            let api = api.clone();
            let check = &check;
            async move { api.get_opt(name).await.ok().flatten().filter(|s| check(s)) }
        })
        .await
    }

    pub async fn live_stack_row(&self, name: &str) -> Option<stacks::Model> {
        stacks::Entity::find()
            .filter(stacks::Column::Name.eq(format!("{}/{name}", self.namespace())))
            .filter(stacks::Column::DeletedAt.is_null())
            .one(self.db.conn())
            .await
            .expect("query stacks")
    }

    pub async fn objects_of(&self, stack_id: uuid::Uuid) -> Vec<deployment_objects::Model> {
        deployment_objects::Entity::find()
            .filter(deployment_objects::Column::StackId.eq(stack_id))
            .order_by_asc(deployment_objects::Column::SequenceId)
            .all(self.db.conn())
            .await
            .expect("query deployment objects")
    }

    pub async fn warning_events_for(&self, name: &str) -> Vec<Event> {
        self.api::<Event>()
            .list(&ListParams::default())
            .await
            .map(|list| {
                list.items
                    .into_iter()
                    .filter(|e| {
                        e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                            && e.type_.as_deref() == Some("Warning")
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A live agent row with a freshly issued key; its id and the key.
pub async fn agent_with_key(store: &Store, name: &str) -> (uuid::Uuid, String) {
    let agent = store
        .sync_agent(&brokkr_operator::store::AgentSync {
            resource_uid: uuid::Uuid::new_v4(),
            name,
            cluster_name: "edge",
            is_suspended: false,
            labels: &[],
            annotations: &BTreeMap::new(),
        })
        .await
        .unwrap();
    let issued = brokkr_operator::keys::issue_key();
    store
        .set_agent_key(
            agent.id,
            &brokkr_operator::store::AgentKey {
                prefix: issued.prefix.clone(),
                hash: issued.hash.clone(),
            },
        )
        .await
        .unwrap();
    (agent.id, issued.key)
}

/// A generator's row, as its controller would sync it.
pub async fn generator_row(store: &Store, name: &str) -> uuid::Uuid {
    store
        .upsert_generator(&brokkr_operator::store::GeneratorSync {
            resource_uid: uuid::Uuid::new_v4(),
            name,
            description: None,
            is_active: true,
        })
        .await
        .unwrap()
        .id
}

/// A stack of `generator` holding `yaml`, targeted at `agents`, as the controllers would
/// sync it; its id.
pub async fn targeted_stack(
    store: &Store,
    generator: uuid::Uuid,
    name: &str,
    yaml: &str,
    agents: &std::collections::BTreeSet<uuid::Uuid>,
) -> uuid::Uuid {
    use sha2::Digest;
    let checksum = hex::encode(sha2::Sha256::digest(yaml));
    let synced = store
        .sync_stack(&brokkr_operator::store::StackSync {
            resource_uid: uuid::Uuid::new_v4(),
            name,
            description: None,
            generator_id: generator,
            labels: None,
            annotations: None,
            content: Some(brokkr_operator::store::StackContent {
                yaml,
                checksum: &checksum,
            }),
            author: None,
            progressive: false,
        })
        .await
        .unwrap();
    store
        .replace_stack_targets(synced.stack.id, agents)
        .await
        .unwrap();
    synced.stack.id
}
