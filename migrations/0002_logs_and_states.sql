-- Terraform output, line by line, as it runs.
CREATE TABLE deploy_logs (
    deploy_id   uuid        NOT NULL,
    seq         integer     NOT NULL,
    attempt     integer     NOT NULL,
    stream      text        NOT NULL DEFAULT 'stdout',
    line        text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (deploy_id, seq)
);

-- Every persisted tfstate version of a workspace, whichever store holds the content.
CREATE TABLE state_versions (
    workspace   text        NOT NULL,
    version     integer     NOT NULL,
    deploy_id   uuid        NOT NULL,
    attempt     integer     NOT NULL,
    store       text        NOT NULL,
    location    text        NOT NULL,
    serial      bigint      NOT NULL,
    lineage     text        NOT NULL,
    sha256      text        NOT NULL,
    size        integer     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, version)
);

-- The content of states kept by the PostgreSQL state store.
CREATE TABLE state_blobs (
    workspace   text    NOT NULL,
    version     integer NOT NULL,
    content     bytea   NOT NULL,
    PRIMARY KEY (workspace, version)
);

-- Last resort: a state that could be neither stored nor destroyed. Never deleted.
CREATE TABLE state_emergency (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace   text        NOT NULL,
    deploy_id   uuid        NOT NULL,
    attempt     integer     NOT NULL,
    sha256      text        NOT NULL,
    content     bytea       NOT NULL,
    reason      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
