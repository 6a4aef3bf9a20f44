"""A private PostgreSQL cluster under a data directory: the embedded default, and the tests' database.

Uses the system's PostgreSQL binaries when present (Debian: /usr/lib/postgresql/N/bin), else the
binaries bundled in the ``pgserver`` wheel. PostgreSQL refuses to run as root, so as root the
server runs as the ``postgres`` system user (created if missing).

Locked down (docs/security.md, "The database"):

- every connection authenticates with scram-sha-256 (``pg_hba.conf`` holds nothing else), the
  unix socket sits in ``<directory>/run`` (mode 0700, owned by the server's user), TCP listens on
  127.0.0.1 only;
- three roles, each with a generated password in a 0600 file of ``<directory>/credentials``
  (mode 0700, owned by the user that runs tfdeploy): the bootstrap superuser (used here only,
  to create the others and the database), ``tfdeploy_owner`` (owns the database and every object
  in it: migrations run as it) and ``tfdeploy_service`` (what the API and workers connect as:
  no superuser, and only the grants of migration 0008);
- a cluster made by an earlier version (trust authentication, socket in /tmp, everything owned
  by the superuser) is converted on its first start: the superuser's password is set in
  single-user mode (no connection is accepted meanwhile), ``pg_hba.conf`` rewritten, and the
  objects of the database given to the owner.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

DB_NAME = "tfdeploy"
OWNER_ROLE = "tfdeploy_owner"
SERVICE_ROLE = "tfdeploy_service"
SUPERUSER = "superuser"  # the credentials file of the bootstrap superuser

HBA = """\
# Written by tfdeploy (service/embedded.py): a password (scram-sha-256) for every connection,
# over the private unix socket or TCP on 127.0.0.1. Rewritten at every start.
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  scram-sha-256
host    all       all   127.0.0.1/32   scram-sha-256
"""
# A unix socket path must fit sockaddr_un (107 bytes on Linux) with ".s.PGSQL.<port>" after it.
MAX_SOCKET_DIR = 90


class EmbeddedPostgresError(RuntimeError):
    pass


def find_bindir() -> Path:
    explicit = os.environ.get("TFDEPLOY_PG_BINDIR")
    candidates = [explicit] if explicit else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists():
            return Path(c)
    try:
        from pgserver._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)
    except ImportError as exc:  # pragma: no cover - pgserver is a dependency
        raise EmbeddedPostgresError(
            "no PostgreSQL binaries: install Debian's postgresql or the pgserver package"
        ) from exc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> str | None:
    """The user that runs the server, or None for the current user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
            check=True,
        )
    return "postgres"


