use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, Set,
    TransactionTrait,
};
use uuid::Uuid;

use super::{Store, StoreResult, check_len, limits};
use crate::entity::{generators, stacks};

/// A Generator resource as the database keeps it.
#[derive(Clone, Debug)]
pub struct GeneratorSync<'a> {
    /// `metadata.uid` of the Generator resource.
    pub resource_uid: Uuid,
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub is_active: bool,
}

impl Store {
    /// Creates or updates the generator row of a Generator resource, keyed by its
    /// `metadata.uid`. A live row of the same name left by an earlier resource (which
    /// Kubernetes no longer has, since names are unique) is soft-deleted first, so the
    /// new resource never adopts its rows.
    pub async fn upsert_generator(
        &self,
        input: &GeneratorSync<'_>,
    ) -> StoreResult<generators::Model> {
        check_len("generator name", input.name, limits::NAME)?;
        let txn = self.db.begin().await?;
        let existing = generators::Entity::find()
            .filter(generators::Column::ResourceUid.eq(input.resource_uid))
            .filter(generators::Column::DeletedAt.is_null())
            .one(&txn)
            .await?;
        let model = match existing {
            Some(row)
                if row.name == input.name
                    && row.description.as_deref() == input.description
                    && row.is_active == input.is_active =>
            {
                row
            }
            Some(row) => {
                let mut active: generators::ActiveModel = row.into();
                active.name = Set(input.name.to_owned());
                active.description = Set(input.description.map(str::to_owned));
                active.is_active = Set(input.is_active);
                active.update(&txn).await?
            }
            None => {
                generators::Entity::update_many()
                    .col_expr(generators::Column::DeletedAt, Expr::current_timestamp())
                    .filter(generators::Column::Name.eq(input.name))
                    .filter(generators::Column::DeletedAt.is_null())
                    .exec(&txn)
                    .await?;
                generators::ActiveModel {
                    id: Set(Uuid::now_v7()),
                    name: Set(input.name.to_owned()),
                    description: Set(input.description.map(str::to_owned)),
                    is_active: Set(input.is_active),
                    resource_uid: Set(Some(input.resource_uid)),
                    ..Default::default()
                }
                .insert(&txn)
                .await?
            }
        };
        txn.commit().await?;
        Ok(model)
    }

    pub async fn find_live_generator_by_resource(
        &self,
        resource_uid: Uuid,
    ) -> StoreResult<Option<generators::Model>> {
        Ok(generators::Entity::find()
            .filter(generators::Column::ResourceUid.eq(resource_uid))
            .filter(generators::Column::DeletedAt.is_null())
            .one(&self.db)
            .await?)
    }

    /// Number of live stacks made by a generator.
    pub async fn count_live_stacks(&self, generator_id: Uuid) -> StoreResult<u64> {
        Ok(stacks::Entity::find()
            .filter(stacks::Column::GeneratorId.eq(generator_id))
            .filter(stacks::Column::DeletedAt.is_null())
            .count(&self.db)
            .await?)
    }

    /// Soft-deletes a generator; its stacks and their deployment objects follow
    /// (database triggers). Returns false when it was already deleted or never existed.
    pub async fn soft_delete_generator(&self, generator_id: Uuid) -> StoreResult<bool> {
        soft_delete(&self.db, generator_id).await
    }

    /// Removes a generator and everything it created, history included.
    #[cfg(any(test, feature = "testing"))]
    pub async fn hard_delete_generator(&self, generator_id: Uuid) -> StoreResult<bool> {
        let txn = self.db.begin().await?;
        let deleted = generators::Entity::delete_by_id(generator_id)
            .exec(&txn)
            .await?
            .rows_affected;
        txn.commit().await?;
        Ok(deleted > 0)
    }
}

async fn soft_delete(db: &impl ConnectionTrait, generator_id: Uuid) -> StoreResult<bool> {
    let updated = generators::Entity::update_many()
        .col_expr(generators::Column::DeletedAt, Expr::current_timestamp())
        .filter(generators::Column::Id.eq(generator_id))
        .filter(generators::Column::DeletedAt.is_null())
        .exec(db)
        .await?;
    Ok(updated.rows_affected > 0)
}
