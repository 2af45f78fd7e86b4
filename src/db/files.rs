//! Uploaded datasets: who owns them, their name, size and sha256.

use serde::Serialize;

use super::{Db, Result};

#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct FileRow {
    pub id: String,
    #[serde(skip)]
    pub owner: Option<String>,
    pub filename: Option<String>,
    pub bytes: i64,
    pub sha256: String,
    pub created_at: String,
}

impl Db {
    pub async fn insert_file(&self, row: &FileRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO files (id, owner, filename, bytes, sha256, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.id)
        .bind(&row.owner)
        .bind(&row.filename)
        .bind(row.bytes)
        .bind(&row.sha256)
        .bind(&row.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_file(&self, id: &str, owner: Option<&str>) -> Result<Option<FileRow>> {
        Ok(sqlx::query_as(
            "SELECT id, owner, filename, bytes, sha256, created_at FROM files WHERE id = ? AND (? IS NULL OR owner = ?)",
        )
        .bind(id)
        .bind(owner)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?)
    }
}
