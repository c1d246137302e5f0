//! The tour of Brokkr that the demo narrates and the scenario test checks: the
//! examples applied to a hub, delivered by two agents to two spokes, refused when targeted
//! from a hub namespace the Agents do not accept, updated while the operator is down,
//! broken, deleted, and an agent going Offline, which fires an alert to a webhook.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use brokkr_crds::{Agent, AgentPhase, AgentTarget, AlertRule, Stack};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

use crate::bench::BenchError;
use crate::fleet::{Fleet, FleetResult, apply_yaml, roll_out_client, wait_for};
use crate::receiver::WebhookReceiver;

const PATIENCE: Duration = Duration::from_secs(90);
const DEMO_NAMESPACE: &str = "brokkr-demo";

/// Prints what happens when `narrate`; quiet otherwise.
pub struct Narrator {
    pub narrate: bool,
}

impl Narrator {
    fn say(&self, text: &str) {
        if self.narrate {
            println!("\n==> {text}");
        }
    }

    fn show(&self, text: &str) {
        if self.narrate {
            println!("{}", text.trim_end());
        }
    }
}

pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn example(name: &str) -> FleetResult<String> {
    let path = examples_dir().join(name);
    std::fs::read_to_string(&path).map_err(|source| BenchError::Io {
        what: format!("read {}", path.display()),
        source,
    })
}

async fn apply_example(fleet: &Fleet, name: &str, n: &Narrator) -> FleetResult<()> {
    let yaml = example(name)?;
    apply_shown(
        fleet,
        &yaml,
        DEMO_NAMESPACE,
        &format!("-f examples/{name}"),
        n,
    )
    .await
}

