-- Users, owned workspaces and workspace streams (issue #11; docs/workspaces.md).
--
-- On a database of the previous version, with its data: every token name and every deploy owner
-- becomes a user; every workspace name becomes a workspace of the user whose deploy came first
-- (a WorkspaceCreated event by system:migration in its stream); the name-keyed state rows, and
-- the locks of queued jobs, move to the workspace's id; names that several users deployed to are
-- listed in workspaces_contested, never merged silently. Events keep what they said: a Requested
-- event without a workspace_id is resolved through workspace_legacy_names.

-- No append may slip in while the streams are written: the WorkspaceCreated events take their
-- positions in order with everyone else's (the lock of tfdeploy_append, migration 0006).
SELECT pg_advisory_xact_lock(7310002);

-- ---------------------------------------------------------------- users and their tokens

CREATE TABLE users (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL UNIQUE,
    admin       boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz
);

-- Token names were the users: a name is an admin if any of its tokens was.
INSERT INTO users (name, admin, created_at)
SELECT name, bool_or(admin), min(created_at)
FROM api_tokens GROUP BY name ORDER BY min(created_at), name;

-- Deploy owners whose tokens are gone keep their deploys, as users.
INSERT INTO users (name, created_at)
SELECT owner, min(created_at)
FROM deploys WHERE owner NOT IN (SELECT name FROM users)
GROUP BY owner ORDER BY min(created_at), owner;

-- api_tokens.admin stays a property of the token: a token acts as an admin only if its user is
-- one and it was made as an admin token (every token of an admin user is, from now on). So the
-- upgrade gives no existing token more power than it had.
ALTER TABLE api_tokens
    ADD COLUMN user_id      bigint REFERENCES users (id),
    ADD COLUMN label        text,
    ADD COLUMN expires_at   timestamptz,
    ADD COLUMN last_used_at timestamptz;
UPDATE api_tokens t SET user_id = u.id FROM users u WHERE u.name = t.name;
ALTER TABLE api_tokens ALTER COLUMN user_id SET NOT NULL;
ALTER TABLE api_tokens DROP COLUMN name;
CREATE INDEX api_tokens_user ON api_tokens (user_id);

-- ---------------------------------------------------------------- workspaces

-- Names are per user: alice's "prod" is not bob's. The id is the key used everywhere inside
-- (state rows, state-store keys, job locks, runs).
CREATE TABLE workspaces (
    id         uuid        PRIMARY KEY,
    owner      text        NOT NULL,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT workspaces_owner_name UNIQUE (owner, name)
);

-- Who else may read or deploy a workspace; written with its MemberSet / MemberRemoved event.
CREATE TABLE workspace_members (
    workspace_id uuid        NOT NULL REFERENCES workspaces (id),
    user_name    text        NOT NULL REFERENCES users (name),
    role         text        NOT NULL CHECK (role IN ('read', 'deploy')),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, user_name)
);
CREATE INDEX workspace_members_user ON workspace_members (user_name, workspace_id);

-- The workspace each name of the previous version became: how events recorded before owners
-- existed (Requested without workspace_id) are read, live and by a projection rebuild.
CREATE TABLE workspace_legacy_names (
    name         text PRIMARY KEY,
    workspace_id uuid NOT NULL UNIQUE REFERENCES workspaces (id)
);

-- Each name goes to the owner of its first deploy.
INSERT INTO workspaces (id, owner, name, created_at)
SELECT gen_random_uuid(), first.owner, first.workspace, first.created_at
FROM (
    SELECT DISTINCT ON (workspace) workspace, owner, created_at
    FROM deploys ORDER BY workspace, created_at, id
) first
ORDER BY first.created_at, first.workspace;

INSERT INTO workspace_legacy_names (name, workspace_id) SELECT name, id FROM workspaces;

-- ---------------------------------------------------------------- workspace streams

-- A workspace's events live in the events table too, deploy_id = the workspace's id.
ALTER TABLE events ADD COLUMN stream_kind text NOT NULL DEFAULT 'deploy';
-- NOT VALID: every existing row has the default; this checks new rows without reading the table.
ALTER TABLE events ADD CONSTRAINT events_stream_kind
    CHECK (stream_kind IN ('deploy', 'workspace')) NOT VALID;

INSERT INTO events (deploy_id, version, type, data, actor, stream_kind)
SELECT id, 1, 'WorkspaceCreated',
       jsonb_build_object('name', name, 'owner', owner, 'migrated', true),
       'system:migration', 'workspace'
FROM workspaces ORDER BY created_at, name;

-- Appends to a workspace's stream: the rules of tfdeploy_append (the global append lock first,
-- so positions commit in order; the per-stream lock; the version check, SQLSTATE TD409), and no
-- read model to write. p_expected NULL appends after whatever the stream holds: for facts that
-- depend on nothing before them (a state was downloaded).
CREATE FUNCTION tfdeploy_append_workspace(
    p_workspace_id uuid,
    p_expected integer,
    p_types text[],
    p_data jsonb[],
    p_actor text
) RETURNS SETOF events
LANGUAGE plpgsql AS $$
DECLARE
    actual integer;
    ev events;
BEGIN
    PERFORM pg_advisory_xact_lock(7310002);
    PERFORM pg_advisory_xact_lock(7310004, hashtext(p_workspace_id::text));
    SELECT coalesce(max(e.version), 0) INTO actual FROM events e WHERE e.deploy_id = p_workspace_id;
    IF p_expected IS NOT NULL AND actual <> p_expected THEN
        RAISE EXCEPTION 'workspace %: expected version %, found %', p_workspace_id, p_expected, actual
            USING ERRCODE = 'TD409', DETAIL = actual::text;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_types, 1), 0) LOOP
        INSERT INTO events (deploy_id, version, type, data, actor, stream_kind)
        VALUES (p_workspace_id, actual + i, p_types[i], p_data[i], p_actor, 'workspace')
        RETURNING * INTO ev;
        RETURN NEXT ev;
    END LOOP;
