//! Storage: SQLite (one file, the embedded default) or PostgreSQL (shared by any number of API
//! and worker processes), through sqlx's `Any` driver. All SQL lives in this module.
//!
//! The job queue is the `jobs` table (`jobs.rs`): a worker claims the oldest queued job (or one
//! whose lease expired) with a single `UPDATE … RETURNING` (on PostgreSQL its row is picked `FOR
//! UPDATE SKIP LOCKED`), and every later write of that worker — heartbeat, phase, progress,
//! events, checkpoints, the finish — names the [`Lease`] it claimed and is refused once another
//! attempt has taken the job. `events.rs` is the event log (the SSE history), `files.rs` the
//! uploads, `idempotency.rs` the keys that make a repeated POST answer with its first object,
//! `notify.rs` PostgreSQL's LISTEN/NOTIFY between processes, `workers.rs` the pool's devices
//! and the jobs' memory estimates.
//!
//! The SQL is written once, for both: `?` parameters, `?::timestamptz` for a time parameter, and
//! times read through [`Db::time`]; [`Db::sql`] makes the backend's text. Times are RFC 3339 text
//! in SQLite (a fixed format, so that text order is time order) and `timestamptz` in PostgreSQL.

pub(crate) mod adapters;
mod events;
mod exports;
mod files;
mod idempotency;
mod jobs;
pub(crate) mod notify;
mod workers;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor};

pub use adapters::AdapterRow;
pub(crate) use events::EventRow;
pub use exports::ExportRow;
pub(crate) use exports::RecordedExport;
pub(crate) use files::{FileRow, Order};
pub(crate) use idempotency::KeyClaim;
pub(crate) use jobs::StopRequest;
pub use jobs::{CancelOutcome, DeleteOutcome, PauseOutcome, ResumeOutcome};
pub(crate) use jobs::{CheckpointRow, Claim, JobRow};

use crate::job::JobId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database URL {0:?}: expected sqlite://PATH or postgres://…")]
    Url(String),
    /// A fenced write of a worker whose claim is no longer current: another attempt took the
    /// job over (its lease expired), or the job was finished or requeued.
    #[error("job {job}: attempt {attempt} no longer holds the job; the write was refused")]
    LeaseLost { job: String, attempt: i64 },
    /// A stored value that does not read back as what was written (edited by hand, or by a
    /// newer version).
    #[error("job {job}: the stored {column} is unreadable: {why}")]
    Corrupt {
        job: String,
        column: String,
        why: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The database could not be reached (refused, reset, timed out waiting for a connection,
    /// shutting down or restarting): the statement may succeed when tried again, and a client
    /// is told to come back (503) rather than that something is broken (500).
    pub fn is_unavailable(&self) -> bool {
        let Error::Sqlx(e) = self else {
            return false;
        };
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // SQLSTATE class 08 (connection exception), 57P01..57P03 (shutting down, crash
            // recovery, starting up), 53300 (too many connections), 53100 (disk full):
            // PostgreSQL's appendix A; SQLite's 13 (SQLITE_FULL), its disk full
            sqlx::Error::Database(d) => d.code().is_some_and(|c| {
                c.starts_with("08")
                    || matches!(&*c, "57P01" | "57P02" | "57P03" | "53300" | "53100" | "13")
            }),
            _ => false,
        }
    }
}

/// How long a statement waits for a pooled connection on PostgreSQL before the database counts
/// as unavailable: a request during an outage is answered (503) within seconds instead of
/// hanging for sqlx's default of 30. SQLite, a local file, keeps the default: its waits are
/// for other writers, not for a network.
const PG_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a starting process waits for an unreachable database before giving up: long enough
/// for a PostgreSQL restart, so that a fleet started beside its database (compose) comes up.
const CONNECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    /// Where it connected (PostgreSQL's LISTEN needs a connection of its own).
    url: std::sync::Arc<str>,
    /// Jobs of one owner that may run at once (the claim skips owners at it).
    max_running_per_owner: i64,
}

/// RFC 3339 UTC time with a fixed six-digit fraction, so that text order is time order (the
/// lease and list queries compare these strings).
const TIME_FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
);

pub(crate) fn format_time(t: time::OffsetDateTime) -> String {
    t.format(TIME_FORMAT).expect("any UTC time formats")
}

