-- Times a job lost its worker (its lease expired while it ran) and was taken over by a claim.
ALTER TABLE jobs ADD COLUMN failovers INTEGER NOT NULL DEFAULT 0;
