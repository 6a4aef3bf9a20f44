-- Wake listeners when events and log lines commit. Payloads carry ids only (NOTIFY is
-- limited to 8000 bytes); listeners read the rows themselves.
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tfdeploy_events', NEW.position || ' ' || NEW.deploy_id || ' ' || NEW.version);
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_notify();

CREATE FUNCTION deploy_logs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tfdeploy_logs', NEW.deploy_id || ' ' || NEW.seq);
    RETURN NULL;
END;
$$;

CREATE TRIGGER deploy_logs_notify AFTER INSERT ON deploy_logs
    FOR EACH ROW EXECUTE FUNCTION deploy_logs_notify();
