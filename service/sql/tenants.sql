-- Named queries for users, tokens, workspaces and their members (migration 0007), loaded by
-- service.queries. Each block starts with "-- name --", then a description, then the query.

-- ensure_user --
-- Make a user unless one of that name exists (the admin flag of an existing user is kept).
INSERT INTO users (name, admin) VALUES (%(name)s, %(admin)s) ON CONFLICT (name) DO NOTHING;

-- insert_user --
-- A new user; a UniqueViolation when the name is taken.
INSERT INTO users (name, admin) VALUES (%(name)s, %(admin)s) RETURNING id;

-- get_user --
-- One user by name.
SELECT id, name, admin, created_at, disabled_at FROM users WHERE name = %(name)s;

-- list_users --
-- Every user with the number of live tokens.
SELECT u.id, u.name, u.admin, u.created_at, u.disabled_at,
       (SELECT count(*) FROM api_tokens t
        WHERE t.user_id = u.id AND t.revoked_at IS NULL
          AND (t.expires_at IS NULL OR t.expires_at > now())) AS tokens
FROM users u ORDER BY u.name;

-- disable_user --
-- Disable a user: every token of theirs is refused from the next request on.
UPDATE users SET disabled_at = now() WHERE name = %(name)s AND disabled_at IS NULL RETURNING id;

-- insert_token --
-- A new API token (its hash only) for a user; an admin user's tokens are admin tokens.
INSERT INTO api_tokens (user_id, token_hash, admin, label, expires_at)
SELECT u.id, %(token_hash)s, u.admin, %(label)s, %(expires_at)s
FROM users u WHERE u.name = %(user)s
RETURNING id;

-- find_token --
-- The principal of a live token: not revoked, not expired, its user not disabled. A token acts
-- as an admin only if both it and its user are admin ones. The token's last use is recorded in
-- the same statement (no round trip of its own), at most once a minute.
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
)
SELECT id, user_id, name, admin FROM found;

-- list_tokens --
-- Every token, without hashes.
SELECT t.id, u.name AS "user", t.label, (u.admin AND t.admin) AS admin, t.created_at,
       t.expires_at, t.last_used_at, t.revoked_at, u.disabled_at,
       (t.expires_at IS NOT NULL AND t.expires_at <= now()) AS expired
FROM api_tokens t JOIN users u ON u.id = t.user_id
ORDER BY t.id;

-- revoke_token --
-- Revoke one token by its id.
UPDATE api_tokens SET revoked_at = now()
WHERE id = %(id)s AND revoked_at IS NULL
RETURNING id;

-- find_workspace --
-- A workspace by owner and name.
SELECT id::text, owner, name, created_at FROM workspaces
WHERE owner = %(owner)s AND name = %(name)s;

-- workspace_access --
-- A workspace by owner and name, with the role a user holds in it as a member (NULL: none).
SELECT w.id::text, w.owner, w.name, w.created_at, m.role
FROM workspaces w
LEFT JOIN workspace_members m ON m.workspace_id = w.id AND m.user_name = %(user)s
WHERE w.owner = %(owner)s AND w.name = %(name)s;

-- workspace_role --
-- The owner of a workspace (by id) and the role a user holds in it as a member.
SELECT w.owner,
       (SELECT m.role FROM workspace_members m
        WHERE m.workspace_id = w.id AND m.user_name = %(user)s) AS role
FROM workspaces w WHERE w.id = %(id)s::uuid;

-- insert_workspace --
-- Claim a workspace name for its owner; a UniqueViolation when the owner has it already.
INSERT INTO workspaces (id, owner, name) VALUES (%(id)s::uuid, %(owner)s, %(name)s);

-- append_workspace --
-- Append events to a workspace's stream (tfdeploy_append_workspace, migration 0007: the append
-- lock, the per-stream lock, the version check with SQLSTATE TD409).
SELECT position, deploy_id, version, type, data, recorded_at, actor, stream_kind,
       deploy_id AS workspace_id
FROM tfdeploy_append_workspace(%(workspace_id)s::uuid, %(expected)s::integer,
                               %(types)s::text[], %(data)s::jsonb[], %(actor)s::text)
ORDER BY version;

-- workspace_stream_version --
-- The last version of a workspace's stream.
SELECT coalesce(max(version), 0) AS version FROM events WHERE deploy_id = %(workspace_id)s::uuid;

-- legacy_workspaces --
-- The migrated mapping: the workspace each name of the previous version became.
SELECT l.name, l.workspace_id::text, w.owner
FROM workspace_legacy_names l JOIN workspaces w ON w.id = l.workspace_id;

-- legacy_workspace --
-- The workspace one name of the previous version became.
SELECT l.workspace_id::text, w.owner
FROM workspace_legacy_names l JOIN workspaces w ON w.id = l.workspace_id
WHERE l.name = %(name)s;

