-- Named queries for the event store, loaded by service.queries. Each block starts with
-- "-- name --", then a description, then the query. Python never builds SQL from strings.

-- lock_appends --
-- Serialise appends for the rest of the transaction so global positions commit in order.
SELECT pg_advisory_xact_lock(7310002);

-- append --
-- Append events after an expected version and write the read model, in one statement
-- (tfdeploy_append, migration 0006: the append lock, the per-deploy lock, the version check
-- with SQLSTATE TD409, the inserts and the upsert of deploys).
SELECT position, deploy_id, version, type, data, recorded_at, actor
FROM tfdeploy_append(%(deploy_id)s::uuid, %(expected)s::integer, %(types)s::text[],
                     %(data)s::jsonb[], %(actor)s::text, %(owner)s::text, %(workspace)s::text,
                     %(action)s::text, %(status)s::text, %(attempt)s::integer,
                     %(max_attempts)s::integer, %(cancel_requested)s::boolean,
                     %(state_version)s::integer, %(error_reason)s::text,
                     %(error_message)s::text, %(created_at)s::timestamptz)
ORDER BY version;

-- read_stream --
-- A deploy's events in order.
SELECT position, deploy_id, version, type, data, recorded_at, actor
FROM events WHERE deploy_id = %(deploy_id)s AND version > %(after_version)s
ORDER BY version;

-- read_all_after --
-- Every event after a global position, in position order.
SELECT position, deploy_id, version, type, data, recorded_at, actor
FROM events WHERE position > %(after)s
ORDER BY position LIMIT %(limit)s;

-- upsert_deploy --
-- Write a deploy's read model; called in the same transaction as the append.
INSERT INTO deploys (id, owner, workspace, action, status, attempt, max_attempts,
                     cancel_requested, state_version, error_reason, error_message,
                     version, created_at, updated_at)
VALUES (%(id)s, %(owner)s, %(workspace)s, %(action)s, %(status)s, %(attempt)s, %(max_attempts)s,
        %(cancel_requested)s, %(state_version)s, %(error_reason)s, %(error_message)s,
        %(version)s, %(created_at)s, %(updated_at)s)
ON CONFLICT (id) DO UPDATE SET
    owner = excluded.owner, workspace = excluded.workspace, action = excluded.action,
    status = excluded.status, attempt = excluded.attempt, max_attempts = excluded.max_attempts,
    cancel_requested = excluded.cancel_requested, state_version = excluded.state_version,
    error_reason = excluded.error_reason, error_message = excluded.error_message,
    version = excluded.version, created_at = excluded.created_at, updated_at = excluded.updated_at;

-- get_deploy --
-- One deploy's read model.
SELECT id, owner, workspace, action, status, attempt, max_attempts, cancel_requested,
       state_version, error_reason, error_message, version, created_at, updated_at
FROM deploys WHERE id = %(id)s;

-- list_deploys --
-- A page of deploys, newest first, keyset-paginated on (created_at, id); filters are optional.
SELECT id, owner, workspace, action, status, attempt, max_attempts, cancel_requested,
       state_version, error_reason, error_message, version, created_at, updated_at
FROM deploys
WHERE (%(owner)s::text IS NULL OR owner = %(owner)s::text)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(workspace)s::text IS NULL OR workspace = %(workspace)s::text)
  AND (%(cursor_at)s::timestamptz IS NULL
       OR (created_at, id) < (%(cursor_at)s::timestamptz, %(cursor_id)s::uuid))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- rebuild_scan --
-- Every event in stream order, for a projection rebuild (one pass, through a server-side
-- cursor); data as JSON text, decoded straight into its event type.
SELECT deploy_id::text, version, type, data::text, recorded_at
FROM events ORDER BY deploy_id, version;

