-- Orders a deploy's log lines among its events: a line with after_version = v was written
-- after event v and before event v+1. Log writes and event appends of one deploy share a
-- per-deploy advisory lock, so this is exact and commit order equals this order.
ALTER TABLE deploy_logs ADD COLUMN after_version integer NOT NULL DEFAULT 0;
CREATE INDEX deploy_logs_after_version ON deploy_logs (deploy_id, after_version, seq);
