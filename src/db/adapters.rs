//! The `adapters` table: PEFT adapters brought from outside, each an owner's by name.

use super::exports::{quota_param, with_stored_bytes};
use super::{Db, Result};

/// An adapter as recorded once its files are stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AdapterRow {
    pub id: String,
    pub owner: Option<String>,
    pub name: String,
    pub base_model: String,
    pub bytes: i64,
    pub sha256: String,
    pub created_at: String,
}

const ADAPTER_COLUMNS: [&str; 7] = [
    "id",
    "owner",
    "name",
    "base_model",
    "bytes",
    "sha256",
    "created_at",
];

/// What recording an adapter did.
pub(crate) enum RecordedAdapter {
    Recorded,
    /// The owner has an adapter of that name already.
    NameTaken,
    /// The owner's stored bytes would pass the quota.
    OverQuota,
}

impl Db {
    /// Records `row`, unless its owner has an adapter of that name or its stored bytes would
    /// then pass `quota` (read and written under the owner's lock, as uploads are).
    pub(crate) async fn insert_adapter(
        &self,
        row: &AdapterRow,
        quota: Option<u64>,
    ) -> Result<RecordedAdapter> {
        let mut tx = self.begin_owner_write(row.owner.as_deref()).await?;
        let taken: Option<(String,)> = sqlx::query_as(
            &self.sql("SELECT id FROM adapters WHERE owner IS NOT DISTINCT FROM ? AND name = ?"),
        )
        .bind(&row.owner)
        .bind(&row.name)
        .fetch_optional(&mut *tx)
        .await?;
        if taken.is_some() {
            tx.rollback().await?;
            return Ok(RecordedAdapter::NameTaken);
        }
        let done = sqlx::query(&self.sql(&with_stored_bytes(
            "INSERT INTO adapters (id, owner, name, base_model, bytes, sha256, created_at)
             SELECT ?, ?, ?, ?, ?, ?, ?::timestamptz
             WHERE ? < 0 OR {stored} + ? <= ?",
        )))
        .bind(&row.id)
        .bind(&row.owner)
        .bind(&row.name)
        .bind(&row.base_model)
        .bind(row.bytes)
        .bind(&row.sha256)
        .bind(&row.created_at)
        .bind(quota_param(quota))
        .bind(&row.owner)
        .bind(&row.owner)
        .bind(&row.owner)
        .bind(&row.owner)
        .bind(row.bytes)
        .bind(quota_param(quota))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(if done.rows_affected() == 1 {
            RecordedAdapter::Recorded
        } else {
            RecordedAdapter::OverQuota
        })
    }

    /// `owner`'s adapter called `name`.
    pub async fn get_adapter(&self, owner: Option<&str>, name: &str) -> Result<Option<AdapterRow>> {
        Ok(sqlx::query_as(&self.sql(&format!(
            "SELECT {} FROM adapters WHERE owner IS NOT DISTINCT FROM ? AND name = ?",
            self.columns(&ADAPTER_COLUMNS)
        )))
        .bind(owner)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// `owner`'s adapters, newest first (at most `limit`).
    pub async fn list_adapters(&self, owner: Option<&str>, limit: i64) -> Result<Vec<AdapterRow>> {
        Ok(sqlx::query_as(&self.sql(&format!(
            "SELECT {} FROM adapters WHERE owner IS NOT DISTINCT FROM ?
             ORDER BY adapters.created_at DESC, id DESC LIMIT ?",
            self.columns(&ADAPTER_COLUMNS)
        )))
        .bind(owner)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Removes `owner`'s adapter `name`; the row removed, if there was one.
    pub async fn delete_adapter(
        &self,
        owner: Option<&str>,
        name: &str,
    ) -> Result<Option<AdapterRow>> {
        let Some(row) = self.get_adapter(owner, name).await? else {
            return Ok(None);
        };
        let done = sqlx::query(&self.sql("DELETE FROM adapters WHERE id = ?"))
            .bind(&row.id)
            .execute(&self.pool)
            .await?;
        Ok((done.rows_affected() == 1).then_some(row))
    }
}
