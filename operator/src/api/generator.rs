//! The generator API (`/api/v1/generator/*`): a CI pipeline or release tool pushes
//! Stacks with its Generator's key, without Kubernetes credentials. The hub
//! server-side-applies the Stack (and, when asked, an AgentTarget of the same name) in the
//! Generator's namespace, so the custom resource stays the one source of truth and
//! `kubectl get stacks` shows what a pipeline pushed. A generator sees and changes only
//! the Stacks whose `generatorRef` names it.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use brokkr_crds::conditions::{find_condition, reasons, types};
use brokkr_crds::{AgentDeployState, AgentHealth, AgentTarget, LabelSelector, Stack, StackStatus};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{ApiError, ApiState, authenticate};
use crate::keys::Scope;
use crate::store::KeyOwner;

/// Largest body a push may have: a Stack's content must fit in one Kubernetes object
/// (etcd stores at most 1.5 MiB per object, metadata and status included).
pub const PUSH_BODY_LIMIT: usize = 1024 * 1024;

/// Longest `?wait=` granted, in seconds.
pub const MAX_WAIT_SECONDS: u64 = 600;

/// How often a waiting request looks at the Stack again.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// Most agents listed in a Stack's answer (the counts cover all of them).
const MAX_AGENTS_LISTED: usize = 50;

/// Kubernetes refuses field managers longer than this.
const MAX_FIELD_MANAGER_LEN: usize = 128;

pub fn routes() -> Router<ApiState> {
    Router::new().route("/stacks", get(list_stacks)).route(
        "/stacks/{name}",
        get(get_stack).put(put_stack).delete(delete_stack),
    )
}

/// The Generator a request comes from.
#[derive(Clone, Debug)]
pub struct CallingGenerator {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
}

impl CallingGenerator {
    /// Field manager of what this generator applies.
    fn field_manager(&self) -> String {
        field_manager(&self.name)
    }
}

/// `brokkr.io/generator/<name>`, cut to what Kubernetes accepts.
pub fn field_manager(generator: &str) -> String {
    let mut manager = format!("brokkr.io/generator/{generator}");
    let end = brokkr_common::truncate_bytes(&manager, MAX_FIELD_MANAGER_LEN).len();
    manager.truncate(end);
    manager
}

impl FromRequestParts<ApiState> for CallingGenerator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let caller = authenticate(parts, state, Scope::Generator).await?;
        let KeyOwner::Generator(id) = caller.owner else {
            return Err(ApiError::InsufficientScope(
                "this key may not call the generator API".into(),
            ));
        };
        // Generator rows are named `<namespace>/<name>`.
        let (namespace, name) = caller
            .name
            .split_once('/')
            .ok_or_else(|| ApiError::Forbidden("this generator has no namespace".into()))?;
        Ok(CallingGenerator {
            id,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

fn client(state: &ApiState) -> Result<Client, ApiError> {
    state
        .cluster_access
        .as_ref()
        .map(|access| access.client.clone())
        .ok_or_else(|| {
            ApiError::NotImplemented(
                "this hub serves the generator API without a Kubernetes client".into(),
            )
        })
}

/// What a push may carry as JSON. YAML bodies are the manifests alone.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PushBody {
    pub manifests: Option<String>,
    pub resources: Option<Vec<serde_json::Value>>,
    pub description: Option<String>,
    /// Labels of the Stack resource.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The Stack's `spec.annotations` (recorded in Brokkr's database).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// When given, an AgentTarget of the Stack's name delivers it to these agents.
    pub targets: Option<PushTargets>,
    /// The Stack's `spec.pinnedRevision`: deliver this recorded revision to every agent
    /// instead of the newest (a rollback). A later push without it unpins.
    pub pinned_revision: Option<i64>,
    /// The Stack's `spec.rollout`: deliver new revisions wave by wave.
    pub rollout: Option<brokkr_crds::RolloutSpec>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PushTargets {
    #[serde(default)]
    pub agents: Vec<String>,
    pub agent_selector: Option<LabelSelector>,
}

#[derive(Debug, Default, Deserialize)]
struct PushQuery {
    wait: Option<u64>,
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Default, Deserialize)]
struct StatusQuery {
    wait: Option<u64>,
    until: Option<String>,
}

/// The answer about one Stack: its revision, counts and conditions.
#[derive(Debug, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StackAnswer {
    pub name: String,
    pub namespace: String,
    pub generation: Option<i64>,
    pub observed_generation: Option<i64>,
    /// The recorded content agents are asked to apply.
    pub revision: Option<Revision>,
    /// Healthy out of targeted agents, e.g. `3/3`.
    pub ready: Option<String>,
    pub targeted_agents: i32,
    pub applied_agents: i32,
    pub healthy_agents: i32,
    pub failed_agents: i32,
    /// Failing agents first, at most 50.
    pub agents: Vec<brokkr_crds::StackAgentStatus>,
    pub conditions: Vec<brokkr_crds::Condition>,
    /// With `?until=ready`: `ready`, `failed`, or `waiting` when the wait ran out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Revision {
    pub sequence: i64,
    pub checksum: String,
}

