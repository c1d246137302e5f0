//! RBAC conformance: requests impersonating a service account (`Impersonate-User`,
//! `Impersonate-Group`) are authorized by the Roles and bindings in the cluster, with the real
//! apiserver's 403 `Forbidden` Status. Runs against kubesim, or unchanged against the real
//! cluster of `$KUBECONFIG` (whose user must be allowed to impersonate, e.g. cluster-admin).

use std::fmt::Debug;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::Status;
use kube::{Client, Config};
use kubesim::TestCluster;
use kubesim::testing::{eventually, unique_name};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn from_json<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value)
        .unwrap_or_else(|e| panic!("test fixture does not deserialize: {e}"))
}

/// The `Status` of a request that must fail with an API error.
fn api_error<T: Debug>(result: kube::Result<T>) -> Box<Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Asserts a 403 with exactly the apiserver's message.
fn assert_forbidden<T: Debug>(result: kube::Result<T>, message: &str) {
    let status = api_error(result);
    assert_eq!(status.code, 403, "{status:?}");
    assert_eq!(status.reason, "Forbidden", "{status:?}");
    assert_eq!(status.message, message);
}

/// A client of the test cluster acting as `user` (with `groups`, when given).
async fn impersonating(cluster: &TestCluster, user: &str, groups: &[&str]) -> Client {
    let path = cluster.kubeconfig();
    let kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("reading kubeconfig {}: {e}", path.display()));
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("loading kubeconfig {}: {e}", path.display()));
    config.auth_info.impersonate = Some(user.to_owned());
    if !groups.is_empty() {
        config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
    }
    Client::try_from(config).unwrap_or_else(|e| panic!("building an impersonating client: {e}"))
}

fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

async fn create<K>(api: &Api<K>, object: Value) -> K
where
    K: kube::Resource + Clone + DeserializeOwned + serde::Serialize + Debug,
{
    api.create(&PostParams::default(), &from_json(object))
        .await
        .unwrap_or_else(|e| panic!("creating a fixture: {e}"))
}

/// A Role with `rules` in `namespace`, bound to the service account `sa` of the test namespace.
async fn grant(cluster: &TestCluster, namespace: &str, name: &str, sa: &str, rules: Value) {
    let roles: Api<Role> = Api::namespaced(cluster.client.clone(), namespace);
    create(
        &roles,
        json!({ "metadata": { "name": name }, "rules": rules }),
    )
    .await;
    let bindings: Api<RoleBinding> = Api::namespaced(cluster.client.clone(), namespace);
    create(
        &bindings,
        json!({
            "metadata": { "name": name },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name },
            "subjects": [{ "kind": "ServiceAccount", "name": sa, "namespace": cluster.namespace }],
        }),
    )
    .await;
}

/// A second throwaway namespace (deleted with the cluster).
async fn other_namespace(cluster: &TestCluster) -> String {
    let name = unique_name("kubesim-rbac-");
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    create(&namespaces, json!({ "metadata": { "name": name } })).await;
    cluster.delete_on_drop::<Namespace>(&name);
    name
}

