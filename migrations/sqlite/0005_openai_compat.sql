-- A file's purpose and status; job metadata (filterable); idempotency keys. (Paused jobs need
-- the jobs table's CHECK constraint changed, which SQLite cannot do inside sqlx's migration
-- transaction: see migrations/sqlite-rebuilds/ and Db::connect.)

ALTER TABLE files ADD COLUMN purpose TEXT NOT NULL DEFAULT 'fine-tune';
-- uploaded | processed (checked as a training file) | error (status_details says why)
ALTER TABLE files ADD COLUMN status TEXT NOT NULL DEFAULT 'uploaded';
ALTER TABLE files ADD COLUMN status_details TEXT;

-- A job's metadata pairs (also in its spec), one row each so that lists can filter on them.
CREATE TABLE job_metadata (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
);

-- An Idempotency-Key a POST carried: a repeat of the same request answers with the same object.
CREATE TABLE idempotency_keys (
    scope          TEXT NOT NULL,                         -- the API key's fingerprint, '' without keys
    route          TEXT NOT NULL,                         -- jobs | files
    key            TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    object_id      TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (scope, route, key)
);
