-- A job's exports and a checkpoint's stored bytes (as migrations/sqlite/0007_exports.sql).
CREATE TABLE exports (
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    format     TEXT NOT NULL,
    export_id  TEXT NOT NULL,
    bytes      BIGINT NOT NULL,
    sha256     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (job_id, format)
);

ALTER TABLE checkpoints ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0;
