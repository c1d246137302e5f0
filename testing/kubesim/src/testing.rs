//! Test support shared by the conformance suite and other crates' controller tests: a cluster
//! that is kubesim by default and a real one when a kubeconfig variable says so, with a
//! throwaway namespace, plus polling helpers and CRD installation.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, Resource};

use crate::KubeSim;

/// How long [`eventually`] waits by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

enum Backend {
    Sim(KubeSim),
    Real { kubeconfig: PathBuf },
}

/// A cluster for one test: kubesim, or the real cluster a kubeconfig variable points at, with a
/// fresh namespace. On a real cluster, dropping it (or [`TestCluster::cleanup`]) deletes the
/// namespace and whatever was registered with [`TestCluster::delete_on_drop`].
pub struct TestCluster {
    pub client: Client,
    pub namespace: String,
    backend: Backend,
    /// API paths of cluster-scoped objects to delete at cleanup (real clusters only).
    cleanup_paths: Mutex<Vec<String>>,
    cleaned_up: bool,
}

impl TestCluster {
    /// kubesim, or the cluster of `$KUBECONFIG` when that variable is set.
    pub async fn new() -> TestCluster {
        Self::from_env_var("KUBECONFIG").await
    }

    /// The real cluster whose kubeconfig path is in `var` (e.g. `BROKKR_E2E_SPOKE_KUBECONFIG`)
    /// when that variable is set and non-empty, else a fresh kubesim.
    pub async fn from_env_var(var: &str) -> TestCluster {
        let real_path = std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .and_then(|v| std::env::split_paths(&v).next());
        let (client, backend) = match real_path {
            Some(path) => (client_for(&path).await, Backend::Real { kubeconfig: path }),
            None => {
                let sim = KubeSim::start()
                    .await
                    .unwrap_or_else(|e| panic!("starting kubesim: {e}"));
                (sim.client(), Backend::Sim(sim))
            }
        };
        let namespace = unique_name("kubesim-test-");
        let mut object = Namespace::default();
        object.metadata.name = Some(namespace.clone());
        object.metadata.labels =
            Some([("kubesim.test/throwaway".to_string(), "true".to_string())].into());
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("creating test namespace {namespace}: {e}"));
        TestCluster {
            client,
            namespace,
            backend,
            cleanup_paths: Mutex::new(Vec::new()),
            cleaned_up: false,
        }
    }

    pub fn is_real(&self) -> bool {
        matches!(self.backend, Backend::Real { .. })
    }

    /// The simulator, when this is not a real cluster.
    pub fn sim(&self) -> Option<&KubeSim> {
        match &self.backend {
            Backend::Sim(sim) => Some(sim),
            Backend::Real { .. } => None,
        }
    }

    /// The requests served so far by verb and resource, on kubesim; `None` on a real
    /// cluster (whose counts are in its audit log), where tests skip what they assert on them.
    pub fn request_counts(&self) -> Option<crate::requests::RequestCounts> {
        self.sim().map(KubeSim::request_counts)
    }

    /// A kubeconfig file for this cluster (for spawning binaries).
    pub fn kubeconfig(&self) -> PathBuf {
        match &self.backend {
            Backend::Sim(sim) => sim.kubeconfig().to_path_buf(),
            Backend::Real { kubeconfig } => kubeconfig.clone(),
        }
    }

    /// An `Api` for namespaced `K` in this test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Makes every watch resuming from a resourceVersion seen so far fail with 410 Gone, and
    /// ends open watches. A no-op on a real cluster, where tests reach 410 by other means.
    pub fn expire_watch_history(&self) {
        if let Backend::Sim(sim) = &self.backend {
            sim.compact_history();
        }
    }

    /// Registers a cluster-scoped object (e.g. a CRD) to delete when this cluster is cleaned up.
    pub fn delete_on_drop<K>(&self, name: &str)
    where
        K: Resource<Scope = k8s_openapi::ClusterResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        let path = format!("{}/{name}", K::url_path(&Default::default(), None));
        self.cleanup_paths
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(path);
    }

    /// Deletes the namespace and registered objects now (real clusters; kubesim just stops).
    pub async fn cleanup(mut self) {
        self.cleaned_up = true;
        if self.is_real() {
            delete_all(&self.client, &self.namespace, &self.take_cleanup_paths()).await;
        }
    }

    fn take_cleanup_paths(&self) -> Vec<String> {
        std::mem::take(&mut *self.cleanup_paths.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let Backend::Real { kubeconfig } = &self.backend else {
            return;
        };
        if self.cleaned_up {
            return;
        }
        // The test's runtime may be shutting down: clean up from a thread with its own runtime
        // and its own client.
        let (kubeconfig, namespace, paths) = (
            kubeconfig.clone(),
            self.namespace.clone(),
            self.take_cleanup_paths(),
        );
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => runtime.block_on(async {
                    let client = client_for(&kubeconfig).await;
                    delete_all(&client, &namespace, &paths).await;
                }),
                Err(e) => eprintln!("kubesim: cannot clean up namespace {namespace}: {e}"),
            }
        });
        let _ = cleanup.join();
    }
}

