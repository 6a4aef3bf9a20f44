-- The audit trail at scale, and ready views for auditors (docs/audit.md).

-- "Who did what": a type and an actor together (e.g. Retried by admin:root), in position order.
-- The single-column (type, position) and (actor, position) indexes cannot answer a combination
-- that is rare while each part is common (Failed by user:x: none) without reading one of them
-- to the end.
CREATE INDEX events_type_actor_position ON events (type, actor, position);

-- Attempts whose state could not be stored (the metric tfdeploy_state_store_failures_total);
-- tiny, and counted without reading the table.
CREATE INDEX events_state_not_persisted ON events (position)
    WHERE type = 'Failed' AND data->>'reason' = 'state_not_persisted';

-- Every event of a deploy with the time since the one before and since the request, and the
-- deploy's workspace and owner. Filter on deploy_id: the filter is applied before the window.
--   SELECT * FROM audit_deploy_timeline WHERE deploy_id = '...' ORDER BY version;
CREATE VIEW audit_deploy_timeline AS
SELECT e.deploy_id,
       d.workspace,
       d.owner,
       e.version,
       e.position,
       e.type,
       e.actor,
       e.recorded_at,
       (e.data->>'attempt')::integer AS attempt,
       e.data->>'reason' AS reason,
       e.recorded_at - lag(e.recorded_at) OVER w AS since_previous,
       e.recorded_at - first_value(e.recorded_at) OVER w AS since_requested,
       e.data
FROM events e
LEFT JOIN deploys d ON d.id = e.deploy_id
WINDOW w AS (PARTITION BY e.deploy_id ORDER BY e.version);

-- One row per attempt: when it started, on which worker, how it ended (Succeeded, Failed with
-- its reason, Cancelled; NULL while it runs) and how long it took.
--   SELECT outcome, reason, avg(duration) FROM audit_attempts
--   WHERE started_at > now() - interval '7 days' GROUP BY 1, 2;
CREATE VIEW audit_attempts AS
SELECT s.deploy_id,
       (s.data->>'attempt')::integer AS attempt,
       s.actor AS worker,
       s.position AS started_position,
       s.recorded_at AS started_at,
       o.type AS outcome,
       o.data->>'reason' AS reason,
       o.recorded_at AS ended_at,
       o.recorded_at - s.recorded_at AS duration
FROM events s
LEFT JOIN LATERAL (
    SELECT x.type, x.data, x.recorded_at
    FROM events x
    WHERE x.deploy_id = s.deploy_id
      AND x.version > s.version
      AND x.type IN ('Succeeded', 'Failed', 'Cancelled')
    ORDER BY x.version
    LIMIT 1
) o ON true
WHERE s.type = 'Started';

-- Failures per day (UTC) and reason: failed attempts, how many of them ended their deploy
-- (final), and how many deploys they hit.
--   SELECT * FROM audit_failures_by_day WHERE day >= current_date - 30 ORDER BY day, reason;
CREATE VIEW audit_failures_by_day AS
SELECT (e.recorded_at AT TIME ZONE 'UTC')::date AS day,
       e.data->>'reason' AS reason,
       count(*) AS failed_attempts,
       count(*) FILTER (WHERE coalesce((e.data->>'final')::boolean, true)) AS failed_deploys,
       count(DISTINCT e.deploy_id) AS deploys
FROM events e
WHERE e.type = 'Failed'
GROUP BY 1, 2;

-- Who replayed or cancelled what: admin replays (Retried by admin), cancel requests of running
-- deploys (CancelRequested) and cancels of queued ones (Cancelled recorded by a user or an
-- admin rather than by the worker that stopped terraform). "actor" is who did it; "on_behalf"
-- is true when it was not the deploy's owner.
--   SELECT * FROM audit_interventions WHERE recorded_at > now() - interval '1 day';
CREATE VIEW audit_interventions AS
SELECT e.position,
       e.recorded_at,
       CASE e.type WHEN 'Retried' THEN 'replay' ELSE 'cancel' END AS action,
       e.type,
       e.actor,
       e.deploy_id,
       d.workspace,
       d.owner,
       e.actor NOT IN ('user:' || d.owner, 'admin:' || d.owner) AS on_behalf,
       (e.data->>'attempt')::integer AS attempt,
       (e.data->>'max_attempts')::integer AS max_attempts
FROM events e
LEFT JOIN deploys d ON d.id = e.deploy_id
WHERE (e.type = 'Retried' AND e.data->>'by' = 'admin')
   OR e.type = 'CancelRequested'
   OR (e.type = 'Cancelled' AND e.actor NOT LIKE 'worker:%');

-- The check behind GET /events' time filters (docs/audit.md): events whose recorded_at is
-- earlier than that of an event appended before them, i.e. the server clock stepped back.
-- The filters stay exact while every stepped_back here is under a day. Reads the whole table.
CREATE VIEW audit_clock_steps AS
SELECT position, recorded_at, earlier_max, earlier_max - recorded_at AS stepped_back
FROM (
    SELECT position,
           recorded_at,
           max(recorded_at) OVER (ORDER BY position
                                  ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier_max
    FROM events
) e
WHERE recorded_at < earlier_max;
