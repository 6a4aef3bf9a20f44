-- Two roles, and encryption at rest (docs/security.md, docs/operations.md "Database roles").
--
-- The OWNER of the schema (the role that runs `tfdeploy migrate`: tfdeploy_owner in the
-- embedded PostgreSQL) owns every object. The SERVICE role, tfdeploy_service, is what the API
-- and the workers connect as (itself, or a login role that is a member of it): not a
-- superuser, owner of nothing, so it can neither ALTER a table nor disable its triggers.
--
-- LATER MIGRATIONS need no GRANT of their own, as long as they run as the owner: the
-- ALTER DEFAULT PRIVILEGES below give tfdeploy_service SELECT, INSERT, UPDATE, DELETE on every
-- table, and USAGE, SELECT on every sequence, that the owner creates in schema public (never
-- TRUNCATE, REFERENCES or TRIGGER). A migration that adds an APPEND-ONLY table must take back
-- what the defaults gave, next to its CREATE TABLE:
--     REVOKE UPDATE, DELETE ON <table> FROM tfdeploy_service;
-- (and refuse UPDATE/DELETE/TRUNCATE with triggers, as migration 0001 does for events). A
-- read-only table likewise: REVOKE INSERT, UPDATE, DELETE ON <table> FROM tfdeploy_service.
--
-- The role is created here when it does not exist yet, if the migrating role may create roles
-- (a superuser, or CREATEROLE); otherwise an administrator creates it first:
--     CREATE ROLE tfdeploy_service NOLOGIN;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tfdeploy_service') THEN
        BEGIN
            CREATE ROLE tfdeploy_service NOLOGIN;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'role tfdeploy_service does not exist, and % may not create it',
                current_user
                USING HINT = 'As an administrator: CREATE ROLE tfdeploy_service NOLOGIN; '
                             '(docs/operations.md, "Database roles")';
        END;
    END IF;
END $$;

-- Nobody but the owner creates objects in the schema (PostgreSQL 15 no longer lets PUBLIC;
-- older servers did).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO tfdeploy_service;

-- What exists now (procrastinate's tables included): read and write rows, use sequences.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO tfdeploy_service;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO tfdeploy_service;

-- What later migrations create (as the owner, the role running this one).
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO tfdeploy_service;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO tfdeploy_service;

-- The event table: read and append, nothing else (the triggers of 0001 stop the owner too).
REVOKE ALL ON events FROM tfdeploy_service;
GRANT SELECT, INSERT ON events TO tfdeploy_service;

-- The migrations' own record, and the audit views: read only.
REVOKE ALL ON schema_migrations FROM tfdeploy_service;
GRANT SELECT ON schema_migrations TO tfdeploy_service;
DO $$
DECLARE
    v record;
BEGIN
    FOR v IN SELECT c.oid::regclass AS name FROM pg_class c
             WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('v', 'm')
    LOOP
        EXECUTE format('REVOKE ALL ON %s FROM tfdeploy_service', v.name);
        EXECUTE format('GRANT SELECT ON %s TO tfdeploy_service', v.name);
    END LOOP;
END $$;

-- Encryption at rest. tfstate versions in state_blobs and emergency copies stored before this
-- migration are plain text: `tfdeploy migrate` seals them right after the SQL migrations (it
-- has the key; service.rotation.seal_plaintext), and they read correctly until then. Objects
-- in S3 cannot be told apart without reading them, so the ones that exist now are listed here
-- and sealed by the same step, which deletes each row once its object is sealed.
CREATE TABLE unsealed_s3_objects (
    workspace text    NOT NULL,
    version   integer NOT NULL,
    location  text    NOT NULL,
    PRIMARY KEY (workspace, version)
);
INSERT INTO unsealed_s3_objects (workspace, version, location)
SELECT workspace, version, location FROM state_versions WHERE store = 's3';
