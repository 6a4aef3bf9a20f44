-- An event's global position is the one its identity column generated for that very insert,
-- never one the inserting role chose.
--
-- The service role may INSERT into events (appends), and INSERT ... OVERRIDING SYSTEM VALUE
-- needs no privilege beyond that: without this trigger it could put an event at a position
-- BEFORE those already appended (0, -1, or a gap a rolled-back append left). Followers of the
-- global feed ("position > N": GET /events/stream, `tfdeploy events --follow`) would never get
-- it, and the audit query would show it in the past: history rewritten without an UPDATE.
--
-- For an insert that let the identity column generate the position, currval of its sequence
-- in this session is exactly that value when the BEFORE trigger runs; a chosen position is
-- refused (and so is one chosen in a session that never generated one: currval is undefined
-- there). One catalog-free comparison per row; no subtransaction.
CREATE FUNCTION events_refuse_chosen_position() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.position IS DISTINCT FROM currval(pg_get_serial_sequence('public.events', 'position')) THEN
        RAISE EXCEPTION 'events are append-only: a position is generated, never chosen (% refused)',
            NEW.position
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER events_position_generated
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_chosen_position();
