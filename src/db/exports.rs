//! A job's exports as stored (which export id holds the newest of each format, its size and
//! sha256), and what an owner stores in all: the sum that the stored-bytes quota bounds.

use super::{now, Db, Result};
use crate::job::JobId;

/// An export recorded once the store confirmed it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExportRow {
    pub format: String,
    /// The folder of this export under the job's `exports/` (each export has its own).
    pub export_id: String,
    pub bytes: i64,
    pub sha256: String,
}

/// What recording an export did.
pub(crate) enum RecordedExport {
    /// Recorded; the export it replaced (its files are no longer referred to), if any.
    Recorded { replaced: Option<String> },
    /// The owner's stored bytes would pass the quota: nothing recorded.
    OverQuota,
}

/// What an owner stores, in bytes: uploads, checkpoints and exports of jobs whose artifacts
/// retention has not removed, and adapters brought from outside. Four `?` parameters, each the
/// owner.
const STORED_BY_OWNER: &str = "(
    (SELECT COALESCE(SUM(bytes), 0) FROM files WHERE owner IS NOT DISTINCT FROM ?)
  + (SELECT COALESCE(SUM(c.bytes), 0) FROM checkpoints c JOIN jobs j ON j.id = c.job_id
     WHERE j.owner IS NOT DISTINCT FROM ? AND j.artifacts_removed_at IS NULL)
  + (SELECT COALESCE(SUM(e.bytes), 0) FROM exports e JOIN jobs j ON j.id = e.job_id
     WHERE j.owner IS NOT DISTINCT FROM ? AND j.artifacts_removed_at IS NULL)
  + (SELECT COALESCE(SUM(bytes), 0) FROM adapters WHERE owner IS NOT DISTINCT FROM ?))";

/// `sql` with `{stored}` replaced by the owner's stored bytes.
pub(super) fn with_stored_bytes(sql: &str) -> String {
    sql.replace("{stored}", STORED_BY_OWNER)
}

/// A quota in bytes as the statements bind it: -1 for none.
pub(super) fn quota_param(quota: Option<u64>) -> i64 {
    quota.map_or(-1, |q| q.min(i64::MAX as u64) as i64)
}

impl Db {
    /// What `owner` stores now, in bytes (PostgreSQL's SUM of bigints is numeric: cast back).
    pub(crate) async fn stored_bytes(&self, owner: Option<&str>) -> Result<u64> {
        let (n,): (i64,) =
            sqlx::query_as(&self.sql(&with_stored_bytes("SELECT CAST({stored} AS BIGINT)")))
                .bind(owner)
                .bind(owner)
                .bind(owner)
                .bind(owner)
                .fetch_one(&self.pool)
                .await?;
        Ok(n.max(0) as u64)
    }

    /// Records `export` as the newest of its format for `job`, unless the owner's stored bytes
    /// (less the export it replaces) would then pass `quota` bytes. Counted and written under
    /// the owner's lock, as uploads are.
    pub(crate) async fn record_export(
        &self,
        job: &JobId,
        owner: Option<&str>,
        export: &ExportRow,
        quota: Option<u64>,
    ) -> Result<RecordedExport> {
        let mut tx = self.begin_owner_write(owner).await?;
        let previous: Option<(String, i64)> = sqlx::query_as(
            &self.sql("SELECT export_id, bytes FROM exports WHERE job_id = ? AND format = ?"),
        )
        .bind(job.as_str())
        .bind(&export.format)
        .fetch_optional(&mut *tx)
        .await?;
        let freed = previous.as_ref().map_or(0, |(_, b)| *b);
        let (fits,): (i64,) = sqlx::query_as(&self.sql(&with_stored_bytes(
            "SELECT CASE WHEN ? < 0 OR {stored} - ? + ? <= ? THEN 1 ELSE 0 END",
        )))
        .bind(quota_param(quota))
        .bind(owner)
        .bind(owner)
        .bind(owner)
        .bind(owner)
        .bind(freed)
        .bind(export.bytes)
        .bind(quota_param(quota))
        .fetch_one(&mut *tx)
        .await?;
        if fits == 0 {
            tx.rollback().await?;
            return Ok(RecordedExport::OverQuota);
        }
        sqlx::query(&self.sql(
            "INSERT INTO exports (job_id, format, export_id, bytes, sha256, created_at)
             VALUES (?, ?, ?, ?, ?, ?::timestamptz)
             ON CONFLICT (job_id, format) DO UPDATE SET export_id = excluded.export_id,
                 bytes = excluded.bytes, sha256 = excluded.sha256, created_at = excluded.created_at",
        ))
        .bind(job.as_str())
        .bind(&export.format)
        .bind(&export.export_id)
        .bind(export.bytes)
        .bind(&export.sha256)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RecordedExport::Recorded {
            replaced: previous.map(|(id, _)| id),
        })
    }

    /// The newest recorded export of `format` of `job`.
    pub async fn get_export(&self, job: &JobId, format: &str) -> Result<Option<ExportRow>> {
        Ok(sqlx::query_as(&self.sql(
            "SELECT format, export_id, bytes, sha256 FROM exports WHERE job_id = ? AND format = ?",
        ))
        .bind(job.as_str())
        .bind(format)
        .fetch_optional(&self.pool)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::JobSpec;

    /// Exports of different owners recorded at once all land: on SQLite each record reads the
    /// owner's sum before it writes, and a transaction that read first could not take the write
    /// lock after another had written (it failed at once with "database is locked").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_on_sqlite_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let db = Db::connect(&url, 8).await.unwrap();
        let spec = JobSpec::from_json(r#"{"base_model":"m","dataset":{"url":"d.jsonl"}}"#).unwrap();
        let mut jobs = Vec::new();
        for n in 0..8 {
            let id = JobId::new();
            let owner = format!("key-{n}");
            db.insert_job(&id, Some(&owner), &spec, None).await.unwrap();
            jobs.push((id, owner));
        }
        let mut tasks = Vec::new();
        for (id, owner) in jobs.clone() {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                for round in 0..10 {
                    let export = ExportRow {
                        format: "merged".into(),
                        export_id: format!("{round:016x}"),
                        bytes: 100,
                        sha256: "0".repeat(64),
                    };
                    let recorded = db.record_export(&id, Some(&owner), &export, Some(1 << 20));
                    match recorded.await {
                        Ok(RecordedExport::Recorded { .. }) => {}
                        Ok(RecordedExport::OverQuota) => panic!("over a quota of 1 MiB"),
                        Err(e) => panic!("round {round} of {owner}: {e}"),
                    }
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        for (id, _) in &jobs {
            let row = db.get_export(id, "merged").await.unwrap().unwrap();
            assert_eq!(row.export_id, format!("{:016x}", 9));
        }
    }
}
