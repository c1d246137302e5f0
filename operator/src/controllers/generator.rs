//! Generator → `generators` row, its API key Secret, and its status.

use std::sync::Arc;
use std::time::Duration;

use brokkr_crds::conditions::{new_condition, reasons, set_condition, types};
use brokkr_crds::{Generator, GeneratorStatus, KeyStatus, REVOKE_KEY_ANNOTATION};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use tracing::instrument;

use super::key_secrets::{KeyStep, generator_secret_name, reconcile_key, revoke_requested_by};
use super::{Context, Error, Result, resource_uid, with_finalizer, write_status};
use crate::status::{now, whole_seconds};
use crate::store::audit::AuditResource;
use crate::store::{GeneratorSync, KeyOwner};

#[instrument(skip_all, fields(generator = %generator.name_any(), namespace = generator.namespace().unwrap_or_default()))]
pub async fn reconcile(generator: Arc<Generator>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = generator
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<Generator> = Api::namespaced(ctx.client.clone(), &namespace);
    with_finalizer(
        &ctx,
        "generator",
        api,
        generator,
        |generator| apply(generator, &ctx, &namespace),
        |generator| cleanup(generator, &ctx),
    )
    .await
}

pub fn secret_name(generator: &Generator) -> String {
    generator_secret_name(&generator.name_any())
}

async fn apply(generator: Arc<Generator>, ctx: &Context, namespace: &str) -> Result<Action> {
    let name = format!("{namespace}/{}", generator.name_any());
    let row = ctx
        .store
        .upsert_generator(&GeneratorSync {
            resource_uid: resource_uid(&*generator)?,
            name: &name,
            description: generator.spec.description.as_deref(),
            is_active: !generator.spec.suspend,
        })
        .await?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let owner_ref = generator
        .controller_owner_ref(&())
        .ok_or(Error::MissingMetadata("uid"))?;
    let short_name = generator.name_any();
    let secret = secret_name(&generator);
    let policy = generator.spec.key_policy();
    let lifetime = policy
        .validate()
        .and_then(|()| policy.lifetime())
        .unwrap_or(brokkr_crds::access::DEFAULT_KEY_LIFETIME);
    let api: Api<Generator> = Api::namespaced(ctx.client.clone(), namespace);
    let previous = generator.status.clone().unwrap_or_default();
    let key = reconcile_key(
        ctx,
        KeyStep {
            api: &api,
            object: &*generator,
            previous_conditions: &previous.conditions,
            recover: format!(
                "to recover, run `kubectl annotate generator -n {namespace} {short_name} {REVOKE_KEY_ANNOTATION}=now` and use the new key from Secret {secret}"
            ),
            revoked_note: "",
            secrets: &secrets,
            secret_namespace: namespace,
            secret: &secret,
            owner_ref,
            owner: KeyOwner::Generator(row.id),
            lifetime,
            revoke_requested_by: revoke_requested_by(&generator.metadata),
            resource: AuditResource {
                kind: "Generator",
                namespace: Some(namespace.to_owned()),
                name: short_name.clone(),
                id: Some(row.id),
            },
        },
    )
    .await?;
    let stacks = ctx.store.count_live_stacks(row.id).await?;

    let mut conditions = previous.conditions.clone();
    set_condition(&mut conditions, key.condition);
    let ready = if generator.spec.suspend {
        new_condition(
            types::READY,
            true,
            reasons::SUSPENDED,
            "registered and suspended: its Stacks keep their last recorded content",
            generator.metadata.generation,
            now(),
        )
    } else {
        new_condition(
            types::READY,
            true,
            reasons::RECONCILED,
            format!("registered; API key in Secret {secret}"),
            generator.metadata.generation,
            now(),
        )
    };
    set_condition(&mut conditions, ready);
    let status = GeneratorStatus {
        observed_generation: generator.metadata.generation,
        conditions,
        generator_id: Some(row.id.to_string()),
        stacks: i32::try_from(stacks).unwrap_or(i32::MAX),
        active: row.is_active,
        api_key_secret: Some(secret),
        api_key: Some(KeyStatus {
            issued_at: key.status.issued_at.map(whole_seconds),
            expires_at: key.status.expires_at.map(whole_seconds),
            last_used_at: key.status.last_used_at.map(whole_seconds),
            ..key.status
        }),
        last_active_at: row
            .last_active_at
            .and_then(crate::status::to_time)
            .map(whole_seconds),
    };
    write_status(&api, &*generator, Some(&previous), &status).await?;
    let refresh = Duration::from_secs(300);
    Ok(Action::requeue(
        key.recheck.map_or(refresh, |wait| wait.min(refresh)),
    ))
}

async fn cleanup(generator: Arc<Generator>, ctx: &Context) -> Result<Action> {
    // Its Stacks go through Kubernetes' garbage collector (owner references) and their
    // own finalizers; here the generator's rows are retired.
    if let Some(row) = ctx
        .store
        .find_live_generator_by_resource(resource_uid(&*generator)?)
        .await?
    {
        ctx.store.soft_delete_generator(row.id).await?;
    }
    Ok(Action::await_change())
}
