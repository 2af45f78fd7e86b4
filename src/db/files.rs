//! Uploaded datasets: who owns them, their name, size and sha256.

use serde::Serialize;

use super::exports::{quota_param, with_stored_bytes};
use super::{Db, Result};
use crate::job::FileStatus;

#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub(crate) struct FileRow {
    pub id: String,
    #[serde(skip)]
    pub owner: Option<String>,
    pub filename: Option<String>,
    pub bytes: i64,
    pub sha256: String,
    pub created_at: String,
    /// What the file is for (OpenAI's `purpose`): `fine-tune` for datasets.
    pub purpose: String,
    #[sqlx(try_from = "String")]
    pub status: FileStatus,
    /// Why the check failed, when `status` is `error`.
    pub(crate) status_details: Option<String>,
}

const FILE_COLUMNS: [&str; 9] = [
    "id",
    "owner",
    "filename",
    "bytes",
    "sha256",
    "created_at",
    "purpose",
    "status",
    "status_details",
];

/// The order of a list of files, by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    Newest,
    Oldest,
}

impl Db {
    /// Records an upload, unless its owner's stored bytes (uploads, checkpoints, exports) would
    /// then pass `quota` bytes (`None`: no quota): `false` when refused. The sum is read and the
    /// row written under the owner's lock ([`Db::begin_owner_write`]), so concurrent uploads
    /// cannot all pass the quota.
    pub(crate) async fn insert_file(&self, row: &FileRow, quota: Option<u64>) -> Result<bool> {
        let mut tx = self.begin_owner_write(row.owner.as_deref()).await?;
        let done = sqlx::query(&self.sql(&with_stored_bytes(
            "INSERT INTO files (id, owner, filename, bytes, sha256, created_at, purpose, status)
             SELECT ?, ?, ?, ?, ?, ?::timestamptz, ?, ?
             WHERE ? < 0 OR {stored} + ? <= ?",
        )))
        .bind(&row.id)
        .bind(&row.owner)
        .bind(&row.filename)
        .bind(row.bytes)
        .bind(&row.sha256)
        .bind(&row.created_at)
        .bind(&row.purpose)
        .bind(row.status.as_str())
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
        Ok(done.rows_affected() == 1)
    }

    /// The caller's uploads in `order`, after the file `after` (a page's last), of `purpose`
    /// when given; one more than `limit` tells whether more exist.
    pub(crate) async fn list_files(
        &self,
        owner: Option<&str>,
        purpose: Option<&str>,
        order: Order,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<FileRow>> {
        let (cmp, dir) = match order {
            Order::Newest => ("<", "DESC"),
            Order::Oldest => (">", "ASC"),
        };
        Ok(sqlx::query_as(&self.sql(&format!(
            "SELECT {} FROM files
             WHERE (? IS NULL OR owner = ?) AND (? IS NULL OR purpose = ?)
               AND (? IS NULL OR (files.created_at, files.id) {cmp}
                    (SELECT a.created_at, a.id FROM files a WHERE a.id = ?))
             ORDER BY files.created_at {dir}, id {dir} LIMIT ?",
            self.columns(&FILE_COLUMNS)
        )))
        .bind(owner)
        .bind(owner)
        .bind(purpose)
        .bind(purpose)
        .bind(after)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records the outcome of checking a file as training data.
    pub(crate) async fn set_file_status(
        &self,
        id: &str,
        status: FileStatus,
        details: Option<&str>,
    ) -> Result<()> {
        sqlx::query(&self.sql("UPDATE files SET status = ?, status_details = ? WHERE id = ?"))
            .bind(status.as_str())
            .bind(details)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Removes an upload's record; whether there was one the caller may see.
    pub(crate) async fn delete_file(&self, id: &str, owner: Option<&str>) -> Result<bool> {
        let done =
            sqlx::query(&self.sql("DELETE FROM files WHERE id = ? AND (? IS NULL OR owner = ?)"))
                .bind(id)
                .bind(owner)
                .bind(owner)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether any job or file belongs to an API key.
    pub(crate) async fn holds_owned_data(&self) -> Result<bool> {
        let (owned,): (i64,) = sqlx::query_as(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM jobs WHERE owner IS NOT NULL)
                 OR EXISTS (SELECT 1 FROM files WHERE owner IS NOT NULL) THEN 1 ELSE 0 END",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(owned != 0)
    }

    pub(crate) async fn get_file(&self, id: &str, owner: Option<&str>) -> Result<Option<FileRow>> {
        Ok(sqlx::query_as(&self.sql(&format!(
            "SELECT {} FROM files WHERE id = ? AND (? IS NULL OR owner = ?)",
            self.columns(&FILE_COLUMNS)
        )))
        .bind(id)
        .bind(owner)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?)
    }
}
