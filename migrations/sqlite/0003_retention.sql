-- When the retention sweep removed a finished job's artifacts; its record and events stay.
ALTER TABLE jobs ADD COLUMN artifacts_removed_at TEXT;
