-- Under early stopping, the step whose checkpoint is the job's adapter (as
-- migrations/sqlite/0008_best_step.sql).
ALTER TABLE jobs ADD COLUMN best_step BIGINT;
