-- An append in one statement: take the append locks, check the stream's version, insert the
-- events and write the deploy's read model, all in the database (service/store.py).
--
-- Why: the append lock (7310002) serialises every append until its transaction commits, so
-- every round trip to the client made while holding it is time no other append can use. With
-- this function the client sends the append and its COMMIT together (one simple-protocol query, store.append_and_commit):
-- the lock is held only while PostgreSQL itself runs the append and the commit.
--
-- Same rules as before, in the same order: the global transaction-scoped advisory lock first
-- (gap-free global positions), then the per-deploy lock shared with log writes, then the
-- optimistic version check (SQLSTATE TD409 when the stream is not at p_expected; the unique
-- (deploy_id, version) stays the backstop). The read model's fields come folded by the
-- caller (service.projection, the same pure code); only what the database decides here --
-- the new events' recorded_at, and so created_at of a new stream and updated_at -- is filled
-- in by the function.
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
    p_created_at timestamptz  -- the stream's first recorded_at; NULL for a new stream
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
                              version, created_at, updated_at)
    VALUES (p_deploy_id, p_owner, p_workspace, p_action, p_status, p_attempt, p_max_attempts,
            p_cancel_requested, p_state_version, p_error_reason, p_error_message,
            ev.version, coalesce(p_created_at, first_at), ev.recorded_at)
    ON CONFLICT (id) DO UPDATE SET
        owner = excluded.owner, workspace = excluded.workspace, action = excluded.action,
        status = excluded.status, attempt = excluded.attempt, max_attempts = excluded.max_attempts,
        cancel_requested = excluded.cancel_requested, state_version = excluded.state_version,
        error_reason = excluded.error_reason, error_message = excluded.error_message,
        version = excluded.version, created_at = excluded.created_at,
        updated_at = excluded.updated_at;
END;
$$;
