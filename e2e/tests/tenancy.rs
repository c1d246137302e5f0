//! Tenancy and trust with the real binaries (issues 13 and 14): two brokkr-operator
//! replicas, a brokkr-agent, PostgreSQL, and kubesim (or real clusters from
//! BROKKR_E2E_HUB_KUBECONFIG and BROKKR_E2E_SPOKE_KUBECONFIG).
//!
//! One scene, in the order a platform team meets it: a pipeline pushes a Stack with its
//! generator key and gates on delivery; a namespace the Agent does not admit is refused;
//! a generator cannot touch another's Stack; a key flood gets 429; a revoked key is refused
//! on both replicas within a second; an expired key is refused; the agent rotates its key
//! with no failed request; a suspended generator is refused; `brokkr-operator audit`
//! prints the whole story; and no key appears in any log.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use brokkr_crds::conditions::{find_condition, reasons, types};
use brokkr_crds::{Agent, AgentTarget};
use brokkr_e2e::bench::BenchError;
use brokkr_e2e::fleet::{Fleet, FleetResult, apply_yaml, wait_for};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(90);

fn setup(message: impl Into<String>) -> BenchError {
    BenchError::Setup(message.into())
}

fn check(holds: bool, what: impl FnOnce() -> String) -> FleetResult<()> {
    if holds { Ok(()) } else { Err(setup(what())) }
}

struct Scene {
    fleet: Fleet,
    http: reqwest::Client,
    replicas: [String; 2],
    team: String,
    rogue: String,
    /// Every key seen during the scene, to look for in the logs at the end.
    keys: BTreeSet<String>,
}

impl Scene {
    /// The value of Secret `name`'s `pak` in hub namespace `namespace`, once it exists.
    async fn secret_key(&mut self, namespace: &str, name: &str) -> FleetResult<String> {
        let secrets: Api<Secret> = Api::namespaced(self.fleet.hub.client.clone(), namespace);
        let key = wait_for(PATIENCE, &format!("Secret {namespace}/{name}"), || async {
            let data = secrets.get_opt(name).await.ok()??.data?;
            String::from_utf8(data.get("pak")?.0.clone()).ok()
        })
        .await?;
        self.keys.insert(key.clone());
        Ok(key)
    }

    async fn agent_key(&mut self, agent: &str) -> FleetResult<String> {
        let namespace = self.fleet.hub.namespace.clone();
        self.secret_key(&namespace, &format!("brokkr-agent-{agent}"))
            .await
    }

    async fn generator_key(&mut self, namespace: &str, generator: &str) -> FleetResult<String> {
        let key = self
            .secret_key(namespace, &format!("brokkr-generator-{generator}"))
            .await?;
        // The Secret is written just before the key's row commits.
        let url = format!("{}/api/v1/generator/stacks", self.replicas[0]);
        wait_for(PATIENCE, "the generator key to work", || async {
            let response = self.http.get(&url).bearer_auth(&key).send().await.ok()?;
            (response.status() == 200).then_some(())
        })
        .await?;
        Ok(key)
    }

    /// `(status, body)` of a request.
    async fn call(&self, request: reqwest::RequestBuilder) -> FleetResult<(u16, Value)> {
        let response = request
            .send()
            .await
            .map_err(|err| setup(format!("call the hub: {err}")))?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    async fn desired(&self, replica: usize, key: &str) -> FleetResult<(u16, Value)> {
        self.call(
            self.http
                .get(format!(
                    "{}/api/v1/agent/desired?wait=0",
                    self.replicas[replica]
                ))
                .bearer_auth(key),
        )
        .await
    }

    async fn push(
        &self,
        key: &str,
        stack: &str,
        query: &str,
        body: Value,
    ) -> FleetResult<(u16, Value)> {
        self.call(
            self.http
                .put(format!(
                    "{}/api/v1/generator/stacks/{stack}{query}",
                    self.replicas[0]
                ))
                .bearer_auth(key)
                .json(&body),
        )
        .await
    }

    async fn sql(&self, sql: &str) -> FleetResult<Vec<sea_orm::QueryResult>> {
        self.fleet
            .db
            .conn()
            .query_all_raw(Statement::from_string(DbBackend::Postgres, sql.to_owned()))
            .await
            .map_err(|err| setup(format!("{sql}: {err}")))
    }

    fn config_map(&self, name: &str, version: &str) -> String {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {}\ndata:\n  version: \"{version}\"\n",
            self.fleet.spokes[0].namespace
        )
    }

