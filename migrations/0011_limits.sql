-- Limits shared by every API process (requests and open event streams per user), and retention
-- (docs/reliability.md, "Limits" and "Retention"; service/api/limits.py, service/maintenance.py).

-- ---------------------------------------------------------------- requests per user
-- One row per user (key 'user:<id>'), or per client address for tokens that name nobody
-- ('address:<ip>'): the requests counted in its current fixed window (window_no = the epoch
-- divided by the window's length). Counted by the statement that authenticates a request
-- (service/sql/limits.sql, authenticate_and_count), so the limit holds across every process
-- and host on this database at no extra round trip. UNLOGGED: no WAL for a write per request;
-- after a crash the counters start again from zero, which only forgives one window.
CREATE UNLOGGED TABLE request_counts (
    key       text    PRIMARY KEY,
    window_no bigint  NOT NULL,
    hits      integer NOT NULL
) WITH (fillfactor = 50);  -- room on the page: each count is a HOT update

-- ---------------------------------------------------------------- open event streams per user
-- Every API process that has served a stream has a row, refreshed every few seconds while it
-- runs (service/api/limits.py, StreamSlots); a stream counts while its process's row is fresh,
-- so the streams of a process that died stop counting once its row is stale. The process also
-- re-writes the list of its open streams each time (tfdeploy_sync_streams): a close whose
-- DELETE failed, or rows lost with the UNLOGGED table after a crash, are set right within one
-- refresh.
CREATE UNLOGGED TABLE api_processes (
    id      uuid        PRIMARY KEY,
    host    text        NOT NULL DEFAULT '',
    pid     integer     NOT NULL DEFAULT 0,
    seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE UNLOGGED TABLE open_streams (
    id         uuid        PRIMARY KEY,
    process_id uuid        NOT NULL REFERENCES api_processes (id) ON DELETE CASCADE,
    user_name  text        NOT NULL,
    opened_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX open_streams_user ON open_streams (user_name);
CREATE INDEX open_streams_process ON open_streams (process_id);

-- Open a stream for p_user unless they hold p_max already (counting streams of live processes
-- only: seen within p_lease). Serialised per user (two opens never both see p_max - 1).
-- opened: whether it was; streams: the user's open streams, this one included when opened.
CREATE FUNCTION tfdeploy_open_stream(
    p_stream uuid, p_process uuid, p_host text, p_pid integer, p_user text, p_max integer,
    p_lease interval, OUT opened boolean, OUT streams integer
) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7310006, hashtext(p_user));
    INSERT INTO api_processes (id, host, pid, seen_at) VALUES (p_process, p_host, p_pid, now())
    ON CONFLICT (id) DO UPDATE SET seen_at = now();
    SELECT count(*) INTO streams
    FROM open_streams s JOIN api_processes p ON p.id = s.process_id
    WHERE s.user_name = p_user AND p.seen_at > now() - p_lease;
    IF streams >= p_max THEN
        opened := false;
        RETURN;
    END IF;
    INSERT INTO open_streams (id, process_id, user_name) VALUES (p_stream, p_process, p_user);
    opened := true;
    streams := streams + 1;
END;
$$;

-- A process's refresh: it is alive, and these are exactly its open streams.
CREATE FUNCTION tfdeploy_sync_streams(
    p_process uuid, p_host text, p_pid integer, p_ids uuid[], p_users text[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO api_processes (id, host, pid, seen_at) VALUES (p_process, p_host, p_pid, now())
    ON CONFLICT (id) DO UPDATE SET seen_at = now();
    DELETE FROM open_streams WHERE process_id = p_process AND id <> ALL (p_ids);
    INSERT INTO open_streams (id, process_id, user_name)
    SELECT i, p_process, u FROM unnest(p_ids, p_users) AS t (i, u)
    ON CONFLICT (id) DO NOTHING;
END;
$$;

-- ---------------------------------------------------------------- retention
-- What retention removed from an ended deploy, and when. A deploy whose inputs are gone cannot
-- run again: the trigger below refuses the replay of such a deploy (SQLSTATE TD410) in the
-- transaction that would append it, so a replay racing the removal either wins (the deploy is
-- no longer ended when retention re-checks it under the deploy's lock) or is refused.
CREATE TABLE deploy_retention (
    deploy_id         uuid PRIMARY KEY,
    logs_removed_at   timestamptz,
    inputs_removed_at timestamptz
);

-- How far each pass has gone through the ended deploys, in (updated_at, id) order: every run
-- goes on from there instead of scanning the deploys already done. A deploy that changes again
-- (a replay) gets a later updated_at, so it comes round again.
CREATE TABLE retention_progress (
    kind       text PRIMARY KEY,  -- 'logs' | 'inputs'
    updated_at timestamptz NOT NULL,
    deploy_id  uuid        NOT NULL
);

-- S3 objects of deleted state versions, deleted from the bucket after the versions' rows
-- (service/maintenance.py); a row stays until its object is gone, so a failed delete is
-- retried by the next run.
CREATE TABLE state_objects_to_delete (
    location  text        PRIMARY KEY,
    workspace text        NOT NULL,
    version   integer     NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX deploys_updated ON deploys (updated_at, id);
CREATE INDEX state_versions_created ON state_versions (created_at);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

CREATE FUNCTION tfdeploy_refuse_replay_without_inputs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM deploy_retention r
               WHERE r.deploy_id = NEW.id AND r.inputs_removed_at IS NOT NULL) THEN
        RAISE EXCEPTION 'deploy %: its files and variables were removed by retention, it cannot run again', NEW.id
            USING ERRCODE = 'TD410';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER deploys_refuse_replay_without_inputs
    BEFORE UPDATE OF status ON deploys
    FOR EACH ROW
    WHEN (OLD.status IN ('succeeded', 'failed', 'cancelled', 'discarded')
          AND NEW.status NOT IN ('succeeded', 'failed', 'cancelled', 'discarded'))
    EXECUTE FUNCTION tfdeploy_refuse_replay_without_inputs();

-- One batch of a pass over ended deploys (p_kind 'logs' or 'inputs'): the next p_batch deploys
-- after the pass's mark that changed last more than p_age ago. Each is taken under its deploy's
-- lock (7310004: the lock every event append and log write of the deploy takes; if it is busy,
-- the batch stops before it and the next run starts there) and, if it is ended, checked again
-- in a statement of its own, so a replay that committed meanwhile is seen; then
--   logs:   every line but the last is deleted, and the last one becomes a marker saying how
--           many were removed (it keeps its seq: a replay's new lines, and the ids of open
--           streams, go on after it);
--   inputs: the files and variables are deleted (a replay is refused from then on).
-- Events are never touched. Returns how many deploys were pruned and whether the pass has more.
CREATE FUNCTION tfdeploy_prune_deploys(
    p_kind text, p_age interval, p_batch integer, OUT pruned integer, OUT more boolean
) LANGUAGE plpgsql AS $$
DECLARE
    mark_at timestamptz;
    mark_id uuid;
    d record;
    n integer;
    last_seq integer;
    examined integer := 0;
    busy boolean := false;
BEGIN
    pruned := 0;
    SELECT updated_at, deploy_id INTO mark_at, mark_id FROM retention_progress WHERE kind = p_kind;
    FOR d IN
        SELECT id, updated_at FROM deploys
        WHERE (mark_at IS NULL OR (updated_at, id) > (mark_at, mark_id))
          AND updated_at < now() - p_age
        ORDER BY updated_at, id
        LIMIT p_batch
    LOOP
        IF NOT pg_try_advisory_xact_lock(7310004, hashtext(d.id::text)) THEN
            -- Being written to (a replay's append, say): stop before it, so the next run
            -- takes it again.
            busy := true;
            EXIT;
        END IF;
        examined := examined + 1;
        mark_at := d.updated_at;
        mark_id := d.id;
        IF NOT EXISTS (SELECT FROM deploys x WHERE x.id = d.id
                       AND x.status IN ('succeeded', 'failed', 'cancelled', 'discarded')) THEN
            CONTINUE;
        END IF;
        IF p_kind = 'logs' THEN
            SELECT count(*), max(seq) INTO n, last_seq FROM deploy_logs WHERE deploy_id = d.id;
            IF n > 1 OR (n = 1 AND NOT EXISTS (
                    SELECT FROM deploy_retention r
                    WHERE r.deploy_id = d.id AND r.logs_removed_at IS NOT NULL)) THEN
                DELETE FROM deploy_logs WHERE deploy_id = d.id AND seq < last_seq;
                UPDATE deploy_logs
                SET line = format('[%s lines of output removed by log retention]', n),
                    stream = 'system'
                WHERE deploy_id = d.id AND seq = last_seq;
                INSERT INTO deploy_retention (deploy_id, logs_removed_at) VALUES (d.id, now())
                ON CONFLICT (deploy_id) DO UPDATE SET logs_removed_at = now();
                pruned := pruned + 1;
            END IF;
        ELSIF p_kind = 'inputs' THEN
            DELETE FROM deploy_inputs WHERE deploy_id = d.id;
            IF FOUND THEN
                INSERT INTO deploy_retention (deploy_id, inputs_removed_at) VALUES (d.id, now())
                ON CONFLICT (deploy_id) DO UPDATE SET inputs_removed_at = now();
                pruned := pruned + 1;
            END IF;
        ELSE
            RAISE EXCEPTION 'unknown retention kind %', p_kind;
        END IF;
    END LOOP;
    IF mark_at IS NOT NULL THEN
        INSERT INTO retention_progress (kind, updated_at, deploy_id) VALUES (p_kind, mark_at, mark_id)
        ON CONFLICT (kind) DO UPDATE SET updated_at = excluded.updated_at, deploy_id = excluded.deploy_id;
    END IF;
    more := NOT busy AND examined >= p_batch;
END;
$$;

-- One batch of state versions older than p_age, deleted with their blobs (the PostgreSQL
-- store) and lock files (ON DELETE CASCADE), their S3 objects queued in
-- state_objects_to_delete. Never a workspace's latest version, and nothing of a workspace that
-- has an unfinished deploy (queued, running, retrying, or a plan waiting for approval: it may
-- need the version it started from or was planned against) or that the CLI holds locked.
-- Returns the versions deleted.
CREATE FUNCTION tfdeploy_prune_states(p_age interval, p_batch integer)
RETURNS TABLE (workspace text, version integer, store text, location text)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    WITH doomed AS (
        SELECT v.workspace, v.version
        FROM state_versions v
        WHERE v.created_at < now() - p_age
          AND v.version < (SELECT max(m.version) FROM state_versions m
                           WHERE m.workspace = v.workspace)
          AND NOT EXISTS (
              SELECT FROM deploys d
              WHERE d.workspace_id = (CASE WHEN v.workspace ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                                           THEN v.workspace::uuid END)
                AND d.status IN ('queued', 'deploying', 'retrying', 'planned'))
          AND NOT EXISTS (SELECT FROM workspace_locks l WHERE l.workspace_id::text = v.workspace)
        ORDER BY v.created_at
        LIMIT p_batch
        FOR UPDATE OF v SKIP LOCKED
    ), gone AS (
        DELETE FROM state_versions s USING doomed
        WHERE s.workspace = doomed.workspace AND s.version = doomed.version
        RETURNING s.workspace, s.version, s.store, s.location
    ), blobs AS (
        DELETE FROM state_blobs b USING gone
        WHERE b.workspace = gone.workspace AND b.version = gone.version
    ), unsealed AS (
        DELETE FROM unsealed_s3_objects u USING gone
        WHERE u.workspace = gone.workspace AND u.version = gone.version
    ), queued AS (
        INSERT INTO state_objects_to_delete (location, workspace, version)
        SELECT gone.location, gone.workspace, gone.version FROM gone WHERE gone.store = 's3'
        ON CONFLICT DO NOTHING
    )
    SELECT gone.workspace, gone.version, gone.store, gone.location FROM gone;
END;
$$;

-- ---------------------------------------------------------------- log notifications
-- One notification per transaction that writes a deploy's log lines, not one per line: the
-- payload is the deploy's id alone, and PostgreSQL delivers identical notifications of one
-- transaction once. Listeners never used the seq (a notification only says "this deploy's
-- stream may have grown"; service/notify.py), and a deploy flooding its output cost every API
-- process one notification per line (bench/flood.py).
CREATE OR REPLACE FUNCTION deploy_logs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tfdeploy_logs', NEW.deploy_id::text);
    RETURN NULL;
END;
$$;