/// Waits until the first call the new grant allows succeeds (a real apiserver's RBAC cache
/// follows new bindings within moments), and returns its result.
async fn once_allowed<T, F, Fut>(what: &str, call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kube::Result<T>>,
{
    let mut call = call;
    eventually(what, || {
        let attempt = call();
        async move { attempt.await.ok() }
    })
    .await
}

#[tokio::test]
async fn a_role_grants_its_verbs_in_its_namespace_only_and_refusals_are_the_apiservers() {
    let cluster = TestCluster::new().await;
    let ns = cluster.namespace.clone();
    let elsewhere = other_namespace(&cluster).await;
    let sa = "reader";
    let user = service_account_user(&ns, sa);
    let config_maps: Api<ConfigMap> = cluster.api();
    create(
        &config_maps,
        json!({ "metadata": { "name": "settings" }, "data": { "a": "1" } }),
    )
    .await;
    grant(
        &cluster,
        &ns,
        "read-config",
        sa,
        json!([{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"] }]),
    )
    .await;
    let client = impersonating(&cluster, &user, &[]).await;
    let mine: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let listed = once_allowed("the Role to allow listing", || async {
        mine.list(&ListParams::default()).await
    })
    .await;
    assert!(
        listed
            .items
            .iter()
            .any(|cm| cm.metadata.name.as_deref() == Some("settings"))
    );
    assert!(mine.get("settings").await.is_ok());
    let watch = mine.watch(&WatchParams::default().timeout(1), "0").await;
    assert!(watch.is_ok(), "watch is granted: {:?}", watch.err());
    if let Ok(stream) = watch {
        drop(stream.boxed());
    }

    // Outside its namespace, at the cluster scope, and with a verb it lacks: refused.
    let theirs: Api<ConfigMap> = Api::namespaced(client.clone(), &elsewhere);
    assert_forbidden(
        theirs.list(&ListParams::default()).await,
        &format!(
            "configmaps is forbidden: User \"{user}\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"{elsewhere}\""
        ),
    );
    let everywhere: Api<ConfigMap> = Api::all(client.clone());
    assert_forbidden(
        everywhere.list(&ListParams::default()).await,
        &format!(
            "configmaps is forbidden: User \"{user}\" cannot list resource \"configmaps\" in API group \"\" at the cluster scope"
        ),
    );
    let status = api_error(
        mine.patch(
            "settings",
            &PatchParams::default(),
            &Patch::Merge(json!({ "data": { "a": "2" } })),
        )
        .await,
    );
    assert_eq!(status.code, 403);
    assert_eq!(
        status.message,
        format!(
            "configmaps \"settings\" is forbidden: User \"{user}\" cannot patch resource \"configmaps\" in API group \"\" in the namespace \"{ns}\""
        )
    );
    let details = status.details.as_ref();
    assert_eq!(details.map(|d| d.name.as_str()), Some("settings"));
    assert_eq!(details.map(|d| d.kind.as_str()), Some("configmaps"));
    assert_forbidden(
        mine.create(
            &PostParams::default(),
            &from_json(json!({ "metadata": { "name": "new" } })),
        )
        .await,
        &format!(
            "configmaps is forbidden: User \"{user}\" cannot create resource \"configmaps\" in API group \"\" in the namespace \"{ns}\""
        ),
    );
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    assert_forbidden(
        secrets.get("anything").await,
        &format!(
            "secrets \"anything\" is forbidden: User \"{user}\" cannot get resource \"secrets\" in API group \"\" in the namespace \"{ns}\""
        ),
    );
    // Without impersonation the same client configuration is an administrator.
    assert!(
        Api::<ConfigMap>::namespaced(cluster.client.clone(), &elsewhere)
            .list(&ListParams::default())
            .await
            .is_ok()
    );
    cluster.cleanup().await;
}

#[tokio::test]
async fn subresources_and_resource_names_are_matched_exactly() {
    let cluster = TestCluster::new().await;
    let ns = cluster.namespace.clone();
    let sa = "keeper";
    let user = service_account_user(&ns, sa);
    let secrets: Api<Secret> = cluster.api();
    for name in ["agent-key", "other"] {
        create(
            &secrets,
            json!({ "metadata": { "name": name }, "stringData": { "k": "v" } }),
        )
        .await;
    }
    let deployments: Api<Deployment> = cluster.api();
    create(
        &deployments,
        json!({
            "metadata": { "name": "web" },
            "spec": {
                "replicas": 0,
                "selector": { "matchLabels": { "app": "web" } },
                "template": {
                    "metadata": { "labels": { "app": "web" } },
                    "spec": { "containers": [{ "name": "main", "image": "registry.invalid/web:v1" }] },
                },
            },
        }),
    )
    .await;
    grant(
        &cluster,
        &ns,
        "keeper",
        sa,
        json!([
            { "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["agent-key"], "verbs": ["get", "update", "list"] },
            { "apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"] },
        ]),
    )
    .await;
    let client = impersonating(&cluster, &user, &[]).await;
    let my_secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut key = once_allowed("the Role to allow reading the key", || async {
        my_secrets.get("agent-key").await
    })
    .await;
    key.string_data = Some([("k".to_owned(), "w".to_owned())].into());
    assert!(
        my_secrets
            .replace("agent-key", &PostParams::default(), &key)
            .await
            .is_ok()
    );
    assert_forbidden(
        my_secrets.get("other").await,
        &format!(
            "secrets \"other\" is forbidden: User \"{user}\" cannot get resource \"secrets\" in API group \"\" in the namespace \"{ns}\""
        ),
    );
    // A name-restricted rule covers a list only when it asks for exactly that name.
    assert_forbidden(
        my_secrets.list(&ListParams::default()).await,
        &format!(
            "secrets is forbidden: User \"{user}\" cannot list resource \"secrets\" in API group \"\" in the namespace \"{ns}\""
        ),
    );
    let one = my_secrets
        .list(&ListParams::default().fields("metadata.name=agent-key"))
        .await;
    assert_eq!(one.map(|l| l.items.len()).ok(), Some(1));

    let my_deployments: Api<Deployment> = Api::namespaced(client, &ns);
    assert!(
        my_deployments
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": { "x": "y" } } })),
            )
            .await
            .is_ok()
    );
    assert_forbidden(
        my_deployments
            .patch_status(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "observedGeneration": 1 } })),
            )
            .await,
        &format!(
            "deployments.apps \"web\" is forbidden: User \"{user}\" cannot patch resource \"deployments/status\" in API group \"apps\" in the namespace \"{ns}\""
        ),
    );
    cluster.cleanup().await;
}

