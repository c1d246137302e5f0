//! Spoke ownership with the real binaries (brokkr-operator, brokkr-agent, PostgreSQL, a
//! kubesim hub and spoke, or real clusters from BROKKR_E2E_HUB_KUBECONFIG and
//! BROKKR_E2E_SPOKE_KUBECONFIG): a custom object that leaves a Stack while the agent is
//! down is pruned after its restart; an existing ConfigMap is refused, then adopted with
//! adoptExisting; driftPolicy Detect leaves an edit in place and turns Drifted True; a
//! Stack with deletionPolicy Orphan leaves its objects, without Brokkr's labels.

use std::time::Duration;

use brokkr_crds::{STACK_LABEL, Stack};
use brokkr_e2e::fleet::{Fleet, FleetResult, apply_yaml, wait_for};
use brokkr_e2e::tour::examples_dir;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kubesim::testing::unique_name;

const PATIENCE: Duration = Duration::from_secs(90);
const HUB_NAMESPACE: &str = "brokkr-demo";

fn crd(group: &str) -> String {
    format!(
        r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.{group}
spec:
  group: {group}
  scope: Namespaced
  names: {{kind: Widget, plural: widgets, singular: widget, listKind: WidgetList}}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {{type: integer}}
"#
    )
}

fn widget(group: &str, name: &str, ns: &str) -> String {
    format!(
        "apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  size: 1\n"
    )
}

fn config_map(name: &str, ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  mode: ours\n"
    )
}

async fn stack(hub: &kube::Client) -> Option<Stack> {
    Api::<Stack>::namespaced(hub.clone(), HUB_NAMESPACE)
        .get_opt("owned")
        .await
        .ok()
        .flatten()
}

fn sequence(stack: &Stack) -> i64 {
    stack
        .status
        .as_ref()
        .and_then(|s| s.deployment_object.as_ref())
        .map_or(0, |d| d.sequence)
}

/// Patches the Stack's spec and waits until the agent applied the new deployment object.
async fn change(hub: &kube::Client, spec: serde_json::Value) -> FleetResult<()> {
    let before = stack(hub).await.map_or(0, |s| sequence(&s));
    Api::<Stack>::namespaced(hub.clone(), HUB_NAMESPACE)
        .patch(
            "owned",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": spec })),
        )
        .await
        .map_err(|e| brokkr_e2e::bench::BenchError::Setup(format!("patch the Stack: {e}")))?;
    wait_for(PATIENCE, "a new version recorded", || async {
        stack(hub)
            .await
            .filter(|s| sequence(s) > before)
            .map(|_| ())
    })
    .await
}

async fn applied(hub: &kube::Client, what: &str) -> FleetResult<Stack> {
    wait_for(PATIENCE, what, || async {
        stack(hub)
            .await
            .filter(|s| s.status.as_ref().is_some_and(|st| st.applied_agents == 1))
    })
    .await
}

