-- Plans kept for approval, the workspace's CLI lock, and the fair claim of deploy jobs.

-- A saved plan (terraform's plan file), sealed with the key ring (it holds variable values and
-- the configuration). Bound to the deploy's attempt and to the state version it was made
-- against; deleted when the deploy ends, like its secrets.
CREATE TABLE saved_plans (
    id                 uuid PRIMARY KEY,
    deploy_id          uuid        NOT NULL,
    attempt            integer     NOT NULL,
    sha256             text        NOT NULL,  -- of the plaintext plan file
    size               integer     NOT NULL,
    content            bytea       NOT NULL,  -- sealed (service.secrets.KeyRing)
    -- The .terraform.lock.hcl the plan was made with: the apply must install the same providers.
    lock_file          text,
    base_state_version integer,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX saved_plans_deploy ON saved_plans (deploy_id);

-- The CLI's lock on a workspace (terraform's http backend, docs/terraform-cli.md): one row while
-- a CLI holds it. Written in the same transaction as the workspace event that records it; the
-- deploy queue reads it (tfdeploy_claim), so CLI and deploys share one lock.
CREATE TABLE workspace_locks (
    workspace_id uuid PRIMARY KEY,
    lock_id      text        NOT NULL,
    info         jsonb       NOT NULL,  -- terraform's LockInfo as the CLI sent it
    holder       text        NOT NULL,  -- the user who holds it
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Unfinished deploys of a workspace, oldest first: what the claim asks about every candidate.
CREATE INDEX deploys_workspace_unfinished ON deploys (workspace_id, created_at, id)
    WHERE status IN ('queued', 'deploying', 'retrying', 'planned');

-- A deploy's live job, by the deploy id in its arguments: the claim asks whether another deploy
-- of the workspace has one taken, and recovery whether a deploy has one at all.
CREATE INDEX procrastinate_jobs_deploy_id ON procrastinate_jobs ((args->>'deploy_id'))
    WHERE status IN ('todo', 'doing');

-- Wake the dispatchers (service/dispatch.py) when a deploy job ends or goes back to the queue,
-- and when a deploy ends or stops waiting for approval without a job (a planned deploy
-- discarded or cancelled): a workspace, a user's turn or a place may have become free.
CREATE FUNCTION tfdeploy_dispatch_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tfdeploy_dispatch', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER procrastinate_jobs_dispatch_notify
    AFTER UPDATE OF status ON procrastinate_jobs
    FOR EACH ROW
    WHEN (OLD.status = 'doing' AND NEW.status <> 'doing')
    EXECUTE FUNCTION tfdeploy_dispatch_notify();

CREATE TRIGGER procrastinate_jobs_dispatch_notify_delete
    AFTER DELETE ON procrastinate_jobs
    FOR EACH ROW
    WHEN (OLD.status = 'doing')
    EXECUTE FUNCTION tfdeploy_dispatch_notify();

CREATE TRIGGER events_dispatch_notify
    AFTER INSERT ON events
    FOR EACH ROW
    WHEN (NEW.type IN ('Discarded', 'Cancelled', 'Succeeded', 'Failed'))
    EXECUTE FUNCTION tfdeploy_dispatch_notify();

-- The fair choice: the deploy job that should start next, or NULL (a pure read: the claim below
-- takes it; a dispatcher with nothing to run asks first whether there is anything to take).
--
-- Which job (CONTRACT, "Deploy lifecycle"): among due jobs of the queue, those that may start
--   * a speculative plan (action 'plan') may always start: it never waits for its workspace;
--   * any other deploy waits while its workspace is held: by the CLI's lock, by a running or
--     planned deploy of it, or by an older unfinished deploy of it (deploys of one workspace
--     run one at a time, in the order they were requested);
--   * a user with p_max_per_user deploys running waits (NULL: no limit);
--   * a deploy whose previous job is still being closed waits for it;
-- the one whose user has the fewest deploys running, then the oldest deploy (FIFO per user).
-- "Running" is a job taken (status doing): preparing its run, or running terraform.
CREATE FUNCTION tfdeploy_pick(p_queue varchar, p_max_per_user integer) RETURNS bigint
LANGUAGE sql STABLE AS $$
    WITH waiting AS (
        SELECT j.id AS job_id, d.id AS deploy_id, d.owner, d.workspace_id, d.action, d.created_at
        FROM procrastinate_jobs j
        JOIN deploys d ON d.id = (j.args->>'deploy_id')::uuid
        WHERE j.queue_name = p_queue
          AND j.status = 'todo'
          AND (j.scheduled_at IS NULL OR j.scheduled_at <= now())
    ), running AS (
        SELECT d.owner, count(*) AS n
        FROM procrastinate_jobs j
        JOIN deploys d ON d.id = (j.args->>'deploy_id')::uuid
        WHERE j.queue_name = p_queue AND j.status = 'doing'
        GROUP BY d.owner
    )
    SELECT w.job_id
    FROM waiting w
    LEFT JOIN running r ON r.owner = w.owner
    WHERE (p_max_per_user IS NULL OR coalesce(r.n, 0) < p_max_per_user)
      -- one job of a deploy at a time: the next attempt's job is queued while the job of the
      -- attempt that failed is still being closed
      AND NOT EXISTS (SELECT FROM procrastinate_jobs dj
                      WHERE dj.status = 'doing' AND dj.args->>'deploy_id' = w.deploy_id::text)
      AND (w.action = 'plan' OR (
            NOT EXISTS (SELECT FROM workspace_locks l WHERE l.workspace_id = w.workspace_id)
        AND NOT EXISTS (
            SELECT FROM deploys o
            WHERE o.workspace_id = w.workspace_id
              AND o.status IN ('queued', 'deploying', 'retrying', 'planned')
              AND o.action <> 'plan'
              AND o.id <> w.deploy_id
              AND ((o.created_at, o.id) < (w.created_at, w.deploy_id)
                   OR o.status = 'planned'
                   OR EXISTS (SELECT FROM procrastinate_jobs oj
                              WHERE oj.status = 'doing'
                                AND oj.args->>'deploy_id' = o.id::text)))))
    ORDER BY coalesce(r.n, 0), w.created_at, w.deploy_id, w.job_id
    LIMIT 1;
$$;

-- The fair claim: take the job tfdeploy_pick chooses and mark it taken by p_worker_id, as
-- procrastinate_fetch_job_v2 does -- or nothing. Called by a worker only while it holds a free
-- place under its host's cap (a host at its cap takes nothing off the queue).
--
-- Claims are serialised by a transaction-scoped advisory lock: each is a few index lookups
-- over the jobs waiting now, and serialising them keeps the choice exact with any number of
-- workers and hosts (no two claims both see a user at n-1 running, or a workspace free). The
-- CLI's LOCK takes the same lock (service/api/tfstate.py), so a lock and a claim never cross.
CREATE FUNCTION tfdeploy_claim(p_queue varchar, p_worker_id bigint, p_max_per_user integer)
RETURNS SETOF procrastinate_jobs
LANGUAGE plpgsql AS $$
DECLARE
    chosen bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7310005);
    chosen := tfdeploy_pick(p_queue, p_max_per_user);
    IF chosen IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
        UPDATE procrastinate_jobs SET status = 'doing', worker_id = p_worker_id
        WHERE id = chosen AND status = 'todo'
        RETURNING *;
END;
$$;

-- When the next job of the queue falls due (a retry's delay): a dispatcher with nothing to
-- claim sleeps until then instead of polling.
CREATE FUNCTION tfdeploy_next_due(p_queue varchar) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT min(scheduled_at) FROM procrastinate_jobs
    WHERE queue_name = p_queue AND status = 'todo' AND scheduled_at > now();
$$;
