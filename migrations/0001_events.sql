-- The event store: one append-only table, the system of record for every deploy.

CREATE TABLE events (
    -- Global position: assigned while appends hold a transaction-scoped advisory lock, so
    -- positions commit in order and a reader following "position > N" never skips one.
    position     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    deploy_id    uuid        NOT NULL,
    version      integer     NOT NULL CHECK (version >= 1),
    type         text        NOT NULL,
    data         jsonb       NOT NULL,
    actor        text        NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT events_stream_version UNIQUE (deploy_id, version)
);

CREATE INDEX events_type_position ON events (type, position);
CREATE INDEX events_actor_position ON events (actor, position);
CREATE INDEX events_recorded_at ON events (recorded_at, position);

-- Append-only, enforced by the database itself: no UPDATE, DELETE or TRUNCATE, whoever asks.
CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER events_no_update_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- The read model: one row per deploy, written in the same transaction as its events.
-- "tfdeploy projections rebuild" recomputes it from the events.
CREATE TABLE deploys (
    id               uuid PRIMARY KEY,
    owner            text        NOT NULL,
    workspace        text        NOT NULL,
    action           text        NOT NULL,
    status           text        NOT NULL,
    attempt          integer     NOT NULL,
    max_attempts     integer     NOT NULL,
    cancel_requested boolean     NOT NULL DEFAULT false,
    state_version    integer,
    error_reason     text,
    error_message    text,
    version          integer     NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);

CREATE INDEX deploys_owner_created ON deploys (owner, created_at DESC, id DESC);
CREATE INDEX deploys_created ON deploys (created_at DESC, id DESC);
CREATE INDEX deploys_workspace_created ON deploys (workspace, created_at DESC, id DESC);
CREATE INDEX deploys_status ON deploys (status);

-- What a deploy applies: written once with its Requested event, never changed.
-- The event keeps only the files' digests; the content lives here.
CREATE TABLE deploy_inputs (
    deploy_id  uuid PRIMARY KEY,
    files      jsonb NOT NULL,
    variables  jsonb NOT NULL DEFAULT '{}'::jsonb,
    sha256     text  NOT NULL
);

-- Secrets, encrypted at rest; the row is deleted when the deploy ends.
CREATE TABLE deploy_secrets (
    deploy_id  uuid PRIMARY KEY,
    ciphertext bytea NOT NULL
);

-- Idempotency-Key: the same key from the same owner returns the same deploy.
CREATE TABLE idempotency_keys (
    owner          text NOT NULL,
    key            text NOT NULL,
    request_sha256 text NOT NULL,
    deploy_id      uuid NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, key)
);

-- API tokens: only a hash is kept; the token is shown once when created.
CREATE TABLE api_tokens (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL,
    token_hash  text        NOT NULL UNIQUE,
    admin       boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