-- copy_deploys --
-- Read-model rows in bulk, for a projection rebuild (store._view_row's column order).
COPY deploys (id, owner, workspace, action, status, attempt, max_attempts, cancel_requested,
              state_version, error_reason, error_message, version, created_at, updated_at)
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
-- * A workspace or owner filter admits a set of deploys ("scope"). A small one is joined to its
--   events through the deploy index and sorted; for a large one, events are read in position
--   order (or through another filter's index) and each deploy is looked up. The cut-off balances
--   the two costs: the join reads every event of the scope, the scan about
--   limit * deploys / |scope| deploys' worth of events.
WITH cutoff AS MATERIALIZED (
    -- Scopes up to this many deploys are joined: sqrt(limit * deploys / 4), about where the two
    -- ways cost the same (measured with bench/audit.py at 1M events; docs/audit.md).
    SELECT ceil(sqrt(%(limit)s * greatest(c.reltuples, 1) / 4))::bigint AS deploys
    FROM pg_class c WHERE c.oid = 'deploys'::regclass
), scope AS MATERIALIZED (
    -- The scope's first cutoff + 1 deploys: all of a small scope; enough to tell a large one.
    SELECT d.id FROM deploys d
    WHERE (%(workspace)s::text IS NOT NULL OR %(owner)s::text IS NOT NULL)
      AND (%(workspace)s::text IS NULL OR d.workspace = %(workspace)s::text)
      AND (%(owner)s::text IS NULL OR d.owner = %(owner)s::text)
    LIMIT (SELECT deploys + 1 FROM cutoff)
), plan AS MATERIALIZED (
    -- Decided when the query runs (the planner cannot know the scope's size): 'all' without a
    -- scope, 'join' for a small one, 'scan' for a large one.
    SELECT CASE
             WHEN %(workspace)s::text IS NULL AND %(owner)s::text IS NULL THEN 'all'
             WHEN count(*) <= (SELECT deploys FROM cutoff) THEN 'join'
             ELSE 'scan'
           END AS way
    FROM scope
), matching AS NOT MATERIALIZED (
    SELECT e.position, e.deploy_id, e.version, e.type, e.data, e.recorded_at, e.actor
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
)
(SELECT m.* FROM matching m
 WHERE (SELECT way FROM plan) = 'all'
 ORDER BY m.position LIMIT %(limit)s)
UNION ALL
(SELECT m.* FROM scope s
 CROSS JOIN LATERAL (
     -- One probe of events_stream_version per deploy: within a stream, version order is
     -- position order (the LIMIT keeps this a nested loop).
     SELECT * FROM matching m WHERE m.deploy_id = s.id ORDER BY m.version LIMIT %(limit)s) m
 WHERE (SELECT way FROM plan) = 'join'
 ORDER BY m.position LIMIT %(limit)s)
UNION ALL
(SELECT m.* FROM matching m
 WHERE (SELECT way FROM plan) = 'scan'
   AND EXISTS (SELECT FROM deploys d
               WHERE d.id = m.deploy_id
                 AND (%(workspace)s::text IS NULL OR d.workspace = %(workspace)s::text)
                 AND (%(owner)s::text IS NULL OR d.owner = %(owner)s::text))
 ORDER BY m.position LIMIT %(limit)s)
ORDER BY position
LIMIT %(limit)s;

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

-- insert_token --
-- A new API token (its hash only).
INSERT INTO api_tokens (name, token_hash, admin) VALUES (%(name)s, %(token_hash)s, %(admin)s)
RETURNING id;

-- find_token --
-- The live token with this hash.
SELECT id, name, admin FROM api_tokens WHERE token_hash = %(token_hash)s AND revoked_at IS NULL;

-- list_tokens --
-- Every token, without hashes.
SELECT id, name, admin, created_at, revoked_at FROM api_tokens ORDER BY id;

-- revoke_token --
-- Revoke a token by id or name.
UPDATE api_tokens SET revoked_at = now()
WHERE (id::text = %(ref)s OR name = %(ref)s) AND revoked_at IS NULL
RETURNING id;
