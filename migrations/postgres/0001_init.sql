-- The same tables as migrations/sqlite/ (after all of its steps), in PostgreSQL's types: times are
-- timestamptz, integers bigint, reals double precision. JSON documents (specs, event data,
-- digests) stay text: the server stores and replays them byte for byte (SSE data, ETags) and
-- never queries inside them, and jsonb would reorder their keys.

CREATE TABLE jobs (
    seq                  BIGSERIAL PRIMARY KEY,           -- creation order; the list cursor
    id                   TEXT NOT NULL UNIQUE,
    owner                TEXT,                            -- API key fingerprint, NULL without keys
    status               TEXT NOT NULL CONSTRAINT jobs_status_check
                             CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    phase                TEXT,
    spec                 TEXT NOT NULL,
    created_at           TIMESTAMPTZ NOT NULL,
    started_at           TIMESTAMPTZ,
    finished_at          TIMESTAMPTZ,
    step                 BIGINT NOT NULL DEFAULT 0,
    total_steps          BIGINT,
    epoch                DOUBLE PRECISION,
    tokens_seen          BIGINT NOT NULL DEFAULT 0,
    elapsed_seconds      DOUBLE PRECISION,
    train_loss           DOUBLE PRECISION,
    eval_loss            DOUBLE PRECISION,
    error_code           TEXT,
    error_message        TEXT,
    cancel_requested     BIGINT NOT NULL DEFAULT 0,
    attempt              BIGINT NOT NULL DEFAULT 0,
    failovers            BIGINT NOT NULL DEFAULT 0,       -- takeovers after an expired lease
    worker               TEXT,
    lease_expires_at     TIMESTAMPTZ,
    adapter_files        TEXT,                            -- [{name, bytes, sha256}] of the final adapter
    artifacts_removed_at TIMESTAMPTZ                      -- when retention removed the artifacts
);
CREATE INDEX jobs_status_seq ON jobs (status, seq);
CREATE INDEX jobs_owner_seq ON jobs (owner, seq);

CREATE TABLE job_events (
    id         BIGSERIAL PRIMARY KEY,                     -- the SSE event id
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind       TEXT NOT NULL,                             -- status | data | metrics | eval | checkpoint
    data       TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX job_events_job_id ON job_events (job_id, id);

CREATE TABLE checkpoints (
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step       BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    files      TEXT NOT NULL,                             -- [{name, bytes, sha256}]
    PRIMARY KEY (job_id, step)
);

CREATE TABLE files (
    id         TEXT PRIMARY KEY,
    owner      TEXT,
    filename   TEXT,
    bytes      BIGINT NOT NULL,
    sha256     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);

-- Every process listens (LISTEN) to learn of what another one wrote: a new event of a job (the
-- payload names the job and the event's id; the listener reads the row), a cancel request (the
-- job's id: the worker running it stops at its next step), a job to claim (workers wake up).
CREATE FUNCTION qtune_notify_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('qtune_events', NEW.job_id || ' ' || NEW.id);
    RETURN NULL;
END $$;
CREATE TRIGGER job_events_notify AFTER INSERT ON job_events
    FOR EACH ROW EXECUTE FUNCTION qtune_notify_event();

CREATE FUNCTION qtune_notify_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.cancel_requested <> 0 AND (TG_OP = 'INSERT' OR OLD.cancel_requested = 0) THEN
        PERFORM pg_notify('qtune_cancel', NEW.id);
    END IF;
    IF NEW.status = 'queued' AND (TG_OP = 'INSERT' OR OLD.status <> 'queued') THEN
        PERFORM pg_notify('qtune_jobs', NEW.id);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION qtune_notify_job();
