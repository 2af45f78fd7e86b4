//! The jobs table is the queue: create, read, list, cancel; claim under a lease; and the
//! fenced writes of the worker holding the lease. Checkpoints are recorded here too, fenced the
//! same way.

use super::{in_seconds, now, Backend, Db, Error, Lease, Result};
use crate::job::{FileDigest, JobId, JobPhase, JobStatus, StepMetrics};
use crate::spec::JobSpec;

/// A job as the database holds it, typed: the spec as the validated [`JobSpec`] it was stored
/// from (read back here, the one place a stored spec is decoded), the stop request as what it
/// asks.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub seq: i64,
    pub id: JobId,
    pub owner: Option<String>,
    pub status: JobStatus,
    pub phase: Option<JobPhase>,
    pub spec: JobSpec,
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
    pub(crate) error_code: Option<String>,
    pub(crate) error_message: Option<String>,
    /// A cancel or pause asked of the running job and not yet carried out.
    pub(crate) stop_requested: Option<StopRequest>,
    pub attempt: i64,
    /// The final adapter's files as recorded when the job succeeded.
    pub adapter_files: Option<Vec<FileDigest>>,
    /// When retention removed the job's artifacts.
    pub(crate) artifacts_removed_at: Option<String>,
    /// Under early stopping, the step whose checkpoint is the adapter (the best evaluation).
    pub best_step: Option<i64>,
}

impl JobRow {
    /// Seconds left at the pace so far: a running job's elapsed time per step times the steps
    /// to go. `None` before the first step, or when the job is not running.
    pub(crate) fn eta_seconds(&self) -> Option<f64> {
        match (self.total_steps, self.elapsed_seconds) {
            (Some(total), Some(elapsed)) if self.step > 0 && self.status == JobStatus::Running => {
                Some(elapsed / self.step as f64 * (total - self.step).max(0) as f64)
            }
            _ => None,
        }
    }
}

/// The row as SQL returns it, before its text columns are decoded into [`JobRow`]'s types.
#[derive(sqlx::FromRow)]
struct JobRecord {
    seq: i64,
    id: String,
    owner: Option<String>,
    status: String,
    phase: Option<String>,
    spec: String,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    step: i64,
    total_steps: Option<i64>,
    epoch: Option<f64>,
    tokens_seen: i64,
    elapsed_seconds: Option<f64>,
    train_loss: Option<f64>,
    eval_loss: Option<f64>,
    error_code: Option<String>,
    error_message: Option<String>,
    cancel_requested: i64,
    attempt: i64,
    adapter_files: Option<String>,
    artifacts_removed_at: Option<String>,
    best_step: Option<i64>,
}

impl TryFrom<JobRecord> for JobRow {
    type Error = Error;
    fn try_from(r: JobRecord) -> Result<JobRow> {
        let corrupt = |column: &str, why: String| Error::Corrupt {
            job: r.id.clone(),
            column: column.to_string(),
            why,
        };
        let id = JobId::parse(&r.id).ok_or_else(|| corrupt("id", "not a UUID".into()))?;
        let status = r
            .status
            .parse()
            .map_err(|e: crate::job::UnknownStatus| corrupt("status", e.to_string()))?;
        let phase = r
            .phase
            .as_deref()
            .map(|p| p.parse::<JobPhase>())
            .transpose()
            .map_err(|e| corrupt("phase", e))?;
        let spec = serde_json::from_str(&r.spec).map_err(|e| corrupt("spec", e.to_string()))?;
        // digests recorded unreadably read as none: downloads then compute them afresh
        let adapter_files = r.adapter_files.as_deref().and_then(|text| {
            serde_json::from_str(text)
                .map_err(|e| tracing::warn!(job = %r.id, error = %e, "the adapter's recorded files are unreadable"))
                .ok()
        });
        Ok(JobRow {
            seq: r.seq,
            id,
            owner: r.owner,
            status,
            phase,
            spec,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            step: r.step,
            total_steps: r.total_steps,
            epoch: r.epoch,
            tokens_seen: r.tokens_seen,
            elapsed_seconds: r.elapsed_seconds,
            train_loss: r.train_loss,
            eval_loss: r.eval_loss,
            error_code: r.error_code,
            error_message: r.error_message,
            stop_requested: StopRequest::from_column(r.cancel_requested),
            attempt: r.attempt,
            adapter_files,
            artifacts_removed_at: r.artifacts_removed_at,
            best_step: r.best_step,
        })
    }
}

