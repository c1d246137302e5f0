//! Generator → `generators` row, its API key Secret, and its status.

use std::sync::Arc;
use std::time::Duration;

use brokkr_crds::conditions::{new_condition, reasons, set_condition, types};
use brokkr_crds::{Generator, GeneratorStatus};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use tracing::instrument;

use super::key_secrets::ensure_key_secret;
use super::{Context, Error, Result, resource_uid, with_finalizer, write_status};
use crate::status::now;
use crate::store::GeneratorSync;

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
    format!("brokkr-generator-{}", generator.name_any())
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
    let owner = generator
        .controller_owner_ref(&())
        .ok_or(Error::MissingMetadata("uid"))?;
    let secret = secret_name(&generator);
    if let Some(issued) =
        ensure_key_secret(&secrets, &secret, owner, row.api_key_hash.as_deref()).await?
    {
        ctx.store
            .set_generator_api_key_hash(row.id, &issued.hash)
            .await?;
    }
    let stacks = ctx.store.count_live_stacks(row.id).await?;

    let previous = generator.status.clone().unwrap_or_default();
    let mut conditions = previous.conditions.clone();
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
        api_key: previous.api_key.clone(),
    };
    let api: Api<Generator> = Api::namespaced(ctx.client.clone(), namespace);
    write_status(&api, &*generator, Some(&previous), &status).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
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
