//! `/api/v1/openapi.json`: the agent API described as OpenAPI 3.1, with the bodies'
//! schemas generated from the wire types themselves.

use axum::Json;
use brokkr_crds::wire::{
    ApiError, DeploymentObject, DesiredState, EventBatch, EventBatchResult, Heartbeat,
    HeartbeatAck, RotatedKey,
};
use serde_json::{Map, Value, json};

pub async fn document() -> Json<Value> {
    Json(openapi())
}

fn schema<T: schemars::JsonSchema>() -> Value {
    serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Null)
}

fn body(schema: &str) -> Value {
    json!({"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

/// `ok` plus the error answers every endpoint can give, and `extra` ones.
fn responses(ok: (&str, &str), extra: &[(&str, &str)]) -> Value {
    let mut map = Map::new();
    let mut success = body(ok.1);
    success["description"] = ok.0.into();
    map.insert("200".into(), success);
    let common = [
        ("400", "malformed request"),
        (
            "401",
            "missing, malformed or unknown agent key (`unauthorized`), a revoked key (`key_revoked`) or an expired key (`key_expired`)",
        ),
        (
            "403",
            "the agent is suspended or deleted (`forbidden`), or the key may not call the agent API (`insufficient_scope`)",
        ),
        (
            "429",
            "this agent key, or requests with unknown keys, went over their rate; wait the `Retry-After` header's seconds",
        ),
        ("503", "the hub cannot serve the request now; retry later"),
    ];
    for (code, description) in common.iter().chain(extra) {
        let mut error = body("ApiError");
        error["description"] = (*description).into();
        if *code == "429" {
            error["headers"] = json!({"Retry-After": {
                "description": "Seconds to wait before the next request",
                "schema": {"type": "integer", "minimum": 1}
            }});
        }
        map.insert((*code).into(), error);
    }
    Value::Object(map)
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The generator API's answers: `ok` plus the errors every generator call can give.
fn generator_responses(ok: (&str, Value), extra: &[(&str, &str)]) -> Value {
    let mut map = Map::new();
    map.insert(
        "200".into(),
        json!({"description": ok.0, "content": {"application/json": {"schema": ok.1}}}),
    );
    let common = [
        ("400", "malformed request or Stack name"),
        (
            "401",
            "missing, malformed or unknown key (`unauthorized`), a revoked key (`key_revoked`) or an expired key (`key_expired`)",
        ),
        (
            "403",
            "an agent key (`insufficient_scope`), a suspended generator (`generator_suspended`), a deleted one, or a Stack of another generator (`forbidden`)",
        ),
        (
            "429",
            "this key went over its rate; wait the `Retry-After` header's seconds",
        ),
        ("503", "the hub cannot serve the request now; retry later"),
    ];
    for (code, description) in common.iter().chain(extra) {
        let mut error = body("ApiError");
        error["description"] = (*description).into();
        map.insert((*code).into(), error);
    }
    Value::Object(map)
}

fn openapi() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Brokkr agent API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "What spoke agents use to pull their desired state and report back (`/api/v1/agent/*`, with an agent key), and what CI pipelines use to push Stacks (`/api/v1/generator/*`, with a generator key). Every request carries `Authorization: Bearer <key>`; a key used on the other API is 403 `insufficient_scope`; every error is a JSON ApiError."
        },
        "components": {
            "securitySchemes": {"agentKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "DesiredState": schema::<DesiredState>(),
                "DeploymentObject": schema::<DeploymentObject>(),
                "EventBatch": schema::<EventBatch>(),
                "EventBatchResult": schema::<EventBatchResult>(),
                "Heartbeat": schema::<Heartbeat>(),
                "HeartbeatAck": schema::<HeartbeatAck>(),
                "RotatedKey": schema::<RotatedKey>(),
                "StackPush": schema::<super::generator::PushBody>(),
                "StackAnswer": schema::<super::generator::StackAnswer>(),
                "ApiError": schema::<ApiError>(),
            }
        },
        "security": [{"agentKey": []}],
        "paths": {
            "/api/v1/agent/desired": {"get": {
                "summary": "This agent's desired state; with `since` and `wait`, a long-poll that returns when it changes. A stack whose deployment object is small (its JSON at most 64 KiB by default) and newer than `since` carries it as `object`, so the agent need not fetch it; otherwise the agent fetches `/api/v1/agent/deployment-objects/{id}`",
                "parameters": [
                    {"name": "since", "in": "query", "schema": {"type": "string"}, "description": "The cursor of the last response"},
                    {"name": "wait", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 60}, "description": "Seconds to wait for a change (at most 60)"}
                ],
                "responses": responses(("the desired state", "DesiredState"), &[])
            }},
            "/api/v1/agent/deployment-objects/{id}": {"get": {
                "summary": "A deployment object targeted at this agent",
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}],
                "responses": responses(("the deployment object", "DeploymentObject"),
                    &[("404", "no such deployment object targeted at this agent")])
            }},
            "/api/v1/agent/events": {"post": {
                "summary": "Report a batch of events; a retried event (same id) is stored once",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EventBatch"}}}},
                "responses": responses(("recorded", "EventBatchResult"), &[
                    ("413", "body too large"),
                    ("415", "the body is not JSON"),
                    ("422", "invalid events, or events about objects not targeted at this agent"),
                ])
            }},
            "/api/v1/agent/heartbeat": {"post": {
                "summary": "Tell the hub this agent is alive, and whether it can work: `state: \"Error\"` with a `message` puts the Agent in phase `Error` (`Healthy=False`, reason `AgentError`) until a heartbeat in another state",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Heartbeat"}}}},
                "responses": responses(("recorded", "HeartbeatAck"), &[("415", "the body is not JSON"), ("422", "invalid heartbeat: a NUL character, a version over 64 characters, or a message over 4,096 bytes")])
            }},
            "/api/v1/agent/key": {"post": {
                "summary": "Renew this agent's key: a new key valid for the Agent's `keyPolicy.lifetime`, also written to the hub's Secret `brokkr-agent-<name>`; the key the request was sent with stays valid for `keyPolicy.overlap`, then is refused with `key_revoked`. Agents call it once 2/3 of their key's lifetime has passed (see `HeartbeatAck.key`)",
                "responses": responses(("the new key", "RotatedKey"), &[
                    ("422", "the Agent's keyPolicy is invalid"),
                    ("501", "this hub cannot rotate keys (no Kubernetes client)"),
                ])
            }},
            "/api/v1/generator/stacks": {"get": {
                "summary": "This generator's Stacks, in its namespace, with their revision and ready counts",
                "responses": generator_responses(("the Stacks", json!({"type": "object", "properties": {"stacks": {"type": "array", "items": {"type": "object"}}}})), &[])
            }},
            "/api/v1/generator/stacks/{name}": {
                "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}, "description": "The Stack's name (a DNS subdomain)"}],
                "put": {
                    "summary": "Create or update a Stack of this generator (server-side apply with field manager `brokkr.io/generator/<generator>`); with `targets`, also an AgentTarget of the same name",
                    "parameters": [
                        {"name": "wait", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 600}, "description": "Seconds to wait until the content is recorded (200 with its revision) or refused (422 with the reason); without it the answer is 202"},
                        {"name": "force", "in": "query", "schema": {"type": "boolean"}, "description": "Take over fields another field manager owns instead of answering 409"}
                    ],
                    "requestBody": {"required": true, "content": {
                        "application/yaml": {"schema": {"type": "string", "description": "Multi-document YAML: the Stack's manifests"}},
                        "application/json": {"schema": {"$ref": "#/components/schemas/StackPush"}}
                    }},
                    "responses": generator_responses(("recorded (200), or accepted without waiting (202)", schema_ref("StackAnswer")), &[
                        ("409", "another field manager owns a field this push sets (the message names both); repeat with force=true to take it over"),
                        ("413", "the body is larger than 1 MiB, the content limit of a Stack"),
                        ("415", "the body is neither application/yaml nor application/json"),
                        ("422", "the body or the content is invalid (the message is the parser's, as in the Stack's Accepted=False condition)"),
                    ])
                },
                "get": {
                    "summary": "The Stack's revision, READY n/m, per-agent results (the first 50) and conditions",
                    "parameters": [
                        {"name": "wait", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 600}},
                        {"name": "until", "in": "query", "schema": {"type": "string", "enum": ["ready"]}, "description": "With `wait`: answer once every targeted agent is healthy on the current revision (`outcome: ready`), a failure is reported (422 `delivery_failed`), or the wait runs out (`outcome: waiting`)"}
                    ],
                    "responses": generator_responses(("the Stack", schema_ref("StackAnswer")), &[
                        ("404", "no such Stack in the generator's namespace"),
                        ("422", "`delivery_failed`: an agent failed to apply or reports degraded health, or the content was refused"),
                    ])
                },
                "delete": {
                    "summary": "Delete the Stack (its agents remove what they applied) and the AgentTarget this generator made for it",
                    "responses": generator_responses(("deletion started (202)", json!({"type": "object"})), &[("404", "no such Stack in the generator's namespace")])
                }
            }
        }
    })
}
