"""A private PostgreSQL cluster under a data directory: the embedded default, and the tests' database.

Uses the system's PostgreSQL binaries when present (Debian: /usr/lib/postgresql/N/bin), else the
binaries bundled in the ``pgserver`` wheel. PostgreSQL refuses to run as root, so as root the
server runs as the ``postgres`` system user (created if missing).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

DB_NAME = "tfdeploy"


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


class EmbeddedPostgres:
    """Start, reuse and stop a cluster in ``directory``; ``url`` connects to its database."""

    def __init__(
        self, directory: str | Path, port: int | None = None, settings: dict[str, str] | None = None
    ) -> None:
        self.directory = Path(directory).resolve()
        # Extra server settings (``-c name=value``), e.g. the tests' throwaway cluster's.
        self.settings = dict(settings or {})
        self.pgdata = self.directory / "pgdata"
        self.port = port
        self.bindir = find_bindir()
        self.user = _run_as()
        self._started_here = False

    # -- commands

    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / tool), *args]
        return ["runuser", "-u", self.user, "--", *cmd] if self.user else cmd

    def _check(self, cmd: list[str], timeout: float = 120) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
        if proc.returncode != 0:
            raise EmbeddedPostgresError(
                f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc.stdout

    # -- lifecycle

    @property
    def url(self) -> str:
        return f"postgresql://{self.user or _current_user()}@127.0.0.1:{self.port}/{DB_NAME}"

    def running(self) -> bool:
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        proc = subprocess.run(self._cmd("pg_ctl", "status", "-D", str(self.pgdata)), capture_output=True, cwd="/")
        return proc.returncode == 0

    def start(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.user:
            _open_path_for(self.user, self.directory)
        port_file = self.directory / "pg.port"
        if self.port is None:
            # Reuse the previous port so URLs stay stable across restarts.
            self.port = int(port_file.read_text()) if port_file.exists() else _free_port()
        if not (self.pgdata / "PG_VERSION").exists():
            if self.pgdata.exists():
                shutil.rmtree(self.pgdata)  # a half-made cluster from an interrupted initdb
            self.pgdata.mkdir(mode=0o700)
            if self.user:
                pw = pwd.getpwnam(self.user)
                os.chown(self.pgdata, pw.pw_uid, pw.pw_gid)
            self._check(
                self._cmd(
                    "initdb", "-D", str(self.pgdata), "-A", "trust", "-E", "UTF8",
                    "--locale=C", "-U", self.user or _current_user(),
                )
            )
        if self.running():
            # Left by an earlier run of ours: take it over.
            self._read_port_from_pid()
        else:
            log = self.directory / "postgres.log"
            if self.user:
                log.touch()
                pw = pwd.getpwnam(self.user)
                os.chown(log, pw.pw_uid, pw.pw_gid)
            opts = (
                f"-p {self.port} -h 127.0.0.1 -k /tmp -c max_connections=300 "
                "-c shared_buffers=128MB -c fsync=on"
            ) + "".join(f" -c {name}={value}" for name, value in self.settings.items())
            try:
                self._check(
                    self._cmd("pg_ctl", "start", "-w", "-t", "120", "-D", str(self.pgdata), "-l", str(log), "-o", opts)
                )
            except EmbeddedPostgresError as exc:
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise EmbeddedPostgresError(f"PostgreSQL did not start: {exc}\n{tail}") from None
            self._started_here = True
        port_file.write_text(str(self.port))
        self._ensure_database()
        return self.url

    def _read_port_from_pid(self) -> None:
        pid_file = self.pgdata / "postmaster.pid"
        with contextlib.suppress(OSError, IndexError, ValueError):
            self.port = int(pid_file.read_text().splitlines()[3])

    def _ensure_database(self) -> None:
        psql = self._cmd(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-d", "postgres", "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'",
        )
        for _ in range(50):
            try:
                out = self._check(psql, timeout=30)
                break
            except EmbeddedPostgresError:
                time.sleep(0.1)
        else:
            out = self._check(psql, timeout=30)
        if out.strip() != "1":
            with contextlib.suppress(EmbeddedPostgresError):  # another process may have won
                self._check(self._cmd("createdb", "-h", "127.0.0.1", "-p", str(self.port), DB_NAME))

    def stop(self, mode: str = "fast") -> None:
        if not (self.pgdata / "postmaster.pid").exists():
            return
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


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name
