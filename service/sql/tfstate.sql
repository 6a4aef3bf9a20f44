-- The terraform CLI's http state backend (service/cli_backend.py, docs/terraform-cli.md): the
-- workspace's CLI lock (workspace_locks, migration 0010) and what holds a workspace.

-- tfstate_claim_lock --
-- The lock the deploy queue's claim runs under (tfdeploy_claim, migration 0010): a LOCK, an
-- UNLOCK or the last step of a state write and a claim never interleave.
SELECT pg_advisory_xact_lock(7310005);

-- tfstate_deploy_holder --
-- The deploy that holds a workspace now, if any: one whose job a worker is running (from the
-- moment it is claimed, before its Started), or whose plan waits for approval. A speculative
-- plan never holds its workspace. The oldest first, if there were ever several.
SELECT d.id, d.owner, d.action, d.status, d.created_at, d.updated_at
FROM deploys d
WHERE d.workspace_id = %(workspace_id)s::uuid
  AND d.status IN ('queued', 'deploying', 'retrying', 'planned')
  AND d.action <> 'plan'
  AND (d.status = 'planned'
       OR EXISTS (SELECT FROM procrastinate_jobs j
                  WHERE j.status = 'doing' AND j.args->>'deploy_id' = d.id::text))
ORDER BY d.created_at, d.id
LIMIT 1;

-- tfstate_cli_lock --
-- The CLI's lock on a workspace, if one is held.
SELECT lock_id, info, holder, created_at FROM workspace_locks
WHERE workspace_id = %(workspace_id)s::uuid;

-- tfstate_insert_lock --
-- Take the CLI's lock (in the transaction of its StateLocked event).
INSERT INTO workspace_locks (workspace_id, lock_id, info, holder)
VALUES (%(workspace_id)s::uuid, %(lock_id)s, %(info)s, %(holder)s);

-- tfstate_delete_lock --
-- Release the CLI's lock held under this ID (in the transaction of its event).
DELETE FROM workspace_locks
WHERE workspace_id = %(workspace_id)s::uuid AND lock_id = %(lock_id)s;

-- tfstate_notify_dispatch --
-- Wake the deploy dispatchers: the workspace's queued deploys may start (delivered at COMMIT).
SELECT pg_notify('tfdeploy_dispatch', '');
