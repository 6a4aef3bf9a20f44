-- Plans and approval (service/planning.py): the state a plan was made against, the TTL.

-- state_version_by_sha --
-- The newest persisted state version of a workspace with this content (a plan run's start).
SELECT version FROM state_versions
WHERE workspace = %(workspace)s AND sha256 = %(sha256)s
ORDER BY version DESC
LIMIT 1;

-- planned_before --
-- Deploys waiting on a plan for longer than the TTL (seconds), with the cutoff (PostgreSQL's
-- clock, like the events' recorded_at) the append checks again.
SELECT id, now() - make_interval(secs => %(ttl)s) AS cutoff
FROM deploys
WHERE status = 'planned' AND updated_at < now() - make_interval(secs => %(ttl)s)
ORDER BY updated_at;
