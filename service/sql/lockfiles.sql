-- Named queries for the lock files kept with state versions (service/lockfiles.py).

-- save_lock_file --
-- The lock file a successful run used, with the state version it persisted (same transaction).
INSERT INTO state_lock_files (workspace, version, content, sha256)
VALUES (%(workspace)s, %(version)s, %(content)s, %(sha256)s)
ON CONFLICT (workspace, version) DO UPDATE SET content = EXCLUDED.content, sha256 = EXCLUDED.sha256;

-- latest_lock_file --
-- The lock file of a workspace's latest state version that has one.
SELECT version, content, sha256 FROM state_lock_files
WHERE workspace = %(workspace)s ORDER BY version DESC LIMIT 1;
