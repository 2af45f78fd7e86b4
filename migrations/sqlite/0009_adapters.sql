-- PEFT adapters brought from outside (POST /v1/adapters, POST /v1/load_lora_adapter), served by
-- name over their base to their owner. Their two files are stored under adapters/{id}/ and count
-- in the owner's stored bytes.
CREATE TABLE adapters (
    id         TEXT PRIMARY KEY,
    owner      TEXT,
    name       TEXT NOT NULL,
    base_model TEXT NOT NULL,
    bytes      INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX adapters_owner_name ON adapters (COALESCE(owner, ''), name);
