"""Pieces shared by the bench scripts: a private PostgreSQL, fresh migrated databases, the API in
a subprocess (a real uvicorn server), a minimal HTTP/1.1 client, percentiles and the table.

Not a benchmark itself. Each script starts its own cluster in a temp dir and removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.embedded import OWNER_ROLE, SERVICE_ROLE, EmbeddedPostgres  # noqa: E402
from service.migrate import migrate  # noqa: E402

PYTHON = sys.executable
_counter = itertools.count()
RUNNER_IMAGE = os.environ.get("TFDEPLOY_BENCH_RUNNER_IMAGE", "local/terraform:1.11.4")


# ---------------------------------------------------------------- PostgreSQL


@contextlib.contextmanager
def cluster() -> Iterator[EmbeddedPostgres]:
    """A private PostgreSQL cluster in a temp dir, stopped and removed at the end.

    With ``TFDEPLOY_BENCH_PG_DIR`` (an EmbeddedPostgres directory, e.g. the smoke test's), that
    cluster is used (started if needed) and left running: each script makes its own database.
    """
    shared = os.environ.get("TFDEPLOY_BENCH_PG_DIR")
    if shared:
        pg = EmbeddedPostgres(shared)
        pg.start()
        yield pg
        return
    directory = tempfile.mkdtemp(prefix="tfdeploy-bench-pg-")
    pg = EmbeddedPostgres(directory)
    try:
        pg.start()
        yield pg
    finally:
        with contextlib.suppress(Exception):
            pg.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)


def new_database(pg: EmbeddedPostgres, *, migrated: bool = True) -> str:
    """A new database owned by the schema's owner, migrated as it; returns the SERVICE role's
    URL (what tfdeploy connects as). ``owner_url(pg, url)``: the owner's, for DDL."""
    name = f"bench_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg.superuser_url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER {OWNER_ROLE}")
    if migrated:
        migrate(pg.url_for(OWNER_ROLE, name))
    return pg.url_for(SERVICE_ROLE, name)


def owner_url(pg: EmbeddedPostgres, url: str) -> str:
    """``url``'s database as the schema's owner."""
    return pg.url_for(OWNER_ROLE, url.rsplit("/", 1)[1])


