//! A Stack's agent policy (`spec.adoptExisting`, `spec.deletionPolicy`) reaches the agents
//! with its content: as the first line of the deployment object, a new revision when it
//! changes, and on the deletion marker.

use brokkr_crds::{DeletionPolicy, Stack, StackPolicy};
use kube::api::{DeleteParams, Patch, PatchParams};
use kubesim::testing::eventually;

mod common;
use common::Hub;

const CONFIG_MAP: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: shop\ndata:\n  color: blue\n";

#[tokio::test]
async fn a_policy_change_is_a_new_revision_and_the_deletion_marker_keeps_the_last_policy() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", CONFIG_MAP).await;
    let first = hub
        .stack_when("shop", "content recorded", |s| {
            s.status
                .as_ref()
                .is_some_and(|st| st.deployment_object.is_some())
        })
        .await
        .status
        .unwrap()
        .deployment_object
        .unwrap();
    let row = hub.live_stack_row("shop").await.expect("stack row");
    let objects = hub.objects_of(row.id).await;
    assert_eq!(
        StackPolicy::from_yaml(&objects[0].yaml_content),
        Ok(StackPolicy::default())
    );
    assert!(objects[0].yaml_content.starts_with("apiVersion"));

    hub.api::<Stack>()
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"spec": {"deletionPolicy": "Orphan", "adoptExisting": true}}),
            ),
        )
        .await
        .unwrap();
    hub.stack_when("shop", "a new revision for the policy", |s| {
        s.status
            .as_ref()
            .and_then(|st| st.deployment_object.as_ref())
            .is_some_and(|d| d.sequence > first.sequence)
    })
    .await;
    let objects = hub.objects_of(row.id).await;
    assert_eq!(objects.len(), 2);
    let policy = StackPolicy {
        adopt_existing: true,
        deletion_policy: DeletionPolicy::Orphan,
        ..StackPolicy::default()
    };
    assert_eq!(
        StackPolicy::from_yaml(&objects[1].yaml_content),
        Ok(policy.clone())
    );
    assert!(objects[1].yaml_content.ends_with(&objects[0].yaml_content));

    hub.api::<Stack>()
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    let marker = eventually("the deletion marker", || async {
        hub.objects_of(row.id)
            .await
            .into_iter()
            .find(|o| o.is_deletion_marker)
    })
    .await;
    assert_eq!(StackPolicy::from_yaml(&marker.yaml_content), Ok(policy));
    hub.stop().await;
}