impl StackAnswer {
    fn of(stack: &Stack) -> StackAnswer {
        let status = stack.status.clone().unwrap_or_default();
        StackAnswer {
            name: stack.name_any(),
            namespace: stack.namespace().unwrap_or_default(),
            generation: stack.metadata.generation,
            observed_generation: status.observed_generation,
            revision: status.deployment_object.map(|object| Revision {
                sequence: object.sequence,
                checksum: object.checksum,
            }),
            ready: status.ready,
            targeted_agents: status.targeted_agents,
            applied_agents: status.applied_agents,
            healthy_agents: status.healthy_agents,
            failed_agents: status.failed_agents,
            agents: status.agents.into_iter().take(MAX_AGENTS_LISTED).collect(),
            conditions: status.conditions,
            outcome: None,
        }
    }
}

/// `PUT /api/v1/generator/stacks/{name}`
async fn put_stack(
    generator: CallingGenerator,
    State(state): State<ApiState>,
    Path(name): Path<String>,
    query: Result<Query<PushQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(PUSH_BODY_LIMIT)
        } else {
            ApiError::BadRequest(rejection.body_text())
        }
    })?;
    check_name(&name)?;
    let push = parse_push(&headers, &body)?;
    let client = client(&state)?;
    let stacks: Api<Stack> = Api::namespaced(client.clone(), &generator.namespace);
    if let Some(existing) = stacks.get_opt(&name).await.map_err(kube_error)? {
        check_owned(&existing, &generator)?;
    }
    let mut params = PatchParams::apply(&generator.field_manager());
    params.force = query.force;
    let applied = stacks
        .patch(
            &name,
            &params,
            &Patch::Apply(stack_object(&name, &generator, &push)),
        )
        .await
        .map_err(kube_error)?;
    if let Some(targets) = &push.targets {
        let agent_targets: Api<AgentTarget> = Api::namespaced(client, &generator.namespace);
        agent_targets
            .patch(
                &name,
                &params,
                &Patch::Apply(agent_target_object(&name, targets)),
            )
            .await
            .map_err(kube_error)?;
    }
    let Some(wait) = query.wait.filter(|wait| *wait > 0) else {
        return Ok((StatusCode::ACCEPTED, Json(StackAnswer::of(&applied))).into_response());
    };
    let generation = applied.metadata.generation;
    let observed = wait_for(&stacks, &name, wait, |stack| {
        accepted_for(stack, generation).is_some()
    })
    .await?;
    match observed
        .as_ref()
        .and_then(|stack| accepted_for(stack, generation))
    {
        Some(Ok(())) => {
            Ok(Json(StackAnswer::of(observed.as_ref().unwrap_or(&applied))).into_response())
        }
        Some(Err(message)) => Err(ApiError::Unprocessable(message)),
        None => Ok((
            StatusCode::ACCEPTED,
            Json(StackAnswer::of(observed.as_ref().unwrap_or(&applied))),
        )
            .into_response()),
    }
}

/// `GET /api/v1/generator/stacks/{name}`
async fn get_stack(
    generator: CallingGenerator,
    State(state): State<ApiState>,
    Path(name): Path<String>,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    check_name(&name)?;
    let until_ready = match query.until.as_deref() {
        None => false,
        Some("ready") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "until={other:?} is not supported; use until=ready"
            )));
        }
    };
    let stacks: Api<Stack> = Api::namespaced(client(&state)?, &generator.namespace);
    let stack = owned_stack(&stacks, &name, &generator).await?;
    if !until_ready {
        return Ok(Json(StackAnswer::of(&stack)).into_response());
    }
    let wait = query.wait.unwrap_or(0);
    let stack = wait_for(&stacks, &name, wait, |stack| delivery(stack).is_some())
        .await?
        .unwrap_or(stack);
    let mut answer = StackAnswer::of(&stack);
    match delivery(&stack) {
        Some(Delivery::Ready) => {
            answer.outcome = Some("ready");
            Ok(Json(answer).into_response())
        }
        Some(Delivery::Failed(message)) => {
            answer.outcome = Some("failed");
            Ok((
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({
                    "error": "delivery_failed",
                    "message": message,
                    "stack": answer,
                })),
            )
                .into_response())
        }
        None => {
            answer.outcome = Some("waiting");
            Ok(Json(answer).into_response())
        }
    }
}

