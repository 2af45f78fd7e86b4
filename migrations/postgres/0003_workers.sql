-- The workers seen lately and their devices (as migrations/sqlite/0006_workers.sql).
CREATE TABLE workers (
    id           TEXT PRIMARY KEY,
    device       TEXT NOT NULL,
    total_bytes  BIGINT NOT NULL,
    free_bytes   BIGINT NOT NULL,
    gflops       DOUBLE PRECISION,
    seen_at      TIMESTAMPTZ NOT NULL
);

CREATE TABLE job_memory (
    job_id      TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    peak_bytes  BIGINT NOT NULL
);
