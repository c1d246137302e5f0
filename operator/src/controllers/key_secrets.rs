//! The Secrets that hold agent and generator keys. The plain key lives only there;
//! the database keeps its hash.

use std::collections::BTreeMap;

use brokkr_crds::OPERATOR_FIELD_MANAGER;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams};

use super::Result;
use crate::keys::{IssuedKey, issue_key, key_matches};

/// Data key of the Secret entry holding a key.
pub const SECRET_KEY: &str = "pak";

/// Makes sure Secret `name` holds a key whose hash is `stored_hash`. When it does not
/// (first reconcile, Secret deleted, database restored), a new key is issued and
/// written, and returned so the caller records its hash.
pub async fn ensure_key_secret(
    api: &Api<Secret>,
    name: &str,
    owner: OwnerReference,
    stored_hash: Option<&str>,
) -> Result<Option<IssuedKey>> {
    if let (Some(hash), Some(secret)) = (stored_hash, api.get_opt(name).await?) {
        let current = secret
            .data
            .as_ref()
            .and_then(|data| data.get(SECRET_KEY))
            .and_then(|value| std::str::from_utf8(&value.0).ok())
            .map(str::to_owned);
        if current.is_some_and(|key| key_matches(&key, hash)) {
            return Ok(None);
        }
    }
    let issued = issue_key();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            owner_references: Some(vec![owner]),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "brokkr".to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            SECRET_KEY.to_owned(),
            ByteString(issued.key.clone().into_bytes()),
        )])),
        ..Default::default()
    };
    let mut patch = serde_json::to_value(&secret).unwrap_or_default();
    patch["apiVersion"] = "v1".into();
    patch["kind"] = "Secret".into();
    api.patch(
        name,
        &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(Some(issued))
}