/// Applies `yaml` to the hub and shows it as `kubectl apply --server-side <shown>` would.
async fn apply_shown(
    fleet: &Fleet,
    yaml: &str,
    namespace: &str,
    shown: &str,
    n: &Narrator,
) -> FleetResult<()> {
    let applied = apply_yaml(&fleet.hub.client, yaml, namespace).await?;
    n.show(&format!(
        "$ kubectl apply --server-side {shown}\n{}",
        applied
            .iter()
            .map(|o| format!("{o} serverside-applied"))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    Ok(())
}

/// A hub namespace the example Agents do not accept (they grant only brokkr-demo).
const OTHER_NAMESPACE: &str = "brokkr-other";

/// The same Agents targeted from another hub namespace: refused, and nothing delivered.
async fn refused_from_another_namespace(fleet: &Fleet, n: &Narrator) -> FleetResult<()> {
    n.say(&format!(
        "A team in hub namespace {OTHER_NAMESPACE} targets the same Agents; they accept AgentTargets only from {DEMO_NAMESPACE} (spec.targetableFrom), so the hub refuses"
    ));
    let hub = fleet.hub.client.clone();
    fleet.hub.delete_on_drop::<Namespace>(OTHER_NAMESPACE);
    let other = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {OTHER_NAMESPACE}\n---\n\
         apiVersion: brokkr.io/v1alpha1\nkind: Generator\nmetadata:\n  name: other\nspec: {{}}\n---\n\
         apiVersion: brokkr.io/v1alpha1\nkind: Stack\nmetadata:\n  name: other\nspec:\n  generatorRef: {{name: other}}\n  \
         manifests: \"apiVersion: v1\\nkind: ConfigMap\\nmetadata: {{name: other, namespace: default}}\\n\"\n---\n\
         apiVersion: brokkr.io/v1alpha1\nkind: AgentTarget\nmetadata:\n  name: other-prod\nspec:\n  stackRef: {{name: other}}\n  \
         agentSelector: {{matchLabels: {{env: prod}}}}\n"
    );
    let shown = format!("-n {OTHER_NAMESPACE} -f -");
    apply_shown(fleet, &other, OTHER_NAMESPACE, &shown, n).await?;
    let targets: Api<AgentTarget> = Api::namespaced(hub.clone(), OTHER_NAMESPACE);
    let (refused, message) = wait_for(PATIENCE, "AgentTarget other-prod NotPermitted", || async {
        let status = targets.get_opt("other-prod").await.ok().flatten()?.status?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
        (ready.reason == "NotPermitted")
            .then(|| (status.refused_agents.clone(), ready.message.clone()))
    })
    .await?;
    if refused != ["prod-eu", "prod-us"] {
        return Err(BenchError::Setup(format!(
            "expected prod-eu and prod-us refused for {OTHER_NAMESPACE}, got {refused:?}"
        )));
    }
    // The AgentTarget's status is written after the target set: nobody is targeted.
    let stacks: Api<Stack> = Api::namespaced(hub.clone(), OTHER_NAMESPACE);
    wait_for(PATIENCE, "Stack other targeted at no agent", || async {
        let status = stacks.get_opt("other").await.ok().flatten()?.status?;
        (status.deployment_object.is_some() && status.targeted_agents == 0).then_some(())
    })
    .await?;
    n.show(&format!(
        "$ kubectl get agenttarget other-prod -n {OTHER_NAMESPACE} -o jsonpath='{{.status.refusedAgents}}'\n{refused:?}\n\
         Ready=False NotPermitted: {message}\nStack {OTHER_NAMESPACE}/other: TARGETS 0"
    ));
    // Out of the way of the rest of the tour (with no targets, nothing waits).
    let _ = targets.delete("other-prod", &DeleteParams::default()).await;
    let _ = stacks.delete("other", &DeleteParams::default()).await;
    Ok(())
}

async fn stack(fleet: &Fleet, name: &str) -> Option<Stack> {
    let stacks: Api<Stack> = Api::namespaced(fleet.hub.client.clone(), DEMO_NAMESPACE);
    stacks.get_opt(name).await.ok().flatten()
}

fn ready(stack: &Stack) -> Option<&str> {
    stack.status.as_ref().and_then(|s| s.ready.as_deref())
}

fn sequence(stack: &Stack) -> i64 {
    stack
        .status
        .as_ref()
        .and_then(|s| s.deployment_object.as_ref())
        .map_or(0, |d| d.sequence)
}

/// Runs the whole tour; an unmet expectation is an error naming it.
pub async fn run(fleet: &mut Fleet, n: &Narrator) -> FleetResult<()> {
    n.say(
        "Starting brokkr-operator against the hub (it installs its CRDs and migrates PostgreSQL)",
    );
    fleet.start_operator().await?;

    n.say("Applying the examples to the hub: a namespace, a Generator and two Agents");
    for name in ["namespace.yaml", "generator.yaml", "agents.yaml"] {
        apply_example(fleet, name, n).await?;
    }
    n.say("The hub issued each Agent a key; starting brokkr-agent in each spoke with it");
    fleet.start_agent("prod-eu", 0).await?;
    fleet.start_agent("prod-us", 1).await?;

    // kubesim runs no Deployment controller: play its part in the simulated spokes.
    let spokes: Vec<kube::Client> = fleet.spokes.iter().map(|s| s.client.clone()).collect();
    let simulated: Vec<bool> = fleet.spokes.iter().map(|s| !s.is_real()).collect();
    let rollout = tokio::spawn(async move {
        loop {
            for (client, simulated) in spokes.iter().zip(&simulated) {
                if *simulated {
                    roll_out_client(client).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let outcome = deliver_update_break_delete(fleet, n).await;
    rollout.abort();
    outcome
}

async fn deliver_update_break_delete(fleet: &mut Fleet, n: &Narrator) -> FleetResult<()> {
    n.say("Applying the Stack `shop` (Namespace, ConfigMap, Deployment, Service) and an AgentTarget selecting env=prod");
    apply_example(fleet, "stack.yaml", n).await?;
    apply_example(fleet, "agent-target.yaml", n).await?;
    let delivered = wait_for(PATIENCE, "Stack shop READY 2/2", || async {
        stack(fleet, "shop")
            .await
            .filter(|s| ready(s) == Some("2/2"))
    })
    .await?;
    n.say("Both agents applied it and report it healthy:");
    n.show(&format!(
        "$ kubectl get stacks -A\n{}",
        fleet.stacks_table().await
    ));
    for (i, spoke) in fleet.spokes.iter().enumerate() {
        let maps: Api<ConfigMap> = Api::namespaced(spoke.client.clone(), "shop");
        let content = maps
            .get_opt("shop-content")
            .await
            .ok()
            .flatten()
            .ok_or_else(|| BenchError::Setup(format!("spoke {i} has no shop/shop-content")))?;
        let labelled = content.labels().contains_key(brokkr_crds::STACK_LABEL);
        if !labelled {
            return Err(BenchError::Setup(format!(
                "spoke {i}: shop-content lacks the brokkr.io/stack label"
            )));
        }
    }
    n.show("spoke 1 and spoke 2: namespace shop holds ConfigMap shop-content, Deployment shop, Service shop (labelled brokkr.io/stack)");

    refused_from_another_namespace(fleet, n).await?;

    n.say("Killing the operator (SIGKILL), changing the Stack meanwhile, then starting it again");
    fleet.kill_operator().await;
    let stacks: Api<Stack> = Api::namespaced(fleet.hub.client.clone(), DEMO_NAMESPACE);
    let manifests = delivered.spec.manifests.clone().unwrap_or_default();
    let updated = manifests.replace("Delivered by Brokkr", "Delivered by Brokkr, version 2");
    stacks
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"manifests": updated}})),
        )
        .await
        .map_err(|err| BenchError::Setup(format!("update the Stack: {err}")))?;
    fleet.start_operator().await?;
    let first = sequence(&delivered);
    wait_for(PATIENCE, "the new version READY 2/2", || async {
        stack(fleet, "shop")
            .await
            .filter(|s| sequence(s) > first && ready(s) == Some("2/2"))
            .filter(|s| {
                s.status.as_ref().is_some_and(|st| {
                    st.agents
                        .iter()
                        .all(|a| a.state == brokkr_crds::AgentDeployState::Applied)
                })
            })
    })
    .await?;
    for spoke in &fleet.spokes {
        let maps: Api<ConfigMap> = Api::namespaced(spoke.client.clone(), "shop");
        wait_for(PATIENCE, "version 2 in every spoke", || async {
            let content = maps.get_opt("shop-content").await.ok().flatten()?;
            content
                .data?
                .get("index.html")?
                .contains("version 2")
                .then_some(())
        })
        .await?;
    }
    let versions = live_versions(fleet, "brokkr-demo/shop").await?;
    if versions != 2 {
        return Err(BenchError::Setup(format!(
            "expected exactly 2 deployment objects for brokkr-demo/shop after the restart, found {versions}"
        )));
    }
    n.show(&format!(
        "$ kubectl get stacks -A\n{}\nPostgreSQL holds exactly {versions} versions of the stack: no duplicate after the restart",
        fleet.stacks_table().await
    ));

    n.say("Applying a Stack with a broken manifest");
    apply_example(fleet, "broken-stack.yaml", n).await?;
    let broken = wait_for(PATIENCE, "Stack broken Accepted=False", || async {
        let s = stack(fleet, "broken").await?;
        let accepted = s
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Accepted")?
            .clone();
        (accepted.status == "False").then_some(accepted)
    })
    .await?;
    if broken.reason != "InvalidManifest" {
        return Err(BenchError::Setup(format!(
            "broken Stack: reason {} instead of InvalidManifest",
            broken.reason
        )));
    }
    n.show(&format!(
        "$ kubectl describe stack broken -n {DEMO_NAMESPACE}   (condition Accepted)\n  Status: {}  Reason: {}\n  Message: {}",
        broken.status, broken.reason, broken.message
    ));

    n.say(
        "Deleting the Stack `shop`: the agents remove what they applied, then the hub lets it go",
    );
    stacks
        .delete("shop", &DeleteParams::default())
        .await
        .map_err(|err| BenchError::Setup(format!("delete the Stack: {err}")))?;
    wait_for(PATIENCE, "Stack shop gone", || async {
        stack(fleet, "shop").await.is_none().then_some(())
    })
    .await?;
    for spoke in &fleet.spokes {
        let maps: Api<ConfigMap> = Api::namespaced(spoke.client.clone(), "shop");
        wait_for(PATIENCE, "the spokes cleaned", || async {
            maps.get_opt("shop-content")
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await?;
    }
    n.show(&format!(
        "$ kubectl get stacks -A\n{}spokes: namespace shop and its objects are gone",
        fleet.stacks_table().await
    ));

    alert_on_an_offline_agent(fleet, n).await
}

/// The on-call team is told: examples/alerting.yaml with its webhook pointed at a receiver
/// the tour runs; an agent stops, the alert fires (signed), the agent returns, it resolves.
async fn alert_on_an_offline_agent(fleet: &mut Fleet, n: &Narrator) -> FleetResult<()> {
    n.say("Telling the on-call team when an agent goes Offline: examples/alerting.yaml, its webhook URL pointed at a receiver this tour runs and `for` shortened to 5s");
    let receiver = WebhookReceiver::start().await?;
    let yaml = example("alerting.yaml")?
        .replace("https://hooks.example.com/brokkr", &receiver.url)
        .replace("for: 30s", "for: 5s");
    apply_shown(fleet, &yaml, DEMO_NAMESPACE, "-f examples/alerting.yaml", n).await?;
    let rules: Api<AlertRule> = Api::namespaced(fleet.hub.client.clone(), DEMO_NAMESPACE);
    wait_for(PATIENCE, "AlertRule edge-down Ready", || async {
        let status = rules.get_opt("edge-down").await.ok().flatten()?.status?;
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await?;

    n.say("Stopping the agent prod-us: after three missed heartbeats the hub marks it Offline, and 5 s after its last heartbeat the rule fires");
    fleet.stop_agent("prod-us").await;
    let stopped = Instant::now();
    let agents: Api<Agent> = Api::all(fleet.hub.client.clone());
    wait_for(PATIENCE, "Agent prod-us Offline", || async {
        let agent = agents.get_opt("prod-us").await.ok().flatten()?;
        (agent.status?.phase? == AgentPhase::Offline).then_some(())
    })
    .await?;
    n.show(&format!(
        "$ kubectl get agents\n{}",
        fleet.agents_table().await
    ));
    let firing = receiver.wait_for(1, PATIENCE).await?.remove(0);
    let fired_after = stopped.elapsed();
    let body = firing.json();
    let expected = [
        ("state", "firing"),
        ("condition", "AgentOffline"),
        ("severity", "critical"),
        ("rule", "brokkr-demo/edge-down"),
    ];
    for (field, value) in expected {
        if body[field] != value {
            return Err(BenchError::Setup(format!(
                "the firing notification's {field} is {} instead of {value:?}",
                body[field]
            )));
        }
    }
    if body["subject"] != serde_json::json!({"kind": "Agent", "name": "prod-us"}) {
        return Err(BenchError::Setup(format!(
            "the firing notification is about {} instead of Agent prod-us",
            body["subject"]
        )));
    }
    let signed = firing
        .headers
        .get("x-brokkr-signature")
        .is_some_and(|s| s.starts_with("sha256=") && s.len() == 7 + 64);
    if !signed {
        return Err(BenchError::Setup(
            "the firing notification carries no X-Brokkr-Signature".into(),
        ));
    }
    n.show(&format!(
        "the receiver got, {:.1} s after the agent stopped (X-Brokkr-Signature: {}…):\n{}",
        fired_after.as_secs_f64(),
        &firing.headers["x-brokkr-signature"][..19],
        serde_json::to_string_pretty(&body).unwrap_or_default()
    ));
    let firing_count = wait_for(PATIENCE, "AlertRule edge-down firing 1", || async {
        let status = rules.get_opt("edge-down").await.ok().flatten()?.status?;
        (status.firing_count == 1).then_some(status.firing_count)
    })
    .await?;
    let metrics = fleet.replica_metrics(0).await.unwrap_or_default();
    let offline_gauge = metrics
        .lines()
        .find(|l| l.starts_with("brokkr_operator_agents{status=\"Offline\"}"))
        .unwrap_or("brokkr_operator_agents{status=\"Offline\"} (missing)")
        .to_owned();
    if !offline_gauge.ends_with(" 1") {
        return Err(BenchError::Setup(format!(
            "the hub's /metrics should count one Offline agent: {offline_gauge}"
        )));
    }
    n.show(&format!(
        "$ kubectl get alertrule edge-down -n {DEMO_NAMESPACE}   (FIRING {firing_count})\nhub /metrics: {offline_gauge}"
    ));

    n.say(
        "Starting prod-us again: it is Online, and the alert resolves with one more notification",
    );
    fleet.start_agent("prod-us", 1).await?;
    let resolved = receiver.wait_for(2, PATIENCE).await?.remove(1);
    let resolved_body = resolved.json();
    if resolved_body["state"] != "resolved" || resolved_body["alertId"] != body["alertId"] {
        return Err(BenchError::Setup(format!(
            "expected the resolved notification of alert {}, got {resolved_body}",
            body["alertId"]
        )));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let count = receiver.deliveries().len();
    if count != 2 {
        return Err(BenchError::Setup(format!(
            "expected exactly one firing and one resolved notification, the receiver got {count}"
        )));
    }
    n.show(&format!(
        "the receiver got the resolved notification: {}",
        resolved_body["message"]
    ));
    Ok(())
}

/// Deployment objects of a stack that are content (not deletion markers), deleted or not.
async fn live_versions(fleet: &Fleet, stack_name: &str) -> FleetResult<i64> {
    let row = fleet
        .db
        .conn()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM deployment_objects d JOIN stacks s ON s.id = d.stack_id \
             WHERE s.name = $1 AND NOT d.is_deletion_marker",
            [stack_name.into()],
        ))
        .await
        .map_err(|source| BenchError::Database {
            what: "count deployment objects".into(),
            source,
        })?
        .ok_or_else(|| BenchError::Setup("no count".into()))?;
    row.try_get("", "n").map_err(|source| BenchError::Database {
        what: "read the count".into(),
        source,
    })
}
