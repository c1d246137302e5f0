//! The fault-injection suite: the real brokkr-operator and brokkr-agents, PostgreSQL and
//! spoke clusters (kubesim, or real clusters from BROKKR_E2E_HUB_KUBECONFIG and
//! BROKKR_E2E_SPOKE_KUBECONFIG), with the hub killed, its database taken away, a second
//! replica failing over, and hostile input. Each test states what must hold.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use brokkr_crds::conditions::find_condition;
use brokkr_crds::{Agent, Stack};
use brokkr_e2e::bench::BenchError;
use brokkr_e2e::fleet::{Fleet, FleetResult, apply_yaml, wait_for};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

const PATIENCE: Duration = Duration::from_secs(90);

/// A fleet on one spoke whose agents each hold a Stack of their own (ConfigMap
/// `held-<n>`), delivered through an AgentTarget with an `agentSelector`.
struct Scene {
    fleet: Fleet,
    agents: Vec<String>,
}

impl Scene {
    async fn new(agents: usize) -> Scene {
        let started = Instant::now();
        let mut fleet = Fleet::new(1)
            .await
            .expect("start PostgreSQL and the clusters");
        let built = started.elapsed();
        match populate(&mut fleet, agents).await {
            Ok(agents) => {
                eprintln!(
                    "fleet ready in {:.1} s ({:.1} s to build and start), {} agents holding their stacks",
                    started.elapsed().as_secs_f64(),
                    built.as_secs_f64(),
                    agents.len()
                );
                Scene { fleet, agents }
            }
            Err(err) => {
                fleet.print_log_tails(15);
                panic!("{}", brokkr_operator::controllers::error_chain(&err));
            }
        }
    }

    fn spoke_config_maps(&self) -> Api<ConfigMap> {
        self.fleet.spokes[0].api()
    }

    async fn set_content(&self, n: usize, version: &str) -> FleetResult<()> {
        set_content(&self.fleet, n, version).await
    }

    async fn wait_for_content(&self, n: usize, version: &str) -> FleetResult<String> {
        wait_for_content(&self.fleet, n, version).await
    }

    /// Uids of the `held-*` ConfigMaps on the spoke, by name.
    async fn uids(&self) -> FleetResult<BTreeMap<String, String>> {
        let list = self
            .spoke_config_maps()
            .list(&Default::default())
            .await
            .map_err(|err| setup(format!("list the spoke's ConfigMaps: {err}")))?;
        Ok(list
            .into_iter()
            .filter(|c| c.name_any().starts_with("held-"))
            .map(|c| (c.name_any(), c.uid().unwrap_or_default()))
            .collect())
    }

    /// `agents.status` of this scene's agents, from the database.
    async fn agent_statuses(&self) -> FleetResult<BTreeMap<String, String>> {
        let rows = self
            .sql("SELECT name, status FROM agents WHERE deleted_at IS NULL")
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let name: String = row.try_get("", "name").ok()?;
                let status: String = row.try_get("", "status").ok()?;
                self.agents.contains(&name).then_some((name, status))
            })
            .collect())
    }

    async fn sql(&self, sql: &str) -> FleetResult<Vec<sea_orm::QueryResult>> {
        self.fleet
            .db
            .conn()
            .query_all_raw(Statement::from_string(DbBackend::Postgres, sql.to_owned()))
            .await
            .map_err(|err| setup(format!("{sql}: {err}")))
    }

    async fn stack(&self, name: &str) -> Option<Stack> {
        let stacks: Api<Stack> = self.fleet.hub.api();
        stacks.get_opt(name).await.ok().flatten()
    }

    /// The agent API answer to `request` made with agent `n`'s key.
    async fn call_as(
        &self,
        n: usize,
        hub_url: &str,
        request: impl FnOnce(&reqwest::Client, String) -> reqwest::RequestBuilder,
    ) -> FleetResult<(u16, serde_json::Value)> {
        let key = self.fleet.agent_key(&self.agents[n]).await?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|err| setup(format!("an HTTP client: {err}")))?;
        let response = request(&client, hub_url.to_owned())
            .bearer_auth(key)
            .send()
            .await
            .map_err(|err| setup(format!("call the agent API: {err}")))?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        Ok((status, body))
    }

    async fn finish(self, outcome: FleetResult<()>) {
        if let Err(err) = &outcome {
            self.fleet.print_log_tails(15);
            let message = brokkr_operator::controllers::error_chain(err);
            self.fleet.shutdown().await;
            panic!("{message}");
        }
        self.fleet.shutdown().await;
    }
}

