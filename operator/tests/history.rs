//! A Stack's history in its status: the last revisions, newest first, with who recorded
//! them, so `kubectl get stack -o yaml` answers "what changed, when, by whom".

use brokkr_crds::Stack;
use kube::api::{Patch, PatchParams};

mod common;
use common::Hub;

fn config_map(color: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: shop\ndata:\n  color: {color}\n"
    )
}

async fn apply(hub: &Hub, manager: &str, color: &str) {
    hub.api::<Stack>()
        .patch(
            "shop",
            &PatchParams::apply(manager).force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "brokkr.io/v1alpha1",
                "kind": "Stack",
                "metadata": {"name": "shop"},
                "spec": {"generatorRef": {"name": "ci"}, "manifests": config_map(color)},
            })),
        )
        .await
        .expect("apply the Stack");
}

#[tokio::test]
async fn the_status_lists_the_last_revisions_newest_first_with_who_recorded_them() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    apply(&hub, "kubectl", "blue").await;
    hub.stack_when("shop", "the first revision in the history", |s| {
        s.status.as_ref().is_some_and(|st| st.history.len() == 1)
    })
    .await;
    apply(&hub, "helm", "green").await;
    hub.stack_when("shop", "two revisions", |s| {
        s.status.as_ref().is_some_and(|st| st.history.len() == 2)
    })
    .await;
    apply(&hub, "argocd-controller", "red").await;
    let stack = hub
        .stack_when("shop", "three revisions", |s| {
            s.status.as_ref().is_some_and(|st| st.history.len() == 3)
        })
        .await;
    let status = stack.status.unwrap();
    let history = &status.history;
    let recorded_by: Vec<Option<&str>> = history.iter().map(|r| r.recorded_by.as_deref()).collect();
    assert_eq!(
        recorded_by,
        [Some("argocd-controller"), Some("helm"), Some("kubectl")],
        "newest first"
    );
    assert!(history[0].sequence > history[1].sequence && history[1].sequence > history[2].sequence);
    let current = status.deployment_object.unwrap();
    assert_eq!(
        history[0].sequence, current.sequence,
        "the newest is being delivered"
    );
    assert_eq!(history[0].checksum, current.checksum[..12]);
    assert!(history.iter().all(|r| r.generator.as_deref() == Some("ci")));
    assert!(history.iter().all(|r| r.recorded_at.is_some()));
    hub.stop().await;
}
