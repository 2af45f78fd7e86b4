-- Under early stopping, the step whose checkpoint is the job's adapter (the best evaluation).
-- (migrations/sqlite-rebuilds/0005 lists it too: on a new database that rebuild runs after this.)
ALTER TABLE jobs ADD COLUMN best_step INTEGER;
