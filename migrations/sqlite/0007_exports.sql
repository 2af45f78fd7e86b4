-- A job's exports (merged folder as a tar, GGUF files), recorded once stored: only a recorded
-- export is served, checked against its digest. Each export is written under its own id
-- (jobs/{job}/exports/{export_id}/{file}), so a re-export never touches the file a download is
-- reading; the row points at the newest.
CREATE TABLE exports (
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    format     TEXT NOT NULL,
    export_id  TEXT NOT NULL,
    bytes      INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (job_id, format)
);

-- Every file of a checkpoint (the resume state too), counted in its owner's stored bytes.
ALTER TABLE checkpoints ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
