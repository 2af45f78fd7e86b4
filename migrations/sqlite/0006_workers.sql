-- The workers seen lately and their devices: what a job's memory estimate is checked against
-- (a job no registered device could hold fails with its estimate) and what /v1/jobs/estimate
-- reports. Each worker rewrites its row while it runs.
CREATE TABLE workers (
    id           TEXT PRIMARY KEY,                        -- host:pid:device
    device       TEXT NOT NULL,                           -- cpu | cuda:N
    total_bytes  INTEGER NOT NULL,                        -- the memory a job may plan for at most
    free_bytes   INTEGER NOT NULL,                        -- what a new job could use now
    gflops       REAL,                                    -- measured float32 matmul rate
    seen_at      TEXT NOT NULL
);

-- A job's estimated peak memory, once a worker has read its model's shape: claims skip jobs
-- that would not fit the claiming worker's free memory. (Its own table: the jobs table is
-- rebuilt on old SQLite files, see migrations/sqlite-rebuilds/.)
CREATE TABLE job_memory (
    job_id      TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    peak_bytes  INTEGER NOT NULL
);