async fn populate(fleet: &mut Fleet, agents: usize) -> FleetResult<Vec<String>> {
    fleet.start_operator().await?;
    let hub_namespace = fleet.hub.namespace.clone();
    apply_yaml(
        &fleet.hub.client,
        "apiVersion: brokkr.io/v1alpha1\nkind: Generator\nmetadata:\n  name: ci\nspec: {}\n",
        &hub_namespace,
    )
    .await?;
    let mut names = Vec::new();
    for n in 0..agents {
        let name = format!("{hub_namespace}-edge-{n}");
        fleet.hub.delete_on_drop::<Agent>(&name);
        let agent = format!(
            "apiVersion: brokkr.io/v1alpha1\nkind: Agent\nmetadata:\n  name: {name}\n  labels:\n    fault-run: {hub_namespace}\n    fault-slot: \"{n}\"\nspec:\n  clusterName: spoke-{n}\n"
        );
        apply_yaml(&fleet.hub.client, &agent, &hub_namespace).await?;
        set_content(fleet, n, "1").await?;
        let target = format!(
            "apiVersion: brokkr.io/v1alpha1\nkind: AgentTarget\nmetadata:\n  name: held-{n}\nspec:\n  stackRef: {{name: held-{n}}}\n  agentSelector:\n    matchLabels: {{fault-run: {hub_namespace}, fault-slot: \"{n}\"}}\n"
        );
        apply_yaml(&fleet.hub.client, &target, &hub_namespace).await?;
        names.push(name);
    }
    for name in &names {
        fleet.start_agent(name, 0).await?;
    }
    for n in 0..agents {
        wait_for_content(fleet, n, "1").await?;
    }
    Ok(names)
}

/// Applies Stack `held-<n>` holding ConfigMap `held-<n>` at `version`.
async fn set_content(fleet: &Fleet, n: usize, version: &str) -> FleetResult<()> {
    let manifests = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held-{n}\n  namespace: {}\ndata:\n  version: \"{version}\"\n",
        fleet.spokes[0].namespace
    );
    set_manifests(fleet, &format!("held-{n}"), &manifests).await
}

async fn set_manifests(fleet: &Fleet, stack: &str, manifests: &str) -> FleetResult<()> {
    let stack = serde_json::json!({
        "apiVersion": "brokkr.io/v1alpha1",
        "kind": "Stack",
        "metadata": {"name": stack},
        "spec": {"generatorRef": {"name": "ci"}, "manifests": manifests},
    });
    let yaml = serde_yaml::to_string(&stack).map_err(|err| setup(err.to_string()))?;
    apply_yaml(&fleet.hub.client, &yaml, &fleet.hub.namespace)
        .await
        .map(|_| ())
}

/// Waits until the spoke holds ConfigMap `held-<n>` at `version`; returns its uid.
async fn wait_for_content(fleet: &Fleet, n: usize, version: &str) -> FleetResult<String> {
    let config_maps: Api<ConfigMap> = fleet.spokes[0].api();
    wait_for(
        PATIENCE,
        &format!("ConfigMap held-{n} at version {version} on the spoke"),
        || async {
            let config_map = config_maps.get_opt(&format!("held-{n}")).await.ok()??;
            let held = config_map.data.as_ref()?.get("version")?;
            (held == version).then(|| config_map.uid().unwrap_or_default())
        },
    )
    .await
}

fn setup(message: String) -> BenchError {
    BenchError::Setup(message)
}

fn check(holds: bool, what: impl FnOnce() -> String) -> FleetResult<()> {
    if holds { Ok(()) } else { Err(setup(what())) }
}

