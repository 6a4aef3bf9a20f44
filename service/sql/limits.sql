-- Limits (service/api/limits.py) and retention (service/maintenance.py); migration 0011.

-- authenticate_and_count --
-- The principal of a live token, exactly as find_token (tenants.sql) finds it (the same rules:
-- not revoked, not expired, its user not disabled; last use recorded at most once a minute),
-- and the request counted, in the same statement, against the token's user -- or, when the
-- token names nobody, against the client's address. Fixed windows of %(window)s seconds by the
-- database's clock (one clock for every host); a statement that arrives late for its window
-- counts in the current one. hits: the requests counted in the window so far, this one
-- included; reset: seconds until the window ends.
WITH found AS (
    SELECT t.id, t.user_id, u.name, (u.admin AND t.admin) AS admin, t.last_used_at
    FROM api_tokens t JOIN users u ON u.id = t.user_id
    WHERE t.token_hash = %(token_hash)s
      AND t.revoked_at IS NULL
      AND (t.expires_at IS NULL OR t.expires_at > now())
      AND u.disabled_at IS NULL
), touched AS (
    UPDATE api_tokens t SET last_used_at = now()
    FROM found f
    WHERE t.id = f.id
      AND (f.last_used_at IS NULL OR f.last_used_at < now() - interval '1 minute')
    RETURNING t.id
), counted AS (
    INSERT INTO request_counts AS c (key, window_no, hits)
    VALUES (
        coalesce('user:' || (SELECT f.user_id FROM found f), 'address:' || %(address)s::text),
        floor(extract(epoch FROM now()) / %(window)s)::bigint,
        1
    )
    ON CONFLICT (key) DO UPDATE SET
        hits = CASE WHEN excluded.window_no <= c.window_no THEN c.hits + 1 ELSE 1 END,
        window_no = greatest(c.window_no, excluded.window_no)
    RETURNING c.hits, c.window_no
)
SELECT f.id, f.user_id, f.name, f.admin, c.hits,
       ((c.window_no + 1) * %(window)s - extract(epoch FROM now()))::float8 AS reset
FROM counted c LEFT JOIN found f ON true;

-- open_stream --
-- Open an event stream for a user unless they hold the maximum already (migration 0011).
SELECT opened, streams
FROM tfdeploy_open_stream(%(stream)s, %(process)s, %(host)s, %(pid)s, %(user)s, %(max)s,
                          %(lease)s * interval '1 second');

-- close_stream --
-- A stream ended.
DELETE FROM open_streams WHERE id = %(stream)s;

-- sync_streams --
-- An API process is alive and holds exactly these streams.
SELECT tfdeploy_sync_streams(%(process)s, %(host)s, %(pid)s, %(ids)s::uuid[], %(users)s::text[]);

-- end_process --
-- An API process stops: its streams stop counting at once.
DELETE FROM api_processes WHERE id = %(process)s;

-- count_open_streams --
-- A user's open streams, on live processes.
SELECT count(*)
FROM open_streams s JOIN api_processes p ON p.id = s.process_id
WHERE s.user_name = %(user)s AND p.seen_at > now() - %(lease)s * interval '1 second';

-- prune_deploys --
-- One batch of a retention pass over ended deploys ('logs' or 'inputs').
SELECT pruned, more FROM tfdeploy_prune_deploys(%(kind)s, %(age)s * interval '1 second', %(batch)s);

-- prune_states --
-- One batch of old state versions deleted (never a workspace's latest, nor anything of a busy one).
SELECT workspace, version, store, location
FROM tfdeploy_prune_states(%(age)s * interval '1 second', %(batch)s);

-- prune_idempotency --
-- One batch of Idempotency-Key records older than the retention.
DELETE FROM idempotency_keys k
USING (SELECT owner, key FROM idempotency_keys
       WHERE created_at < now() - %(age)s * interval '1 second'
       ORDER BY created_at LIMIT %(batch)s) old
WHERE k.owner = old.owner AND k.key = old.key;

-- state_objects_to_delete --
-- S3 objects of deleted state versions still to delete from the bucket.
SELECT location, workspace, version FROM state_objects_to_delete
ORDER BY queued_at, location LIMIT %(batch)s;

-- state_object_deleted --
-- One of them is gone from the bucket.
DELETE FROM state_objects_to_delete WHERE location = %(location)s;

-- prune_request_counts --
-- Request counters whose window ended more than an hour ago (users and addresses gone quiet).
DELETE FROM request_counts
WHERE (window_no + 1) * %(window)s < extract(epoch FROM now()) - 3600;

-- prune_api_processes --
-- API processes not seen for an hour, with the streams they held (long stale, uncounted).
DELETE FROM api_processes WHERE seen_at < now() - interval '1 hour';
