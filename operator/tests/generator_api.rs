//! The generator API over real HTTP, against a real PostgreSQL and kubesim (or the
//! cluster of `$KUBECONFIG`) with the controllers running: a pipeline pushes a Stack with
//! its Generator's key, waits for it to be recorded and delivered, lists and deletes it;
//! what it may not do is refused with the matching 4xx.

use std::time::Duration;

use brokkr_crds::{AgentTarget, Generator, Stack};
use brokkr_operator::api;
use brokkr_operator::store::EventReport;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use kubesim::testing::eventually;
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

mod common;
use common::Hub;

const CONFIG_MAP: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: shop\ndata:\n  color: blue\n";

struct Pipeline {
    hub: Hub,
    url: String,
    http: reqwest::Client,
}

impl Pipeline {
    async fn start() -> Pipeline {
        let hub = Hub::start().await;
        let url = hub.serve_api().await;
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Pipeline { hub, url, http }
    }

    /// Creates Generator `name` and returns the key the hub issued it.
    async fn generator(&self, name: &str) -> String {
        self.hub.create_generator(name).await;
        let secrets: Api<Secret> = self.hub.api();
        let secret = format!("brokkr-generator-{name}");
        // The Secret is written before the key's row commits: wait until the key works.
        eventually("the generator's key, working", || async {
            let secret = secrets.get_opt(&secret).await.ok()??;
            let key = String::from_utf8(secret.data?.get("pak")?.0.clone()).ok()?;
            let (status, _) = self.get(&key, "stacks").await;
            (status == 200).then_some(key)
        })
        .await
    }

    fn stack_url(&self, name: &str) -> String {
        format!("{}/api/v1/generator/stacks/{name}", self.url)
    }

    async fn push(&self, key: &str, name: &str, query: &str, yaml: &str) -> (u16, Value) {
        let response = self
            .http
            .put(format!("{}{query}", self.stack_url(name)))
            .bearer_auth(key)
            .header("Content-Type", "application/yaml")
            .body(yaml.to_owned())
            .send()
            .await
            .unwrap();
        answer(response).await
    }

    async fn push_json(&self, key: &str, name: &str, query: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .put(format!("{}{query}", self.stack_url(name)))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        answer(response).await
    }

    async fn get(&self, key: &str, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}/api/v1/generator/{path}", self.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        answer(response).await
    }

    async fn delete(&self, key: &str, name: &str) -> (u16, Value) {
        let response = self
            .http
            .delete(self.stack_url(name))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        answer(response).await
    }
}

async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("a JSON body with status {status}: {text:?}"));
    (status, body)
}

