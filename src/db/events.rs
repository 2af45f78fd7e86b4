//! The event log of every job: status changes, data summaries, step metrics, evaluations and
//! checkpoints, in order. Its row ids are the SSE event ids.

use sqlx::{Any, Transaction};

use super::{now, Db, Lease, Result};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub kind: String,
    pub data: String,
}

/// An event with the time it was recorded.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct TimedEventRow {
    pub id: i64,
    pub kind: String,
    pub data: String,
    pub created_at: String,
}

impl Db {
    /// An event written inside `tx` (with the status change it records).
    pub(super) async fn insert_event_in(
        &self,
        tx: &mut Transaction<'_, Any>,
        job_id: &str,
        kind: &str,
        data: &str,
    ) -> Result<i64> {
        let (id,): (i64,) = sqlx::query_as(&self.sql(
            "INSERT INTO job_events (job_id, kind, data, created_at)
             VALUES (?, ?, ?, ?::timestamptz) RETURNING id",
        ))
        .bind(job_id)
        .bind(kind)
        .bind(data)
        .bind(now())
        .fetch_one(&mut **tx)
        .await?;
        Ok(id)
    }

    /// An event of the API's (queued, cancelled while queued): not fenced, no worker holds the job.
    pub(crate) async fn insert_event(&self, job_id: &str, kind: &str, data: &str) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let id = self.insert_event_in(&mut tx, job_id, kind, data).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// An event of the worker holding `lease`; refused once the lease is lost.
    pub async fn insert_event_fenced(&self, lease: &Lease, kind: &str, data: &str) -> Result<i64> {
        let row: Option<(i64,)> = sqlx::query_as(&self.sql(
            "INSERT INTO job_events (job_id, kind, data, created_at)
             SELECT ?, ?, ?, ?::timestamptz WHERE EXISTS
                 (SELECT 1 FROM jobs WHERE id = ? AND attempt = ? AND status = 'running')
             RETURNING id",
        ))
        .bind(lease.job.as_str())
        .bind(kind)
        .bind(data)
        .bind(now())
        .bind(lease.job.as_str())
        .bind(lease.attempt)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.0).ok_or_else(|| lease.lost())
    }

    /// Events of a job after event id `after`, oldest first.
    pub async fn events_after(&self, job_id: &str, after: i64) -> Result<Vec<EventRow>> {
        Ok(sqlx::query_as(
            &self.sql(
                "SELECT id, kind, data FROM job_events WHERE job_id = ? AND id > ? ORDER BY id",
            ),
        )
        .bind(job_id)
        .bind(after)
        .fetch_all(&self.pool)
        .await?)
    }

    /// One event of a job (what another process's NOTIFY named).
    pub async fn event(&self, job_id: &str, id: i64) -> Result<Option<EventRow>> {
        Ok(sqlx::query_as(
            &self.sql("SELECT id, kind, data FROM job_events WHERE job_id = ? AND id = ?"),
        )
        .bind(job_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// A page of a job's events, newest first, older than event `before` when given.
    pub(crate) async fn events_page(
        &self,
        job_id: &str,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<TimedEventRow>> {
        Ok(sqlx::query_as(&self.sql(&format!(
            "SELECT id, kind, data, {} FROM job_events
             WHERE job_id = ? AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?",
            self.time("created_at")
        )))
        .bind(job_id)
        .bind(before)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}
