//! Generators as the source of Stacks: a suspended Generator records nothing new for its
//! Stacks until it resumes.

use brokkr_crds::conditions::{find_condition, reasons, types};
use brokkr_crds::{Generator, Stack};
use kube::api::{Patch, PatchParams};

mod common;
use common::Hub;

fn config_map(color: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: shop\ndata:\n  color: {color}\n"
    )
}

fn accepted_reason(stack: &Stack) -> Option<String> {
    let status = stack.status.as_ref()?;
    find_condition(&status.conditions, types::ACCEPTED).map(|c| c.reason.clone())
}

async fn set_suspend(hub: &Hub, generator: &str, suspend: bool) {
    hub.api::<Generator>()
        .patch(
            generator,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"suspend": suspend}})),
        )
        .await
        .expect("patch the Generator");
}

async fn set_color(hub: &Hub, stack: &str, color: &str) {
    hub.api::<Stack>()
        .patch(
            stack,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"manifests": config_map(color)}})),
        )
        .await
        .expect("patch the Stack");
}

#[tokio::test]
async fn a_suspended_generators_stacks_keep_their_last_content_until_it_resumes() {
    let hub = Hub::start().await;
    hub.create_generator("ci").await;
    hub.create_stack("shop", "ci", &config_map("blue")).await;
    hub.stack_when("shop", "the first content recorded", |s| {
        accepted_reason(s).as_deref() == Some(reasons::RECORDED)
    })
    .await;
    let row = hub.live_stack_row("shop").await.expect("stack row");

    set_suspend(&hub, "ci", true).await;
    set_color(&hub, "shop", "green").await;
    let stack = hub
        .stack_when("shop", "Accepted says the Generator is suspended", |s| {
            accepted_reason(s).as_deref() == Some(reasons::GENERATOR_SUSPENDED)
                && s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation
        })
        .await;
    let objects = hub.objects_of(row.id).await;
    assert_eq!(objects.len(), 1, "nothing new is recorded while suspended");
    assert!(objects[0].yaml_content.contains("color: blue"));
    assert_eq!(
        stack.status.unwrap().deployment_object.unwrap().sequence,
        objects[0].sequence_id,
        "agents keep being served the last recorded content"
    );

    set_suspend(&hub, "ci", false).await;
    hub.stack_when("shop", "the held-back content recorded on resume", |s| {
        accepted_reason(s).as_deref() == Some(reasons::RECORDED)
    })
    .await;
    let objects = hub.objects_of(row.id).await;
    assert_eq!(objects.len(), 2);
    assert!(objects[1].yaml_content.contains("color: green"));
    hub.stop().await;
}