#[tokio::test]
async fn a_pushed_stack_is_recorded_with_the_generators_field_manager_and_its_revision_returned() {
    let p = Pipeline::start().await;
    let key = p.generator("ci").await;

    let (status, body) = p.push(&key, "shop", "?wait=30", CONFIG_MAP).await;
    assert_eq!(status, 200, "{body}");
    let sequence = body["revision"]["sequence"].as_i64().expect("a revision");
    assert_eq!(body["revision"]["checksum"].as_str().unwrap().len(), 64);

    let stack = p.hub.api::<Stack>().get("shop").await.unwrap();
    assert_eq!(stack.spec.generator_ref.name, "ci");
    assert_eq!(stack.spec.manifests.as_deref(), Some(CONFIG_MAP));
    let managers: Vec<String> = stack
        .managed_fields()
        .iter()
        .filter_map(|entry| entry.manager.clone())
        .collect();
    assert!(
        managers.contains(&"brokkr.io/generator/ci".to_owned()),
        "{managers:?}"
    );

    // The same content again is the same revision; new content a newer one.
    let (_, again) = p.push(&key, "shop", "?wait=30", CONFIG_MAP).await;
    assert_eq!(again["revision"]["sequence"].as_i64(), Some(sequence));
    let (status, newer) = p
        .push(
            &key,
            "shop",
            "?wait=30",
            &CONFIG_MAP.replace("blue", "green"),
        )
        .await;
    assert_eq!(status, 200, "{newer}");
    assert!(newer["revision"]["sequence"].as_i64().unwrap() > sequence);

    // Without ?wait the push is accepted at once.
    let (status, body) = p.push(&key, "other", "", CONFIG_MAP).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["name"], "other");

    let (status, listed) = p.get(&key, "stacks").await;
    assert_eq!(status, 200);
    let mut names: Vec<&str> = listed["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["other", "shop"]);

    // The generator's last activity is kept (to the minute) and shown in its status at
    // its next reconcile, here the one a new Stack of it causes.
    eventually("last_active_at recorded", || async {
        let rows = p
            .hub
            .db
            .conn()
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT 1 AS one FROM generators WHERE last_active_at IS NOT NULL",
            ))
            .await
            .ok()?;
        (!rows.is_empty()).then_some(())
    })
    .await;
    assert_eq!(p.push(&key, "third", "", CONFIG_MAP).await.0, 202);
    let generator = eventually("lastActiveAt in the Generator's status", || async {
        let generator = p.hub.api::<Generator>().get("ci").await.ok()?;
        generator.status.as_ref()?.last_active_at.as_ref()?;
        Some(generator)
    })
    .await;
    let shown = generator.status.unwrap().last_active_at.unwrap().0;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(shown);
    assert!(age.as_secs() < 120, "recent: {shown}");
    p.hub.stop().await;
}

#[tokio::test]
async fn a_pipeline_rolls_back_by_pinning_a_revision_and_unpins_with_its_next_push() {
    let p = Pipeline::start().await;
    let key = p.generator("ci").await;
    let (_, first) = p.push(&key, "shop", "?wait=30", CONFIG_MAP).await;
    let first = first["revision"]["sequence"].as_i64().unwrap();
    let green = CONFIG_MAP.replace("blue", "green");
    let (_, second) = p.push(&key, "shop", "?wait=30", &green).await;
    let second = second["revision"]["sequence"].as_i64().unwrap();

    let (status, pinned) = p
        .push_json(
            &key,
            "shop",
            "?wait=30",
            serde_json::json!({"manifests": green, "pinnedRevision": first}),
        )
        .await;
    assert_eq!(status, 200, "{pinned}");
    assert_eq!(
        pinned["revision"]["sequence"].as_i64(),
        Some(first),
        "delivered"
    );
    let stack = p.hub.api::<Stack>().get("shop").await.unwrap();
    assert_eq!(stack.spec.pinned_revision, Some(first));

    let (status, refused) = p
        .push_json(
            &key,
            "shop",
            "?wait=30",
            serde_json::json!({"manifests": green, "pinnedRevision": second + 1000}),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .starts_with("UnknownRevision"),
        "{refused}"
    );

    let (status, unpinned) = p.push(&key, "shop", "?wait=30", &green).await;
    assert_eq!(status, 200, "{unpinned}");
    assert_eq!(unpinned["revision"]["sequence"].as_i64(), Some(second));
    let stack = p.hub.api::<Stack>().get("shop").await.unwrap();
    assert_eq!(
        stack.spec.pinned_revision, None,
        "a push without the pin unpins"
    );
    p.hub.stop().await;
}

#[tokio::test]
async fn refused_content_is_a_422_with_the_parsers_message() {
    let p = Pipeline::start().await;
    let key = p.generator("ci").await;
    let (status, body) = p
        .push(
            &key,
            "broken",
            "?wait=30",
            "apiVersion: v1\nmetadata:\n  name: x\n",
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("InvalidManifest: document 1: missing kind"),
        "{message}"
    );
    p.hub.stop().await;
}

