//! Progressive rollouts and pins with the real binaries (issue 15): brokkr-operator, three
//! brokkr-agents, PostgreSQL, and kubesim (or real clusters from BROKKR_E2E_HUB_KUBECONFIG
//! and BROKKR_E2E_SPOKE_KUBECONFIG).
//!
//! One Stack, a ConfigMap `web`, delivered in two waves: `canary` (the agent of spoke 0,
//! `ring=canary`) and then `eu` (the agents of spokes 1 and 2, `region=eu`), one agent at a
//! time. The scene: revision 1 reaches the canary first and the eu spokes only once the
//! canary reports it healthy; revision 2 fails to apply on the canary, which halts the
//! rollout while the eu spokes keep revision 1; the fixed revision 3 rolls out again from
//! the canary; a pin takes every spoke back to revision 1 at once; a pin to a revision that
//! does not exist is refused and changes nothing; removing the pin rolls revision 3 out
//! from the canary again, and the eu spokes wait while the canary's agent is stopped. The
//! Stack's status is printed at every step.
//!
//! With BROKKR_E2E_HUB_KUBECONFIG the hub is a real cluster. With
//! BROKKR_E2E_SPOKE_KUBECONFIG, the fleet makes all three spokes that one cluster (as for
//! every multi-spoke scene), where the agents would share ConfigMap `web` and the second
//! would refuse it as not its own: the scene needs three distinct spokes, and says so and
//! skips.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brokkr_crds::conditions::{find_condition, reasons, types};
use brokkr_crds::{AgentDeployState, AgentHealth, Stack};
use brokkr_e2e::bench::BenchError;
use brokkr_e2e::fleet::{Fleet, FleetResult, apply_yaml, wait_for};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use kubesim::testing::TestCluster;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(90);
/// A whole rollout: three agents one after the other, each gated on the one before.
const ROLLOUT_PATIENCE: Duration = Duration::from_secs(180);
/// How long the eu spokes must keep revision 1 behind a halted rollout.
const HELD_FOR: Duration = Duration::from_secs(10);
const STACK: &str = "web";
const SPOKES: usize = 3;
const ROLES: [&str; SPOKES] = ["canary", "eu-1", "eu-2"];

fn setup(message: impl Into<String>) -> BenchError {
    BenchError::Setup(message.into())
}

fn check(holds: bool, what: impl FnOnce() -> String) -> FleetResult<()> {
    if holds { Ok(()) } else { Err(setup(what())) }
}

struct Scene {
    fleet: Fleet,
    /// Hub namespace of the Generator, the Stack and the AgentTarget (the operator's).
    hub_namespace: String,
    /// Spoke namespace of the ConfigMap `web`, on every spoke.
    namespace: String,
    /// Agent names, by spoke.
    agents: [String; SPOKES],
    watch: SpokeWatch,
}

/// A spoke's watch delivered `web` at this version (`None`: without one, or deleted).
struct Sighting {
    spoke: usize,
    at: Instant,
    version: Option<String>,
}

/// Every version of ConfigMap `web` each spoke's watch delivered, with when it arrived:
/// the order in which the spokes received a revision, finer than polling them.
struct SpokeWatch {
    seen: Arc<Mutex<Vec<Sighting>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SpokeWatch {
    fn start(spokes: &[TestCluster], namespace: &str) -> SpokeWatch {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tasks = spokes
            .iter()
            .enumerate()
            .map(|(spoke, cluster)| {
                let api: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), namespace);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let config = watcher::Config::default().fields("metadata.name=web");
                    // Backing off on errors: once the spoke is gone, the watch must not spin.
                    let mut events = watcher(api, config).default_backoff().boxed();
                    while let Some(event) = events.next().await {
                        let version = match event {
                            Ok(watcher::Event::Apply(map) | watcher::Event::InitApply(map)) => {
                                map.data.and_then(|data| data.get("version").cloned())
                            }
                            Ok(watcher::Event::Delete(_)) => None,
                            _ => continue,
                        };
                        seen.lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .push(Sighting {
                                spoke,
                                at: Instant::now(),
                                version,
                            });
                    }
                })
            })
            .collect();
        SpokeWatch { seen, tasks }
    }

    /// Per spoke, how long after `since` its watch first delivered `version`.
    fn first_held(&self, since: Instant, version: &str) -> [Option<Duration>; SPOKES] {
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut held = [None; SPOKES];
        for sighting in seen.iter() {
            let first = &mut held[sighting.spoke];
            if first.is_none()
                && sighting.at >= since
                && sighting.version.as_deref() == Some(version)
            {
                *first = Some(sighting.at.duration_since(since));
            }
        }
        held
    }
}