#[tokio::test]
async fn cluster_roles_bind_groups_everywhere_or_in_one_namespace() {
    let cluster = TestCluster::new().await;
    let ns = cluster.namespace.clone();
    let elsewhere = other_namespace(&cluster).await;
    let sa = "viewer";
    let user = service_account_user(&ns, sa);
    let role_name = unique_name("kubesim-rbac-");
    let cluster_roles: Api<ClusterRole> = Api::all(cluster.client.clone());
    create(
        &cluster_roles,
        json!({
            "metadata": { "name": role_name },
            "rules": [
                { "apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"] },
                { "apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"] },
            ],
        }),
    )
    .await;
    cluster.delete_on_drop::<ClusterRole>(&role_name);
    // Bound in one namespace to every service account of the test namespace (a group).
    let bindings: Api<RoleBinding> = Api::namespaced(cluster.client.clone(), &elsewhere);
    create(
        &bindings,
        json!({
            "metadata": { "name": "group-read" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name },
            "subjects": [{ "kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": format!("system:serviceaccounts:{ns}") }],
        }),
    )
    .await;
    let client = impersonating(&cluster, &user, &[]).await;
    let there: Api<ConfigMap> = Api::namespaced(client.clone(), &elsewhere);
    once_allowed("the RoleBinding to allow listing", || async {
        there.list(&ListParams::default()).await
    })
    .await;
    let here: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert_forbidden(
        here.list(&ListParams::default()).await,
        &format!(
            "configmaps is forbidden: User \"{user}\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"{ns}\""
        ),
    );
    // A Namespace object is in its own namespace: the binding there covers it, no other.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    assert!(namespaces.get(&elsewhere).await.is_ok());
    assert_forbidden(
        namespaces.get(&ns).await,
        &format!(
            "namespaces \"{ns}\" is forbidden: User \"{user}\" cannot get resource \"namespaces\" in API group \"\" in the namespace \"{ns}\""
        ),
    );
    assert_forbidden(
        Api::<ConfigMap>::all(client.clone())
            .list(&ListParams::default())
            .await,
        &format!(
            "configmaps is forbidden: User \"{user}\" cannot list resource \"configmaps\" in API group \"\" at the cluster scope"
        ),
    );

    // A ClusterRoleBinding grants everywhere: to a group the user is impersonated with...
    let team = unique_name("kubesim-rbac-team-");
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(cluster.client.clone());
    let bind_cluster_role = |role: &str, group: &str| {
        let name = unique_name("kubesim-rbac-");
        cluster.delete_on_drop::<ClusterRoleBinding>(&name);
        json!({
            "metadata": { "name": name },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role },
            "subjects": [{ "kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": group }],
        })
    };
    create(&cluster_bindings, bind_cluster_role(&role_name, &team)).await;
    let member = impersonating(&cluster, "jane", &[&team]).await;
    once_allowed(
        "the ClusterRoleBinding to allow listing everywhere",
        || async {
            Api::<ConfigMap>::all(member.clone())
                .list(&ListParams::default())
                .await
        },
    )
    .await;
    assert_forbidden(
        Api::<ConfigMap>::namespaced(member, &ns)
            .create(
                &PostParams::default(),
                &from_json(json!({ "metadata": { "name": "x" } })),
            )
            .await,
        &format!(
            "configmaps is forbidden: User \"jane\" cannot create resource \"configmaps\" in API group \"\" in the namespace \"{ns}\""
        ),
    );
    // ...and to system:authenticated, which every impersonated user is in (a grant harmless
    // on a shared cluster: one ConfigMap name that exists only here).
    let public = unique_name("kubesim-rbac-public-");
    let config_maps: Api<ConfigMap> = cluster.api();
    create(&config_maps, json!({ "metadata": { "name": public } })).await;
    let reader = unique_name("kubesim-rbac-");
    create(
        &cluster_roles,
        json!({
            "metadata": { "name": reader },
            "rules": [{ "apiGroups": [""], "resources": ["configmaps"], "resourceNames": [public], "verbs": ["get"] }],
        }),
    )
    .await;
    cluster.delete_on_drop::<ClusterRole>(&reader);
    create(
        &cluster_bindings,
        bind_cluster_role(&reader, "system:authenticated"),
    )
    .await;
    let anyone: Api<ConfigMap> = Api::namespaced(impersonating(&cluster, "joe", &[]).await, &ns);
    once_allowed("system:authenticated to be granted", || async {
        anyone.get(&public).await
    })
    .await;
    assert_forbidden(
        anyone.list(&ListParams::default()).await,
        &format!(
            "configmaps is forbidden: User \"joe\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"{ns}\""
        ),
    );
    cluster.cleanup().await;
}

