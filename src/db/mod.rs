//! Storage: one SQLite file in the data dir, through sqlx. All SQL lives in this module.
//!
//! The job queue is the `jobs` table: a worker claims the oldest queued job (or one whose lease
//! expired) with a single `UPDATE … RETURNING`, which SQLite runs atomically, and every later
//! write of that worker is fenced by the `attempt` it claimed.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

pub type Result<T> = std::result::Result<T, sqlx::Error>;

#[derive(Clone)]
pub struct Db {
    pool: SqlitePool,
}

/// RFC 3339 UTC time with a fixed six-digit fraction, so that text order is time order (the
/// lease and list queries compare these strings).
const TIME_FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
);

fn format_time(t: time::OffsetDateTime) -> String {
    t.format(TIME_FORMAT).expect("any UTC time formats")
}

pub fn now() -> String {
    format_time(time::OffsetDateTime::now_utc())
}

pub fn in_seconds(secs: i64) -> String {
    format_time(time::OffsetDateTime::now_utc() + time::Duration::seconds(secs))
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct JobRow {
    pub seq: i64,
    pub id: String,
    pub owner: Option<String>,
    pub status: String,
    pub phase: Option<String>,
    pub spec: String,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub step: i64,
    pub total_steps: Option<i64>,
    pub epoch: Option<f64>,
    pub tokens_seen: i64,
    pub elapsed_seconds: Option<f64>,
    pub train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub cancel_requested: i64,
    pub attempt: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub kind: String,
    pub data: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CheckpointRow {
    pub step: i64,
    pub created_at: String,
    pub files: String,
}

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

/// What a cancel request did.
pub enum CancelOutcome {
    /// A queued job, cancelled at once.
    Cancelled,
    /// A running job, flagged: the worker stops it at its next step.
    Requested,
    /// Already cancelled (cancel is idempotent).
    AlreadyCancelled,
    /// Succeeded or failed: nothing to cancel.
    Finished(String),
    NotFound,
}

/// A claimed job.
pub struct Claim {
    pub id: String,
    pub spec: String,
    pub attempt: i64,
}

const JOB_COLUMNS: &str = "seq, id, owner, status, phase, spec, created_at, started_at, finished_at, step, total_steps, epoch, tokens_seen, elapsed_seconds, train_loss, eval_loss, error_code, error_message, cancel_requested, attempt";

impl Db {
    /// Opens (creating if needed) the database file with WAL and foreign keys, and applies the
    /// embedded migrations.
    pub async fn open(path: &Path) -> Result<Db> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Db { pool })
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    pub async fn insert_job(&self, id: &str, owner: Option<&str>, spec: &str) -> Result<JobRow> {
        sqlx::query_as(&format!(
            // created_at is taken inside the insert, which SQLite serializes, so it never runs
            // backwards against seq (the list order)
            "INSERT INTO jobs (id, owner, status, spec, created_at)
             VALUES (?, ?, 'queued', ?, strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')) RETURNING {JOB_COLUMNS}"
        ))
        .bind(id)
        .bind(owner)
        .bind(spec)
        .fetch_one(&self.pool)
        .await
    }

    /// A job, if it exists and `owner` may see it (`None` = no API keys in use).
    pub async fn get_job(&self, id: &str, owner: Option<&str>) -> Result<Option<JobRow>> {
        sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ? AND (? IS NULL OR owner = ?)"
        ))
        .bind(id)
        .bind(owner)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await
    }

    /// Newest first; `after` is the `seq` of the last job of the previous page.
    pub async fn list_jobs(
        &self,
        owner: Option<&str>,
        status: Option<&str>,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<JobRow>> {
        sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE (? IS NULL OR owner = ?) AND (? IS NULL OR status = ?) AND (? IS NULL OR seq < ?)
             ORDER BY seq DESC LIMIT ?"
        ))
        .bind(owner)
        .bind(owner)
        .bind(status)
        .bind(status)
        .bind(after)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// One statement, so it is atomic without a read-then-write transaction (which WAL can
    /// refuse with SQLITE_BUSY_SNAPSHOT while a worker writes).
    pub async fn request_cancel(&self, id: &str, owner: Option<&str>) -> Result<CancelOutcome> {
        let stamp = now();
        let row: Option<(String, Option<String>)> = sqlx::query_as(
            "UPDATE jobs SET
                 status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
                 finished_at = CASE WHEN status = 'queued' THEN ? ELSE finished_at END,
                 phase = CASE WHEN status = 'queued' THEN NULL ELSE phase END,
                 cancel_requested = CASE WHEN status = 'running' THEN 1 ELSE cancel_requested END
             WHERE id = ? AND (? IS NULL OR owner = ?)
             RETURNING status, finished_at",
        )
        .bind(&stamp)
        .bind(id)
        .bind(owner)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => CancelOutcome::NotFound,
            Some((status, finished)) => match status.as_str() {
                "cancelled" if finished.as_deref() == Some(stamp.as_str()) => {
                    CancelOutcome::Cancelled
                }
                "cancelled" => CancelOutcome::AlreadyCancelled,
                "running" => CancelOutcome::Requested,
                other => CancelOutcome::Finished(other.to_string()),
            },
        })
    }

    /// Claims the oldest runnable job: queued, or running under a lease that expired (its worker
    /// died). Atomic: two workers never get the same job.
    pub async fn claim_next(&self, worker: &str, lease_secs: i64) -> Result<Option<Claim>> {
        let now = now();
        let row: Option<(String, String, i64)> = sqlx::query_as(
            "UPDATE jobs SET status = 'running', attempt = attempt + 1, worker = ?, lease_expires_at = ?,
                 started_at = COALESCE(started_at, ?), phase = NULL
             WHERE seq = (SELECT seq FROM jobs
                          WHERE (status = 'queued' OR (status = 'running' AND lease_expires_at < ?))
                            AND cancel_requested = 0
                          ORDER BY seq LIMIT 1)
             RETURNING id, spec, attempt",
        )
        .bind(worker)
        .bind(in_seconds(lease_secs))
        .bind(&now)
        .bind(&now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id, spec, attempt)| Claim { id, spec, attempt }))
    }

    /// Extends the lease; returns whether the caller still owns the job and whether a cancel
    /// was requested.
    pub async fn heartbeat(&self, id: &str, attempt: i64, lease_secs: i64) -> Result<Option<bool>> {
        let row: Option<(i64,)> = sqlx::query_as(
            "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND attempt = ? AND status = 'running'
             RETURNING cancel_requested",
        )
        .bind(in_seconds(lease_secs))
        .bind(id)
        .bind(attempt)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.0 != 0))
    }

    /// At start-up of the single-node server: jobs left running by a crash go back to the queue
    /// (they resume from their last checkpoint).
    pub async fn requeue_running(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "UPDATE jobs SET status = 'queued', phase = NULL, worker = NULL, lease_expires_at = NULL
             WHERE status = 'running' RETURNING id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    pub async fn set_phase(&self, id: &str, attempt: i64, phase: &str) -> Result<()> {
        sqlx::query("UPDATE jobs SET phase = ? WHERE id = ? AND attempt = ?")
            .bind(phase)
            .bind(id)
            .bind(attempt)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn set_progress(
        &self,
        id: &str,
        attempt: i64,
        step: i64,
        total_steps: i64,
        epoch: f64,
        tokens_seen: i64,
        elapsed_seconds: f64,
        train_loss: f64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET step = ?, total_steps = ?, epoch = ?, tokens_seen = ?, elapsed_seconds = ?, train_loss = ?
             WHERE id = ? AND attempt = ?",
        )
        .bind(step)
        .bind(total_steps)
        .bind(epoch)
        .bind(tokens_seen)
        .bind(elapsed_seconds)
        .bind(train_loss)
        .bind(id)
        .bind(attempt)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    pub async fn set_total_steps(&self, id: &str, attempt: i64, total_steps: i64) -> Result<()> {
        sqlx::query("UPDATE jobs SET total_steps = ? WHERE id = ? AND attempt = ?")
            .bind(total_steps)
            .bind(id)
            .bind(attempt)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    pub async fn set_eval_loss(&self, id: &str, attempt: i64, eval_loss: f64) -> Result<()> {
        sqlx::query("UPDATE jobs SET eval_loss = ? WHERE id = ? AND attempt = ?")
            .bind(eval_loss)
            .bind(id)
            .bind(attempt)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Ends a job the caller owns: `succeeded`, `failed` (with an error) or `cancelled`.
    pub async fn finish(
        &self,
        id: &str,
        attempt: i64,
        status: &str,
        error: Option<(&str, &str)>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET status = ?, phase = NULL, finished_at = ?, error_code = ?, error_message = ?,
                 worker = NULL, lease_expires_at = NULL
             WHERE id = ? AND attempt = ? AND status = 'running'",
        )
        .bind(status)
        .bind(now())
        .bind(error.map(|e| e.0))
        .bind(error.map(|e| e.1))
        .bind(id)
        .bind(attempt)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Puts a running job back in the queue (graceful shutdown), keeping its progress.
    pub async fn requeue(&self, id: &str, attempt: i64) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET status = 'queued', phase = NULL, worker = NULL, lease_expires_at = NULL
             WHERE id = ? AND attempt = ? AND status = 'running'",
        )
        .bind(id)
        .bind(attempt)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    pub async fn insert_event(&self, job_id: &str, kind: &str, data: &str) -> Result<i64> {
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO job_events (job_id, kind, data, created_at) VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(job_id)
        .bind(kind)
        .bind(data)
        .bind(now())
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    /// Events of a job after event id `after`, oldest first; `kinds` filters when given.
    pub async fn events_after(&self, job_id: &str, after: i64) -> Result<Vec<EventRow>> {
        sqlx::query_as(
            "SELECT id, kind, data FROM job_events WHERE job_id = ? AND id > ? ORDER BY id",
        )
        .bind(job_id)
        .bind(after)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn insert_checkpoint(&self, job_id: &str, step: i64, files: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO checkpoints (job_id, step, created_at, files) VALUES (?, ?, ?, ?)
             ON CONFLICT (job_id, step) DO UPDATE SET files = excluded.files, created_at = excluded.created_at",
        )
        .bind(job_id)
        .bind(step)
        .bind(now())
        .bind(files)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    pub async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRow>> {
        sqlx::query_as(
            "SELECT step, created_at, files FROM checkpoints WHERE job_id = ? ORDER BY step",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await
    }

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
        .await
        .map(|_| ())
    }

    pub async fn get_file(&self, id: &str, owner: Option<&str>) -> Result<Option<FileRow>> {
        sqlx::query_as(
            "SELECT id, owner, filename, bytes, sha256, created_at FROM files WHERE id = ? AND (? IS NULL OR owner = ?)",
        )
        .bind(id)
        .bind(owner)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await
    }
}