def _open_path_for(user: str, path: Path) -> None:
    """Let ``user`` reach ``path``: the data dir may sit under root's home (mode 700)."""
    pw = pwd.getpwnam(user)
    for parent in reversed(path.parents):
        st = parent.stat()
        if not st.st_mode & 0o001:
            parent.chmod(st.st_mode | 0o001)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` with mode 0600 (atomically: a reader sees the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class EmbeddedPostgres:
    """Start, reuse and stop a cluster in ``directory``. ``url`` connects as the service role,
    ``owner_url`` as the schema's owner (migrations), ``superuser_url()`` as the superuser
    (tests and maintenance only)."""

    def __init__(
        self, directory: str | Path, port: int | None = None, settings: dict[str, str] | None = None
    ) -> None:
        self.directory = Path(directory).resolve()
        # Extra server settings (``-c name=value``), e.g. the tests' throwaway cluster's.
        self.settings = dict(settings or {})
        self.pgdata = self.directory / "pgdata"
        self.socket_dir = self.directory / "run"
        self.credentials = self.directory / "credentials"
        self.port = port
        self.bindir = find_bindir()
        self.user = _run_as()
        self.superuser = self.user or _current_user()
        self._started_here = False

    # -- commands

    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / tool), *args]
        return ["runuser", "-u", self.user, "--", *cmd] if self.user else cmd

    def _check(
        self, cmd: list[str], timeout: float = 120, input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd="/", input=input,
            env=None if env is None else {**os.environ, **env},
        )
        if proc.returncode != 0:
            raise EmbeddedPostgresError(
                f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc.stdout

    def tool_env(self) -> dict[str, str]:
        """Environment for a client tool (psql, pg_dump, pgbench) connecting as the superuser:
        the password travels in the environment of that one process, never on a command line."""
        return {"PGPASSWORD": self.password(SUPERUSER), "PGUSER": self.superuser,
                "PGHOST": "127.0.0.1", "PGPORT": str(self.port)}

    def pg_dump(self, database: str = DB_NAME) -> bytes:
        """``pg_dump`` of ``database`` (plain SQL), as the superuser."""
        proc = subprocess.run(
            self._cmd("pg_dump", "-d", database), capture_output=True, cwd="/",
            env={**os.environ, **self.tool_env()}, timeout=300,
        )
        if proc.returncode != 0:
            raise EmbeddedPostgresError(f"pg_dump failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout

    # -- credentials

    def password(self, role: str) -> str:
        """The generated password of ``role`` (``superuser``, ``tfdeploy_owner``,
        ``tfdeploy_service``), from its 0600 file."""
        return (self.credentials / f"{role}.password").read_text(encoding="ascii").strip()

    def _ensure_password(self, role: str) -> str:
        path = self.credentials / f"{role}.password"
        if not path.exists():
            _write_private(path, secrets.token_urlsafe(32) + "\n")
        return self.password(role)

    # -- URLs

    def url_for(self, role: str, database: str = DB_NAME) -> str:
        name, key = (self.superuser, SUPERUSER) if role == SUPERUSER else (role, role)
        return f"postgresql://{name}:{self.password(key)}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        """The service role's URL: what the API and workers connect with."""
        return self.url_for(SERVICE_ROLE)

    @property
    def owner_url(self) -> str:
        """The owner's URL: what migrations run as."""
        return self.url_for(OWNER_ROLE)

    def superuser_url(self, database: str = "postgres") -> str:
        return self.url_for(SUPERUSER, database)

    def display_url(self, role: str = SERVICE_ROLE) -> str:
        """A URL to print: no password in it."""
        return f"postgresql://{role}@127.0.0.1:{self.port}/{DB_NAME}"

    # -- lifecycle

    def running(self) -> bool:
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        proc = subprocess.run(self._cmd("pg_ctl", "status", "-D", str(self.pgdata)), capture_output=True, cwd="/")
        return proc.returncode == 0

    @contextlib.contextmanager
    def _start_lock(self) -> Iterator[None]:
        """Processes starting one cluster at once (``tfdeploy up`` and a ``token create``) take
        turns: one makes or converts it, the others find it done."""
        fd = os.open(self.directory / ".start.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def start(self) -> str:
        """Start (or take over) the cluster, locked down; returns the service role's URL."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.user:
            _open_path_for(self.user, self.directory)
        self.credentials.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.credentials, 0o700)  # owned by us, not by the server's user
        with self._start_lock():
            port_file = self.directory / "pg.port"
            if self.port is None:
                # Reuse the previous port so URLs stay stable across restarts.
                self.port = int(port_file.read_text()) if port_file.exists() else _free_port()
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            elif not (self.credentials / f"{SUPERUSER}.password").exists():
                self._set_superuser_password_offline()  # a cluster from before the lock-down
            self._write_hba()
            if self.running():
                # Left by an earlier run of ours: take it over.
                self._read_port_from_pid()
            else:
                self._start_server()
                self._started_here = True
            port_file.write_text(str(self.port))
            self._bootstrap()
        return self.url

    def _chown_to_server(self, path: Path) -> None:
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _pwfile(self, password: str) -> Path:
        """The superuser's password in a file the server's user can read (initdb --pwfile,
        postgres --single reads stdin instead); the caller removes it."""
        path = self.directory / f".pwfile.{os.getpid()}"
        _write_private(path, password + "\n")
        self._chown_to_server(path)
        return path

    def _initdb(self) -> None:
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)  # a half-made cluster from an interrupted initdb
        self.pgdata.mkdir(mode=0o700)
        self._chown_to_server(self.pgdata)
        password = secrets.token_urlsafe(32)
        pwfile = self._pwfile(password)
        try:
            self._check(
                self._cmd(
                    "initdb", "-D", str(self.pgdata), "--auth=scram-sha-256", f"--pwfile={pwfile}",
                    "-E", "UTF8", "--locale=C", "-U", self.superuser,
                )
            )
        finally:
            pwfile.unlink(missing_ok=True)
        # Only now: a crash before this leaves a cluster without the file, which the next
        # start treats as one to convert (it sets a new password offline).
        _write_private(self.credentials / f"{SUPERUSER}.password", password + "\n")

    def _set_superuser_password_offline(self) -> None:
        """A cluster made before the lock-down trusts every local connection. Stop it if it
        runs, and set the superuser's password in single-user mode: no connection is accepted
        while we do, and the password never crosses a socket."""
        if self.running():
            self.stop("fast")
        password = secrets.token_urlsafe(32)
        statement = sql.SQL("ALTER ROLE {} WITH PASSWORD {};\n").format(
            sql.Identifier(self.superuser), sql.Literal(password)
        ).as_string(None)
        self._check(
            self._cmd("postgres", "--single", "-D", str(self.pgdata), "-c", "log_statement=none",
                      "-c", "password_encryption=scram-sha-256", "postgres"),
            input=statement,
        )
        _write_private(self.credentials / f"{SUPERUSER}.password", password + "\n")

    def _write_hba(self) -> None:
        path = self.pgdata / "pg_hba.conf"
        if path.read_text() == HBA:
            return
        # The server's own user reads it; write it as the file it replaces was (its owner).
        tmp = self.pgdata / f".pg_hba.conf.{os.getpid()}"
        tmp.write_text(HBA)
        tmp.chmod(0o600)
        self._chown_to_server(tmp)
        os.replace(tmp, path)
        if self.running():
            self._check(self._cmd("pg_ctl", "reload", "-D", str(self.pgdata)))

    def _reach(self) -> None:
        """Let the server's user reach the directory again: a parent may have lost its o+x
        since ``start`` began (pytest takes group and other bits off /tmp/pytest-of-<user> at
        every session start, and sessions run side by side)."""
        if self.user:
            _open_path_for(self.user, self.directory)

    def _start_server(self) -> None:
        self._reach()
        log = self.directory / "postgres.log"
        if self.user:
            log.touch()
            self._chown_to_server(log)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.socket_dir, 0o700)
        self._chown_to_server(self.socket_dir)
        # No unix socket at all rather than one in a shared directory, when the path is too
        # long for one (deep data dirs); TCP on 127.0.0.1 still serves.
        sockets = str(self.socket_dir) if len(str(self.socket_dir)) <= MAX_SOCKET_DIR else ""
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories='{sockets}' -c unix_socket_permissions=0700 "
            "-c password_encryption=scram-sha-256 -c max_connections=300 "
            "-c shared_buffers=128MB -c fsync=on"
        ) + "".join(f" -c {name}={value}" for name, value in self.settings.items())
        try:
            self._check(
                self._cmd("pg_ctl", "start", "-w", "-t", "120", "-D", str(self.pgdata), "-l", str(log), "-o", opts)
            )
        except EmbeddedPostgresError as exc:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise EmbeddedPostgresError(f"PostgreSQL did not start: {exc}\n{tail}") from None

    def _read_port_from_pid(self) -> None:
        pid_file = self.pgdata / "postmaster.pid"
        with contextlib.suppress(OSError, IndexError, ValueError):
            self.port = int(pid_file.read_text().splitlines()[3])

    def _superuser(self, database: str = "postgres") -> psycopg.Connection[Any]:
        last: Exception | None = None
        for _ in range(50):  # a server just started, or restarting, may refuse for a moment
            try:
                return psycopg.connect(self.superuser_url(database), autocommit=True, connect_timeout=10)
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.1)
        raise EmbeddedPostgresError(f"cannot connect to the embedded PostgreSQL: {last}")

    def _bootstrap(self) -> None:
        """The two roles (passwords from their files), the database owned by the owner, and in
        it every object owned by the owner (a database made before the lock-down has them
        owned by the superuser)."""
        with self._superuser() as conn:
            for role in (OWNER_ROLE, SERVICE_ROLE):
                ensure_role(conn, role, self._ensure_password(role))
            row = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (DB_NAME,)
            ).fetchone()
            if row is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another process won
                    conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(DB_NAME), sql.Identifier(OWNER_ROLE)))
            elif row[0] != OWNER_ROLE:  # made by an earlier version, as the superuser
                conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                    sql.Identifier(DB_NAME), sql.Identifier(OWNER_ROLE)))
        with self._superuser(DB_NAME) as conn:
            give_to_owner(conn, OWNER_ROLE)
            conn.execute(sql.SQL(
                "REVOKE ALL ON DATABASE {db} FROM PUBLIC;"
                "GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {svc}"
            ).format(db=sql.Identifier(DB_NAME), svc=sql.Identifier(SERVICE_ROLE)))

    def stop(self, mode: str = "fast") -> None:
        if not (self.pgdata / "postmaster.pid").exists():
            return
        self._reach()
        # Not guarded by running(): a status check can race with a server still coming up.
        proc = subprocess.run(
            self._cmd("pg_ctl", "stop", "-w", "-t", "120", "-m", mode, "-D", str(self.pgdata)),
            capture_output=True, text=True, cwd="/",
        )
        if proc.returncode != 0 and (self.pgdata / "postmaster.pid").exists() and self.running():
            raise EmbeddedPostgresError(f"pg_ctl stop failed: {proc.stderr.strip() or proc.stdout.strip()}")

    def restart(self) -> None:
        # -l: without a log file the server would keep pg_ctl's captured output open.
        log = str(self.directory / "postgres.log")
        self._check(self._cmd("pg_ctl", "restart", "-w", "-m", "fast", "-D", str(self.pgdata), "-l", log))

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- roles (also what docs/operations.md asks an external server's administrator to do) ------


def ensure_role(conn: psycopg.Connection[Any], role: str, password: str) -> None:
    """``role`` exists, may log in with ``password``, and has no power beyond its grants. The
    password is sent as a SCRAM verifier computed here (libpq), so it appears in no statement
    the server could log."""
    with contextlib.suppress(psycopg.errors.DuplicateObject):
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
    conn.execute(
        sql.SQL(
            "ALTER ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
            "NOBYPASSRLS INHERIT PASSWORD {}"
        ).format(sql.Identifier(role), sql.Literal(verifier.decode()))
    )


# Every object of schema public that someone other than the owner owns (tables, views,
# sequences not owned by a column, functions, enums, domains, ranges, composite types) goes to
# the owner. Indexes, a column's sequence, a table's row type and array types follow their owner.
_GIVE_TO_OWNER = """
DO $$
DECLARE
    owner_name text := {owner};
    r record;
BEGIN
    FOR r IN
        SELECT c.oid::regclass AS obj, c.relkind
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace
          AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c')
          AND pg_get_userbyid(c.relowner) <> owner_name
          AND NOT (c.relkind = 'S' AND EXISTS (
              SELECT 1 FROM pg_depend d
              WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                AND d.deptype IN ('a', 'i')))
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO %I',
                       CASE r.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                      WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
                                      WHEN 'c' THEN 'TYPE' ELSE 'TABLE' END,
                       r.obj, owner_name);
    END LOOP;
    FOR r IN
        SELECT p.oid::regprocedure AS obj
        FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace AND pg_get_userbyid(p.proowner) <> owner_name
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.obj, owner_name);
    END LOOP;
    FOR r IN
        SELECT t.oid::regtype AS obj
        FROM pg_type t
        WHERE t.typnamespace = 'public'::regnamespace AND pg_get_userbyid(t.typowner) <> owner_name
          AND t.typtype IN ('e', 'd', 'r')
    LOOP
        EXECUTE format('ALTER TYPE %s OWNER TO %I', r.obj, owner_name);
    END LOOP;
END $$;
"""


def give_to_owner(conn: psycopg.Connection[Any], owner: str) -> None:
    """Make ``owner`` the owner of every object in schema public (as a superuser): the
    database of an earlier version has them owned by the superuser that migrated it."""
    conn.execute(sql.SQL(_GIVE_TO_OWNER).format(owner=sql.Literal(owner)))


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name