impl SpokeWatch {
    fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for SpokeWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the scene saw while following a change.
struct Timeline {
    /// Per spoke: when it first held the version, since the change.
    held: [Option<Duration>; SPOKES],
    /// The stack once the scene's condition held.
    stack: Stack,
}

impl Scene {
    fn short<'a>(&self, agent: &'a str) -> &'a str {
        agent
            .strip_prefix(&format!("{}-", self.hub_namespace))
            .unwrap_or(agent)
    }

    fn stacks(&self) -> Api<Stack> {
        Api::namespaced(self.fleet.hub.client.clone(), &self.hub_namespace)
    }

    async fn stack(&self) -> Option<Stack> {
        self.stacks().get_opt(STACK).await.ok().flatten()
    }

    fn config_map(&self, version: &str) -> String {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\n  namespace: {}\ndata:\n  version: {version}\n",
            self.namespace
        )
    }

    /// Server-side applies the Stack `web` with `manifests`, pinned to `pinned`, as a
    /// pipeline running `kubectl apply --server-side` would.
    async fn apply_stack(&self, manifests: &str, pinned: Option<i64>) -> FleetResult<()> {
        let mut spec = json!({
            "generatorRef": {"name": "ci"},
            "rollout": {
                "waves": [
                    {"name": "canary", "agentSelector": {"matchLabels": {"ring": "canary"}}},
                    {"name": "eu", "agentSelector": {"matchLabels": {"region": "eu"}}},
                ],
                "maxUnavailable": 1,
                "healthTimeout": "2m",
            },
            "manifests": manifests,
        });
        if let Some(pinned) = pinned {
            spec["pinnedRevision"] = json!(pinned);
        }
        let stack = json!({"apiVersion": "brokkr.io/v1alpha1", "kind": "Stack",
                           "metadata": {"name": STACK}, "spec": spec});
        let yaml = serde_yaml::to_string(&stack).map_err(|err| setup(err.to_string()))?;
        apply_yaml(&self.fleet.hub.client, &yaml, &self.hub_namespace).await?;
        Ok(())
    }

    /// `data.version` of ConfigMap `web` on each spoke.
    async fn versions(&self) -> [Option<String>; SPOKES] {
        let mut versions: [Option<String>; SPOKES] = Default::default();
        for (spoke, version) in self.fleet.spokes.iter().zip(versions.iter_mut()) {
            let maps: Api<ConfigMap> = Api::namespaced(spoke.client.clone(), &self.namespace);
            *version = maps
                .get_opt("web")
                .await
                .ok()
                .flatten()
                .and_then(|map| map.data?.get("version").cloned());
        }
        versions
    }

    /// Whether the Stack's status reports the canary's agent at `revision`, applied and
    /// healthy.
    fn canary_healthy(&self, stack: &Stack, revision: i64) -> bool {
        let Some(status) = &stack.status else {
            return false;
        };
        let delivered = status.deployment_object.as_ref().map(|d| d.sequence);
        status.agents.iter().any(|agent| {
            agent.name == self.agents[0]
                && agent.revision.or(delivered) == Some(revision)
                && agent.state == AgentDeployState::Applied
                && agent.health == AgentHealth::Healthy
        })
    }

    /// Follows the spokes and the Stack from `since` (taken before the change) until
    /// `done` holds, then prints, in order, when each spoke first held `version` (from the
    /// spokes' watches) and each new rollout step of the Stack (from polling it).
    async fn follow(
        &self,
        since: Instant,
        version: &str,
        revision: Option<i64>,
        what: &str,
        done: impl Fn(&Stack, &[Option<String>; SPOKES]) -> bool,
    ) -> FleetResult<Timeline> {
        let mut lines: Vec<(Duration, String)> = Vec::new();
        let mut canary_healthy = None;
        let mut shown = String::new();
        let stack = loop {
            let at = since.elapsed();
            let versions = self.versions().await;
            if let Some(stack) = self.stack().await {
                if let Some(revision) = revision
                    && canary_healthy.is_none()
                    && self.canary_healthy(&stack, revision)
                {
                    canary_healthy = Some(at);
                    lines.push((
                        at,
                        format!("status: canary reports revision {revision} applied and healthy"),
                    ));
                }
                let step = rollout_step(&stack);
                if step != shown {
                    lines.push((at, step.clone()));
                    shown = step;
                }
                if done(&stack, &versions) {
                    break stack;
                }
            }
            if at >= ROLLOUT_PATIENCE {
                return Err(setup(format!(
                    "timed out after {ROLLOUT_PATIENCE:?} waiting for {what}; spokes hold {versions:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let held = self.watch.first_held(since, version);
        for (spoke, at) in held.iter().enumerate() {
            if let Some(at) = at {
                lines.push((
                    *at,
                    format!(
                        "spoke {spoke} ({}) holds web version={version}",
                        ROLES[spoke]
                    ),
                ));
            }
        }
        lines.sort_by_key(|(at, _)| *at);
        for (at, line) in &lines {
            eprintln!("  {:>6.2}s  {line}", at.as_secs_f64());
        }
        Ok(Timeline { held, stack })
    }

    /// Prints the Stack as `kubectl get stacks`, its rollout, its rollout conditions, its
    /// agents and what each spoke holds.
    async fn show(&self, title: &str) {
        eprintln!("\n--- {title}\n$ kubectl get stacks -A");
        eprint!("{}", self.fleet.stacks_table().await);
        let Some(stack) = self.stack().await else {
            eprintln!("(no Stack {STACK})");
            return;
        };
        let status = stack.status.clone().unwrap_or_default();
        eprintln!(
            "status.rollout: {}",
            status
                .rollout
                .as_ref()
                .and_then(|r| serde_json::to_string(r).ok())
                .unwrap_or_else(|| "(none)".into())
        );
        for type_ in [types::ROLLOUT_HALTED, types::PINNED, types::ACCEPTED] {
            match find_condition(&status.conditions, type_) {
                Some(c) => eprintln!("{type_}={} ({}): {}", c.status, c.reason, c.message),
                None => eprintln!("{type_}: (none)"),
            }
        }
        let delivered = status.deployment_object.as_ref().map(|d| d.sequence);
        for agent in &status.agents {
            eprintln!(
                "agent {:<7} {:<8} {:<11} revision {:<4} {}",
                self.short(&agent.name),
                agent.state.as_str(),
                agent.health.as_str(),
                agent
                    .revision
                    .map(|r| format!("{r}*"))
                    .or(delivered.map(|d| d.to_string()))
                    .unwrap_or_default(),
                agent.message.as_deref().unwrap_or_default()
            );
        }
        let versions = self.versions().await;
        let held: Vec<String> = versions
            .iter()
            .enumerate()
            .map(|(spoke, v)| format!("{spoke} ({})={}", ROLES[spoke], v.as_deref().unwrap_or("-")))
            .collect();
        eprintln!("spokes, web version: {}", held.join("  "));
    }

    /// Events of the Stack with `reason`, as `(type, note)`.
    async fn events(&self, reason: &str) -> Vec<(String, String)> {
        let events: Api<Event> =
            Api::namespaced(self.fleet.hub.client.clone(), &self.hub_namespace);
        events
            .list(&ListParams::default())
            .await
            .map(|list| list.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(STACK)
                    && e.reason.as_deref() == Some(reason)
            })
            .map(|e| (e.type_.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    async fn wait_for_event(&self, reason: &str, type_: &str) -> FleetResult<String> {
        let (_, note) = wait_for(
            PATIENCE,
            &format!("a {type_} Event {reason} on the Stack"),
            || async {
                self.events(reason)
                    .await
                    .into_iter()
                    .find(|(t, _)| t == type_)
            },
        )
        .await?;
        eprintln!("event: {type_} {reason}: {note}");
        Ok(note)
    }
}

/// Per agent assigned revision `sequence`: when the hub assigned it, and when the agent
/// first reported it healthy after that (hub clock), in the order of assignment.
const ASSIGNMENTS: &str = r#"
SELECT a.name AS agent, ra.assigned_at,
       (SELECT min(e.created_at) FROM agent_events e
         WHERE e.agent_id = a.id AND e.deployment_object_id = ra.deployment_object_id
           AND e.event_type = 'Health' AND e.deleted_at IS NULL
           AND e.created_at >= ra.assigned_at
           AND split_part(e.message, ':', 1) = 'healthy') AS healthy_at
FROM rollout_assignments ra
JOIN agents a ON a.id = ra.agent_id
JOIN deployment_objects d ON d.id = ra.deployment_object_id
WHERE d.sequence_id = $1
ORDER BY ra.assigned_at, a.name
"#;

type Assigned = (
    String,
    chrono::DateTime<chrono::Utc>,
    Option<chrono::DateTime<chrono::Utc>>,
);

impl Scene {
    /// The gate as the hub recorded it: each agent was assigned `sequence` only once every
    /// agent of the waves before it (and, with `maxUnavailable: 1`, the agent before it in
    /// its wave) had reported `sequence` healthy after being assigned it.
    async fn check_gates(&self, sequence: i64) -> FleetResult<()> {
        let rows = self
            .fleet
            .db
            .conn()
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                ASSIGNMENTS,
                [sequence.into()],
            ))
            .await
            .map_err(|source| BenchError::Database {
                what: "read the rollout assignments".into(),
                source,
            })?;
        let mut assigned: Vec<Assigned> = Vec::new();
        for row in rows {
            let read = |column: &str| setup(format!("rollout assignment column {column}"));
            assigned.push((
                row.try_get("", "agent").map_err(|_| read("agent"))?,
                row.try_get("", "assigned_at")
                    .map_err(|_| read("assigned_at"))?,
                row.try_get("", "healthy_at")
                    .map_err(|_| read("healthy_at"))?,
            ));
        }
        let names: Vec<&str> = assigned.iter().map(|a| self.short(&a.0)).collect();
        check(names == ROLES, || {
            format!("revision {sequence} was assigned in the order {names:?}, not {ROLES:?}")
        })?;
        let start = assigned[0].1;
        let since =
            |at: chrono::DateTime<chrono::Utc>| (at - start).num_milliseconds() as f64 / 1000.0;
        let shown: Vec<String> = assigned
            .iter()
            .map(|(agent, at, healthy)| {
                format!(
                    "{} assigned +{:.2}s, healthy +{}",
                    self.short(agent),
                    since(*at),
                    healthy.map_or("never".into(), |h| format!("{:.2}s", since(h)))
                )
            })
            .collect();
        eprintln!("hub, revision {sequence}: {}", shown.join("; "));
        for pair in assigned.windows(2) {
            let (before, after) = (&pair[0], &pair[1]);
            let healthy = before.2.ok_or_else(|| {
                setup(format!(
                    "{} never reported revision {sequence} healthy after being assigned it",
                    before.0
                ))
            })?;
            check(after.1 >= healthy, || {
                format!(
                    "{} was assigned revision {sequence} at {}, before {} reported it healthy \
                     after its own assignment ({healthy})",
                    after.0, after.1, before.0
                )
            })?;
        }
        Ok(())
    }
}

/// One line for the rollout's state: its summary and the `RolloutHalted` condition.
fn rollout_step(stack: &Stack) -> String {
    let Some(status) = &stack.status else {
        return "status: (none)".into();
    };
    let revision = status
        .deployment_object
        .as_ref()
        .map(|d| d.sequence.to_string())
        .unwrap_or_default();
    let summary = status
        .rollout
        .as_ref()
        .and_then(|r| r.summary.clone())
        .unwrap_or_else(|| "(no rollout)".into());
    let halted = find_condition(&status.conditions, types::ROLLOUT_HALTED)
        .map(|c| format!("RolloutHalted={} ({})", c.status, c.reason))
        .unwrap_or_else(|| "RolloutHalted: (none)".into());
    format!("REVISION {revision}  ROLLOUT {summary}  {halted}")
}

fn condition_is(stack: &Stack, type_: &str, status: &str, reason: &str) -> bool {
    stack
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, type_))
        .is_some_and(|c| c.status == status && c.reason == reason)
}

fn delivered(stack: &Stack) -> Option<i64> {
    stack
        .status
        .as_ref()?
        .deployment_object
        .as_ref()
        .map(|d| d.sequence)
}

fn all_hold(versions: &[Option<String>; SPOKES], version: &str) -> bool {
    versions.iter().all(|v| v.as_deref() == Some(version))
}

/// The spokes received the rollout of `revision` in the order of the waves: the canary's
/// first, then the eu spokes one after the other (`maxUnavailable: 1`, by agent name).
/// That each waited for the health of the one before is [`Scene::check_gates`]' part.
fn check_canary_first(timeline: &Timeline, revision: i64) -> FleetResult<()> {
    for (spoke, pair) in timeline.held.windows(2).enumerate() {
        let (before, after) = (pair[0], pair[1]);
        check(
            matches!((before, after), (Some(before), Some(after)) if before < after),
            || {
                format!(
                    "revision {revision}: spoke {} ({}) held it after {before:?}, spoke {} ({}) \
                     after {after:?}",
                    spoke,
                    ROLES[spoke],
                    spoke + 1,
                    ROLES[spoke + 1]
                )
            },
        )?;
    }
    let mut order: Vec<(Duration, &str)> = timeline
        .held
        .iter()
        .zip(ROLES)
        .filter_map(|(held, role)| held.map(|h| (h, role)))
        .collect();
    order.sort();
    let order: Vec<&str> = order.into_iter().map(|(_, role)| role).collect();
    eprintln!("order: {}", order.join(" → "));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_roll_out_wave_by_wave_halt_on_failure_resume_and_pin_back() {
    if std::env::var_os(brokkr_e2e::fleet::SPOKE_KUBECONFIG_VAR).is_some() {
        // The fleet makes every spoke that one cluster, where the three agents would apply
        // the same ConfigMap and the second would refuse it as another agent's.
        eprintln!(
            "skipped: the rollout scene needs three distinct spoke clusters, and {} names one",
            brokkr_e2e::fleet::SPOKE_KUBECONFIG_VAR
        );
        return;
    }
    let started = Instant::now();
    let mut fleet = Fleet::new(SPOKES)
        .await
        .expect("start PostgreSQL and the clusters");
    let hub_namespace = fleet.hub.namespace.clone();
    let namespace = fleet.spokes[0].namespace.clone();
    let agents = ROLES.map(|role| format!("{hub_namespace}-{role}"));
    let outcome = prepare(&mut fleet, &namespace, &agents).await;
    let watch = SpokeWatch::start(&fleet.spokes, &namespace);
    let mut scene = Scene {
        fleet,
        hub_namespace,
        namespace,
        agents,
        watch,
    };
    let outcome = match outcome {
        Ok(()) => {
            eprintln!(
                "fleet ready in {:.0} s (binaries built, operator and three agents started)",
                started.elapsed().as_secs_f64()
            );
            let scene_started = Instant::now();
            let outcome = run(&mut scene).await;
            eprintln!(
                "\nthe scene took {:.0} s",
                scene_started.elapsed().as_secs_f64()
            );
            outcome
        }
        Err(err) => Err(err),
    };
    if outcome.is_err() {
        scene.show("at the failure").await;
        scene.fleet.print_log_tails(25);
    }
    let message = outcome
        .as_ref()
        .err()
        .map(|err| brokkr_operator::controllers::error_chain(err));
    scene.watch.stop();
    scene.fleet.shutdown().await;
    if let Some(message) = message {
        panic!("{message}");
    }
}

/// Starts the operator, gives every spoke the namespace of `web`, and registers and
/// starts one labelled agent per spoke.
async fn prepare(fleet: &mut Fleet, namespace: &str, agents: &[String; SPOKES]) -> FleetResult<()> {
    fleet.start_operator().await?;
    let hub = fleet.hub.client.clone();
    let hub_namespace = fleet.hub.namespace.clone();
    // The ConfigMap goes to the same namespace on every spoke: spoke 0's throwaway one,
    // created on the others (the spokes of a real cluster already share it).
    for spoke in &fleet.spokes[1..] {
        let namespaces: Api<Namespace> = Api::all(spoke.client.clone());
        let exists = namespaces
            .get_opt(namespace)
            .await
            .map_err(|err| setup(format!("read namespace {namespace}: {err}")))?
            .is_some();
        if !exists {
            apply_yaml(
                &spoke.client,
                &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n"),
                namespace,
            )
            .await?;
        }
    }
    let labels = [
        json!({"ring": "canary", "region": "eu"}),
        json!({"region": "eu"}),
        json!({"region": "eu"}),
    ];
    for ((name, role), labels) in agents.iter().zip(ROLES).zip(labels) {
        let mut labels = labels;
        labels["rollout-run"] = Value::String(hub_namespace.clone());
        let agent = json!({"apiVersion": "brokkr.io/v1alpha1", "kind": "Agent",
                           "metadata": {"name": name, "labels": labels},
                           "spec": {"clusterName": role}});
        fleet.hub.delete_on_drop::<brokkr_crds::Agent>(name);
        let yaml = serde_yaml::to_string(&agent).map_err(|err| setup(err.to_string()))?;
        apply_yaml(&hub, &yaml, &hub_namespace).await?;
    }
    for (spoke, name) in agents.iter().enumerate() {
        fleet.start_agent(name, spoke).await?;
    }
    apply_yaml(
        &hub,
        &format!(
            "apiVersion: brokkr.io/v1alpha1\nkind: Generator\nmetadata:\n  name: ci\nspec: {{}}\n---\n\
             apiVersion: brokkr.io/v1alpha1\nkind: AgentTarget\nmetadata:\n  name: web\nspec:\n  \
             stackRef: {{name: web}}\n  agentSelector: {{matchLabels: {{rollout-run: {hub_namespace}}}}}\n"
        ),
        &hub_namespace,
    )
    .await?;
    Ok(())
}

async fn run(scene: &mut Scene) -> FleetResult<()> {
    eprintln!(
        "agents (named {}-<name>): canary on spoke 0 (ring=canary, region=eu), eu-1 on spoke 1 \
         and eu-2 on spoke 2 (region=eu); waves canary → eu, maxUnavailable 1, healthTimeout 2m",
        scene.hub_namespace
    );

    // 1. Revision 1 reaches the canary first, the eu spokes once it is healthy.
    eprintln!("\n=== 1. Stack web, revision 1 (version=v1)");
    let since = Instant::now();
    scene.apply_stack(&scene.config_map("v1"), None).await?;
    let first = wait_for(PATIENCE, "revision 1 recorded", || async {
        delivered(&scene.stack().await?)
    })
    .await?;
    rolled_out(scene, since, "v1", first, "revision 1 rolled out").await?;

    // 2. Revision 2 fails on the canary: the rollout halts, the eu spokes keep revision 1.
    eprintln!("\n=== 2. revision 2: web version=v2 and a ConfigMap in a namespace no spoke has");
    let absent = format!("{}-absent", scene.hub_namespace);
    let broken = format!(
        "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web-extra\n  namespace: {absent}\ndata:\n  version: v2\n",
        scene.config_map("v2")
    );
    let since = Instant::now();
    scene.apply_stack(&broken, None).await?;
    let second = wait_for(PATIENCE, "revision 2 recorded", || async {
        delivered(&scene.stack().await?).filter(|s| *s > first)
    })
    .await?;
    let timeline = scene
        .follow(
            since,
            "v2",
            Some(second),
            "the rollout halted",
            |stack, _| {
                condition_is(
                    stack,
                    types::ROLLOUT_HALTED,
                    "True",
                    reasons::ROLLOUT_APPLY_FAILED,
                )
            },
        )
        .await?;
    let status = timeline.stack.status.clone().unwrap_or_default();
    let halted = find_condition(&status.conditions, types::ROLLOUT_HALTED)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    check(halted.contains(&scene.agents[0]), || {
        format!("RolloutHalted does not name the canary's agent: {halted}")
    })?;
    let canary = status.agents.iter().find(|a| a.name == scene.agents[0]);
    check(
        canary.is_some_and(|a| a.state == AgentDeployState::Failed && a.revision.is_none()),
        || format!("the canary is not reported Failed at revision {second}: {canary:?}"),
    )?;
    let note = scene.wait_for_event("RolloutHalted", "Warning").await?;
    check(note.contains(&scene.agents[0]), || {
        format!("the RolloutHalted Event does not name the canary: {note}")
    })?;
    tokio::time::sleep(HELD_FOR).await;
    let versions = scene.versions().await;
    check(
        versions[1].as_deref() == Some("v1") && versions[2].as_deref() == Some("v1"),
        || format!("{HELD_FOR:?} after the halt, the spokes hold {versions:?}"),
    )?;
    let stack = scene
        .stack()
        .await
        .ok_or_else(|| setup("the Stack is gone"))?;
    let status = stack.status.clone().unwrap_or_default();
    for eu in &scene.agents[1..] {
        let agent = status.agents.iter().find(|a| &a.name == eu);
        check(agent.is_some_and(|a| a.revision == Some(first)), || {
            format!("{eu} is not held at revision {first}: {agent:?}")
        })?;
    }
    check(
        condition_is(
            &stack,
            types::ROLLOUT_HALTED,
            "True",
            reasons::ROLLOUT_APPLY_FAILED,
        ),
        || "the rollout did not stay halted".into(),
    )?;
    eprintln!(
        "after {HELD_FOR:?}: the eu spokes still hold v1 (canary holds {:?})",
        versions[0]
    );
    scene.show("revision 2 halted on the canary").await;

    // 3. The fixed revision 3 rolls out again from the canary.
    eprintln!("\n=== 3. revision 3 (version=v3), fixed");
    let since = Instant::now();
    scene.apply_stack(&scene.config_map("v3"), None).await?;
    let third = wait_for(PATIENCE, "revision 3 recorded", || async {
        delivered(&scene.stack().await?).filter(|s| *s > second)
    })
    .await?;
    let timeline = rolled_out(scene, since, "v3", third, "revision 3 rolled out").await?;

    // 4. A pin takes every spoke back to revision 1 at once.
    let history: Vec<i64> = timeline
        .stack
        .status
        .as_ref()
        .map(|s| s.history.iter().map(|r| r.sequence).collect())
        .unwrap_or_default();
    check(history == [third, second, first], || {
        format!("status.history lists {history:?}, not [{third}, {second}, {first}]")
    })?;
    eprintln!(
        "\n=== 4. spec.pinnedRevision: {first} (revision 1, from status.history {history:?})"
    );
    let since = Instant::now();
    scene
        .apply_stack(&scene.config_map("v3"), Some(first))
        .await?;
    let timeline = scene
        .follow(
            since,
            "v1",
            None,
            "every spoke back at revision 1",
            |stack, versions| {
                all_hold(versions, "v1")
                    && delivered(stack) == Some(first)
                    && condition_is(stack, types::PINNED, "True", reasons::PINNED)
            },
        )
        .await?;
    check(timeline.held.iter().all(Option::is_some), || {
        "a spoke never held v1".into()
    })?;
    scene.wait_for_event(reasons::PINNED, "Normal").await?;
    scene.show("pinned to revision 1").await;

    // 5. A pin to a revision that does not exist is refused and changes nothing.
    eprintln!("\n=== 5. spec.pinnedRevision: 999999, then no pin");
    scene
        .apply_stack(&scene.config_map("v3"), Some(999_999))
        .await?;
    wait_for(PATIENCE, "Accepted=False (UnknownRevision)", || async {
        let stack = scene.stack().await?;
        condition_is(&stack, types::ACCEPTED, "False", reasons::UNKNOWN_REVISION).then_some(())
    })
    .await?;
    tokio::time::sleep(HELD_FOR).await;
    let versions = scene.versions().await;
    check(all_hold(&versions, "v1"), || {
        format!("{HELD_FOR:?} after an unknown pin, the spokes hold {versions:?}")
    })?;
    scene.show("pinned to an unknown revision").await;

    // Removing the pin rolls revision 3 out from the canary again. Its agent is stopped
    // first, so that the eu wave has to wait for a report the canary has not sent: the
    // canary's reports on revision 3 from before the pin must not open the gate.
    let canary = scene.agents[0].clone();
    eprintln!("\nstopping the canary's agent, then removing the pin");
    scene.fleet.stop_agent(&canary).await;
    let since = Instant::now();
    scene.apply_stack(&scene.config_map("v3"), None).await?;
    wait_for(PATIENCE, "Pinned=False (Unpinned)", || async {
        let stack = scene.stack().await?;
        condition_is(&stack, types::PINNED, "False", reasons::UNPINNED).then_some(())
    })
    .await?;
    scene.wait_for_event(reasons::UNPINNED, "Normal").await?;
    tokio::time::sleep(HELD_FOR).await;
    scene
        .show("unpinned while the canary's agent is stopped")
        .await;
    let versions = scene.versions().await;
    check(all_hold(&versions, "v1"), || {
        format!(
            "{HELD_FOR:?} after the pin was removed, with the canary's agent stopped (it never \
             applied revision {third} since the pin), the spokes hold {versions:?}: the eu wave \
             did not wait for the canary"
        )
    })?;
    eprintln!("\nstarting the canary's agent again");
    scene.fleet.start_agent(&canary, 0).await?;
    rolled_out(
        scene,
        since,
        "v3",
        third,
        "unpinned: revision 3 rolled out again",
    )
    .await?;
    Ok(())
}

/// Waits until every spoke holds `version` (revision `revision`) and the rollout is
/// complete, checks that it went canary first through the gates, and shows the status.
async fn rolled_out(
    scene: &Scene,
    since: Instant,
    version: &str,
    revision: i64,
    title: &str,
) -> FleetResult<Timeline> {
    let timeline = scene
        .follow(since, version, Some(revision), title, |stack, versions| {
            all_hold(versions, version)
                && condition_is(
                    stack,
                    types::ROLLOUT_HALTED,
                    "False",
                    reasons::ROLLOUT_COMPLETE,
                )
        })
        .await?;
    check_canary_first(&timeline, revision)?;
    scene.check_gates(revision).await?;
    scene.show(title).await;
    Ok(timeline)
}