#[tokio::test]
async fn targets_make_an_agent_target_and_until_ready_gates_on_delivery() {
    let p = Pipeline::start().await;
    let key = p.generator("ci").await;
    let agent = p.hub.create_agent("edge", &[("ring", "canary")]).await;
    let (status, body) = p
        .push_json(
            &key,
            "shop",
            "?wait=30",
            json!({
                "manifests": CONFIG_MAP,
                "description": "the shop",
                "labels": {"app": "shop"},
                "targets": {"agentSelector": {"matchLabels": {"ring": "canary", "brokkr.io/test": p.hub.agent_label}}},
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let target = p.hub.api::<AgentTarget>().get("shop").await.unwrap();
    assert_eq!(target.spec.stack_ref.name, "shop");

    // Nobody has reported yet: the wait runs out with the outcome `waiting`.
    let (status, waiting) = p.get(&key, "stacks/shop?wait=1&until=ready").await;
    assert_eq!(
        (status, waiting["outcome"].as_str()),
        (200, Some("waiting"))
    );

    let row = eventually("the stack row", || p.hub.live_stack_row("shop")).await;
    let agent_id = eventually("the agent targeted", || async {
        p.hub
            .store
            .stack_target_agent_ids(row.id)
            .await
            .ok()?
            .into_iter()
            .next()
    })
    .await;
    let object = p
        .hub
        .store
        .current_deployment_object(row.id)
        .await
        .unwrap()
        .unwrap()
        .id;
    let report = |event_type: &str, status: &str, message: &str| EventReport {
        id: uuid::Uuid::now_v7(),
        deployment_object_id: object,
        event_type: event_type.into(),
        status: status.into(),
        message: Some(message.into()),
    };
    let waiter = {
        let (http, url, key) = (p.http.clone(), p.url.clone(), key.clone());
        tokio::spawn(async move {
            let response = http
                .get(format!(
                    "{url}/api/v1/generator/stacks/shop?wait=60&until=ready"
                ))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            answer(response).await
        })
    };
    p.hub
        .store
        .record_agent_events(
            agent_id,
            &[
                report("Apply", "Success", "applied 1 object"),
                report("Health", "Success", "healthy"),
            ],
        )
        .await
        .unwrap();
    let (status, ready) = waiter.await.unwrap();
    assert_eq!(
        (status, ready["outcome"].as_str()),
        (200, Some("ready")),
        "{ready}"
    );
    assert_eq!(ready["ready"], "1/1");
    assert_eq!(ready["agents"][0]["name"], agent.name_any());

    p.hub
        .store
        .record_agent_events(
            agent_id,
            &[report("Apply", "Failure", "configmaps is forbidden")],
        )
        .await
        .unwrap();
    let failed = eventually("the failure reported", || async {
        let (status, body) = p.get(&key, "stacks/shop?wait=5&until=ready").await;
        (status == 422).then_some(body)
    })
    .await;
    assert_eq!(failed["error"], "delivery_failed");
    assert_eq!(failed["stack"]["outcome"], "failed");

    // Deleting takes the AgentTarget the push made with it.
    let (status, _) = p.delete(&key, "shop").await;
    assert_eq!(status, 202);
    eventually("the AgentTarget deleted", || async {
        p.hub
            .api::<AgentTarget>()
            .get_opt("shop")
            .await
            .ok()
            .and_then(|found| found.is_none().then_some(()))
    })
    .await;
    p.hub.stop().await;
}

#[tokio::test]
async fn a_generator_may_touch_only_its_own_stacks() {
    let p = Pipeline::start().await;
    let ci = p.generator("ci").await;
    p.generator("release").await;
    p.hub.create_stack("theirs", "release", CONFIG_MAP).await;

    let (status, body) = p.push(&ci, "theirs", "", CONFIG_MAP).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("release"));
    assert_eq!(p.get(&ci, "stacks/theirs").await.0, 403);
    assert_eq!(p.delete(&ci, "theirs").await.0, 403);
    assert_eq!(p.get(&ci, "stacks/missing").await.0, 404);
    let (_, listed) = p.get(&ci, "stacks").await;
    assert_eq!(listed["stacks"], json!([]));
    p.hub.stop().await;
}

#[tokio::test]
async fn an_edit_by_another_manager_is_a_409_naming_it_unless_forced() {
    let p = Pipeline::start().await;
    let key = p.generator("ci").await;
    assert_eq!(p.push(&key, "shop", "", CONFIG_MAP).await.0, 202);
    // Someone edits the Stack with kubectl.
    p.hub
        .api::<Stack>()
        .patch(
            "shop",
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(json!({
                "apiVersion": "brokkr.io/v1alpha1",
                "kind": "Stack",
                "metadata": {"name": "shop"},
                "spec": {"generatorRef": {"name": "ci"}, "manifests": CONFIG_MAP.replace("blue", "red")},
            })),
        )
        .await
        .unwrap();
    let green = CONFIG_MAP.replace("blue", "green");
    let (status, body) = p.push(&key, "shop", "", &green).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("conflict")),
        "{body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("kubectl") && message.contains("manifests"),
        "{message}"
    );
    let (status, _) = p.push(&key, "shop", "?force=true", &green).await;
    assert_eq!(status, 202);
    let stack = p.hub.api::<Stack>().get("shop").await.unwrap();
    assert_eq!(stack.spec.manifests.as_deref(), Some(green.as_str()));
    p.hub.stop().await;
}

