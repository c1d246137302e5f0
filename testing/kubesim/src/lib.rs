//! kubesim: an in-process Kubernetes API server simulator, for tests only.
//!
//! [`KubeSim::start`] serves the Kubernetes REST API over plain HTTP on 127.0.0.1 and hands back
//! a [`kube::Client`] and a kubeconfig for it. Objects live in memory; list, watch, patch,
//! server-side apply, finalizers, garbage collection and CRDs behave like a real apiserver as
//! far as the conformance suite (`tests/`) checks, and that suite runs unchanged against a real
//! cluster when `KUBECONFIG` is set. What it does *not* do is listed in the crate's README.
//!
//! Tests normally use [`TestCluster`], which picks kubesim or a real cluster and creates a
//! throwaway namespace.

mod apply;
mod cel;
mod rbac;
pub mod requests;
mod resources;
mod router;
mod schema;
mod selectors;
mod status;
mod store;
pub mod testing;
mod typed;
mod watch;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;

pub use store::Options;
pub use testing::TestCluster;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("writing the kubeconfig: {0}")]
    Kubeconfig(std::io::Error),
    #[error("building a client for {url}: {source}")]
    Client {
        url: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A running simulator. Dropping it stops the server and ends its watch streams.
pub struct KubeSim {
    addr: SocketAddr,
    store: Arc<store::Store>,
    client: kube::Client,
    // Owns the directory the kubeconfig lives in; removed on drop.
    _kubeconfig_dir: tempfile::TempDir,
    kubeconfig_path: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
}

impl KubeSim {
    /// Starts on 127.0.0.1 with a random free port.
    pub async fn start() -> Result<KubeSim, Error> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    pub async fn start_on(addr: SocketAddr) -> Result<KubeSim, Error> {
        Self::start_with(addr, Options::default()).await
    }

    pub async fn start_with(addr: SocketAddr, options: Options) -> Result<KubeSim, Error> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let store = store::Store::new(options);
        let (shutdown, stopped) = oneshot::channel::<()>();
        let app = router::router(store.clone());
        tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(err) = server.await {
                tracing::error!("kubesim server failed: {err}");
            }
        });

        let url = format!("http://{addr}");
        let client_error = |source: Box<dyn std::error::Error + Send + Sync>| Error::Client {
            url: url.clone(),
            source,
        };
        let cluster_url = url
            .parse::<http::Uri>()
            .map_err(|e| client_error(e.into()))?;
        let mut config = kube::Config::new(cluster_url);
        config.default_namespace = "default".into();
        let client = kube::Client::try_from(config).map_err(|e| client_error(e.into()))?;

        let kubeconfig_dir = tempfile::tempdir().map_err(Error::Kubeconfig)?;
        let kubeconfig_path = kubeconfig_dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig_path, kubeconfig_yaml(&url)).map_err(Error::Kubeconfig)?;
        tracing::info!("kubesim serving on {url}");
        Ok(KubeSim {
            addr,
            store,
            client,
            _kubeconfig_dir: kubeconfig_dir,
            kubeconfig_path,
            shutdown: Some(shutdown),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for this simulator (plain HTTP, no auth, default namespace `default`).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A kubeconfig file for this simulator, usable by kubectl and by `kube::Config` inference.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig_path
    }

    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml(&self.url())
    }

    /// How many requests of each verb and resource this simulator has served so far.
    pub fn request_counts(&self) -> requests::RequestCounts {
        self.store.requests().snapshot()
    }

    /// Forgets the watch history and ends every open watch, so a watcher resuming from any
    /// resourceVersion it has seen gets 410 Gone and must re-list (as after etcd compaction).
    pub fn compact_history(&self) {
        self.store.compact_history();
    }
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        self.store.close_watches();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kubesim
  cluster:
    server: {url}
contexts:
- name: kubesim
  context:
    cluster: kubesim
    user: kubesim
    namespace: default
current-context: kubesim
users:
- name: kubesim
  user: {{}}