END;
$$;

-- ---------------------------------------------------------------- the deploys read model

ALTER TABLE deploys
    ADD COLUMN workspace_id    uuid,
    ADD COLUMN workspace_owner text NOT NULL DEFAULT '';
UPDATE deploys d SET workspace_id = w.id, workspace_owner = w.owner
FROM workspace_legacy_names l JOIN workspaces w ON w.id = l.workspace_id
WHERE l.name = d.workspace;
DROP INDEX deploys_workspace_created;
CREATE INDEX deploys_workspace_id_created ON deploys (workspace_id, created_at DESC, id DESC);

-- tfdeploy_append (migration 0006) writes the two new columns too: the same function with two
-- more parameters.
DROP FUNCTION tfdeploy_append(uuid, integer, text[], jsonb[], text, text, text, text, text,
                              integer, integer, boolean, integer, text, text, timestamptz);
CREATE FUNCTION tfdeploy_append(
    p_deploy_id uuid,
    p_expected integer,
    p_types text[],
    p_data jsonb[],
    p_actor text,
    p_owner text,
    p_workspace text,
    p_action text,
    p_status text,
    p_attempt integer,
    p_max_attempts integer,
    p_cancel_requested boolean,
    p_state_version integer,
    p_error_reason text,
    p_error_message text,
    p_created_at timestamptz,  -- the stream's first recorded_at; NULL for a new stream
    p_workspace_id uuid,
    p_workspace_owner text
) RETURNS SETOF events
LANGUAGE plpgsql AS $$
DECLARE
    actual integer;
    ev events;
    first_at timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(7310002);
    PERFORM pg_advisory_xact_lock(7310004, hashtext(p_deploy_id::text));
    SELECT coalesce(max(e.version), 0) INTO actual FROM events e WHERE e.deploy_id = p_deploy_id;
    IF actual <> p_expected THEN
        RAISE EXCEPTION 'deploy %: expected version %, found %', p_deploy_id, p_expected, actual
            USING ERRCODE = 'TD409', DETAIL = actual::text;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_types, 1), 0) LOOP
        INSERT INTO events (deploy_id, version, type, data, actor)
        VALUES (p_deploy_id, p_expected + i, p_types[i], p_data[i], p_actor)
        RETURNING * INTO ev;
        first_at := coalesce(first_at, ev.recorded_at);
        RETURN NEXT ev;
    END LOOP;
    IF ev IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO deploys AS d (id, owner, workspace, action, status, attempt, max_attempts,
                              cancel_requested, state_version, error_reason, error_message,
                              version, created_at, updated_at, workspace_id, workspace_owner)
    VALUES (p_deploy_id, p_owner, p_workspace, p_action, p_status, p_attempt, p_max_attempts,
            p_cancel_requested, p_state_version, p_error_reason, p_error_message,
            ev.version, coalesce(p_created_at, first_at), ev.recorded_at, p_workspace_id,
            p_workspace_owner)
    ON CONFLICT (id) DO UPDATE SET
        owner = excluded.owner, workspace = excluded.workspace, action = excluded.action,
        status = excluded.status, attempt = excluded.attempt, max_attempts = excluded.max_attempts,
        cancel_requested = excluded.cancel_requested, state_version = excluded.state_version,
        error_reason = excluded.error_reason, error_message = excluded.error_message,
        version = excluded.version, created_at = excluded.created_at,
        updated_at = excluded.updated_at, workspace_id = excluded.workspace_id,
        workspace_owner = excluded.workspace_owner;
END;
$$;

-- ---------------------------------------------------------------- state rows and queued jobs

-- The state of a workspace is keyed by its id from now on (state stores, runs, job locks).
UPDATE state_versions s SET workspace = l.workspace_id::text
FROM workspace_legacy_names l WHERE s.workspace = l.name;
UPDATE state_blobs s SET workspace = l.workspace_id::text
FROM workspace_legacy_names l WHERE s.workspace = l.name;
UPDATE state_emergency s SET workspace = l.workspace_id::text
FROM workspace_legacy_names l WHERE s.workspace = l.name;

-- Jobs queued (or running) by the previous version take their workspace's new lock, so they
-- and new jobs of the same workspace still run one at a time.
UPDATE procrastinate_jobs j SET lock = 'workspace:' || l.workspace_id::text
FROM workspace_legacy_names l
WHERE j.lock = 'workspace:' || l.name AND j.status IN ('todo', 'doing');

-- ---------------------------------------------------------------- contested names

-- Workspace names that several users deployed to before workspaces had owners: the workspace
-- went to the first deployer; every other user who deployed to it is listed here, with their
-- membership (NULL until an admin or the owner settles it; docs/workspaces.md).
CREATE VIEW workspaces_contested AS
SELECT w.id AS workspace_id,
       w.owner,
       w.name,
       d.owner AS other_user,
       count(*) AS deploys,
       min(d.created_at) AS first_deploy_at,
       max(d.created_at) AS last_deploy_at,
       (SELECT m.role FROM workspace_members m
        WHERE m.workspace_id = w.id AND m.user_name = d.owner) AS member_role
FROM workspace_legacy_names l
JOIN workspaces w ON w.id = l.workspace_id
JOIN deploys d ON d.workspace_id = w.id AND d.owner <> w.owner
JOIN events e ON e.deploy_id = d.id AND e.version = 1
WHERE coalesce(e.data->>'workspace_id', '') = ''
GROUP BY w.id, w.owner, w.name, d.owner;