#[tokio::test]
async fn keys_bodies_and_names_are_checked_before_anything_is_written() {
    let p = Pipeline::start().await;
    let key = p.generator("ci").await;
    let (status, body) = p.push("brokkr_nope_nope", "shop", "", CONFIG_MAP).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, body) = p.push(&key, "Not_A_Name", "", CONFIG_MAP).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    let response = p
        .http
        .put(p.stack_url("shop"))
        .bearer_auth(&key)
        .header("Content-Type", "text/plain")
        .body(CONFIG_MAP)
        .send()
        .await
        .unwrap();
    assert_eq!(answer(response).await.0, 415);
    let huge = format!("a: \"{}\"\n", "x".repeat(api::generator::PUSH_BODY_LIMIT));
    let (status, body) = p.push(&key, "shop", "", &huge).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert!(
        body["message"].as_str().unwrap().contains("1048576"),
        "the limit is named: {body}"
    );
    assert!(
        p.hub
            .api::<Stack>()
            .get_opt("shop")
            .await
            .unwrap()
            .is_none(),
        "nothing was written"
    );

    // A suspended generator is refused until it resumes.
    p.hub
        .api::<Generator>()
        .patch(
            "ci",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    let refused = eventually("the suspension known to the API", || async {
        let (status, body) = p.push(&key, "shop", "", CONFIG_MAP).await;
        (status == 403).then_some(body)
    })
    .await;
    assert_eq!(refused["error"], "generator_suspended");
    p.hub.stop().await;
}

#[tokio::test]
async fn agent_keys_may_not_call_the_generator_api() {
    let p = Pipeline::start().await;
    let (_, agent_key) = common::agent_with_key(&p.hub.store, "edge").await;
    let (status, body) = p.get(&agent_key, "stacks").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("insufficient_scope")),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    p.hub.stop().await;
}

/// Runs `examples/ci-push.sh` as a pipeline would, against this hub.
fn ci_push(
    p: &Pipeline,
    key: &str,
    stack: &str,
    manifests: &std::path::Path,
) -> tokio::process::Child {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ci-push.sh");
    tokio::process::Command::new("sh")
        .arg(script)
        .arg(stack)
        .arg(manifests)
        .arg("60")
        .env("BROKKR_URL", &p.url)
        .env("BROKKR_GENERATOR_KEY", key)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run examples/ci-push.sh")
}