/// Records the names of ConfigMaps deleted on the spoke until `stop` is called.
struct DeletionWatch {
    task: tokio::task::JoinHandle<()>,
    deleted: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl DeletionWatch {
    fn start(api: Api<ConfigMap>) -> DeletionWatch {
        let (tx, deleted) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default()).boxed();
            while let Some(event) = events.next().await {
                if let Ok(watcher::Event::Delete(config_map)) = event {
                    let _ = tx.send(config_map.name_any());
                }
            }
        });
        DeletionWatch { task, deleted }
    }

    fn stop(mut self) -> Vec<String> {
        self.task.abort();
        let mut names = Vec::new();
        while let Ok(name) = self.deleted.try_recv() {
            names.push(name);
        }
        names
    }
}

/// Expectation: SIGKILLing the hub and starting it again, three times, while 20 agents
/// hold stacks through an agentSelector, deletes nothing on the spoke (no DELETE seen
/// by a watch, every uid unchanged), and the hub delivers afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_killed_and_restarted_three_times_deletes_nothing_on_any_spoke() {
    let mut scene = Scene::new(20).await;
    let outcome = async {
        let before = scene.uids().await?;
        check(before.len() == 20, || {
            format!("20 ConfigMaps delivered: {before:?}")
        })?;
        let watch = DeletionWatch::start(scene.spoke_config_maps());
        for _ in 0..3 {
            scene.fleet.kill_operator().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            scene.fleet.start_operator().await?;
            // Long enough for every controller to reconcile everything once.
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        scene.set_content(7, "2").await?;
        scene.wait_for_content(7, "2").await?;
        let deleted = watch.stop();
        check(deleted.is_empty(), || {
            format!("deleted on the spoke: {deleted:?}")
        })?;
        let after = scene.uids().await?;
        check(after == before, || {
            format!("uids changed: {before:?} -> {after:?}")
        })
    }
    .await;
    scene.finish(outcome).await;
}

/// Expectation: with PostgreSQL unreachable for 30 s, the agent API answers 503 (or
/// serves what it holds), never 500, the hub does not exit; once PostgreSQL is back,
/// pushes resume, and no agent is marked Offline for the hub's own outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_unreachable_for_30s_gives_503s_then_pushes_resume_and_no_agent_goes_offline() {
    let mut scene = Scene::new(2).await;
    let outcome = async {
        let hub = scene.fleet.api_url.clone();
        scene.fleet.db.refuse_connections().await;
        let outage = Instant::now();
        let mut statuses = BTreeMap::<u16, usize>::new();
        while outage.elapsed() < Duration::from_secs(30) {
            let event = serde_json::json!({"events": [{
                "id": uuid::Uuid::now_v7(), "deploymentObjectId": uuid::Uuid::now_v7(),
                "type": "Health", "status": "Success", "message": "healthy"}]});
            let (status, body) = scene
                .call_as(0, &hub, |c, hub| {
                    c.post(format!("{hub}/api/v1/agent/events")).json(&event)
                })
                .await?;
            check(status != 500, || format!("a 500 during the outage: {body}"))?;
            *statuses.entry(status).or_default() += 1;
            let (status, body) = scene
                .call_as(1, &hub, |c, hub| {
                    c.get(format!("{hub}/api/v1/agent/desired?wait=0"))
                })
                .await?;
            check(status == 200 || status == 503, || {
                format!("desired answered {status} during the outage: {body}")
            })?;
            check(scene.fleet.replica_running(0), || "the hub exited".into())?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        check(statuses.contains_key(&503), || {
            format!("events during the outage were never refused with 503: {statuses:?}")
        })?;
        scene.fleet.db.accept_connections().await;
        scene.set_content(1, "2").await?;
        scene.wait_for_content(1, "2").await?;
        // The offline sweep runs every second: give it a few runs after the outage.
        let settle = Instant::now();
        while settle.elapsed() < Duration::from_secs(8) {
            let statuses = scene.agent_statuses().await?;
            check(statuses.values().all(|s| s != "Offline"), || {
                format!("an agent was marked Offline after the hub's outage: {statuses:?}")
            })?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        check(scene.fleet.replica_running(0), || "the hub exited".into())
    }
    .await;
    scene.finish(outcome).await;
}

/// Expectation: when every PostgreSQL connection of the hub is terminated (the
/// listener's included), the next Stack change still reaches the spoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hub_connection_terminated_the_next_change_still_reaches_the_spoke() {
    let scene = Scene::new(1).await;
    let outcome = async {
        let terminated = scene.fleet.db.terminate_connections().await;
        check(terminated > 0, || {
            "no connection of the hub was terminated".into()
        })?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let changed = Instant::now();
        scene.set_content(0, "2").await?;
        scene.wait_for_content(0, "2").await?;
        eprintln!(
            "after {terminated} connections were terminated, a change reached the spoke in {:.1} s",
            changed.elapsed().as_secs_f64()
        );
        Ok(())
    }
    .await;
    scene.finish(outcome).await;
}