async fn client_for(kubeconfig: &std::path::Path) -> Client {
    let loaded = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("reading kubeconfig {}: {e}", kubeconfig.display()));
    let config = Config::from_custom_kubeconfig(loaded, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("loading kubeconfig {}: {e}", kubeconfig.display()));
    Client::try_from(config)
        .unwrap_or_else(|e| panic!("building client for {}: {e}", kubeconfig.display()))
}

async fn delete_all(client: &Client, namespace: &str, paths: &[String]) {
    for path in paths {
        let request = http::Request::delete(path.as_str()).body(Vec::new());
        if let Ok(request) = request
            && let Err(e) = client.request_text(request).await
        {
            eprintln!("kubesim: cleaning up {path}: {e}");
        }
    }
    if let Err(e) = Api::<Namespace>::all(client.clone())
        .delete(namespace, &DeleteParams::background())
        .await
    {
        eprintln!("kubesim: deleting test namespace {namespace}: {e}");
    }
}

/// Creates or updates `crd` (server-side apply, forced) and waits until it is Established and
/// each served version lists (a real server serves a new resource a moment after Established).
pub async fn install_crd(client: &Client, crd: &CustomResourceDefinition) {
    let name = crd.metadata.name.clone().unwrap_or_default();
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let mut body =
        serde_json::to_value(crd).unwrap_or_else(|e| panic!("CRD {name} does not serialize: {e}"));
    body["apiVersion"] = "apiextensions.k8s.io/v1".into();
    body["kind"] = "CustomResourceDefinition".into();
    if let Some(meta) = body.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    body.as_object_mut().map(|o| o.remove("status"));
    crds.patch(
        &name,
        &PatchParams::apply("kubesim-test").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap_or_else(|e| panic!("installing CRD {name}: {e}"));
    eventually(&format!("CRD {name} to be Established"), || async {
        let crd = crds.get(&name).await.ok()?;
        let established = crd
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
    for version in crd.spec.versions.iter().filter(|v| v.served) {
        let resource = ApiResource {
            group: crd.spec.group.clone(),
            version: version.name.clone(),
            api_version: format!("{}/{}", crd.spec.group, version.name),
            kind: crd.spec.names.kind.clone(),
            plural: crd.spec.names.plural.clone(),
        };
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        eventually(
            &format!("{} to be served", resource.api_version),
            || async {
                api.list(&ListParams::default().limit(1))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }
}

/// `prefix` plus 8 random lowercase alphanumerics: unique enough for namespaces, CRD groups etc.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &id[..8])
}

/// Polls `check` every 50 ms until it returns `Some`, for up to [`DEFAULT_TIMEOUT`]; panics
/// naming `what` if it never does.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(DEFAULT_TIMEOUT, what, check).await
}

/// [`eventually`] with an explicit timeout.
pub async fn eventually_within<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