#[tokio::test]
async fn the_example_pipeline_passes_once_delivered_and_fails_on_an_agents_failure() {
    let p = Pipeline::start().await;
    let key = p.generator("ci").await;
    let agent = p.hub.create_agent("edge", &[]).await;
    let target: AgentTarget = serde_json::from_value(json!({
        "apiVersion": "brokkr.io/v1alpha1",
        "kind": "AgentTarget",
        "metadata": {"name": "shop"},
        "spec": {"stackRef": {"name": "shop"}, "agents": [agent.name_any()]},
    }))
    .unwrap();
    p.hub
        .api::<AgentTarget>()
        .create(&Default::default(), &target)
        .await
        .unwrap();
    let manifests =
        std::env::temp_dir().join(format!("brokkr-ci-push-{}.yaml", uuid::Uuid::now_v7()));

    for (color, outcome) in [("blue", "Success"), ("green", "Failure")] {
        std::fs::write(&manifests, CONFIG_MAP.replace("blue", color)).unwrap();
        let run = ci_push(&p, &key, "shop", &manifests);
        // The agent's part: report on the content the push recorded.
        let (agent_id, object) = eventually("the pushed content targeted", || async {
            let row = p.hub.live_stack_row("shop").await?;
            let object = p.hub.store.current_deployment_object(row.id).await.ok()??;
            if !object.yaml_content.contains(color) {
                return None;
            }
            let agent_id = p
                .hub
                .store
                .stack_target_agent_ids(row.id)
                .await
                .ok()?
                .into_iter()
                .next()?;
            Some((agent_id, object.id))
        })
        .await;
        let report = |event_type: &str, status: &str, message: &str| EventReport {
            id: uuid::Uuid::now_v7(),
            deployment_object_id: object,
            event_type: event_type.into(),
            status: status.into(),
            message: Some(message.into()),
        };
        let reports = match outcome {
            "Success" => vec![
                report("Apply", "Success", "applied 1 object"),
                report("Health", "Success", "healthy"),
            ],
            _ => vec![report(
                "Apply",
                "Failure",
                "configmaps \"settings\" is forbidden",
            )],
        };
        p.hub
            .store
            .record_agent_events(agent_id, &reports)
            .await
            .unwrap();
        let output = tokio::time::timeout(Duration::from_secs(90), run.wait_with_output())
            .await
            .expect("the script finishes")
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!("--- ci-push.sh ({color}):\n{stdout}{stderr}");
        assert!(stdout.contains("recorded as revision"), "{stdout}{stderr}");
        assert!(
            !stdout.contains(&key) && !stderr.contains(&key),
            "the key is never printed"
        );
        match outcome {
            "Success" => {
                assert!(output.status.success(), "{stdout}{stderr}");
                assert!(stdout.contains("ready on 1/1 agents"), "{stdout}");
            }
            _ => {
                assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
                assert!(
                    stderr.contains("delivery failed") && stderr.contains("forbidden"),
                    "{stderr}"
                );
            }
        }
    }
    let _ = std::fs::remove_file(&manifests);
    p.hub.stop().await;
}

#[tokio::test]
async fn the_openapi_document_describes_the_generator_api() {
    let p = Pipeline::start().await;
    let response = p
        .http
        .get(format!("{}/api/v1/openapi.json", p.url))
        .send()
        .await
        .unwrap();
    let (status, body) = answer(response).await;
    assert_eq!(status, 200);
    let stack = &body["paths"]["/api/v1/generator/stacks/{name}"];
    for method in ["put", "get", "delete"] {
        assert!(stack[method].is_object(), "{method} documented");
    }
    assert!(body["paths"]["/api/v1/generator/stacks"]["get"].is_object());
    for code in ["409", "413", "415", "422"] {
        assert!(
            stack["put"]["responses"][code].is_object(),
            "{code} documented"
        );
    }
    let forbidden = stack["put"]["responses"]["403"]["description"]
        .as_str()
        .unwrap();
    assert!(forbidden.contains("generator_suspended") && forbidden.contains("insufficient_scope"));
    for schema in ["StackPush", "StackAnswer"] {
        assert!(
            body["components"]["schemas"][schema].is_object(),
            "{schema}"
        );
    }
    p.hub.stop().await;
}