async fn scenario(fleet: &mut Fleet) -> FleetResult<()> {
    fleet.start_operator().await?;
    let hub = fleet.hub.client.clone();
    for name in ["namespace.yaml", "generator.yaml", "agents.yaml"] {
        let yaml = std::fs::read_to_string(examples_dir().join(name)).unwrap();
        apply_yaml(&hub, &yaml, HUB_NAMESPACE).await?;
    }
    fleet.start_agent("prod-eu", 0).await?;
    let spoke = fleet.spokes[0].client.clone();
    let ns = fleet.spokes[0].namespace.clone();
    let group = format!("{}.brokkr.test", unique_name("w"));
    fleet.spokes[0].delete_on_drop::<CustomResourceDefinition>(&format!("widgets.{group}"));
    let widgets: Api<DynamicObject> = Api::namespaced_with(
        spoke.clone(),
        &ns,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(&group, "v1", "Widget"),
            "widgets",
        ),
    );
    let config_maps: Api<ConfigMap> = Api::namespaced(spoke.clone(), &ns);
    let manifests = |documents: &[String]| documents.join("---\n");

    let v1 = manifests(&[
        crd(&group),
        widget(&group, "kept", &ns),
        widget(&group, "leaving", &ns),
        config_map("settings", &ns),
    ]);
    let stack_yaml = format!(
        "apiVersion: brokkr.io/v1alpha1\nkind: Stack\nmetadata:\n  name: owned\nspec:\n  generatorRef: {{name: ci}}\n  manifests: {}\n---\napiVersion: brokkr.io/v1alpha1\nkind: AgentTarget\nmetadata:\n  name: owned-eu\nspec:\n  stackRef: {{name: owned}}\n  agents: [prod-eu]\n",
        serde_json::to_string(&v1).unwrap()
    );
    apply_yaml(&hub, &stack_yaml, HUB_NAMESPACE).await?;
    applied(&hub, "the Stack applied by prod-eu").await?;
    assert!(widgets.get_opt("leaving").await.unwrap().is_some());

    // A custom object leaves the Stack while the agent is down.
    fleet.stop_agent("prod-eu").await;
    let v2 = manifests(&[
        crd(&group),
        widget(&group, "kept", &ns),
        config_map("settings", &ns),
    ]);
    change(&hub, serde_json::json!({"manifests": v2})).await?;
    fleet.start_agent("prod-eu", 0).await?;
    wait_for(PATIENCE, "the Widget that left to be pruned", || async {
        widgets
            .get_opt("leaving")
            .await
            .ok()
            .and_then(|w| w.is_none().then_some(()))
    })
    .await?;
    assert!(widgets.get_opt("kept").await.unwrap().is_some());

    // A ConfigMap that already exists is refused, then adopted.
    let mut theirs = ConfigMap::default();
    theirs.metadata.name = Some("taken".into());
    theirs.data = Some([("mode".to_owned(), "theirs".to_owned())].into());
    config_maps
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    let v3 = manifests(&[
        crd(&group),
        widget(&group, "kept", &ns),
        config_map("settings", &ns),
        config_map("taken", &ns),
    ]);
    change(&hub, serde_json::json!({"manifests": v3})).await?;
    let message = wait_for(PATIENCE, "the refusal in the Stack's status", || async {
        stack(&hub).await.and_then(|s| {
            s.status?
                .agents
                .iter()
                .filter_map(|a| a.message.clone())
                .find(|m| m.contains("exists and is not managed by Brokkr"))
        })
    })
    .await?;
    assert!(
        message.contains(&format!(
            "ConfigMap {ns}/taken: exists and is not managed by Brokkr; set spec.adoptExisting: true on the Stack to take it over"
        )),
        "{message}"
    );
    let untouched = config_maps.get("taken").await.unwrap();
    assert_eq!(untouched.data.unwrap()["mode"], "theirs");
    change(&hub, serde_json::json!({"adoptExisting": true})).await?;
    wait_for(PATIENCE, "the ConfigMap adopted", || async {
        let taken = config_maps.get_opt("taken").await.ok().flatten()?;
        let mode = taken.data.as_ref()?.get("mode")?.clone();
        (mode == "ours" && taken.metadata.labels?.contains_key(STACK_LABEL)).then_some(())
    })
    .await?;

    // Detect: an edit stays, and the Stack says it drifted.
    change(&hub, serde_json::json!({"driftPolicy": "Detect"})).await?;
    let version = applied(&hub, "the Detect version applied").await?;
    let detect_sequence = sequence(&version);
    config_maps
        .patch(
            "settings",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"mode": "edited"}})),
        )
        .await
        .unwrap();
    let drifted = wait_for(PATIENCE, "Drifted=True", || async {
        let s = stack(&hub).await?;
        (sequence(&s) == detect_sequence).then_some(())?;
        s.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Drifted" && c.status == "True")
    })
    .await?;
    assert!(drifted.message.contains("prod-eu"), "{}", drifted.message);
    let settings = config_maps.get("settings").await.unwrap();
    assert_eq!(settings.data.unwrap()["mode"], "edited");

    // Orphan: deleting the Stack leaves its objects, without Brokkr's labels.
    change(&hub, serde_json::json!({"deletionPolicy": "Orphan"})).await?;
    applied(&hub, "the Orphan version applied").await?;
    Api::<Stack>::namespaced(hub.clone(), HUB_NAMESPACE)
        .delete("owned", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(PATIENCE, "the Stack to be deleted", || async {
        stack(&hub).await.is_none().then_some(())
    })
    .await?;
    let unlabelled = |labels: Option<std::collections::BTreeMap<String, String>>| {
        !labels
            .unwrap_or_default()
            .keys()
            .any(|k| k.starts_with("brokkr.io/"))
    };
    wait_for(PATIENCE, "the objects orphaned", || async {
        let settings = config_maps.get_opt("settings").await.ok().flatten()?;
        let taken = config_maps.get_opt("taken").await.ok().flatten()?;
        let kept = widgets.get_opt("kept").await.ok().flatten()?;
        (unlabelled(settings.metadata.labels)
            && unlabelled(taken.metadata.labels)
            && unlabelled(kept.metadata.labels))
        .then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_adoption_drift_and_orphan_with_the_real_binaries() {
    let mut fleet = Fleet::new(1).await.expect("start the fleet");
    let outcome = scenario(&mut fleet).await;
    if let Err(err) = &outcome {
        fleet.print_log_tails(20);
        panic!("{err}");
    }
    fleet.shutdown().await;
}
