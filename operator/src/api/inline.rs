//! The desired-state answer's body, with small deployment objects inline.
//!
//! After a push, every targeted agent made two requests: the answer, then
//! `GET /deployment-objects/{id}`; at 10,000 agents those requests, not computation, are
//! the cost of a push. So the answer carries each small object that is new to the agent
//! (its sequence above the cursor's), and the agent skips the fetch. Large objects,
//! deletion markers and objects an earlier answer carried are left out: those the agent
//! fetches, or already holds.
//!
//! An object's JSON is the body the fetch answers, serialised once and shared through the
//! [`super::objects::ObjectCache`]: an answer sends those bytes as a chunk of its body,
//! behind the stack's own (small) JSON, instead of serialising or copying the object for
//! every agent, and an object not cached is loaded once for all the answers (and
//! fetches) that want it at once.

use axum::body::Bytes;
use brokkr_crds::wire::DesiredStack;
use futures::future::join_all;
use serde::Serialize;
use tracing::debug;
use uuid::Uuid;

use super::{ApiState, load_object};

/// The JSON of a [`brokkr_crds::wire::DesiredState`] with `cursor` and `stacks`, each small
/// object new since `since` inline, as the chunks of a body: the answer's own bytes, and
/// the shared bytes of each object.
pub(super) async fn desired_body(
    state: &ApiState,
    cursor: &str,
    stacks: &[DesiredStack],
    since: i64,
) -> Vec<Bytes> {
    let max_bytes = state.config.inline_object_max_bytes;
    let objects = join_all(stacks.iter().map(|stack| async move {
        if max_bytes == 0 || stack.deletion || stack.sequence <= since {
            return None;
        }
        object_body(state, stack.deployment_object_id, max_bytes).await
    }))
    .await;
    assemble(cursor, stacks, &objects)
}

/// The shared JSON of object `id` if it is at most `max_bytes` long. `None` when it is
/// larger, or cannot be had now: the agent then fetches it, and hears of any error there.
async fn object_body(state: &ApiState, id: Uuid, max_bytes: usize) -> Option<Bytes> {
    let loaded = state
        .objects
        .get_or_load(id, || load_object(&state.store, id))
        .await;
    match loaded {
        Ok(object) => object
            .map(|object| object.body)
            .filter(|body| body.len() <= max_bytes),
        Err(err) => {
            debug!(deployment_object = %id, error = %err, "could not load a deployment object to inline; the agent fetches it");
            None
        }
    }
}

/// `{"cursor":…,"stacks":[…]}` with `objects[i]` (a serialised `DeploymentObject`) as the
/// `object` of `stacks[i]`: chunks that, concatenated, are the JSON; the objects' chunks
/// are the shared bytes themselves (a reference count, not a copy).
fn assemble(cursor: &str, stacks: &[DesiredStack], objects: &[Option<Bytes>]) -> Vec<Bytes> {
    let mut chunks = Vec::new();
    let mut body = Vec::with_capacity(64 + stacks.len() * 256);
    body.extend_from_slice(b"{\"cursor\":");
    write(&mut body, cursor);
    body.extend_from_slice(b",\"stacks\":[");
    for (at, stack) in stacks.iter().enumerate() {
        if at > 0 {
            body.push(b',');
        }
        write(&mut body, stack);
        if let Some(object) = objects.get(at).and_then(Option::as_ref) {
            // The stack's JSON ends with its closing brace: the object goes in before it.
            body.pop();
            body.extend_from_slice(b",\"object\":");
            chunks.push(Bytes::from(std::mem::take(&mut body)));
            chunks.push(object.clone());
            body.push(b'}');
        }
    }
    body.extend_from_slice(b"]}");
    chunks.push(Bytes::from(body));
    chunks
}

/// The chunks as one response body, with its `Content-Length`.
pub(super) fn into_response(chunks: Vec<Bytes>) -> axum::response::Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    use axum::response::IntoResponse;
    let length: usize = chunks.iter().map(Bytes::len).sum();
    let body = if chunks.len() == 1 {
        axum::body::Body::from(chunks.into_iter().next().unwrap_or_default())
    } else {
        let chunks = chunks.into_iter().map(Ok::<_, std::convert::Infallible>);
        axum::body::Body::from_stream(futures::stream::iter(chunks))
    };
    (
        [
            (CONTENT_TYPE, "application/json".to_owned()),
            (CONTENT_LENGTH, length.to_string()),
        ],
        body,
    )
        .into_response()
}

fn write<T: Serialize + ?Sized>(body: &mut Vec<u8>, value: &T) {
    // Strings, numbers and UUIDs into a `Vec`: nothing here can fail.
    serde_json::to_writer(body, value).expect("the desired state serialises to JSON");
}

#[cfg(test)]
mod tests {
    use brokkr_crds::wire::{DeploymentObject, DesiredState};

    use super::*;

    fn stack(n: u128, deletion: bool) -> DesiredStack {
        DesiredStack {
            stack_id: Uuid::from_u128(n),
            stack_name: format!("ns/app-{n}"),
            deployment_object_id: Uuid::from_u128(100 + n),
            sequence: i64::try_from(n).unwrap(),
            checksum: format!("sum-{n}"),
            deletion,
            object: None,
        }
    }

    #[test]
    fn spliced_objects_read_back_as_the_stacks_objects() {
        let stacks = vec![stack(1, false), stack(2, false), stack(3, true)];
        let object = DeploymentObject {
            id: stacks[1].deployment_object_id,
            stack_id: stacks[1].stack_id,
            sequence: 2,
            checksum: "sum-2".into(),
            deletion: false,
            yaml: "kind: ConfigMap\ndata:\n  quote: \"\\\"}]\"\n".into(),
        };
        let shared = Bytes::from(serde_json::to_vec(&object).unwrap());
        let chunks = assemble(
            "2.0123456789abcdef",
            &stacks,
            &[None, Some(shared.clone()), None],
        );
        assert!(
            chunks.iter().any(|c| c.as_ptr() == shared.as_ptr()),
            "the object is sent from the shared bytes, not a copy"
        );
        let answer: DesiredState = serde_json::from_slice(&chunks.concat()).unwrap();
        let mut expected = stacks.clone();
        expected[1].object = Some(object);
        assert_eq!(
            answer,
            DesiredState {
                cursor: "2.0123456789abcdef".into(),
                stacks: expected,
            }
        );
        let empty: DesiredState =
            serde_json::from_slice(&assemble("0.x\"", &[], &[]).concat()).unwrap();
        assert_eq!(empty.cursor, "0.x\"");
        assert!(empty.stacks.is_empty());
    }
}
