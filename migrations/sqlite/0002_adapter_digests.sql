-- The final adapter's files with their size and sha256, recorded when the job succeeds:
-- downloads are served under this ETag and checked against it. [{name, bytes, sha256}]
ALTER TABLE jobs ADD COLUMN adapter_files TEXT;