/// A page of rows, typed. A row that no longer reads back (edited by hand, or stored by a newer
/// version) is left out with an error line rather than failing the whole page: one bad row must
/// not hide its owner's other jobs. Reading it alone (`get_job`) names the problem.
fn typed(records: Vec<JobRecord>) -> Vec<JobRow> {
    records
        .into_iter()
        .filter_map(|r| match JobRow::try_from(r) {
            Ok(row) => Some(row),
            Err(e) => {
                tracing::error!(error = %e, "a stored job is unreadable; left out of the list");
                None
            }
        })
        .collect()
}

/// A recorded checkpoint and the digests of its files. Files recorded unreadably (hand-edited)
/// read as none, so that the checkpoint is still listed and its downloads computed afresh.
#[derive(Debug, Clone)]
pub struct CheckpointRow {
    pub step: i64,
    pub created_at: String,
    pub files: Vec<FileDigest>,
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
    Finished(JobStatus),
    NotFound,
}

/// What a pause request did.
pub enum PauseOutcome {
    /// A queued job, paused at once.
    Paused,
    /// A running job, flagged: its worker checkpoints and stops at its next step.
    Requested,
    /// Already paused, or already being paused or cancelled.
    Unchanged(JobStatus),
    /// Succeeded, failed or cancelled: nothing to pause.
    Finished(JobStatus),
    NotFound,
}

/// What a resume request did.
pub enum ResumeOutcome {
    /// Back in the queue; it continues from its last checkpoint.
    Resumed,
    /// Not paused (queued or running: nothing to do; finished: nothing to resume).
    NotPaused(JobStatus),
    NotFound,
}

/// What a worker was asked, read by its heartbeat (`jobs.cancel_requested`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    Cancel,
    Pause,
}

impl StopRequest {
    fn from_column(v: i64) -> Option<StopRequest> {
        match v {
            0 => None,
            2 => Some(StopRequest::Pause),
            _ => Some(StopRequest::Cancel),
        }
    }
}

/// What a delete did.
pub enum DeleteOutcome {
    /// Gone, with its events and checkpoints.
    Deleted,
    /// Running: it must stop first.
    Running,
    NotFound,
}

/// A claimed job.
pub struct Claim {
    pub lease: Lease,
    pub spec: JobSpec,
    /// Times the job has been taken over from a worker whose lease expired (this claim included
    /// when it is such a takeover).
    pub failovers: i64,
}

const JOB_COLUMNS: [&str; 23] = [
    "seq",
    "id",
    "owner",
    "status",
    "phase",
    "spec",
    "created_at",
    "started_at",
    "finished_at",
    "step",
    "total_steps",
    "epoch",
    "tokens_seen",
    "elapsed_seconds",
    "train_loss",
    "eval_loss",
    "error_code",
    "error_message",
    "cancel_requested",
    "attempt",
    "adapter_files",
    "artifacts_removed_at",
    "best_step",
];

/// The condition every fenced write adds: the job is still running under this attempt.
pub(super) const FENCE: &str = "id = ? AND attempt = ? AND status = 'running'";