/// `GET /api/v1/generator/stacks`
async fn list_stacks(
    generator: CallingGenerator,
    State(state): State<ApiState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let stacks: Api<Stack> = Api::namespaced(client(&state)?, &generator.namespace);
    let list = stacks.list(&Default::default()).await.map_err(kube_error)?;
    let mine: Vec<serde_json::Value> = list
        .items
        .iter()
        .filter(|stack| stack.spec.generator_ref.name == generator.name)
        .map(|stack| {
            let status = stack.status.clone().unwrap_or_default();
            json!({
                "name": stack.name_any(),
                "revision": status.deployment_object.map(|object| json!({
                    "sequence": object.sequence,
                    "checksum": object.checksum,
                })),
                "ready": status.ready,
                "targetedAgents": status.targeted_agents,
                "healthyAgents": status.healthy_agents,
                "failedAgents": status.failed_agents,
            })
        })
        .collect();
    Ok(Json(json!({ "stacks": mine })))
}

/// `DELETE /api/v1/generator/stacks/{name}`: the Stack and the AgentTarget this generator
/// made for it.
async fn delete_stack(
    generator: CallingGenerator,
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let client = client(&state)?;
    let stacks: Api<Stack> = Api::namespaced(client.clone(), &generator.namespace);
    owned_stack(&stacks, &name, &generator).await?;
    let agent_targets: Api<AgentTarget> = Api::namespaced(client, &generator.namespace);
    if let Some(target) = agent_targets.get_opt(&name).await.map_err(kube_error)?
        && managed_by(&target, &generator.field_manager())
    {
        agent_targets
            .delete(&name, &DeleteParams::default())
            .await
            .map_err(kube_error)?;
    }
    stacks
        .delete(&name, &DeleteParams::default())
        .await
        .map_err(kube_error)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"name": name, "deleted": true})),
    )
        .into_response())
}

/// Whether `manager` owns any field of `object`.
fn managed_by<K: kube::Resource>(object: &K, manager: &str) -> bool {
    object
        .meta()
        .managed_fields
        .iter()
        .flatten()
        .any(|entry| entry.manager.as_deref() == Some(manager))
}

async fn owned_stack(
    stacks: &Api<Stack>,
    name: &str,
    generator: &CallingGenerator,
) -> Result<Stack, ApiError> {
    let stack = stacks
        .get_opt(name)
        .await
        .map_err(kube_error)?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no Stack {name:?} in namespace {}",
                generator.namespace
            ))
        })?;
    check_owned(&stack, generator)?;
    Ok(stack)
}

fn check_owned(stack: &Stack, generator: &CallingGenerator) -> Result<(), ApiError> {
    let owner = &stack.spec.generator_ref.name;
    if *owner != generator.name {
        return Err(ApiError::Forbidden(format!(
            "Stack {:?} belongs to Generator {owner:?}, not {:?}",
            stack.name_any(),
            generator.name
        )));
    }
    Ok(())
}

/// A Kubernetes object name: a DNS subdomain (RFC 1123), as Stacks need.
fn check_name(name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .as_bytes()
            .first()
            .zip(name.as_bytes().last())
            .is_some_and(|(first, last)| {
                first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric()
            });
    if valid {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{name:?} is not a valid Stack name: lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit, at most 253 characters"
        )))
    }
}

