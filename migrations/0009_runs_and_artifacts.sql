-- Artifacts a run leaves that a later deploy of the workspace uses.
--
-- state_lock_files: the dependency lock file (.terraform.lock.hcl) a successful run used, kept
-- with the state version that run persisted (same key as state_versions: the workspace key and
-- the version). The next deploy of the workspace gets the latest one unless it brings its own
-- (service/lockfiles.py, docs/providers.md). Written in the transaction that indexes the state
-- version; goes with it if that version is ever deleted. Not secret: no encryption.
CREATE TABLE state_lock_files (
    workspace   text        NOT NULL,
    version     integer     NOT NULL,
    content     text        NOT NULL,
    sha256      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, version),
    FOREIGN KEY (workspace, version) REFERENCES state_versions (workspace, version) ON DELETE CASCADE
);
