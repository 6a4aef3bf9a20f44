-- Named queries for the event store, loaded by service.queries. Each block starts with
-- "-- name --", then a description, then the query. Python never builds SQL from strings.

-- lock_appends --
-- Serialise appends for the rest of the transaction so global positions commit in order.
SELECT pg_advisory_xact_lock(7310002);

-- append --
-- Append events after an expected version and write the read model, in one statement
-- (tfdeploy_append, migration 0006: the append lock, the per-deploy lock, the version check
-- with SQLSTATE TD409, the inserts and the upsert of deploys; migration 0007 added the
-- workspace's id and owner).
SELECT position, deploy_id, version, type, data, recorded_at, actor, stream_kind,
       %(workspace_id)s::uuid AS workspace_id
FROM tfdeploy_append(%(deploy_id)s::uuid, %(expected)s::integer, %(types)s::text[],
                     %(data)s::jsonb[], %(actor)s::text, %(owner)s::text, %(workspace)s::text,
                     %(action)s::text, %(status)s::text, %(attempt)s::integer,
                     %(max_attempts)s::integer, %(cancel_requested)s::boolean,
                     %(state_version)s::integer, %(error_reason)s::text,
                     %(error_message)s::text, %(created_at)s::timestamptz,
                     %(workspace_id)s::uuid, %(workspace_owner)s::text)
ORDER BY version;

-- read_stream --
-- A stream's events in order (a deploy's, or a workspace's), each with its workspace's id.
SELECT e.position, e.deploy_id, e.version, e.type, e.data, e.recorded_at, e.actor, e.stream_kind,
       CASE WHEN e.stream_kind = 'workspace' THEN e.deploy_id ELSE d.workspace_id END
           AS workspace_id
FROM events e LEFT JOIN deploys d ON d.id = e.deploy_id
WHERE e.deploy_id = %(deploy_id)s AND e.version > %(after_version)s
ORDER BY e.version;

-- read_all_after --
-- Every event after a global position, in position order, each with its workspace's id.
SELECT e.position, e.deploy_id, e.version, e.type, e.data, e.recorded_at, e.actor, e.stream_kind,
       CASE WHEN e.stream_kind = 'workspace' THEN e.deploy_id ELSE d.workspace_id END
           AS workspace_id
FROM events e LEFT JOIN deploys d ON d.id = e.deploy_id
WHERE e.position > %(after)s
ORDER BY e.position LIMIT %(limit)s;

-- upsert_deploy --
-- Write a deploy's read model; called in the same transaction as the append.
INSERT INTO deploys (id, owner, workspace, action, status, attempt, max_attempts,
                     cancel_requested, state_version, error_reason, error_message,
                     version, created_at, updated_at, workspace_id, workspace_owner)
VALUES (%(id)s, %(owner)s, %(workspace)s, %(action)s, %(status)s, %(attempt)s, %(max_attempts)s,
        %(cancel_requested)s, %(state_version)s, %(error_reason)s, %(error_message)s,
        %(version)s, %(created_at)s, %(updated_at)s, nullif(%(workspace_id)s::text, '')::uuid,
        %(workspace_owner)s)
ON CONFLICT (id) DO UPDATE SET
    owner = excluded.owner, workspace = excluded.workspace, action = excluded.action,
    status = excluded.status, attempt = excluded.attempt, max_attempts = excluded.max_attempts,
    cancel_requested = excluded.cancel_requested, state_version = excluded.state_version,
    error_reason = excluded.error_reason, error_message = excluded.error_message,
    version = excluded.version, created_at = excluded.created_at, updated_at = excluded.updated_at,
    workspace_id = excluded.workspace_id, workspace_owner = excluded.workspace_owner;

-- get_deploy --
-- One deploy's read model.
SELECT id, owner, workspace, action, status, attempt, max_attempts, cancel_requested,
       state_version, error_reason, error_message, version, created_at, updated_at,
       workspace_id, workspace_owner
FROM deploys WHERE id = %(id)s;

-- list_deploys --
-- A page of deploys, newest first, keyset-paginated on (created_at, id); filters are optional.
-- With a viewer (a user who is not an admin), only the deploys they may see: their own, and
-- those of the workspaces they own or are a member of. Each source is read through its own
-- index, newest first, and the page is merged from them.
WITH filtered AS NOT MATERIALIZED (
    SELECT id, owner, workspace, action, status, attempt, max_attempts, cancel_requested,
           state_version, error_reason, error_message, version, created_at, updated_at,
           workspace_id, workspace_owner
    FROM deploys
    WHERE (%(owner)s::text IS NULL OR owner = %(owner)s::text)
      AND (%(status)s::text IS NULL OR status = %(status)s::text)
      AND (%(workspace_id)s::uuid IS NULL OR workspace_id = %(workspace_id)s::uuid)
      AND (%(cursor_at)s::timestamptz IS NULL
           OR (created_at, id) < (%(cursor_at)s::timestamptz, %(cursor_id)s::uuid))
), readable AS MATERIALIZED (
    -- The workspaces the viewer may read: owned, or a member of.
    SELECT w.id FROM workspaces w WHERE w.owner = %(viewer)s::text
    UNION
    SELECT m.workspace_id FROM workspace_members m WHERE m.user_name = %(viewer)s::text
)
SELECT * FROM (
    (SELECT f.* FROM filtered f
     WHERE %(viewer)s::text IS NULL
     ORDER BY f.created_at DESC, f.id DESC LIMIT %(limit)s)
    UNION ALL
    (SELECT f.* FROM filtered f
     WHERE f.owner = %(viewer)s::text
     ORDER BY f.created_at DESC, f.id DESC LIMIT %(limit)s)
    UNION ALL
    (SELECT x.* FROM readable r
     CROSS JOIN LATERAL (
         SELECT f.* FROM filtered f
         WHERE f.workspace_id = r.id AND f.owner <> %(viewer)s::text
         ORDER BY f.created_at DESC, f.id DESC LIMIT %(limit)s) x)
) page
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- rebuild_scan --
-- Every deploy event in stream order, for a projection rebuild (one pass, through a server-side
-- cursor); data as JSON text, decoded straight into its event type. Workspace streams have no
-- read model here.
SELECT deploy_id::text, version, type, data::text, recorded_at
FROM events WHERE stream_kind = 'deploy' ORDER BY deploy_id, version;

-- copy_deploys --
-- Read-model rows in bulk, for a projection rebuild (store._view_row's column order).
COPY deploys (id, owner, workspace, action, status, attempt, max_attempts, cancel_requested,
              state_version, error_reason, error_message, version, created_at, updated_at,
              workspace_id, workspace_owner)
FROM STDIN;

-- clear_deploys --
-- Empty the read model before a rebuild (the events stay).
DELETE FROM deploys;

-- audit_page --
-- The audit query over the event table; every filter optional, keyset on position.
-- How it stays fast at millions of events (docs/audit.md, bench/audit.py):
-- * A time window also bounds the positions scanned. Events are appended one at a time under a
--   lock and stamped with clock_timestamp(), so recorded_at follows position; the bounds are read
--   from events_recorded_at one day beyond the window, so the page stays exact unless the
--   server's clock ever stepped back by more than a day.
-- * A workspace filter or a viewer admits a set of streams ("scope"): a workspace's deploys (and
--   its own stream when workspace_stream is true); a viewer's own deploys, the deploys of the
--   workspaces they own or are a member of, and the streams of the workspaces they own. A small
--   scope is joined to its events through the stream index and sorted; for a large one, events
--   are read in position order (or through another filter's index) and each stream is looked
--   up. The cut-off balances the two costs: the join reads every event of the scope, the scan
--   about limit * deploys / |scope| deploys' worth of events.
-- * Each row comes with its stream kind and its workspace's id.
WITH cutoff AS MATERIALIZED (
    -- Scopes up to this many streams are joined: sqrt(limit * deploys / 4), about where the two
    -- ways cost the same (measured with bench/audit.py at 1M events; docs/audit.md).
    SELECT ceil(sqrt(%(limit)s * greatest(c.reltuples, 1) / 4))::bigint AS deploys
    FROM pg_class c WHERE c.oid = 'deploys'::regclass
), readable AS MATERIALIZED (
    -- The workspaces the viewer may read: owned, or a member of (none without a viewer).
    SELECT w.id FROM workspaces w WHERE w.owner = %(viewer)s::text
    UNION
    SELECT m.workspace_id FROM workspace_members m WHERE m.user_name = %(viewer)s::text
), scope AS MATERIALIZED (
    -- The scope's first cutoff + 1 streams: all of a small scope; enough to tell a large one.
    SELECT s.id FROM (
        -- the workspace's deploys (those the viewer may see)
        SELECT d.id FROM deploys d
        WHERE d.workspace_id = %(workspace_id)s::uuid
          AND (%(viewer)s::text IS NULL OR d.owner = %(viewer)s::text
               OR d.workspace_id IN (SELECT id FROM readable))
        UNION ALL
        -- the workspace's own stream (its owner's, or everyone's without a viewer)
        SELECT w.id FROM workspaces w
        WHERE %(workspace_stream)s AND w.id = %(workspace_id)s::uuid
          AND (%(viewer)s::text IS NULL OR w.owner = %(viewer)s::text)
        UNION ALL
        -- without a workspace: the viewer's own deploys ...
        SELECT d.id FROM deploys d
        WHERE %(workspace_id)s::uuid IS NULL AND d.owner = %(viewer)s::text
        UNION ALL
        -- ... the other deploys of the workspaces they may read ...
        SELECT d.id FROM readable r JOIN deploys d ON d.workspace_id = r.id
        WHERE %(workspace_id)s::uuid IS NULL AND d.owner <> %(viewer)s::text
        UNION ALL
        -- ... and the streams of the workspaces they own.
        SELECT w.id FROM workspaces w
        WHERE %(workspace_id)s::uuid IS NULL AND w.owner = %(viewer)s::text
    ) s
    LIMIT (SELECT deploys + 1 FROM cutoff)
), plan AS MATERIALIZED (
    -- Decided when the query runs (the planner cannot know the scope's size): 'all' without a
    -- scope, 'join' for a small one, 'scan' for a large one.
    SELECT CASE
             WHEN %(workspace_id)s::uuid IS NULL AND %(viewer)s::text IS NULL THEN 'all'
             WHEN count(*) <= (SELECT deploys FROM cutoff) THEN 'join'
             ELSE 'scan'
           END AS way
    FROM scope
), matching AS NOT MATERIALIZED (
    SELECT e.position, e.deploy_id, e.version, e.type, e.data, e.recorded_at, e.actor,
           e.stream_kind
    FROM events e
    WHERE (%(deploy_id)s::uuid IS NULL OR e.deploy_id = %(deploy_id)s::uuid)
      AND (%(type)s::text IS NULL OR e.type = %(type)s::text)
      AND (%(actor)s::text IS NULL OR e.actor = %(actor)s::text)
      AND (%(since)s::timestamptz IS NULL OR e.recorded_at >= %(since)s::timestamptz)
      AND (%(until)s::timestamptz IS NULL OR e.recorded_at < %(until)s::timestamptz)
      AND e.position > %(after)s
      AND (%(since)s::timestamptz IS NULL
           OR e.position > coalesce(
               (SELECT b.position FROM events b
                WHERE b.recorded_at < %(since)s::timestamptz - interval '1 day'
                ORDER BY b.recorded_at DESC, b.position DESC LIMIT 1), 0))
      AND (%(until)s::timestamptz IS NULL
           OR e.position < coalesce(
               (SELECT b.position FROM events b
                WHERE b.recorded_at >= %(until)s::timestamptz + interval '1 day'
                ORDER BY b.recorded_at, b.position LIMIT 1), 9223372036854775807))
), page AS (
    (SELECT m.* FROM matching m
     WHERE (SELECT way FROM plan) = 'all'
     ORDER BY m.position LIMIT %(limit)s)
    UNION ALL
    (SELECT m.* FROM scope s
     CROSS JOIN LATERAL (
         -- One probe of events_stream_version per stream: within a stream, version order is
         -- position order (the LIMIT keeps this a nested loop).
         SELECT * FROM matching m WHERE m.deploy_id = s.id ORDER BY m.version LIMIT %(limit)s) m
     WHERE (SELECT way FROM plan) = 'join'
     ORDER BY m.position LIMIT %(limit)s)
    UNION ALL
    (SELECT m.* FROM matching m
     WHERE (SELECT way FROM plan) = 'scan'
       AND CASE m.stream_kind
             WHEN 'workspace' THEN EXISTS (
                 SELECT FROM workspaces w
                 WHERE w.id = m.deploy_id
                   AND (%(workspace_id)s::uuid IS NULL
                        OR (%(workspace_stream)s AND w.id = %(workspace_id)s::uuid))
                   AND (%(viewer)s::text IS NULL OR w.owner = %(viewer)s::text))
             ELSE EXISTS (
                 SELECT FROM deploys d
                 WHERE d.id = m.deploy_id
                   AND (%(workspace_id)s::uuid IS NULL OR d.workspace_id = %(workspace_id)s::uuid)
                   AND (%(viewer)s::text IS NULL OR d.owner = %(viewer)s::text
                        OR d.workspace_id IN (SELECT id FROM readable)))
           END
     ORDER BY m.position LIMIT %(limit)s)
    ORDER BY position
    LIMIT %(limit)s
)
SELECT p.position, p.deploy_id, p.version, p.type, p.data, p.recorded_at, p.actor,
       p.stream_kind,
       CASE WHEN p.stream_kind = 'workspace' THEN p.deploy_id ELSE d.workspace_id END
           AS workspace_id
FROM page p LEFT JOIN deploys d ON d.id = p.deploy_id
ORDER BY p.position;

-- defer_job --
-- Queue a procrastinate job (built by procrastinate: service.queue.Queue.run_job) through
-- procrastinate's own SQL function, the one its defer runs, so that the job can travel in one
-- query with the append (store.append_and_commit) and commit with it.
SELECT unnest(procrastinate_defer_jobs_v1(ARRAY[ROW(
    %(queue_name)s::varchar, %(task_name)s::varchar, %(priority)s::integer, %(lock)s::text,
    %(queueing_lock)s::text, %(args)s::jsonb, %(scheduled_at)s::timestamptz
)::procrastinate_job_to_defer_v1]) ) AS id;

-- insert_inputs --
-- A deploy's files and variables, written once with its Requested event.
INSERT INTO deploy_inputs (deploy_id, files, variables, sha256)
VALUES (%(deploy_id)s, %(files)s, %(variables)s, %(sha256)s);

-- get_inputs --
-- A deploy's files and variables.
SELECT files, variables, sha256 FROM deploy_inputs WHERE deploy_id = %(deploy_id)s;

-- insert_secrets --
-- A deploy's encrypted secrets.
INSERT INTO deploy_secrets (deploy_id, ciphertext) VALUES (%(deploy_id)s, %(ciphertext)s);

-- get_secrets --
-- A deploy's encrypted secrets, if it still has them.
SELECT ciphertext FROM deploy_secrets WHERE deploy_id = %(deploy_id)s;

-- delete_secrets --
-- Forget a deploy's secrets once it has ended.
DELETE FROM deploy_secrets WHERE deploy_id = %(deploy_id)s;

-- get_idempotency --
-- The deploy an owner's Idempotency-Key already created.
SELECT request_sha256, deploy_id FROM idempotency_keys WHERE owner = %(owner)s AND key = %(key)s;

-- insert_idempotency --
-- Remember an Idempotency-Key; a concurrent twin collides on the primary key.
INSERT INTO idempotency_keys (owner, key, request_sha256, deploy_id)
VALUES (%(owner)s, %(key)s, %(request_sha256)s, %(deploy_id)s);