def pg_version(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


async def make_token(url: str, name: str = "bench", admin: bool = False) -> str:
    from service.auth import create_token

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await create_token(conn, name, admin=admin)


# ---------------------------------------------------------------- the API in a subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Per-user limits a bench's single user would otherwise hit (32 clients of one token, 1000
# streams of one admin): benches measure throughput, with the limiter counting as usual.
UNLIMITED = {"TFDEPLOY_RATE_LIMIT": "9999999/s", "TFDEPLOY_MAX_STREAMS_PER_USER": "1000000"}


class ApiProcess:
    """``bench/_serve.py``: the API (no worker) under uvicorn in its own process; or, with
    ``workers``, ``tfdeploy serve --workers N`` (N processes on one socket, as deployed).
    ``limits``: TFDEPLOY_* limit settings (default: UNLIMITED)."""

    def __init__(
        self, url: str, data_dir: str, *, profile: str | None = None, workers: int | None = None,
        limits: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = url
        self.workers = workers
        env = dict(os.environ, **(UNLIMITED if limits is None else limits))
        if workers:
            cmd = [PYTHON, "-m", "service.cli", "serve", "--workers", str(workers),
                   "--host", "127.0.0.1", "--port", str(self.port)]
            env.update(TFDEPLOY_DATABASE_URL=url, TFDEPLOY_DATA_DIR=data_dir,
                       TFDEPLOY_LOG_LEVEL="warning")
        else:
            cmd = [PYTHON, str(ROOT / "bench" / "_serve.py"), url, data_dir, str(self.port)]
            if profile:
                cmd.append(profile)
        # Its log goes to a file: an unread pipe would fill up and stall the server's logging.
        self.log_path = Path(data_dir) / f"api-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=str(ROOT), stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self.base = f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API process exited: {self.log_path.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("API process did not become ready")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def pids(self) -> list[int]:
        """The server's process and its children (the ``--workers`` processes)."""
        out = [self.proc.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(stat.parent.name))
        return out

    def cpu_seconds(self) -> float:
        """user + system CPU time of the server's processes so far."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: uvicorn's graceful stop
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> ApiProcess:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- a minimal HTTP/1.1 client


class Conn:
    """One keep-alive HTTP/1.1 connection over asyncio streams: next to no client overhead."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def request(self, method: str, path: str, body: bytes = b"", extra: str = "") -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode().partition(":")
            if k.lower() == "content-length":
                length = int(v)
        data = await self.reader.readexactly(length) if length else b""
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


# ---------------------------------------------------------------- figures


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n## {title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    sys.stdout.flush()


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        return f"{c:.3g}" if abs(c) < 100 else f"{c:.0f}"
    return str(c)


def docker_ok() -> bool:
    from service.runners import docker_available

    if not docker_available():
        return False
    proc = subprocess.run(["docker", "image", "inspect", RUNNER_IMAGE], capture_output=True)
    return proc.returncode == 0


# ---------------------------------------------------------------- API + worker in this process


class Harness:
    """The API (in-process ASGI client) and a worker in this event loop, as ``tfdeploy up`` runs
    them, plus a direct connection to watch the read model."""

    def __init__(self, services: Any, worker: Any, client: Any, watch: Any) -> None:
        self.services, self.worker, self.client, self.watch = services, worker, client, watch

    async def submit(self, files: dict[str, str], **body: Any) -> str:
        r = await self.client.post("/deploys", json={"files": files, **body})
        if r.status_code != 202:
            raise RuntimeError(f"POST /deploys: {r.status_code} {r.text}")
        return str(r.json()["id"])

    async def wait(self, deploy_id: str, limit: float = 300, poll: float = 0.005) -> str:
        """Poll the read model every ``poll`` seconds until the deploy ends; returns its status."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            cur = await self.watch.execute("SELECT status FROM deploys WHERE id = %s", (deploy_id,))
            row = await cur.fetchone()
            if row and row[0] in ("succeeded", "failed", "cancelled"):
                return str(row[0])
            await asyncio.sleep(poll)
        raise RuntimeError(f"deploy {deploy_id} not finished after {limit}s")


@contextlib.asynccontextmanager
async def harness(url: str, data_dir: str, runner: str, max_concurrency: int = 4) -> Any:
    import logging

    import httpx

    from service.api.app import create_app
    from service.services import open_services
    from service.settings import from_env
    from service.worker import Worker

    for name in ("httpx", "procrastinate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    settings = from_env(
        {}, data_dir=data_dir, runner=runner, runner_image=RUNNER_IMAGE, runner_network="none",
        max_concurrency=max_concurrency, log_level="warning",
    )
    services = await open_services(settings, url)
    worker = Worker(services, name="bench-worker")
    task = asyncio.create_task(worker.run())
    token = await make_token(url)
    watch = await psycopg.AsyncConnection.connect(url, autocommit=True)
    transport = httpx.ASGITransport(app=create_app(services))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://bench", headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        ) as client:
            yield Harness(services, worker, client, watch)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 120)
        await worker.close()
        await watch.close()
        await services.close()


# ---------------------------------------------------------------- py-spy


def pyspy_start(
    pid: int, seconds: float, out: str, idle: bool = True, subprocesses: bool = False
) -> subprocess.Popen[bytes] | None:
    """Sample ``pid`` with py-spy (if installed: ``pip install py-spy``) for ``seconds``;
    ``idle=False`` keeps only samples of threads on CPU (a CPU profile); ``subprocesses``
    samples its child processes too."""
    exe = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(exe).exists():
        print("py-spy not installed: no profile")
        return None
    return subprocess.Popen(
        [exe, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "200",
         *(["--idle"] if idle else []), *(["--subprocesses"] if subprocesses else []),
         "--format", "raw", "-o", out, "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def pyspy_report(proc: subprocess.Popen[bytes] | None, out: str, top: int = 15) -> None:
    """Print the busiest leaf frames and the busiest tfdeploy frames (inclusive) of a raw
    (collapsed stacks) py-spy profile."""
    if proc is None:
        return
    proc.wait(120)
    if not Path(out).exists():
        print("py-spy wrote no profile")
        return
    leaf: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in Path(out).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
        for f in set(frames):
            if "service/" in f or "docker/" in f or "procrastinate" in f or "psycopg" in f or "litestar" in f or "hcl2" in f or "lark" in f:
                incl[f] = incl.get(f, 0) + n
    print(f"\npy-spy, {total} samples:")
    table(["share", "leaf frame (self)"],
          [[f"{100 * v / total:.1f}%", k[:110]] for k, v in sorted(leaf.items(), key=lambda kv: -kv[1])[:top]])
    table(["share", "frame (inclusive)"],
          [[f"{100 * v / total:.1f}%", k[:110]] for k, v in sorted(incl.items(), key=lambda kv: -kv[1])[:top]])