    async fn wait_for_config_map(&self, name: &str, version: &str) -> FleetResult<()> {
        let config_maps: Api<ConfigMap> = self.fleet.spokes[0].api();
        wait_for(
            PATIENCE,
            &format!("ConfigMap {name} at version {version} on the spoke"),
            || async {
                let held = config_maps.get_opt(name).await.ok()??;
                (held.data?.get("version")? == version).then_some(())
            },
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_keys_pipelines_and_the_audit_log_with_the_real_binaries() {
    let mut fleet = Fleet::new(1)
        .await
        .expect("start PostgreSQL and the clusters");
    let outcome = async {
        fleet.start_replica(0).await?;
        fleet.start_replica(1).await?;
        Ok::<_, BenchError>(())
    }
    .await;
    if let Err(err) = outcome {
        fleet.print_log_tails(20);
        panic!("{}", brokkr_operator::controllers::error_chain(&err));
    }
    let hub_namespace = fleet.hub.namespace.clone();
    let replicas = [
        fleet.replica_api_url(0).expect("replica 0"),
        fleet.replica_api_url(1).expect("replica 1"),
    ];
    let mut scene = Scene {
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("an HTTP client"),
        replicas,
        team: format!("{hub_namespace}-team"),
        rogue: format!("{hub_namespace}-rogue"),
        keys: BTreeSet::new(),
        fleet,
    };
    let outcome = run(&mut scene).await;
    if outcome.is_err() {
        scene.fleet.print_log_tails(20);
    }
    let Scene { fleet, .. } = scene;
    let message = outcome
        .as_ref()
        .err()
        .map(|err| brokkr_operator::controllers::error_chain(err));
    fleet.shutdown().await;
    if let Some(message) = message {
        panic!("{message}");
    }
}

async fn run(scene: &mut Scene) -> FleetResult<()> {
    let hub = scene.fleet.hub.client.clone();
    let hub_namespace = scene.fleet.hub.namespace.clone();
    let (team, rogue) = (scene.team.clone(), scene.rogue.clone());
    for namespace in [&team, &rogue] {
        scene.fleet.hub.delete_on_drop::<Namespace>(namespace);
        apply_yaml(
            &hub,
            &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n"),
            &hub_namespace,
        )
        .await?;
    }
    let agent = |name: &str, spec: Value| {
        json!({"apiVersion": "brokkr.io/v1alpha1", "kind": "Agent",
               "metadata": {"name": name}, "spec": spec})
    };
    let edge = format!("{hub_namespace}-edge");
    let idle = format!("{hub_namespace}-idle");
    let revoked = format!("{hub_namespace}-revoked");
    let flood = format!("{hub_namespace}-flood");
    let agents = [
        agent(
            &edge,
            json!({"clusterName": "edge", "targetableFrom": {"namespaces": [team]},
                   "keyPolicy": {"lifetime": "1m", "overlap": "40s"}}),
        ),
        agent(
            &idle,
            json!({"clusterName": "idle", "keyPolicy": {"lifetime": "1m", "overlap": "10s"}}),
        ),
        agent(&revoked, json!({"clusterName": "revoked"})),
        agent(&flood, json!({"clusterName": "flood"})),
    ];
    for agent in &agents {
        let name = agent["metadata"]["name"].as_str().unwrap_or_default();
        scene.fleet.hub.delete_on_drop::<Agent>(name);
        apply_yaml(
            &hub,
            &serde_yaml::to_string(agent).map_err(|e| setup(e.to_string()))?,
            &hub_namespace,
        )
        .await?;
    }
    let generator = |name: &str| {
        format!(
            "apiVersion: brokkr.io/v1alpha1\nkind: Generator\nmetadata:\n  name: {name}\nspec: {{}}\n"
        )
    };
    apply_yaml(&hub, &generator("ci"), &team).await?;
    apply_yaml(&hub, &generator("release"), &team).await?;
    apply_yaml(&hub, &generator("ci"), &rogue).await?;

    // The agent keeps its key in a Secret of its own on the spoke and renews it there.
    let spoke_namespace = scene.fleet.spokes[0].namespace.clone();
    let edge_key = scene.agent_key(&edge).await?;
    let spoke_secrets: Api<Secret> =
        Api::namespaced(scene.fleet.spokes[0].client.clone(), &spoke_namespace);
    // As the agent chart does: the agent's key in a Secret it may read and update.
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "brokkr-agent-key"},
        "stringData": {"pak": edge_key},
    }))
    .map_err(|err| setup(err.to_string()))?;
    spoke_secrets
        .create(&Default::default(), &secret)
        .await
        .map_err(|err| setup(format!("create the agent's key Secret: {err}")))?;
    let hub_url = scene.replicas[0].clone();
    scene
        .fleet
        .start_agent_with(
            &edge,
            0,
            &hub_url,
            &[
                ("BROKKR_AGENT_KEY_SECRET", "brokkr-agent-key".to_owned()),
                ("BROKKR_AGENT_NAMESPACE", spoke_namespace.clone()),
            ],
        )
        .await?;
    let edge_started = Instant::now();

    // 1. A pipeline pushes a Stack with its generator key and gates on delivery.
    let ci = scene.generator_key(&team, "ci").await?;
    let (status, pushed) = scene
        .push(
            &ci,
            "web",
            "?wait=60",
            json!({"manifests": scene.config_map("web", "1"), "targets": {"agents": [edge]}}),
        )
        .await?;
    check(status == 200, || format!("push: {status} {pushed}"))?;
    eprintln!("pushed: revision {}", pushed["revision"]);
    let (status, ready) = scene
        .call(
            scene
                .http
                .get(format!(
                    "{}/api/v1/generator/stacks/web?wait=90&until=ready",
                    scene.replicas[0]
                ))
                .bearer_auth(&ci),
        )
        .await?;
    check(status == 200 && ready["outcome"] == "ready", || {
        format!("until=ready: {status} {ready}")
    })?;
    scene.wait_for_config_map("web", "1").await?;
    eprintln!("delivered: ready {}", ready["ready"]);

    // 2. A namespace the Agent does not admit cannot deliver to it.
    let stolen = format!(
        "apiVersion: brokkr.io/v1alpha1\nkind: Stack\nmetadata:\n  name: stolen\nspec:\n  generatorRef: {{name: ci}}\n  manifests: |\n{}---\napiVersion: brokkr.io/v1alpha1\nkind: AgentTarget\nmetadata:\n  name: stolen\nspec:\n  stackRef: {{name: stolen}}\n  agents: [{edge}]\n",
        scene
            .config_map("stolen", "1")
            .lines()
            .map(|line| format!("    {line}\n"))
            .collect::<String>()
    );
    apply_yaml(&hub, &stolen, &rogue).await?;
    let targets: Api<AgentTarget> = Api::namespaced(hub.clone(), &rogue);
    let refused = wait_for(PATIENCE, "the rogue AgentTarget refused", || async {
        let target = targets.get_opt("stolen").await.ok()??;
        let status = target.status?;
        let ready = find_condition(&status.conditions, types::READY)?;
        (ready.reason == reasons::NOT_PERMITTED)
            .then_some((status.refused_agents.clone(), ready.message.clone()))
    })
    .await?;
    check(refused.0 == [edge.clone()], || {
        format!("refusedAgents: {refused:?}")
    })?;
    eprintln!("refused cross-namespace target: {}", refused.1);

    // 3. A generator cannot push to another generator's Stack.
    let release = scene.generator_key(&team, "release").await?;
    let (status, body) = scene
        .push(
            &release,
            "web",
            "",
            json!({"manifests": scene.config_map("web", "evil")}),
        )
        .await?;
    check(status == 403, || {
        format!("another generator's push: {status} {body}")
    })?;
    eprintln!("another generator's Stack: {status} {}", body["message"]);

    // 4. A flood of requests with one key meets its rate: 429 with Retry-After.
    let flood_key = scene.agent_key(&flood).await?;
    let url = format!("{}/api/v1/agent/desired?wait=0", scene.replicas[0]);
    let answers = futures::future::join_all((0..800).map(|_| {
        let request = scene.http.get(&url).bearer_auth(&flood_key);
        async move {
            let response = request.send().await.ok()?;
            Some((
                response.status().as_u16(),
                response.headers().get("retry-after").is_some(),
            ))
        }
    }))
    .await;
    let limited = answers
        .iter()
        .flatten()
        .filter(|(status, _)| *status == 429)
        .count();
    let with_retry_after = answers
        .iter()
        .flatten()
        .filter(|(s, r)| *s == 429 && *r)
        .count();
    check(limited > 0 && limited == with_retry_after, || {
        format!("{limited} of 800 answered 429, {with_retry_after} with Retry-After")
    })?;
    eprintln!("flood: {limited} of 800 requests answered 429 with Retry-After");

    // 5. A revoked key is refused on both replicas within a second of its revocation.
    let old_key = scene.agent_key(&revoked).await?;
    for replica in 0..2 {
        let (status, body) = scene.desired(replica, &old_key).await?;
        check(status == 200, || {
            format!("before revocation, replica {replica}: {status} {body}")
        })?;
    }
    Api::<Agent>::all(hub.clone())
        .patch(
            &revoked,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"brokkr.io/revoke-key": "now"}}})),
        )
        .await
        .map_err(|err| setup(format!("annotate: {err}")))?;
    let mut refused_at = [None, None];
    let deadline = Instant::now() + PATIENCE;
    while refused_at.iter().any(Option::is_none) && Instant::now() < deadline {
        for (replica, at) in refused_at.iter_mut().enumerate() {
            if at.is_none() {
                let (status, body) = scene.desired(replica, &old_key).await?;
                if status == 401 && body["error"] == "key_revoked" {
                    *at = Some(chrono::Utc::now());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let prefix = old_key.split('_').nth(1).unwrap_or_default().to_owned();
    let rows = scene
        .sql(&format!(
            "SELECT revoked_at FROM api_keys WHERE prefix = '{prefix}'"
        ))
        .await?;
    let revoked_at: chrono::DateTime<chrono::Utc> = rows
        .first()
        .and_then(|row| row.try_get("", "revoked_at").ok())
        .ok_or_else(|| setup("the revoked key's row"))?;
    for (replica, at) in refused_at.iter().enumerate() {
        let at =
            at.ok_or_else(|| setup(format!("replica {replica} never refused the revoked key")))?;
        let after = (at - revoked_at).num_milliseconds();
        eprintln!("revoked key refused by replica {replica} {after} ms after revocation");
        check(after <= 1000, || {
            format!("replica {replica} refused the revoked key after {after} ms")
        })?;
    }
    let new_key = scene.agent_key(&revoked).await?;
    check(new_key != old_key, || {
        "a new key was issued into the Secret".into()
    })?;

    // 6. An expired key is refused.
    let idle_key = scene.agent_key(&idle).await?;
    let (status, body) = scene.desired(0, &idle_key).await?;
    check(status == 200, || {
        format!("the idle key before it expires: {status} {body}")
    })?;
    let expired = wait_for(
        Duration::from_secs(120),
        "the idle key to expire",
        || async {
            let (status, body) = scene.desired(1, &idle_key).await.ok()?;
            (status == 401).then_some(body)
        },
    )
    .await?;
    check(expired["error"] == "key_expired", || {
        format!("expired: {expired}")
    })?;
    eprintln!("expired key: 401 {}", expired["message"]);

    // 7. The agent rotates its key at 2/3 of its lifetime, without a failed request.
    let rotated = wait_for(
        Duration::from_secs(120),
        "the agent to renew its key",
        || async {
            let data = spoke_secrets
                .get_opt("brokkr-agent-key")
                .await
                .ok()??
                .data?;
            let key = String::from_utf8(data.get("pak")?.0.clone()).ok()?;
            (key != edge_key).then_some(key)
        },
    )
    .await?;
    scene.keys.insert(rotated.clone());
    eprintln!(
        "the agent renewed its key {:.0} s after it started",
        edge_started.elapsed().as_secs_f64()
    );
    let hub_copy = scene.agent_key(&edge).await?;
    check(hub_copy == rotated, || {
        "the hub's Secret holds the renewed key".into()
    })?;
    let (status, pushed) = scene
        .push(
            &ci,
            "web",
            "?wait=60",
            json!({"manifests": scene.config_map("web", "2")}),
        )
        .await?;
    check(status == 200, || {
        format!("push after rotation: {status} {pushed}")
    })?;
    scene.wait_for_config_map("web", "2").await?;
    // Past the old key's overlap, the agent still works (it uses the new key).
    tokio::time::sleep(Duration::from_secs(45)).await;
    let (status, pushed) = scene
        .push(
            &ci,
            "web",
            "?wait=60",
            json!({"manifests": scene.config_map("web", "3")}),
        )
        .await?;
    check(status == 200, || {
        format!("push after the overlap: {status} {pushed}")
    })?;
    scene.wait_for_config_map("web", "3").await?;
    let metrics = scene.fleet.agent_metrics(&edge).await.unwrap_or_default();
    let failed: Vec<&str> = metrics
        .lines()
        .filter(|line| {
            line.starts_with("brokkr_agent_hub_request_errors_total") && !line.ends_with(" 0")
        })
        .collect();
    check(failed.is_empty(), || {
        format!("failed hub requests: {failed:?}")
    })?;
    eprintln!("rotation: no failed request to the hub");

    // 8. A suspended generator is refused.
    apply_yaml(
        &hub,
        "apiVersion: brokkr.io/v1alpha1\nkind: Generator\nmetadata:\n  name: ci\nspec:\n  suspend: true\n",
        &team,
    )
    .await?;
    let suspended = wait_for(PATIENCE, "the suspended generator refused", || async {
        let (status, body) = scene
            .push(
                &ci,
                "web",
                "",
                json!({"manifests": scene.config_map("web", "4")}),
            )
            .await
            .ok()?;
        (status == 403).then_some(body)
    })
    .await?;
    check(suspended["error"] == "generator_suspended", || {
        format!("{suspended}")
    })?;
    eprintln!("suspended generator: 403 {}", suspended["error"]);

    // 9. The audit log tells the story.
    let output = tokio::process::Command::new(scene.fleet.operator_binary())
        .arg("audit")
        .env("DATABASE_URL", scene.fleet.db.url())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .map_err(|err| setup(format!("run brokkr-operator audit: {err}")))?;
    let printed = String::from_utf8_lossy(&output.stdout);
    eprintln!("--- brokkr-operator audit\n{printed}");
    check(output.status.success(), || {
        String::from_utf8_lossy(&output.stderr).into_owned()
    })?;
    for action in [
        "DeploymentObjectRecorded",
        "TargetsChanged",
        "TargetingRefused",
        "KeyIssued",
        "KeyFirstUsed",
        "KeyRotated",
        "KeyRevoked",
        "KeyExpired",
        "AuthenticationFailed",
    ] {
        check(printed.contains(action), || {
            format!("the audit log lacks {action}")
        })?;
    }

    // 10. No key in any log.
    for entry in std::fs::read_dir(scene.fleet.log_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for key in &scene.keys {
            check(!log.contains(key.as_str()), || {
                format!("{} holds a key", entry.path().display())
            })?;
        }
    }
    eprintln!("{} keys issued; none appears in the logs", scene.keys.len());
    Ok(())
}
