-- Lets the jobs table hold 'paused'. SQLite cannot change a CHECK constraint in place, so the
-- table is rebuilt as SQLite's documentation prescribes (https://www.sqlite.org/lang_altertable.html,
-- "Making Other Kinds Of Table Schema Changes"): with foreign keys off — which cannot be switched
-- inside a transaction, and sqlx 0.8 runs every SQLite migration inside one — so that dropping
-- the old table does not cascade into job_events and checkpoints, whose REFERENCES jobs (id)
-- then name the new table. Db::connect runs this once, in its own transaction, when the schema
-- lacks 'paused'.
CREATE TABLE jobs_rebuilt (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    id                   TEXT NOT NULL UNIQUE,
    owner                TEXT,
    status               TEXT NOT NULL CHECK (status IN ('queued', 'running', 'paused', 'succeeded', 'failed', 'cancelled')),
    phase                TEXT,
    spec                 TEXT NOT NULL,
    created_at           TEXT NOT NULL,
    started_at           TEXT,
    finished_at          TEXT,
    step                 INTEGER NOT NULL DEFAULT 0,
    total_steps          INTEGER,
    epoch                REAL,
    tokens_seen          INTEGER NOT NULL DEFAULT 0,
    elapsed_seconds      REAL,
    train_loss           REAL,
    eval_loss            REAL,
    error_code           TEXT,
    error_message        TEXT,
    -- 0: none; 1: cancel; 2: pause (the running worker stops at its next step either way)
    cancel_requested     INTEGER NOT NULL DEFAULT 0,
    attempt              INTEGER NOT NULL DEFAULT 0,
    worker               TEXT,
    lease_expires_at     TEXT,
    adapter_files        TEXT,
    artifacts_removed_at TEXT,
    failovers            INTEGER NOT NULL DEFAULT 0,
    -- added by 0008_best_step.sql, which runs before this rebuild
    best_step            INTEGER
);
INSERT INTO jobs_rebuilt (seq, id, owner, status, phase, spec, created_at, started_at, finished_at,
        step, total_steps, epoch, tokens_seen, elapsed_seconds, train_loss, eval_loss, error_code,
        error_message, cancel_requested, attempt, worker, lease_expires_at, adapter_files,
        artifacts_removed_at, failovers, best_step)
    SELECT seq, id, owner, status, phase, spec, created_at, started_at, finished_at, step,
        total_steps, epoch, tokens_seen, elapsed_seconds, train_loss, eval_loss, error_code,
        error_message, cancel_requested, attempt, worker, lease_expires_at, adapter_files,
        artifacts_removed_at, failovers, best_step
    FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_rebuilt RENAME TO jobs;
CREATE INDEX jobs_status_seq ON jobs (status, seq);
CREATE INDEX jobs_owner_seq ON jobs (owner, seq);
