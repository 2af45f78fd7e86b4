-- PEFT adapters brought from outside (as migrations/sqlite/0009_adapters.sql).
CREATE TABLE adapters (
    id         TEXT PRIMARY KEY,
    owner      TEXT,
    name       TEXT NOT NULL,
    base_model TEXT NOT NULL,
    bytes      BIGINT NOT NULL,
    sha256     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE UNIQUE INDEX adapters_owner_name ON adapters (COALESCE(owner, ''), name);
