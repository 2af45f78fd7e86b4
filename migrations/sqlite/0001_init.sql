-- Jobs, their event log (status changes, metrics, evals, checkpoints), checkpoints and uploaded files.
-- Times are RFC 3339 text in UTC; JSON columns are text. Kept to SQL that Postgres also accepts
-- where that costs nothing.

CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,   -- creation order; the list cursor
    id               TEXT NOT NULL UNIQUE,
    owner            TEXT,                                -- API key fingerprint, NULL without keys
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    phase            TEXT,
    spec             TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT,
    step             INTEGER NOT NULL DEFAULT 0,
    total_steps      INTEGER,
    epoch            REAL,
    tokens_seen      INTEGER NOT NULL DEFAULT 0,
    elapsed_seconds  REAL,
    train_loss       REAL,
    eval_loss        REAL,
    error_code       TEXT,
    error_message    TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempt          INTEGER NOT NULL DEFAULT 0,
    worker           TEXT,
    lease_expires_at TEXT
);
CREATE INDEX jobs_status_seq ON jobs (status, seq);
CREATE INDEX jobs_owner_seq ON jobs (owner, seq);

CREATE TABLE job_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,         -- the SSE event id
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind       TEXT NOT NULL,                             -- status | data | metrics | eval | checkpoint
    data       TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX job_events_job_id ON job_events (job_id, id);

CREATE TABLE checkpoints (
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step       INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    files      TEXT NOT NULL,                             -- [{name, bytes, sha256}]
    PRIMARY KEY (job_id, step)
);

CREATE TABLE files (
    id         TEXT PRIMARY KEY,
    owner      TEXT,
    filename   TEXT,
    bytes      INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    created_at TEXT NOT NULL
);
