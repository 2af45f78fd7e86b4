//! Storage: one SQLite file in the data dir, through sqlx. All SQL lives in this module.
//!
//! The job queue is the `jobs` table (`jobs.rs`): a worker claims the oldest queued job (or one
//! whose lease expired) with a single `UPDATE … RETURNING`, which SQLite runs atomically, and
//! every later write of that worker — heartbeat, phase, progress, events, checkpoints, the
//! finish — names the [`Lease`] it claimed and is refused once another attempt has taken the job.
//! `events.rs` is the event log (the SSE history), `files.rs` the uploads.

mod events;
mod files;
mod jobs;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

pub use events::EventRow;
pub use files::FileRow;
pub use jobs::{CancelOutcome, CheckpointRow, Claim, DeleteOutcome, JobRow};

use crate::job::JobId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A fenced write of a worker whose claim is no longer current: another attempt took the
    /// job over (its lease expired), or the job was finished or requeued.
    #[error("job {job}: attempt {attempt} no longer holds the job; the write was refused")]
    LeaseLost { job: String, attempt: i64 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The fence of a worker's writes: the job and the attempt number its claim got. Every claim
/// increments the attempt, so a worker whose job was taken over can no longer write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job: JobId,
    pub attempt: i64,
}

impl Lease {
    pub(crate) fn lost(&self) -> Error {
        Error::LeaseLost {
            job: self.job.to_string(),
            attempt: self.attempt,
        }
    }

    /// `Ok` when the fenced statement changed its one row, else the lease is gone.
    pub(crate) fn check(&self, rows_affected: u64) -> Result<()> {
        if rows_affected == 1 {
            Ok(())
        } else {
            Err(self.lost())
        }
    }
}

#[derive(Clone)]
pub struct Db {
    pool: SqlitePool,
    /// Jobs of one owner that may run at once (the claim skips owners at it).
    max_running_per_owner: i64,
}

/// RFC 3339 UTC time with a fixed six-digit fraction, so that text order is time order (the
/// lease and list queries compare these strings).
const TIME_FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
);

pub fn format_time(t: time::OffsetDateTime) -> String {
    t.format(TIME_FORMAT).expect("any UTC time formats")
}

pub fn now() -> String {
    format_time(time::OffsetDateTime::now_utc())
}

pub fn in_seconds(secs: i64) -> String {
    format_time(time::OffsetDateTime::now_utc() + time::Duration::seconds(secs))
}

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
        Ok(Db {
            pool,
            max_running_per_owner: i64::MAX,
        })
    }

    /// Claims skip an owner with `n` jobs running (0: no limit).
    pub fn limit_running_per_owner(mut self, n: u64) -> Db {
        self.max_running_per_owner = if n == 0 { i64::MAX } else { n as i64 };
        self
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The statuses the jobs table's CHECK constraint allows, read from the schema SQLite keeps:
    /// compared with [`crate::job::JobStatus::ALL`] by a test.
    pub async fn allowed_statuses(&self) -> Result<Vec<String>> {
        let (sql,): (String,) =
            sqlx::query_as("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'")
                .fetch_one(&self.pool)
                .await?;
        let list = sql
            .split_once("status IN (")
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(list, _)| list)
            .unwrap_or_default();
        Ok(list
            .split(',')
            .map(|s| s.trim().trim_matches('\'').to_string())
            .filter(|s| !s.is_empty())
            .collect())
    }
}