pub fn now() -> String {
    format_time(time::OffsetDateTime::now_utc())
}

pub(crate) fn in_seconds(secs: i64) -> String {
    format_time(time::OffsetDateTime::now_utc() + time::Duration::seconds(secs))
}

impl Db {
    /// Connects to `sqlite://PATH` (created if missing; WAL, foreign keys) or `postgres://…`
    /// with a pool of `pool_size` connections, and applies the backend's embedded migrations.
    pub async fn connect(url: &str, pool_size: u32) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if url.starts_with("sqlite:") {
            let sep = if url.contains('?') { '&' } else { '?' };
            (Backend::Sqlite, format!("{url}{sep}mode=rwc"))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_string())
        } else {
            return Err(Error::Url(redact(url)));
        };
        let mut options = AnyPoolOptions::new().max_connections(pool_size.max(1));
        if backend == Backend::Postgres {
            options = options.acquire_timeout(PG_ACQUIRE_TIMEOUT);
        }
        let started = std::time::Instant::now();
        let mut backoff = crate::retry::Backoff::new();
        let pool = loop {
            match Self::open(options.clone(), backend, &url).await {
                Err(e) if e.is_unavailable() && started.elapsed() < CONNECT_PATIENCE => {
                    tracing::warn!(error = %e, url = %redact(&url), "database unreachable; retrying");
                    backoff.wait().await;
                }
                result => break result?,
            }
        };
        Ok(Db {
            pool,
            backend,
            url: url.into(),
            max_running_per_owner: i64::MAX,
        })
    }

    /// The pool, connected and migrated.
    async fn open(options: AnyPoolOptions, backend: Backend, url: &str) -> Result<AnyPool> {
        let pool = options
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // the busy timeout first: switching to WAL waits for other writers
                        conn.execute(
                            "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL;
                             PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        match backend {
            Backend::Sqlite => {
                sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
                sqlite_rebuild_jobs(&pool).await?;
            }
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await?,
        }
        Ok(pool)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The backend's text of a statement written with `?` parameters (see the module's notes).
    fn sql(&self, text: &str) -> String {
        translate(self.backend, text)
    }

    /// A time column as the select list reads it: RFC 3339 text with six fraction digits on both.
    fn time(&self, column: &str) -> String {
        match self.backend {
            Backend::Sqlite => column.to_string(),
            Backend::Postgres => {
                let name = column.rsplit('.').next().unwrap_or(column);
                format!(
                    "to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS {name}"
                )
            }
        }
    }

    /// A select list in which the time columns are read through [`Db::time`].
    fn columns(&self, columns: &[&str]) -> String {
        columns
            .iter()
            .map(|c| {
                if TIME_COLUMNS.contains(c) {
                    self.time(c)
                } else {
                    c.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Claims skip an owner with `n` jobs running (0: no limit).
    pub(crate) fn limit_running_per_owner(mut self, n: u64) -> Db {
        self.max_running_per_owner = if n == 0 { i64::MAX } else { n as i64 };
        self
    }

    /// A transaction that holds `owner`'s quota lock until it ends, so that a quota's count and
    /// the write it allows happen as one (concurrent requests of one key queue here).
    /// PostgreSQL: a transaction-scoped advisory lock on the owner. SQLite: `BEGIN IMMEDIATE`,
    /// the one write lock taken before the first read — a deferred transaction that read first
    /// could not take it later once another connection had written (SQLITE_BUSY at once, not
    /// after the busy timeout).
    pub(crate) async fn begin_owner_write(
        &self,
        owner: Option<&str>,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        match self.backend {
            Backend::Sqlite => Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?),
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock(hashtext($1))) AS locked")
                    .bind(owner.unwrap_or(""))
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }

    pub(crate) async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The statuses the jobs table's CHECK constraint allows, read from the schema the database
    /// keeps: compared with [`crate::job::JobStatus::ALL`] by a test.
    pub async fn allowed_statuses(&self) -> Result<Vec<String>> {
        let query = match self.backend {
            Backend::Sqlite => "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'",
            Backend::Postgres => {
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'jobs_status_check'"
            }
        };
        let (sql,): (String,) = sqlx::query_as(query).fetch_one(&self.pool).await?;
        // the quoted words of the status check (SQLite keeps the CREATE TABLE text, PostgreSQL
        // gives the constraint alone)
        let check = match self.backend {
            Backend::Sqlite => sql
                .split_once("status IN (")
                .and_then(|(_, rest)| rest.split_once(')'))
                .map(|(list, _)| list.to_string())
                .unwrap_or_default(),
            Backend::Postgres => sql,
        };
        Ok(check
            .split('\'')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect())
    }
}

/// Rebuilds SQLite's jobs table when its status CHECK lacks `paused`
/// (migrations/sqlite-rebuilds/ says why this is not an sqlx migration). Foreign keys are off
/// on this connection for the rebuild only; `BEGIN IMMEDIATE` takes the write lock first, so a
/// second process starting on the same file waits and then finds the work done.
async fn sqlite_rebuild_jobs(pool: &AnyPool) -> Result<()> {
    const REBUILD: &str =
        include_str!("../../migrations/sqlite-rebuilds/0005_jobs_status_paused.sql");
    let mut conn = pool.acquire().await?;
    conn.execute("PRAGMA foreign_keys = OFF").await?;
    let rebuilt = async {
        conn.execute("BEGIN IMMEDIATE").await?;
        let (schema,): (String,) =
            sqlx::query_as("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'")
                .fetch_one(&mut *conn)
                .await?;
        if !schema.contains("'paused'") {
            conn.execute(REBUILD).await?;
            let broken: Vec<(String,)> = sqlx::query_as("PRAGMA foreign_key_check")
                .fetch_all(&mut *conn)
                .await?;
            if !broken.is_empty() {
                return Err(sqlx::Error::Protocol(format!(
                    "rebuilding the jobs table broke {} foreign keys",
                    broken.len()
                )));
            }
        }
        conn.execute("COMMIT").await?;
        Ok::<(), sqlx::Error>(())
    }
    .await;
    if rebuilt.is_err() {
        let _ = conn.execute("ROLLBACK").await;
    }
    conn.execute("PRAGMA foreign_keys = ON").await?;
    Ok(rebuilt?)
}

/// Columns that hold times (read through [`Db::time`]).
const TIME_COLUMNS: [&str; 5] = [
    "created_at",
    "started_at",
    "finished_at",
    "lease_expires_at",
    "artifacts_removed_at",
];

/// `?` → `$1, $2, …` for PostgreSQL; `?::timestamptz` → `?` for SQLite (which keeps times as
/// text). The statements hold no `?` inside string literals.
fn translate(backend: Backend, text: &str) -> String {
    match backend {
        Backend::Sqlite => text.replace("?::timestamptz", "?"),
        Backend::Postgres => {
            let mut out = String::with_capacity(text.len() + 16);
            let mut n = 0;
            for c in text.chars() {
                if c == '?' {
                    n += 1;
                    out.push('$');
                    out.push_str(&n.to_string());
                } else {
                    out.push(c);
                }
            }
            out
        }
    }
}

/// A database URL fit for an error message: without its password.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_translate_per_backend() {
        let sql = "UPDATE jobs SET a = ?, t = ?::timestamptz WHERE id = ? AND owner IS NOT DISTINCT FROM ?";
        assert_eq!(
            translate(Backend::Postgres, sql),
            "UPDATE jobs SET a = $1, t = $2::timestamptz WHERE id = $3 AND owner IS NOT DISTINCT FROM $4"
        );
        assert_eq!(
            translate(Backend::Sqlite, sql),
            "UPDATE jobs SET a = ?, t = ? WHERE id = ? AND owner IS NOT DISTINCT FROM ?"
        );
    }

    #[tokio::test]
    async fn sqlite_connections_have_their_settings() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let db = Db::connect(&url, 2).await.unwrap();
        for (pragma, expected) in [
            ("journal_mode", "wal"),
            ("foreign_keys", "1"),
            ("busy_timeout", "10000"),
            ("synchronous", "1"),
        ] {
            use sqlx::Row;
            let row = sqlx::query(&format!("PRAGMA {pragma}"))
                .fetch_one(&db.pool)
                .await
                .unwrap();
            let value = row
                .try_get::<String, _>(0)
                .or_else(|_| row.try_get::<i64, _>(0).map(|n| n.to_string()))
                .unwrap();
            assert_eq!(value, expected, "PRAGMA {pragma}");
        }
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://qtune:hunter2@db:5432/qtune"),
            "postgres://qtune:***@db:5432/qtune"
        );
    }
}
