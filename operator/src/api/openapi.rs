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

fn openapi() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Brokkr agent API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "What spoke agents use to pull their desired state and report back. Every request carries `Authorization: Bearer <agent key>`; every error is a JSON ApiError."
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
                "ApiError": schema::<ApiError>(),
            }
        },
        "security": [{"agentKey": []}],
        "paths": {
            "/api/v1/agent/desired": {"get": {
                "summary": "This agent's desired state; with `since` and `wait`, a long-poll that returns when it changes",
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
                "summary": "Tell the hub this agent is alive",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Heartbeat"}}}},
                "responses": responses(("recorded", "HeartbeatAck"), &[("415", "the body is not JSON"), ("422", "invalid heartbeat")])
            }},
            "/api/v1/agent/key": {"post": {
                "summary": "Renew this agent's key: a new key valid for the Agent's `keyPolicy.lifetime`, also written to the hub's Secret `brokkr-agent-<name>`; the key the request was sent with stays valid for `keyPolicy.overlap`, then is refused with `key_revoked`. Agents call it once 2/3 of their key's lifetime has passed (see `HeartbeatAck.key`)",
                "responses": responses(("the new key", "RotatedKey"), &[
                    ("422", "the Agent's keyPolicy is invalid"),
                    ("501", "this hub cannot rotate keys (no Kubernetes client)"),
                ])
            }}
        }
    })
}
