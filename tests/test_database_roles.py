"""The database locked down (issue 11, part 6): the service role cannot rewrite history, the
embedded PostgreSQL lets nobody in without a password, and a cluster of an earlier version is
converted on its first start."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock
from uuid import uuid4

import psycopg
import pytest
from cryptography.fernet import Fernet

from service.embedded import (
    HBA,
    OWNER_ROLE,
    SERVICE_ROLE,
    SUPERUSER,
    EmbeddedPostgres,
    _free_port,
)
from service.migrate import MigrationError, migrate, migrations_dir, seal_plaintext
from service.secrets import KeyRing, SecretBox, generate_key

ROOT = Path(__file__).resolve().parent.parent


def refused(url: str, statement: str) -> str:
    """The error ``statement`` gets on its own connection (it must get one)."""
    with psycopg.connect(url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute(statement)
        return str(err.value)


# -- the service role --------------------------------------------------------------------------


def test_the_service_role_only_reads_and_appends_events(database_url, owner_database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(  # an append (the service's appends go through tfdeploy_append)
            "INSERT INTO events (deploy_id, version, type, data, actor) "
            "VALUES (%s, 1, 'Requested', '{}', 'user:ann')", (str(uuid4()),)
        )
        row = conn.execute("SELECT current_user, count(*) FROM events GROUP BY 1").fetchone()
        assert row == (SERVICE_ROLE, 1)
    for statement in (
        "UPDATE events SET actor = 'mallory'",
        "DELETE FROM events",
        "TRUNCATE events",
        "ALTER TABLE events DISABLE TRIGGER ALL",
        "ALTER TABLE events DISABLE TRIGGER events_no_update_delete",
        "DROP TRIGGER events_no_truncate ON events",
        "DROP TABLE events",
        "ALTER TABLE events ADD COLUMN x int",
        "SET session_replication_role = replica",
        "CREATE TABLE mine (x int)",
        "ALTER ROLE tfdeploy_service SUPERUSER",
        "DELETE FROM schema_migrations",
    ):
        message = refused(database_url, statement)
        assert "permission denied" in message or "must be" in message, (statement, message)
    with psycopg.connect(owner_database_url) as conn:  # nothing changed
        assert conn.execute("SELECT count(*), min(actor) FROM events").fetchone() == (1, "user:ann")
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'events'::regclass AND tgenabled = 'O'"
        ).fetchone()
        assert triggers == (5,)  # append-only (2), generated positions, the SSE notify, the dispatch notify


def test_the_service_role_owns_nothing_and_has_no_power(database_url):
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication "
            "FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row == (False, False, False, False, False)
        owned = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relowner = current_user::regrole"
        ).fetchone()
        assert owned == (0,)
        assert conn.execute(
            "SELECT has_schema_privilege('public', 'CREATE')"
        ).fetchone() == (False,)


def test_every_table_grants_the_service_what_it_needs(database_url):
    """Whatever the migrations made (procrastinate's tables included): rows of every table may
    be read and written, except the event table (read, append) and the migrations' record
    (read); every sequence may be used; nothing may be truncated."""
    with psycopg.connect(database_url) as conn:
        tables = conn.execute(
            "SELECT c.relname, has_table_privilege(c.oid, 'SELECT'),"
            " has_table_privilege(c.oid, 'INSERT'), has_table_privilege(c.oid, 'UPDATE'),"
            " has_table_privilege(c.oid, 'DELETE'), has_table_privilege(c.oid, 'TRUNCATE')"
            " FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')"
        ).fetchall()
        assert len(tables) > 10
        for name, select, insert, update, delete, truncate in tables:
            expected = {
                "events": (True, True, False, False),
                "schema_migrations": (True, False, False, False),
            }.get(name, (True, True, True, True))
            assert (select, insert, update, delete) == expected, name
            assert not truncate, name
        sequences = conn.execute(
            "SELECT c.relname, has_sequence_privilege(c.oid, 'USAGE') FROM pg_class c"
            " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'S'"
        ).fetchall()
        assert sequences and all(ok for _, ok in sequences), sequences
        views = conn.execute(
            "SELECT c.relname, has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT')"
            " FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'v'"
        ).fetchall()
        assert views and all(sel and not ins for _, sel, ins in views), views


def test_a_later_migration_needs_no_grant_and_an_append_only_one_revokes(
    owner_database_url, database_url, tmp_path, monkeypatch
):
    """What migration 0008's header promises: a table a later migration makes is usable by the
    service at once; an append-only one takes back UPDATE and DELETE as the header says."""
    directory = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), directory)
    (directory / "0900_later.sql").write_text(
        "CREATE TABLE later (id bigserial PRIMARY KEY, x int);\n"
        "CREATE TABLE later_log (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, x int);\n"
        "REVOKE UPDATE, DELETE ON later_log FROM tfdeploy_service;\n"
    )
    monkeypatch.setenv("TFDEPLOY_MIGRATIONS_DIR", str(directory))
    assert migrate(owner_database_url) == ["0900_later.sql"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO later (x) VALUES (1), (2)")
        conn.execute("UPDATE later SET x = 3 WHERE x = 1")
        conn.execute("DELETE FROM later WHERE x = 2")
        assert conn.execute("SELECT x FROM later").fetchall() == [(3,)]
        conn.execute("INSERT INTO later_log (x) VALUES (1)")
        assert conn.execute("SELECT x FROM later_log").fetchall() == [(1,)]
    for statement in ("UPDATE later_log SET x = 2", "DELETE FROM later_log", "TRUNCATE later"):
        assert "permission denied" in refused(database_url, statement)


def test_migrations_run_as_the_owner(
    database_url, superuser_database_url, tmp_path, monkeypatch
):
    """The service role may not migrate; a superuser migrates as the owner, so what it makes
    has the owner's default grants."""
    with pytest.raises(MigrationError, match="schema's owner"):
        migrate(database_url)
    directory = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), directory)
    (directory / "0900_by_superuser.sql").write_text("CREATE TABLE by_superuser (x int);\n")
    monkeypatch.setenv("TFDEPLOY_MIGRATIONS_DIR", str(directory))
    assert migrate(superuser_database_url) == ["0900_by_superuser.sql"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        owner = conn.execute(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'by_superuser'"
        ).fetchone()
        assert owner == (OWNER_ROLE,)
        conn.execute("INSERT INTO by_superuser VALUES (1)")


def test_migration_0008_makes_the_role_when_it_is_missing(pg_cluster, empty_database_url):
    """On a server where nobody made tfdeploy_service yet: a superuser that owns the database
    (the previous compose.yaml's setup) gets it made by the migration; an owner that may not
    create roles is told what to do."""
    name = f"su_owned_{uuid4().hex[:8]}"
    with psycopg.connect(pg_cluster.superuser_url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # owned by the superuser
        # The cluster's roles are shared: rename ours away for the test, and back after.
        conn.execute("ALTER ROLE tfdeploy_service RENAME TO tfdeploy_service_away")
    try:
        with pytest.raises(psycopg.errors.RaiseException, match="may not create it"):
            migrate(empty_database_url)  # the owner: NOCREATEROLE
        su = pg_cluster.url_for(SUPERUSER, name)
        assert "0008_roles_and_encryption.sql" in migrate(su)
        with psycopg.connect(su) as conn:
            row = conn.execute(
                "SELECT rolcanlogin, has_table_privilege('tfdeploy_service', 'events', 'INSERT'),"
                " has_table_privilege('tfdeploy_service', 'events', 'UPDATE')"
                " FROM pg_roles WHERE rolname = 'tfdeploy_service'"
            ).fetchone()
            assert row == (False, True, False)  # NOLOGIN: a login role joins it
    finally:
        with psycopg.connect(pg_cluster.superuser_url(), autocommit=True) as conn:
            for db in (name, empty_database_url.rsplit("/", 1)[1]):
                conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            conn.execute("DROP ROLE IF EXISTS tfdeploy_service")
            conn.execute("ALTER ROLE tfdeploy_service_away RENAME TO tfdeploy_service")


# -- the embedded cluster ----------------------------------------------------------------------


def psql(pg: EmbeddedPostgres, *args: str, user: str | None = None, password: str | None = None,
         as_os_user: str | None = None) -> subprocess.CompletedProcess[str]:
    """psql ``-w`` (never prompts), optionally as another OS user, with or without a password."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    cmd = [str(pg.bindir / "psql"), "-w", "-X", "-At", "-U", user or pg.superuser, "-d", "postgres",
           *args, "-c", "SELECT 'in'"]
    if as_os_user:
        cmd = ["runuser", "-u", as_os_user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=30)


def test_the_embedded_cluster_needs_a_password_everywhere(pg_cluster):
    tcp = ("-h", "127.0.0.1", "-p", str(pg_cluster.port))
    for user in (pg_cluster.superuser, "postgres", OWNER_ROLE, SERVICE_ROLE):
        no_password = psql(pg_cluster, *tcp, user=user)
        assert no_password.returncode != 0 and "in" not in no_password.stdout
        assert "password" in no_password.stderr, no_password.stderr
        wrong = psql(pg_cluster, *tcp, user=user, password="not-the-password")
        assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr
    for role in (SUPERUSER, OWNER_ROLE, SERVICE_ROLE):
        user = pg_cluster.superuser if role == SUPERUSER else role
        ok = psql(pg_cluster, *tcp, user=user, password=pg_cluster.password(role))
        assert ok.stdout.strip() == "in", ok.stderr
    assert (pg_cluster.pgdata / "pg_hba.conf").read_text() == HBA
    assert "trust" not in HBA and "0.0.0.0" not in HBA
    with psycopg.connect(pg_cluster.superuser_url()) as conn:
        settings = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('listen_addresses', 'unix_socket_directories', 'unix_socket_permissions', "
            "'password_encryption')"
        ).fetchall())
        scram = conn.execute(
            "SELECT bool_and(rolpassword LIKE 'SCRAM-SHA-256$%%') FROM pg_authid "
            "WHERE rolname IN (%s, %s, %s)", (pg_cluster.superuser, OWNER_ROLE, SERVICE_ROLE)
        ).fetchone()
    assert settings["listen_addresses"] == "127.0.0.1"
    assert settings["unix_socket_permissions"] == "0700"
    assert settings["password_encryption"] == "scram-sha-256"
    assert scram == (True,)
    sockets = settings["unix_socket_directories"]
    assert sockets in ("", str(pg_cluster.socket_dir)) and not sockets.startswith("/tmp")


def test_embedded_files_are_private(pg_cluster):
    for path, mode in [
        (pg_cluster.credentials, 0o700),
        (pg_cluster.socket_dir, 0o700),
        (pg_cluster.pgdata, 0o700),
        *((f, 0o600) for f in pg_cluster.credentials.iterdir()),
    ]:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    names = sorted(f.name for f in pg_cluster.credentials.iterdir())
    assert names == sorted(f"{r}.password" for r in (SUPERUSER, OWNER_ROLE, SERVICE_ROLE))
    assert len({pg_cluster.password(r) for r in (SUPERUSER, OWNER_ROLE, SERVICE_ROLE)}) == 3
    assert pg_cluster.display_url().count(":") == 2  # scheme and port: no password printed
    assert pg_cluster.password(SERVICE_ROLE) not in pg_cluster.display_url()


@pytest.fixture
def other_os_user() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another OS user")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    return "nobody"


def test_another_os_user_reaches_neither_the_socket_nor_the_passwords(pg_cluster, other_os_user):
    run = lambda *cmd: subprocess.run(  # noqa: E731
        ["runuser", "-u", other_os_user, "--", *cmd], capture_output=True, text=True, cwd="/"
    )
    assert run("ls", str(pg_cluster.socket_dir)).returncode != 0
    assert run("ls", str(pg_cluster.credentials)).returncode != 0
    assert run("cat", str(pg_cluster.credentials / f"{SUPERUSER}.password")).returncode != 0
    if pg_cluster.socket_dir.joinpath(f".s.PGSQL.{pg_cluster.port}").exists():
        by_socket = psql(pg_cluster, "-h", str(pg_cluster.socket_dir), "-p", str(pg_cluster.port),
                         as_os_user=other_os_user, password=pg_cluster.password(SUPERUSER))
        assert by_socket.returncode != 0 and "in" not in by_socket.stdout
        assert "Permission denied" in by_socket.stderr, by_socket.stderr
    tcp = ("-h", "127.0.0.1", "-p", str(pg_cluster.port))
    for user in ("postgres", pg_cluster.superuser, SERVICE_ROLE, other_os_user):
        attempt = psql(pg_cluster, *tcp, user=user, as_os_user=other_os_user)
        assert attempt.returncode != 0 and "in" not in attempt.stdout, attempt.stderr


@pytest.fixture
def cluster_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="tfdeploy-test-roles-pg-"))
    try:
        yield directory
    finally:
        EmbeddedPostgres(directory).stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)


def make_cluster_as_before(directory: Path, tmp_path: Path) -> tuple[EmbeddedPostgres, str]:
    """A cluster as the previous version made and left it running: trust authentication, the
    socket in /tmp, the database and every table owned by the superuser (migrations 0001-0006
    and procrastinate)."""
    pg = EmbeddedPostgres(directory)
    pg.directory.mkdir(parents=True, exist_ok=True)
    pg._chown_to_server(pg.directory)
    pg.pgdata.mkdir(mode=0o700)
    pg._chown_to_server(pg.pgdata)
    pg._check(pg._cmd("initdb", "-D", str(pg.pgdata), "-A", "trust", "-E", "UTF8", "--locale=C",
                      "-U", pg.superuser))
    port = _free_port()
    (directory / "pg.port").write_text(str(port))
    log = directory / "postgres.log"
    log.touch()
    pg._chown_to_server(log)
    pg._check(pg._cmd("pg_ctl", "start", "-w", "-D", str(pg.pgdata), "-l", str(log),
                      "-o", f"-p {port} -h 127.0.0.1 -k /tmp"))
    trust = f"postgresql://{pg.superuser}@127.0.0.1:{port}"
    with psycopg.connect(f"{trust}/postgres", autocommit=True) as conn:
        conn.execute("CREATE DATABASE tfdeploy")
    old = tmp_path / "old-migrations"
    old.mkdir()
    for f in sorted(migrations_dir().glob("*.sql")):
        if f.name < "0007":
            shutil.copy(f, old)
    with mock.patch.dict(os.environ, {"TFDEPLOY_MIGRATIONS_DIR": str(old)}):
        migrate(f"{trust}/tfdeploy")
    return pg, f"{trust}/tfdeploy"


def test_a_cluster_of_the_previous_version_is_converted(cluster_dir, tmp_path):
    old_pg, trust_url = make_cluster_as_before(cluster_dir, tmp_path)
    key = generate_key()
    state = b'{"version": 4, "serial": 1, "lineage": "l", "password": "hunter2-old"}'
    deploy_id = str(uuid4())
    with psycopg.connect(trust_url, autocommit=True) as conn:
        conn.execute("INSERT INTO state_blobs VALUES ('site', 1, %s)", (state,))
        conn.execute("INSERT INTO deploy_secrets VALUES (%s, %s)",
                     (deploy_id, Fernet(key.encode()).encrypt(b'{"token":"t0k"}')))
    assert old_pg.running()

    pg = EmbeddedPostgres(cluster_dir)
    pg.start()  # stops the old server, sets the password offline, locks it down
    assert pg.running() and not Path(f"/tmp/.s.PGSQL.{pg.port}").exists()
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(trust_url, connect_timeout=5)  # trust is gone
    assert (pg.pgdata / "pg_hba.conf").read_text() == HBA
    with psycopg.connect(pg.superuser_url("tfdeploy")) as conn:
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
            "WHERE relnamespace = 'public'::regnamespace"
        ).fetchall()
        assert owners == [(OWNER_ROLE,)]
        for catalog, owner_col, ns_col in (("pg_proc", "proowner", "pronamespace"),
                                           ("pg_type", "typowner", "typnamespace")):
            found = conn.execute(
                f"SELECT DISTINCT pg_get_userbyid({owner_col}) FROM {catalog} "
                f"WHERE {ns_col} = 'public'::regnamespace"
            ).fetchall()
            assert found == [(OWNER_ROLE,)], catalog  # procrastinate's functions and enums too
        assert conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'tfdeploy'"
        ).fetchone() == (OWNER_ROLE,)

    # Then what `tfdeploy up` does: migrate as the owner, seal, serve as the service role.
    assert "0008_roles_and_encryption.sql" in migrate(pg.owner_url)
    keyring = KeyRing(key)
    [blobs, _] = seal_plaintext(pg.owner_url, keyring)
    assert blobs.resealed == 1 and blobs.finished
    with psycopg.connect(pg.url) as conn:
        blob = conn.execute("SELECT content FROM state_blobs").fetchone()[0]
        assert keyring.open(blob) == state and b"hunter2" not in blob
        secret = conn.execute("SELECT ciphertext FROM deploy_secrets").fetchone()[0]
        assert SecretBox(keyring).decrypt(secret) == {"token": "t0k"}
    assert "permission denied" in refused(pg.url, "DELETE FROM events")

    # A second start changes nothing and keeps the passwords.
    passwords = [pg.password(r) for r in (SUPERUSER, OWNER_ROLE, SERVICE_ROLE)]
    pg.stop()
    again = EmbeddedPostgres(cluster_dir)
    again.start()
    assert [again.password(r) for r in (SUPERUSER, OWNER_ROLE, SERVICE_ROLE)] == passwords
    with psycopg.connect(again.url) as conn:
        assert conn.execute("SELECT count(*) FROM state_blobs").fetchone() == (1,)