preferences: {{}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends a raw request; returns the HTTP status code of the answer.
    async fn code(sim: &KubeSim, method: &str, path: &str, content_type: &str, body: &str) -> u16 {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(body.as_bytes().to_vec())
            .unwrap_or_else(|e| panic!("building {method} {path}: {e}"));
        match sim.client().request_text(request).await {
            Ok(_) => 200,
            Err(kube::Error::Api(status)) => status.code,
            Err(other) => panic!("{method} {path} failed outside the API: {other}"),
        }
    }

    #[tokio::test]
    async fn malformed_requests_get_client_errors_not_panics() {
        let sim = KubeSim::start().await.unwrap_or_else(|e| panic!("{e}"));
        let cms = "/api/v1/namespaces/default/configmaps";
        let json = "application/json";
        let merge = "application/merge-patch+json";
        assert_eq!(code(&sim, "POST", cms, json, "not json").await, 400);
        assert_eq!(code(&sim, "POST", cms, json, "[1, 2]").await, 400);
        assert_eq!(
            code(&sim, "POST", cms, json, r#"{"metadata": "x"}"#).await,
            400
        );
        assert_eq!(
            code(&sim, "POST", cms, json, r#"{"metadata": {"name": "a"}}"#).await,
            200
        );
        assert!(
            code(
                &sim,
                "PUT",
                &format!("{cms}/a"),
                json,
                r#"{"metadata": {"name": 5}}"#
            )
            .await
                < 500
        );
        assert!(
            code(
                &sim,
                "PATCH",
                &format!("{cms}/a"),
                merge,
                r#"{"metadata": "x"}"#
            )
            .await
                < 500
        );
        assert_eq!(
            code(&sim, "PATCH", &format!("{cms}/a"), merge, "[]").await,
            400
        );
        let json_patch = "application/json-patch+json";
        assert_eq!(
            code(
                &sim,
                "PATCH",
                &format!("{cms}/a"),
                json_patch,
                r#"{"op": 1}"#
            )
            .await,
            400
        );
        let replace_root = r#"[{"op": "replace", "path": "", "value": 1}]"#;
        assert_eq!(
            code(&sim, "PATCH", &format!("{cms}/a"), json_patch, replace_root).await,
            400
        );
        let missing = r#"[{"op": "remove", "path": "/nope/deeper"}]"#;
        assert_eq!(
            code(&sim, "PATCH", &format!("{cms}/a"), json_patch, missing).await,
            422
        );
        let apply = "application/apply-patch+yaml";
        assert_eq!(
            code(
                &sim,
                "PATCH",
                &format!("{cms}/a?fieldManager=m"),
                apply,
                "- a\n- b"
            )
            .await,
            400
        );
        assert_eq!(
            code(&sim, "PATCH", &format!("{cms}/a"), "text/plain", "x").await,
            415
        );
        assert_eq!(
            code(
                &sim,
                "GET",
                &format!("{cms}?labelSelector=a%20in%20("),
                json,
                ""
            )
            .await,
            400
        );
        assert_eq!(
            code(
                &sim,
                "GET",
                &format!("{cms}?watch=1&resourceVersion=abc"),
                json,
                ""
            )
            .await,
            400
        );
        assert_eq!(
            code(&sim, "GET", "/apis/nope.example.com/v1/things", json, "").await,
            404
        );
        assert_eq!(
            code(&sim, "GET", "/api/v1/configmaps/a", json, "").await,
            404
        );
        assert_eq!(
            code(
                &sim,
                "GET",
                "/api/v1/namespaces/default/configmaps/a/status",
                json,
                ""
            )
            .await,
            404
        );
        assert_eq!(
            code(&sim, "DELETE", &format!("{cms}/a"), json, "garbage").await,
            400
        );
        let ns_status = r#"{"metadata": {"name": "default"}, "status": "weird"}"#;
        assert!(
            code(
                &sim,
                "PUT",
                "/api/v1/namespaces/default/status",
                json,
                ns_status
            )
            .await
                < 500
        );
        let crd = r#"{"metadata": {"name": "x"}, "spec": {"names": "weird", "versions": 3}}"#;
        let crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
        assert_eq!(code(&sim, "POST", crds, json, crd).await, 422);
        // Still serving after all that.
        assert_eq!(code(&sim, "GET", cms, json, "").await, 200);
    }

    #[tokio::test]
    async fn dropping_the_simulator_stops_serving() {
        let sim = KubeSim::start().await.unwrap_or_else(|e| panic!("{e}"));
        let addr = sim.addr();
        assert!(std::fs::read_to_string(sim.kubeconfig()).is_ok_and(|k| k.contains(&sim.url())));
        drop(sim);
        testing::eventually("the listener to close", || async {
            tokio::net::TcpStream::connect(addr).await.err().map(|_| ())
        })
        .await;
    }
}