impl Db {
    /// Inserts a queued job and its metadata pairs (the rows list filters read), in one
    /// transaction.
    /// Stores a queued job, unless `owner` already has `max_waiting` jobs waiting (queued or
    /// paused; `None`: no limit): `None` then. The count and the insert happen under one lock
    /// ([`Db::begin_owner_write`]), so concurrent submits cannot all pass the limit.
    pub async fn insert_job(
        &self,
        id: &JobId,
        owner: Option<&str>,
        spec: &JobSpec,
        max_waiting: Option<u64>,
    ) -> Result<Option<JobRow>> {
        let text = serde_json::to_string(spec).expect("a spec serializes");
        let mut tx = self.begin_owner_write(owner).await?;
        // created_at is taken inside the insert, so that it does not run backwards against seq
        // (the list order) as a time taken before it could
        let created_at = match self.backend {
            Backend::Sqlite => "strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')",
            Backend::Postgres => "clock_timestamp()",
        };
        let cap = max_waiting.map_or(-1, |n| n.min(i64::MAX as u64) as i64);
        let row: Option<JobRecord> = sqlx::query_as(&self.sql(&format!(
            "INSERT INTO jobs (id, owner, status, spec, created_at)
             SELECT ?, ?, 'queued', ?, {created_at}
             WHERE ? < 0 OR (SELECT COUNT(*) FROM jobs WHERE owner IS NOT DISTINCT FROM ?
                             AND status IN ('queued', 'paused')) < ?
             RETURNING {}",
            self.columns(&JOB_COLUMNS)
        )))
        .bind(id.as_str())
        .bind(owner)
        .bind(&text)
        .bind(cap)
        .bind(owner)
        .bind(cap)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        for (key, value) in spec.metadata.iter().flatten() {
            sqlx::query(
                &self.sql("INSERT INTO job_metadata (job_id, key, value) VALUES (?, ?, ?)"),
            )
            .bind(id.as_str())
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        row.try_into().map(Some)
    }

    /// A job, if it exists and `owner` may see it (`None` = no API keys in use).
    pub async fn get_job(&self, id: &JobId, owner: Option<&str>) -> Result<Option<JobRow>> {
        let record: Option<JobRecord> = sqlx::query_as(&self.sql(&format!(
            "SELECT {} FROM jobs WHERE id = ? AND (? IS NULL OR owner = ?)",
            self.columns(&JOB_COLUMNS)
        )))
        .bind(id.as_str())
        .bind(owner)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        record.map(JobRow::try_from).transpose()
    }

    /// Newest first; `after` is the `seq` of the last job of the previous page.
    pub async fn list_jobs(
        &self,
        owner: Option<&str>,
        status: Option<JobStatus>,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<JobRow>> {
        self.list_jobs_tagged(owner, status, &[], after, limit)
            .await
    }

    /// [`Db::list_jobs`] of the jobs that carry every one of the `metadata` pairs.
    pub(crate) async fn list_jobs_tagged(
        &self,
        owner: Option<&str>,
        status: Option<JobStatus>,
        metadata: &[(String, String)],
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<JobRow>> {
        let status = status.map(JobStatus::as_str);
        let tagged: String = metadata
            .iter()
            .map(|_| {
                " AND EXISTS (SELECT 1 FROM job_metadata m
                              WHERE m.job_id = jobs.id AND m.key = ? AND m.value = ?)"
            })
            .collect();
        let sql = self.sql(&format!(
            "SELECT {} FROM jobs
             WHERE (? IS NULL OR owner = ?) AND (? IS NULL OR status = ?) AND (? IS NULL OR seq < ?)
                 {tagged}
             ORDER BY seq DESC LIMIT ?",
            self.columns(&JOB_COLUMNS)
        ));
        let mut query = sqlx::query_as::<_, JobRecord>(&sql)
            .bind(owner)
            .bind(owner)
            .bind(status)
            .bind(status)
            .bind(after)
            .bind(after);
        for (key, value) in metadata {
            query = query.bind(key).bind(value);
        }
        Ok(typed(query.bind(limit).fetch_all(&self.pool).await?))
    }

    /// One statement, so it is atomic without a read-then-write transaction (which WAL can
    /// refuse with SQLITE_BUSY_SNAPSHOT while a worker writes).
    pub async fn request_cancel(&self, id: &JobId, owner: Option<&str>) -> Result<CancelOutcome> {
        let stamp = now();
        let row: Option<(String, Option<String>)> = sqlx::query_as(&self.sql(&format!(
            "UPDATE jobs SET
                 status = CASE WHEN status IN ('queued', 'paused') THEN 'cancelled' ELSE status END,
                 finished_at = CASE WHEN status IN ('queued', 'paused') THEN ?::timestamptz ELSE finished_at END,
                 phase = CASE WHEN status IN ('queued', 'paused') THEN NULL ELSE phase END,
                 cancel_requested = CASE WHEN status = 'running' THEN 1 ELSE cancel_requested END
             WHERE id = ? AND (? IS NULL OR owner = ?)
             RETURNING status, {}",
            self.time("finished_at")
        )))
        .bind(&stamp)
        .bind(id.as_str())
        .bind(owner)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        let Some((status, finished)) = row else {
            return Ok(CancelOutcome::NotFound);
        };
        let status: JobStatus = status
            .parse()
            .map_err(|e| Error::Sqlx(sqlx::Error::Decode(Box::new(e))))?;
        Ok(match status {
            JobStatus::Cancelled if finished.as_deref() == Some(stamp.as_str()) => {
                CancelOutcome::Cancelled
            }
            JobStatus::Cancelled => CancelOutcome::AlreadyCancelled,
            JobStatus::Running => CancelOutcome::Requested,
            JobStatus::Queued | JobStatus::Paused => CancelOutcome::Requested,
            finished => CancelOutcome::Finished(finished),
        })
    }

    /// Pauses a queued job at once, or asks a running one's worker to checkpoint and stop (a
    /// cancel already asked for wins). Each statement is atomic on its own; the first that
    /// changes the row says what happened.
    pub async fn request_pause(&self, id: &JobId, owner: Option<&str>) -> Result<PauseOutcome> {
        let paused = sqlx::query(&self.sql(
            "UPDATE jobs SET status = 'paused'
             WHERE id = ? AND (? IS NULL OR owner = ?) AND status = 'queued'",
        ))
        .bind(id.as_str())
        .bind(owner)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        if paused.rows_affected() == 1 {
            return Ok(PauseOutcome::Paused);
        }
        let flagged = sqlx::query(&self.sql(
            "UPDATE jobs SET cancel_requested = 2
             WHERE id = ? AND (? IS NULL OR owner = ?) AND status = 'running'
                 AND cancel_requested = 0",
        ))
        .bind(id.as_str())
        .bind(owner)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        if flagged.rows_affected() == 1 {
            return Ok(PauseOutcome::Requested);
        }
        Ok(match self.get_job(id, owner).await? {
            None => PauseOutcome::NotFound,
            Some(row) if row.status.is_terminal() => PauseOutcome::Finished(row.status),
            Some(row) => PauseOutcome::Unchanged(row.status),
        })
    }

    /// Puts a paused job back in the queue with its status event, in one transaction.
    pub async fn resume(
        &self,
        id: &JobId,
        owner: Option<&str>,
        event_data: &str,
    ) -> Result<(ResumeOutcome, Option<i64>)> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(&self.sql(
            "UPDATE jobs SET status = 'queued', cancel_requested = 0, phase = NULL
             WHERE id = ? AND (? IS NULL OR owner = ?) AND status = 'paused'",
        ))
        .bind(id.as_str())
        .bind(owner)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 {
            let event = self
                .insert_event_in(&mut tx, id.as_str(), "status", event_data)
                .await?;
            tx.commit().await?;
            return Ok((ResumeOutcome::Resumed, Some(event)));
        }
        tx.rollback().await?;
        Ok(match self.get_job(id, owner).await? {
            Some(row) => (ResumeOutcome::NotPaused(row.status), None),
            None => (ResumeOutcome::NotFound, None),
        })
    }

    /// Finished jobs whose artifacts are still kept and that finished before `cutoff`.
    pub(crate) async fn expired_jobs(&self, cutoff: &str) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(&self.sql(
            "SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled')
                 AND finished_at < ?::timestamptz AND artifacts_removed_at IS NULL",
        ))
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Records that a job's artifacts were removed by retention (its record stays).
    pub(crate) async fn mark_artifacts_removed(&self, id: &JobId) -> Result<()> {
        sqlx::query(&self.sql(
            "UPDATE jobs SET artifacts_removed_at = ?::timestamptz, adapter_files = NULL WHERE id = ?",
        ))
            .bind(now())
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes a job that is not running (its events and checkpoints go with it).
    pub async fn delete_job(&self, id: &JobId, owner: Option<&str>) -> Result<DeleteOutcome> {
        let gone: Option<(String,)> = sqlx::query_as(&self.sql(
            "DELETE FROM jobs WHERE id = ? AND (? IS NULL OR owner = ?) AND status != 'running'
             RETURNING id",
        ))
        .bind(id.as_str())
        .bind(owner)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        if gone.is_some() {
            return Ok(DeleteOutcome::Deleted);
        }
        Ok(match self.get_job(id, owner).await? {
            Some(_) => DeleteOutcome::Running,
            None => DeleteOutcome::NotFound,
        })
    }

    /// Claims a runnable job — queued, or running under a lease that expired (its worker died) —
    /// of the owner with the fewest jobs running, the oldest first: one tenant's long queue does
    /// not hold every worker. Atomic: two workers never get the same job.
    pub async fn claim_next(
        &self,
        worker: &str,
        lease_secs: i64,
        free_bytes: u64,
    ) -> Result<Option<Claim>> {
        let now = now();
        // PostgreSQL: the picked row is locked for this claim and skipped by concurrent ones, so
        // racing workers each get a different job instead of waiting on one another
        let lock = match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
        };
        // (SET expressions read the row as it was: `status = 'running'` there means a takeover)
        let row: Option<(String, String, i64, i64)> = sqlx::query_as(&self.sql(&format!(
            "UPDATE jobs SET status = 'running', attempt = attempt + 1, worker = ?,
                 failovers = failovers + CASE WHEN status = 'running' THEN 1 ELSE 0 END,
                 lease_expires_at = ?::timestamptz,
                 started_at = COALESCE(started_at, ?::timestamptz), phase = NULL
             WHERE seq = (SELECT q.seq FROM jobs q
                          WHERE (q.status = 'queued' OR (q.status = 'running' AND q.lease_expires_at < ?::timestamptz))
                            AND q.cancel_requested = 0
                            -- a job whose estimated peak is known and larger than this
                            -- worker's free memory is left for one with room
                            AND NOT EXISTS (SELECT 1 FROM job_memory m
                                            WHERE m.job_id = q.id AND m.peak_bytes > ?)
                            AND (SELECT COUNT(*) FROM jobs r
                                 WHERE r.status = 'running' AND r.owner IS NOT DISTINCT FROM q.owner
                                   AND r.seq != q.seq) < ?
                          -- fair between owners: the owner with the fewest jobs running goes
                          -- first, then the oldest job
                          ORDER BY (SELECT COUNT(*) FROM jobs r
                                    WHERE r.status = 'running' AND r.owner IS NOT DISTINCT FROM q.owner
                                      AND r.seq != q.seq),
                                   q.seq
                          LIMIT 1 {lock})
             RETURNING id, spec, attempt, failovers"
        )))
        .bind(worker)
        .bind(in_seconds(lease_secs))
        .bind(&now)
        .bind(&now)
        .bind(i64::try_from(free_bytes).unwrap_or(i64::MAX))
        .bind(self.max_running_per_owner)
        .fetch_optional(&self.pool)
        .await?;
        let Some((id, spec, attempt, failovers)) = row else {
            return Ok(None);
        };
        let corrupt = |column: &str, why: String| Error::Corrupt {
            job: id.clone(),
            column: column.to_string(),
            why,
        };
        Ok(Some(Claim {
            lease: Lease {
                job: JobId::parse(&id).ok_or_else(|| corrupt("id", "not a UUID".into()))?,
                attempt,
            },
            spec: serde_json::from_str(&spec).map_err(|e| corrupt("spec", e.to_string()))?,
            failovers,
        }))
    }

    /// Ends the jobs whose worker died after being asked to stop (their lease expired with a
    /// cancel or pause request on them, so no claim takes them): a pause becomes `paused` (it
    /// resumes from its last recorded checkpoint), a cancel `cancelled`. Each with its status
    /// event, in one transaction per job; returns the ids and events written.
    pub async fn settle_stopped_orphans(
        &self,
        pause_event: &str,
        cancel_event: &str,
    ) -> Result<Vec<(String, i64, &'static str)>> {
        let stamp = now();
        let orphans: Vec<(String, i64)> = sqlx::query_as(&self.sql(
            "SELECT id, cancel_requested FROM jobs
             WHERE status = 'running' AND cancel_requested <> 0 AND lease_expires_at < ?::timestamptz",
        ))
        .bind(&stamp)
        .fetch_all(&self.pool)
        .await?;
        let mut settled = Vec::new();
        for (id, request) in orphans {
            let (status, data) = match StopRequest::from_column(request) {
                Some(StopRequest::Pause) => ("paused", pause_event),
                _ => ("cancelled", cancel_event),
            };
            let mut tx = self.pool.begin().await?;
            let done = sqlx::query(&self.sql(
                "UPDATE jobs SET status = ?, phase = NULL, worker = NULL, lease_expires_at = NULL,
                     cancel_requested = 0,
                     finished_at = CASE WHEN ? = 'cancelled' THEN ?::timestamptz ELSE finished_at END
                 WHERE id = ? AND status = 'running' AND cancel_requested = ?
                     AND lease_expires_at < ?::timestamptz",
            ))
            .bind(status)
            .bind(status)
            .bind(&stamp)
            .bind(&id)
            .bind(request)
            .bind(&stamp)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                tx.rollback().await?;
                continue;
            }
            let event = self.insert_event_in(&mut tx, &id, "status", data).await?;
            tx.commit().await?;
            settled.push((id, event, status));
        }
        Ok(settled)
    }