/// Expectation: killing the hub while an agent reports a stream of changes loses no
/// report and stores none twice: every version the agent applied has one Apply event,
/// every reported health has its Apply, the last version is reported, and the agent's
/// queue drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_killed_during_event_posts_loses_and_duplicates_no_event() {
    let mut scene = Scene::new(1).await;
    let outcome = async {
        for version in 2..=6 {
            scene.set_content(0, &version.to_string()).await?;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        scene.fleet.kill_operator().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        scene.fleet.start_operator().await?;
        for version in 7..=10 {
            scene.set_content(0, &version.to_string()).await?;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        scene.wait_for_content(0, "10").await?;
        let agent = scene.agents[0].clone();
        wait_for(PATIENCE, "the agent's event queue to drain", || async {
            let metrics = scene.fleet.agent_metrics(&agent).await?;
            metrics
                .lines()
                .any(|l| l.starts_with("brokkr_agent_events_pending") && l.ends_with(" 0"))
                .then_some(())
        })
        .await?;
        let newest_reported = wait_for(PATIENCE, "an Apply report of the last version", || async {
            let rows = scene
                .sql(
                    "SELECT count(*) AS n FROM agent_events e JOIN deployment_objects d \
                     ON d.id = e.deployment_object_id WHERE e.event_type = 'Apply' \
                     AND e.status = 'Success' AND d.sequence_id = \
                     (SELECT max(sequence_id) FROM deployment_objects WHERE is_deletion_marker = false)",
                )
                .await
                .ok()?;
            let n: i64 = rows.first()?.try_get("", "n").ok()?;
            (n == 1).then_some(n)
        })
        .await?;
        check(newest_reported == 1, || "the last version was not reported once".into())?;
        let duplicated = scene
            .sql(
                "SELECT deployment_object_id FROM agent_events WHERE event_type = 'Apply' \
                 GROUP BY deployment_object_id, status HAVING count(*) > 1",
            )
            .await?;
        check(duplicated.is_empty(), || {
            format!("{} versions have more than one Apply report", duplicated.len())
        })?;
        let health_without_apply = scene
            .sql(
                "SELECT DISTINCT h.deployment_object_id FROM agent_events h \
                 WHERE h.event_type = 'Health' AND NOT EXISTS (SELECT 1 FROM agent_events a \
                 WHERE a.event_type = 'Apply' AND a.deployment_object_id = h.deployment_object_id)",
            )
            .await?;
        check(health_without_apply.is_empty(), || {
            format!(
                "{} versions have a Health report but lost their Apply report",
                health_without_apply.len()
            )
        })
    }
    .await;
    scene.finish(outcome).await;
}

/// Expectation: of two hub replicas, killing the leader lets the other take over
/// within the lease duration (15 s) plus one retry (4 s), and an agent connected to
/// the surviving replica keeps receiving pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_the_follower_takes_over_and_its_agents_keep_receiving_pushes() {
    let mut scene = Scene::new(1).await;
    let outcome = async {
        let follower_url = scene.fleet.start_replica(1).await?;
        let leader_of = |text: Option<String>| {
            text.is_some_and(|t| t.lines().any(|l| l == "brokkr_operator_leader 1"))
        };
        check(leader_of(scene.fleet.replica_metrics(0).await), || {
            "replica 0 (started first) is not the leader".into()
        })?;
        check(!leader_of(scene.fleet.replica_metrics(1).await), || {
            "two leaders at once".into()
        })?;
        let agent = scene.agents[0].clone();
        scene.fleet.stop_agent(&agent).await;
        scene
            .fleet
            .start_agent_via(&agent, 0, &follower_url)
            .await?;
        scene.set_content(0, "2").await?;
        scene.wait_for_content(0, "2").await?;

        scene.fleet.kill_replica(0).await;
        let killed = Instant::now();
        let fleet = &scene.fleet;
        wait_for(Duration::from_secs(30), "replica 1 to lead", || async {
            leader_of(fleet.replica_metrics(1).await).then_some(())
        })
        .await?;
        let failover = killed.elapsed();
        eprintln!(
            "failover: replica 1 leads {:.1} s after the leader was killed",
            failover.as_secs_f64()
        );
        check(failover <= Duration::from_secs(19), || {
            format!("failover took {failover:?}, more than the lease duration and a retry")
        })?;
        scene.set_content(0, "3").await?;
        scene.wait_for_content(0, "3").await.map(|_| ())
    }
    .await;
    scene.finish(outcome).await;
}

