-- Paused jobs; a file's purpose and status; job metadata (filterable); idempotency keys. The same
-- steps as migrations/sqlite/0005_openai_compat.sql.
ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('queued', 'running', 'paused', 'succeeded', 'failed', 'cancelled'));
-- cancel_requested: 0 none, 1 cancel, 2 pause (the running worker stops at its next step either way)

ALTER TABLE files ADD COLUMN purpose TEXT NOT NULL DEFAULT 'fine-tune';
ALTER TABLE files ADD COLUMN status TEXT NOT NULL DEFAULT 'uploaded';
ALTER TABLE files ADD COLUMN status_details TEXT;

CREATE TABLE job_metadata (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
);

CREATE TABLE idempotency_keys (
    scope          TEXT NOT NULL,
    route          TEXT NOT NULL,
    key            TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    object_id      TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (scope, route, key)
);