/// The push's content from a YAML or JSON body.
pub fn parse_push(headers: &HeaderMap, body: &[u8]) -> Result<PushBody, ApiError> {
    if body.len() > PUSH_BODY_LIMIT {
        return Err(ApiError::TooLarge(PUSH_BODY_LIMIT));
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
    match content_type.as_deref() {
        Some("application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml") => {
            let manifests = std::str::from_utf8(body)
                .map_err(|_| ApiError::BadRequest("the YAML body is not UTF-8".into()))?;
            if manifests.trim().is_empty() {
                return Err(ApiError::Unprocessable(
                    "the YAML body holds no manifests".into(),
                ));
            }
            Ok(PushBody {
                manifests: Some(manifests.to_owned()),
                ..PushBody::default()
            })
        }
        Some("application/json") => {
            let push: PushBody = serde_json::from_slice(body).map_err(|err| {
                if err.is_syntax() || err.is_eof() {
                    ApiError::BadRequest(format!("malformed JSON: {err}"))
                } else {
                    ApiError::Unprocessable(err.to_string())
                }
            })?;
            match (&push.manifests, &push.resources) {
                (Some(_), Some(_)) => Err(ApiError::Unprocessable(
                    "set exactly one of manifests or resources, not both".into(),
                )),
                (None, None) => Err(ApiError::Unprocessable(
                    "set exactly one of manifests or resources; neither is set".into(),
                )),
                _ => Ok(push),
            }
        }
        _ => Err(ApiError::UnsupportedMediaType(
            "send the manifests as Content-Type: application/yaml, or a JSON body as \
             application/json"
                .into(),
        )),
    }
}

/// The Stack this push applies: only the fields the generator owns.
fn stack_object(name: &str, generator: &CallingGenerator, push: &PushBody) -> serde_json::Value {
    let mut metadata = json!({"name": name, "namespace": generator.namespace});
    if !push.labels.is_empty() {
        metadata["labels"] = json!(push.labels);
    }
    let mut spec = json!({"generatorRef": {"name": generator.name}});
    if let Some(manifests) = &push.manifests {
        spec["manifests"] = json!(manifests);
    }
    if let Some(resources) = &push.resources {
        spec["resources"] = json!(resources);
    }
    if let Some(description) = &push.description {
        spec["description"] = json!(description);
    }
    if !push.annotations.is_empty() {
        spec["annotations"] = json!(push.annotations);
    }
    if let Some(revision) = push.pinned_revision {
        spec["pinnedRevision"] = json!(revision);
    }
    if let Some(rollout) = &push.rollout {
        spec["rollout"] = json!(rollout);
    }
    json!({
        "apiVersion": brokkr_crds::API_VERSION,
        "kind": "Stack",
        "metadata": metadata,
        "spec": spec,
    })
}

fn agent_target_object(name: &str, targets: &PushTargets) -> serde_json::Value {
    let mut spec = json!({"stackRef": {"name": name}});
    if !targets.agents.is_empty() {
        spec["agents"] = json!(targets.agents);
    }
    if let Some(selector) = &targets.agent_selector {
        spec["agentSelector"] = json!(selector);
    }
    json!({
        "apiVersion": brokkr_crds::API_VERSION,
        "kind": "AgentTarget",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// Whether the operator decided on `generation`'s content: `Ok` when it was recorded
/// (or held back by a suspension), `Err` with the reason when refused; `None` while
/// undecided.
fn accepted_for(stack: &Stack, generation: Option<i64>) -> Option<Result<(), String>> {
    let status: &StackStatus = stack.status.as_ref()?;
    if status.observed_generation < generation {
        return None;
    }
    let accepted = find_condition(&status.conditions, types::ACCEPTED)?;
    if accepted.observed_generation < generation {
        return None;
    }
    if accepted.status == "True" {
        Some(Ok(()))
    } else {
        Some(Err(format!("{}: {}", accepted.reason, accepted.message)))
    }
}

enum Delivery {
    Ready,
    Failed(String),
}

/// Whether every targeted agent is healthy on the current revision, or one failed.
fn delivery(stack: &Stack) -> Option<Delivery> {
    let status = stack.status.as_ref()?;
    if status.observed_generation < stack.metadata.generation {
        return None;
    }
    let condition = |type_| find_condition(&status.conditions, type_);
    if let Some(accepted) = condition(types::ACCEPTED)
        && accepted.status == "False"
    {
        return Some(Delivery::Failed(format!(
            "the content was refused ({}): {}",
            accepted.reason, accepted.message
        )));
    }
    if let Some(degraded) = condition(types::DEGRADED)
        && degraded.status == "True"
    {
        // What the agents said, so the pipeline's log shows why without kubectl.
        let said: Vec<String> = status
            .agents
            .iter()
            .filter(|agent| {
                agent.state == AgentDeployState::Failed || agent.health == AgentHealth::Degraded
            })
            .take(5)
            .map(|agent| {
                format!(
                    "{}: {}",
                    agent.name,
                    agent.message.as_deref().unwrap_or("-")
                )
            })
            .collect();
        return Some(Delivery::Failed(format!(
            "{}: {} ({})",
            degraded.reason,
            degraded.message,
            said.join("; ")
        )));
    }
    let ready = condition(types::READY)?;
    (ready.status == "True" && ready.reason == reasons::ALL_HEALTHY).then_some(Delivery::Ready)
}

/// Reads the Stack until `done` holds or `wait_seconds` pass; the last read comes back
/// (`None` if the Stack is gone).
async fn wait_for(
    stacks: &Api<Stack>,
    name: &str,
    wait_seconds: u64,
    done: impl Fn(&Stack) -> bool,
) -> Result<Option<Stack>, ApiError> {
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(wait_seconds.min(MAX_WAIT_SECONDS));
    loop {
        let stack = stacks.get_opt(name).await.map_err(kube_error)?;
        let finished = stack.as_ref().is_none_or(&done);
        if finished || tokio::time::Instant::now() + WAIT_POLL > deadline {
            return Ok(stack);
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// The API server's refusals are the caller's to fix (4xx, with the server's message,
/// which names the field and manager of a conflict); anything else is a 503.
fn kube_error(err: kube::Error) -> ApiError {
    match err {
        kube::Error::Api(status) => {
            let message = status.message.clone();
            match status.code {
                409 => ApiError::Conflict(format!(
                    "{message} (repeat with ?force=true to take the fields over)"
                )),
                422 | 400 => ApiError::Unprocessable(message),
                404 => ApiError::NotFound(message),
                403 => ApiError::Unavailable(Box::new(kube::Error::Api(status))),
                413 => ApiError::TooLarge(PUSH_BODY_LIMIT),
                _ => ApiError::Unavailable(Box::new(kube::Error::Api(status))),
            }
        }
        other => ApiError::Unavailable(Box::new(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
        headers
    }

    #[test]
    fn yaml_bodies_are_the_manifests_and_json_bodies_say_which() {
        let push = parse_push(&headers("application/yaml; charset=utf-8"), b"a: 1\n").unwrap();
        assert_eq!(push.manifests.as_deref(), Some("a: 1\n"));
        let push = parse_push(
            &headers("application/json"),
            br#"{"resources": [{"apiVersion": "v1", "kind": "ConfigMap"}], "targets": {"agents": ["edge-1"]}}"#,
        )
        .unwrap();
        assert_eq!(push.resources.unwrap().len(), 1);
        assert_eq!(push.targets.unwrap().agents, ["edge-1"]);
    }

    #[test]
    fn bad_bodies_get_the_matching_4xx() {
        let code = |content_type: &str, body: &[u8]| {
            parse_push(&headers(content_type), body)
                .unwrap_err()
                .into_response()
                .status()
        };
        assert_eq!(
            code("text/plain", b"a: 1"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(code("application/json", b"{"), StatusCode::BAD_REQUEST);
        assert_eq!(
            code(
                "application/json",
                br#"{"manifests": "a", "resources": []}"#
            ),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            code("application/json", br#"{}"#),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            code("application/json", br#"{"manifests": "a", "surprise": 1}"#),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            code("application/yaml", b"  \n"),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            code("application/yaml", &[0xff, 0xfe]),
            StatusCode::BAD_REQUEST
        );
        let huge = vec![b'a'; PUSH_BODY_LIMIT + 1];
        assert_eq!(
            code("application/yaml", &huge),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[test]
    fn stack_names_are_dns_subdomains() {
        for good in ["web", "web-1", "a.b", "0"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Web", "-web", "web-", "a/b", "a_b", &"a".repeat(254)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_managers_fit_what_kubernetes_accepts() {
        assert_eq!(field_manager("ci"), "brokkr.io/generator/ci");
        assert_eq!(field_manager(&"g".repeat(253)).len(), MAX_FIELD_MANAGER_LEN);
    }

    #[test]
    fn the_pushed_stack_carries_only_what_the_generator_sets() {
        let generator = CallingGenerator {
            id: Uuid::nil(),
            namespace: "team-a".into(),
            name: "ci".into(),
        };
        let push = PushBody {
            manifests: Some("a: 1".into()),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            ..PushBody::default()
        };
        let stack = stack_object("web", &generator, &push);
        assert_eq!(stack["spec"]["generatorRef"]["name"], "ci");
        assert_eq!(stack["metadata"]["namespace"], "team-a");
        assert_eq!(stack["metadata"]["labels"]["app"], "web");
        assert!(stack["spec"].get("resources").is_none());
        assert!(stack["spec"].get("description").is_none());
        let _: Stack = serde_json::from_value(stack).expect("a valid Stack");
    }
}