-- deploy_workspace_key --
-- The key of a deploy's workspace: its id (the name only for a deploy no workspace was ever
-- resolved for, which only hand-written streams have).
SELECT coalesce(workspace_id::text, workspace) FROM deploys WHERE id = %(deploy_id)s::uuid;

-- deploy_access --
-- One deploy's read model, the owner of its workspace, and the role a user holds in that
-- workspace as a member: everything the access rules need, in one round trip.
SELECT d.id, d.owner, d.workspace, d.action, d.status, d.attempt, d.max_attempts,
       d.cancel_requested, d.state_version, d.error_reason, d.error_message, d.version,
       d.created_at, d.updated_at, d.workspace_id, d.workspace_owner,
       w.owner AS ws_owner,
       (SELECT m.role FROM workspace_members m
        WHERE m.workspace_id = d.workspace_id AND m.user_name = %(user)s) AS role
FROM deploys d
LEFT JOIN workspaces w ON w.id = d.workspace_id
WHERE d.id = %(id)s::uuid;

-- list_workspaces --
-- The workspaces a user may see (every one when %(all)s: an admin), keyset-paginated on
-- (owner, name), each with the caller's role in it, its latest deploy and latest state version.
-- A user's own and member workspaces are found through their indexes, not by a scan.
WITH visible AS (
    SELECT w.id, w.owner, w.name, w.created_at, 'owner' AS role
    FROM workspaces w
    WHERE NOT %(all)s AND w.owner = %(viewer)s::text
    UNION ALL
    SELECT w.id, w.owner, w.name, w.created_at, m.role
    FROM workspace_members m JOIN workspaces w ON w.id = m.workspace_id
    WHERE NOT %(all)s AND m.user_name = %(viewer)s::text
    UNION ALL
    SELECT w.id, w.owner, w.name, w.created_at,
           CASE WHEN w.owner = %(viewer)s::text THEN 'owner'
                ELSE coalesce((SELECT m.role FROM workspace_members m
                               WHERE m.workspace_id = w.id AND m.user_name = %(viewer)s::text),
                              'admin') END
    FROM workspaces w
    WHERE %(all)s
), page AS (
    SELECT * FROM visible v
    WHERE (%(owner)s::text IS NULL OR v.owner = %(owner)s::text)
      AND (%(after_owner)s::text IS NULL
           OR (v.owner, v.name) > (%(after_owner)s::text, %(after_name)s::text))
    ORDER BY v.owner, v.name
    LIMIT %(limit)s
)
SELECT v.id::text, v.owner, v.name, v.created_at, v.role,
       d.id::text AS deploy_id, d.action AS deploy_action, d.status AS deploy_status,
       d.owner AS deploy_owner, d.created_at AS deploy_created_at,
       s.version AS state_version, s.serial AS state_serial, s.created_at AS state_created_at
FROM page v
LEFT JOIN LATERAL (
    SELECT x.id, x.action, x.status, x.owner, x.created_at FROM deploys x
    WHERE x.workspace_id = v.id ORDER BY x.created_at DESC, x.id DESC LIMIT 1
) d ON true
LEFT JOIN LATERAL (
    SELECT y.version, y.serial, y.created_at FROM state_versions y
    WHERE y.workspace = v.id::text ORDER BY y.version DESC LIMIT 1
) s ON true
ORDER BY v.owner, v.name;

-- list_members --
-- A workspace's members.
SELECT user_name, role, updated_at FROM workspace_members
WHERE workspace_id = %(workspace_id)s::uuid ORDER BY user_name;

-- set_member --
-- Make a user a member with a role, or change their role.
INSERT INTO workspace_members (workspace_id, user_name, role)
VALUES (%(workspace_id)s::uuid, %(user)s, %(role)s)
ON CONFLICT (workspace_id, user_name) DO UPDATE SET role = excluded.role, updated_at = now();

-- remove_member --
-- Remove a member.
DELETE FROM workspace_members
WHERE workspace_id = %(workspace_id)s::uuid AND user_name = %(user)s;

-- list_contested --
-- Workspace names several users deployed to before workspaces had owners (migration 0007).
SELECT workspace_id::text, owner, name, other_user, deploys, first_deploy_at, last_deploy_at,
       member_role
FROM workspaces_contested ORDER BY owner, name, other_user;

-- requester_standing --
-- What the requester of a deploy is to its workspace when an attempt is about to start: the
-- workspace's owner, the user's admin flag and disabled time, and their member role. No row:
-- the workspace or the user is unknown.
SELECT w.owner, u.admin, u.disabled_at,
       (SELECT m.role FROM workspace_members m
        WHERE m.workspace_id = w.id AND m.user_name = u.name) AS role
FROM workspaces w, users u
WHERE w.id = %(id)s::uuid AND u.name = %(user)s;
