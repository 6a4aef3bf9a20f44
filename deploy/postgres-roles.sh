#!/bin/sh
# The two roles of tfdeploy's database (docs/operations.md, "Database roles"), made once when
# compose.yaml's PostgreSQL initialises its data directory (docker-entrypoint-initdb.d):
#   tfdeploy_owner    owns the database and everything in it; `tfdeploy migrate` connects as it
#   tfdeploy_service  what the API and the workers connect as; migration 0008 grants it rows to
#                     read and write (the event table: read and append only), nothing else
# The passwords come from the environment (required in compose.yaml) and travel to psql as
# variables, not on a command line.
set -eu
psql -v ON_ERROR_STOP=1 -X --username "$POSTGRES_USER" --dbname postgres \
     -v owner_password="$TFDEPLOY_PG_OWNER_PASSWORD" \
     -v service_password="$TFDEPLOY_PG_SERVICE_PASSWORD" <<'SQL'
SET password_encryption = 'scram-sha-256';
CREATE ROLE tfdeploy_owner LOGIN PASSWORD :'owner_password';
CREATE ROLE tfdeploy_service LOGIN PASSWORD :'service_password';
CREATE DATABASE tfdeploy OWNER tfdeploy_owner;
REVOKE ALL ON DATABASE tfdeploy FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE tfdeploy TO tfdeploy_service;
SQL