/// Expectation: a YAML alias bomb in a Stack is refused (Accepted=False,
/// InvalidManifest, naming the limit) without the hub's memory growing past 256 MiB;
/// NUL characters in a heartbeat or an event are 422s naming the field; afterwards the
/// hub still runs, every agent is Online and another Stack's change is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_and_the_hub_and_other_agents_carry_on() {
    let mut scene = Scene::new(2).await;
    let outcome = async {
        let pid = scene
            .fleet
            .replica_pid(0)
            .ok_or_else(|| setup("no hub".into()))?;
        let mut bomb = String::from(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bomb\ndata:\n  items: &a [",
        );
        bomb.push_str(&vec!["x"; 20_000].join(","));
        bomb.push_str("]\n  copies: [");
        bomb.push_str(&vec!["*a"; 20_000].join(","));
        bomb.push_str("]\n");
        set_manifests(&scene.fleet, "held-0", &bomb).await?;
        let message = wait_for(PATIENCE, "the alias bomb refused", || async {
            let stack = scene.stack("held-0").await?;
            let accepted = find_condition(&stack.status?.conditions, "Accepted")?.clone();
            (accepted.status == "False" && accepted.reason == "InvalidManifest")
                .then_some(accepted.message)
        })
        .await?;
        check(message.contains("YAML aliases"), || {
            format!("names the limit: {message}")
        })?;
        let peak = brokkr_e2e::bench::procfs::peak_rss_kib(pid).unwrap_or(0);
        eprintln!(
            "hub peak RSS after the alias bomb: {:.1} MiB",
            peak as f64 / 1024.0
        );
        check(peak < 256 * 1024, || {
            format!("the hub's peak RSS reached {peak} KiB")
        })?;

        let hub = scene.fleet.api_url.clone();
        let (status, body) = scene
            .call_as(1, &hub, |c, hub| {
                c.post(format!("{hub}/api/v1/agent/heartbeat"))
                    .json(&serde_json::json!({"version": "1\u{0}", "state": "Ready"}))
            })
            .await?;
        check(
            status == 422
                && body["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("version")),
            || format!("a NUL heartbeat: {status} {body}"),
        )?;
        let event = serde_json::json!({"events": [{
            "id": uuid::Uuid::now_v7(), "deploymentObjectId": uuid::Uuid::now_v7(),
            "type": "Health", "status": "Success", "message": "degraded: \u{0}"}]});
        let (status, body) = scene
            .call_as(1, &hub, |c, hub| {
                c.post(format!("{hub}/api/v1/agent/events")).json(&event)
            })
            .await?;
        check(
            status == 422
                && body["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("events[0].message")),
            || format!("a NUL event: {status} {body}"),
        )?;

        scene.set_content(1, "2").await?;
        scene.wait_for_content(1, "2").await?;
        // The ConfigMap of the refused Stack is still the last good version.
        scene.wait_for_content(0, "1").await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let statuses = scene.agent_statuses().await?;
        check(statuses.values().all(|s| s == "Online"), || {
            format!("agents: {statuses:?}")
        })?;
        check(scene.fleet.replica_running(0), || "the hub exited".into())
    }
    .await;
    scene.finish(outcome).await;
}