    /// Extends the lease; returns what the worker is asked to stop for, if anything.
    pub async fn heartbeat(&self, lease: &Lease, lease_secs: i64) -> Result<Option<StopRequest>> {
        let row: Option<(i64,)> = sqlx::query_as(&self.sql(&format!(
            "UPDATE jobs SET lease_expires_at = ?::timestamptz WHERE {FENCE} RETURNING cancel_requested"
        )))
        .bind(in_seconds(lease_secs))
        .bind(lease.job.as_str())
        .bind(lease.attempt)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| StopRequest::from_column(r.0))
            .ok_or_else(|| lease.lost())
    }

    /// Moves a lease's expiry to `secs` from now (negative: into the past), as a worker that
    /// stopped renewing would leave it. Used by tests of takeover and by operators' tooling.
    pub async fn set_lease_expiry(&self, lease: &Lease, secs: i64) -> Result<()> {
        let done = sqlx::query(&self.sql(&format!(
            "UPDATE jobs SET lease_expires_at = ?::timestamptz WHERE {FENCE}"
        )))
        .bind(in_seconds(secs))
        .bind(lease.job.as_str())
        .bind(lease.attempt)
        .execute(&self.pool)
        .await?;
        lease.check(done.rows_affected())
    }

    pub async fn set_phase(&self, lease: &Lease, phase: JobPhase) -> Result<()> {
        let done = sqlx::query(&self.sql(&format!("UPDATE jobs SET phase = ? WHERE {FENCE}")))
            .bind(phase.as_str())
            .bind(lease.job.as_str())
            .bind(lease.attempt)
            .execute(&self.pool)
            .await?;
        lease.check(done.rows_affected())
    }

    /// A step's progress.
    pub async fn set_progress(&self, lease: &Lease, m: &StepMetrics) -> Result<()> {
        let done = sqlx::query(&self.sql(&format!(
            "UPDATE jobs SET step = ?, total_steps = ?, epoch = ?, tokens_seen = ?, elapsed_seconds = ?, train_loss = ?
             WHERE {FENCE}"
        )))
        .bind(m.step as i64)
        .bind(m.total_steps as i64)
        .bind(m.epoch)
        .bind(m.tokens_seen as i64)
        .bind(m.elapsed_seconds)
        .bind(m.train_loss)
        .bind(lease.job.as_str())
        .bind(lease.attempt)
        .execute(&self.pool)
        .await?;
        lease.check(done.rows_affected())
    }

    pub async fn set_total_steps(&self, lease: &Lease, total_steps: i64) -> Result<()> {
        let done =
            sqlx::query(&self.sql(&format!("UPDATE jobs SET total_steps = ? WHERE {FENCE}")))
                .bind(total_steps)
                .bind(lease.job.as_str())
                .bind(lease.attempt)
                .execute(&self.pool)
                .await?;
        lease.check(done.rows_affected())
    }

    pub async fn set_eval_loss(&self, lease: &Lease, eval_loss: f64) -> Result<()> {
        let done = sqlx::query(&self.sql(&format!("UPDATE jobs SET eval_loss = ? WHERE {FENCE}")))
            .bind(eval_loss)
            .bind(lease.job.as_str())
            .bind(lease.attempt)
            .execute(&self.pool)
            .await?;
        lease.check(done.rows_affected())
    }

    /// Records that checkpoint `step` holds the best evaluation so far (early stopping): it is
    /// kept through pruning and becomes the adapter unless a better one follows.
    pub async fn set_best_step(&self, lease: &Lease, step: i64) -> Result<()> {
        let done = sqlx::query(&self.sql(&format!("UPDATE jobs SET best_step = ? WHERE {FENCE}")))
            .bind(step)
            .bind(lease.job.as_str())
            .bind(lease.attempt)
            .execute(&self.pool)
            .await?;
        lease.check(done.rows_affected())
    }

    /// Ends a job the lease still holds — `succeeded` (with its adapter's digests), `failed`
    /// (with an error) or `cancelled` — and records its final status event, in one
    /// transaction. Returns the event's id.
    pub async fn finish(
        &self,
        lease: &Lease,
        status: JobStatus,
        error: Option<(&str, &str)>,
        adapter_files: Option<&str>,
        event_data: &str,
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(&self.sql(&format!(
            "UPDATE jobs SET status = ?, phase = NULL, finished_at = ?::timestamptz, error_code = ?,
                 error_message = ?, adapter_files = ?, worker = NULL, lease_expires_at = NULL
             WHERE {FENCE}"
        )))
        .bind(status.as_str())
        .bind(now())
        .bind(error.map(|e| e.0))
        .bind(error.map(|e| e.1))
        .bind(adapter_files)
        .bind(lease.job.as_str())
        .bind(lease.attempt)
        .execute(&mut *tx)
        .await?;
        self.record_status_in(tx, lease, done.rows_affected(), event_data)
            .await
    }

    /// Takes a running job off its worker, keeping its progress — back to the queue (graceful
    /// shutdown) or paused (on request) — and records why, in one transaction. Returns the
    /// event's id.
    pub async fn requeue(&self, lease: &Lease, to: JobStatus, event_data: &str) -> Result<i64> {
        debug_assert!(matches!(to, JobStatus::Queued | JobStatus::Paused));
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(&self.sql(&format!(
            "UPDATE jobs SET status = ?, phase = NULL, worker = NULL, lease_expires_at = NULL,
                 cancel_requested = 0
             WHERE {FENCE}"
        )))
        .bind(to.as_str())
        .bind(lease.job.as_str())
        .bind(lease.attempt)
        .execute(&mut *tx)
        .await?;
        self.record_status_in(tx, lease, done.rows_affected(), event_data)
            .await
    }

    /// Ends the transaction of a fenced status change: its status event is written and both are
    /// committed if the UPDATE changed the job's row, else it is rolled back at once (not when
    /// the connection is next used, which would leave SQLite's write lock taken till then).
    async fn record_status_in(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Any>,
        lease: &Lease,
        rows_affected: u64,
        event_data: &str,
    ) -> Result<i64> {
        if let Err(lost) = lease.check(rows_affected) {
            tx.rollback().await?;
            return Err(lost);
        }
        let id = self
            .insert_event_in(&mut tx, lease.job.as_str(), "status", event_data)
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Records a checkpoint the lease's worker wrote (a later write of the same step replaces
    /// it: a resumed attempt may write it again).
    pub async fn insert_checkpoint(
        &self,
        lease: &Lease,
        step: i64,
        files: &str,
        bytes: u64,
    ) -> Result<()> {
        let done = sqlx::query(&self.sql(&format!(
            "INSERT INTO checkpoints (job_id, step, created_at, files, bytes)
             SELECT ?, ?, ?::timestamptz, ?, ? WHERE EXISTS (SELECT 1 FROM jobs WHERE {FENCE})
             ON CONFLICT (job_id, step) DO UPDATE SET files = excluded.files,
                 created_at = excluded.created_at, bytes = excluded.bytes"
        )))
        .bind(lease.job.as_str())
        .bind(step)
        .bind(now())
        .bind(files)
        .bind(bytes.min(i64::MAX as u64) as i64)
        .bind(lease.job.as_str())
        .bind(lease.attempt)
        .execute(&self.pool)
        .await?;
        lease.check(done.rows_affected())
    }

    /// Forgets checkpoint `step` of the job `lease` holds (pruned): no takeover resumes from it
    /// and no one downloads it once this returns.
    pub(crate) async fn delete_checkpoint(&self, lease: &Lease, step: i64) -> Result<()> {
        sqlx::query(&self.sql(&format!(
            "DELETE FROM checkpoints WHERE job_id = ? AND step = ?
             AND EXISTS (SELECT 1 FROM jobs WHERE {FENCE})"
        )))
        .bind(lease.job.as_str())
        .bind(step)
        .bind(lease.job.as_str())
        .bind(lease.attempt)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn list_checkpoints(&self, job: &JobId) -> Result<Vec<CheckpointRow>> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(&self.sql(&format!(
            "SELECT step, {}, files FROM checkpoints WHERE job_id = ? ORDER BY step",
            self.time("created_at")
        )))
        .bind(job.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(step, created_at, files)| CheckpointRow {
                step,
                created_at,
                files: serde_json::from_str(&files).unwrap_or_else(|e| {
                    tracing::warn!(job = %job, step, error = %e, "a checkpoint's recorded files are unreadable");
                    Vec::new()
                }),
            })
            .collect())
    }
}
