//! The `workers` table (each worker's device and memory, rewritten while it runs) and
//! `job_memory` (a job's estimated peak, which claims compare with their free memory).

use super::{in_seconds, now, Db, Lease, Result};

/// A worker as it last reported itself.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct WorkerRow {
    pub id: String,
    pub device: String,
    pub total_bytes: i64,
    pub free_bytes: i64,
    pub gflops: Option<f64>,
    pub(crate) seen_at: String,
}

/// Seconds after its last report that a worker still counts as part of the pool (workers
/// report at least every [`crate::worker`]'s report interval, training or not).
pub(crate) const WORKER_SEEN_SECS: i64 = 120;

impl Db {
    /// Records what `worker` has now (a new row or its row rewritten).
    pub async fn report_worker(
        &self,
        worker: &str,
        device: &str,
        total_bytes: u64,
        free_bytes: u64,
        gflops: Option<f64>,
    ) -> Result<()> {
        // NULL written as such, not bound: sqlx's Any driver binds a missing f64 as a float4
        // NULL, and PostgreSQL's cached statement then refuses the 8-byte value of a later
        // report ("incorrect binary data format in bind parameter 5")
        let gflops_value = if gflops.is_some() { "?" } else { "NULL" };
        let sql = self.sql(&format!(
            "INSERT INTO workers (id, device, total_bytes, free_bytes, gflops, seen_at)
             VALUES (?, ?, ?, ?, {gflops_value}, ?::timestamptz)
             ON CONFLICT (id) DO UPDATE SET device = excluded.device,
                 total_bytes = excluded.total_bytes, free_bytes = excluded.free_bytes,
                 gflops = excluded.gflops, seen_at = excluded.seen_at"
        ));
        let mut query = sqlx::query(&sql)
            .bind(worker)
            .bind(device)
            .bind(clamp(total_bytes))
            .bind(clamp(free_bytes));
        if let Some(g) = gflops {
            query = query.bind(g);
        }
        query.bind(now()).execute(&self.pool).await?;
        Ok(())
    }

    /// A worker leaving the pool (shutdown).
    pub async fn remove_worker(&self, worker: &str) -> Result<()> {
        sqlx::query(&self.sql("DELETE FROM workers WHERE id = ?"))
            .bind(worker)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The workers that reported within [`WORKER_SEEN_SECS`], largest device first.
    pub async fn live_workers(&self) -> Result<Vec<WorkerRow>> {
        Ok(sqlx::query_as(&self.sql(&format!(
            "SELECT id, device, total_bytes, free_bytes, gflops, {}
             FROM workers WHERE seen_at >= ?::timestamptz ORDER BY total_bytes DESC, id",
            self.time("seen_at")
        )))
        .bind(in_seconds(-WORKER_SEEN_SECS))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Jobs per status, and running jobs and free memory per live worker, for `/metrics`.
    pub async fn queue_snapshot(&self) -> Result<crate::metrics::QueueSnapshot> {
        let jobs: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status")
                .fetch_all(&self.pool)
                .await?;
        let running: Vec<(String, i64)> = sqlx::query_as(
            "SELECT worker, COUNT(*) FROM jobs
             WHERE status = 'running' AND worker IS NOT NULL GROUP BY worker",
        )
        .fetch_all(&self.pool)
        .await?;
        let live = self.live_workers().await?;
        let running_per_worker = live
            .iter()
            .map(|w| {
                let n = running
                    .iter()
                    .find(|(id, _)| *id == w.id)
                    .map_or(0, |r| r.1);
                (w.id.clone(), n)
            })
            .collect();
        Ok(crate::metrics::QueueSnapshot {
            jobs,
            running_per_worker,
            free_bytes_per_worker: live.into_iter().map(|w| (w.id, w.free_bytes)).collect(),
        })
    }

    /// Removes the rows of workers that stopped reporting (killed without a shutdown).
    pub(crate) async fn forget_silent_workers(&self) -> Result<()> {
        sqlx::query(&self.sql("DELETE FROM workers WHERE seen_at < ?::timestamptz"))
            .bind(in_seconds(-WORKER_SEEN_SECS))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a job's estimated peak memory, fenced by the lease of the worker that read it.
    pub async fn set_job_memory(&self, lease: &Lease, peak_bytes: u64) -> Result<()> {
        let done = sqlx::query(&self.sql(&format!(
            "INSERT INTO job_memory (job_id, peak_bytes)
             SELECT ?, ? WHERE EXISTS (SELECT 1 FROM jobs WHERE {})
             ON CONFLICT (job_id) DO UPDATE SET peak_bytes = excluded.peak_bytes",
            super::jobs::FENCE
        )))
        .bind(lease.job.as_str())
        .bind(clamp(peak_bytes))
        .bind(lease.job.as_str())
        .bind(lease.attempt)
        .execute(&self.pool)
        .await?;
        lease.check(done.rows_affected())
    }
}

fn clamp(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}