#[tokio::test]
async fn a_server_side_apply_that_creates_needs_create_too() {
    let cluster = TestCluster::new().await;
    let ns = cluster.namespace.clone();
    let sa = "applier";
    let user = service_account_user(&ns, sa);
    let config_maps: Api<ConfigMap> = cluster.api();
    create(
        &config_maps,
        json!({ "metadata": { "name": "existing" }, "data": { "a": "1" } }),
    )
    .await;
    grant(
        &cluster,
        &ns,
        "patch-only",
        sa,
        json!([{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "patch"] }]),
    )
    .await;
    let client = impersonating(&cluster, &user, &[]).await;
    let mine: Api<ConfigMap> = Api::namespaced(client, &ns);
    let apply = |name: &str| json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name }, "data": { "a": "2" } });
    let params = PatchParams::apply("rbac-test").force();
    once_allowed("the Role to allow applying", || async {
        mine.patch("existing", &params, &Patch::Apply(apply("existing")))
            .await
    })
    .await;
    let status = api_error(
        mine.patch("fresh", &params, &Patch::Apply(apply("fresh")))
            .await,
    );
    assert_eq!(status.code, 403, "{status:?}");
    assert_eq!(status.reason, "Forbidden");
    assert!(
        status
            .message
            .starts_with("configmaps \"fresh\" is forbidden"),
        "{}",
        status.message
    );
    assert!(config_maps.get_opt("fresh").await.ok().flatten().is_none());
    cluster.cleanup().await;
}
