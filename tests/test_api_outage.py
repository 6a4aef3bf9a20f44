"""The API as a real process (`python -m service.cli serve`) through a PostgreSQL restart and a
SIGTERM (issue 6, scenarios 2 and 5, the API's part; docs/reliability.md).

Each test has its own PostgreSQL cluster (it is stopped and started here, not the session's
shared one) and reads the SSE streams over real HTTP, like a browser's EventSource: on a closed
stream it reconnects with the last id in ``Last-Event-ID``. Nothing is asserted on speed: the
measured times are printed (run with -s to see them); the waits are generous.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.auth import create_token
from service.lifecycle import AttemptFailed, AttemptSucceeded, PersistedState, StartAttempt
from service.logs import append_lines
from service.services import Services, open_services
from service.settings import from_env

ROOT = Path(__file__).resolve().parent.parent
MAIN_TF = 'resource "terraform_data" "x" {}\n'
WORKER = "worker:outage"


# ---------------------------------------------------------------- the API process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiProcess:
    """`python -m service.cli serve` on a free port, its output in a file."""

    def __init__(self, database_url: str, tmp_path: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"api-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TFDEPLOY_")}
        env.update(
            TFDEPLOY_DATABASE_URL=database_url,
            TFDEPLOY_DATA_DIR=str(tmp_path / "data"),
            TFDEPLOY_RUNNER="local",
            PYTHONUNBUFFERED="1",
        )
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self, limit: float = 60) -> None:
        deadline = time.monotonic() + limit
        async with httpx.AsyncClient(base_url=self.base, timeout=5) as c:
            while True:
                assert self.proc.poll() is None, self.log()[-3000:]
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get("/health")).status_code == 200:
                        return
                assert time.monotonic() < deadline, self.log()[-3000:]
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture
def cluster() -> Iterator[Any]:
    """A PostgreSQL cluster of this test's own, migrated (in its own temp dir, as conftest's:
    pytest's basetemp is pruned by other sessions on a shared machine)."""
    from service.embedded import EmbeddedPostgres
    from service.migrate import migrate

    directory = tempfile.mkdtemp(prefix="tfdeploy-test-outage-pg-")
    pg = EmbeddedPostgres(directory)
    try:
        pg.start()
        migrate(pg.owner_url)
        yield pg
    finally:
        with contextlib.suppress(Exception):
            pg.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def writer_services(cluster: Any, tmp_path: Path) -> AsyncIterator[Services]:
    """Services of this test process on the cluster: they write events and log lines as a
    worker does (the deploys' lifecycle is driven from here, no terraform needed)."""
    settings = from_env({}, data_dir=str(tmp_path / "data"))
    # Back soon after the database (as the API process is, service.cli), so the writes resume
    # quickly: the streams' resumption is measured from the first write after the outage.
    services = await open_services(settings, cluster.url, pool_size=4, pool_wait=5.0)
    try:
        yield services
    finally:
        await services.close()


# ---------------------------------------------------------------- an EventSource


@dataclass
class Received:
    id: str | None
    event: str
    data: str
    at: float  # time.monotonic()


@dataclass
class EventSource:
    """What a browser's EventSource does, over real HTTP: read the stream; when it closes or
    fails, wait ``retry`` seconds and reconnect with ``Last-Event-ID``. Unlike a browser it
    also retries after an HTTP error status (a browser gives up; a page would retry itself),
    recording each status."""

    base: str
    path: str
    token: str
    retry: float = 0.3
    messages: list[Received] = field(default_factory=list)
    statuses: list[tuple[float, int, dict[str, Any] | None, str | None]] = field(
        default_factory=list
    )
    connects: int = 0
    closed_at: list[float] = field(default_factory=list)  # when a stream ended (server closed)
    last_id: str | None = None
    open: asyncio.Event = field(default_factory=asyncio.Event)
    stop_after_end: bool = True

    async def run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        timeout = httpx.Timeout(60.0, read=None)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as c:
            while True:
                headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
                if self.last_id is not None:
                    headers["Last-Event-ID"] = self.last_id
                try:
                    # ``base`` is read at each connection: a test may point it elsewhere.
                    async with c.stream("GET", self.base + self.path, headers=headers) as r:
                        if r.status_code != 200:
                            body = await r.aread()
                            body_json = None
                            with contextlib.suppress(ValueError):
                                body_json = json.loads(body)
                            self.statuses.append(
                                (time.monotonic(), r.status_code, body_json,
                                 r.headers.get("retry-after"))
                            )
                        else:
                            self.statuses.append((time.monotonic(), 200, None, None))
                            self.connects += 1
                            self.open.set()
                            if await self._read(r):
                                return
                            self.closed_at.append(time.monotonic())
                            self.open.clear()
                except httpx.HTTPError:
                    self.open.clear()
                    self.closed_at.append(time.monotonic())
                await asyncio.sleep(self.retry)

    async def _read(self, response: httpx.Response) -> bool:
        """Read until the stream closes; True on ``end`` (EventSource user code closes)."""
        event, data, id_ = "message", "", None
        async for line in response.aiter_lines():
            if line == "":
                if data or id_ is not None:
                    if id_ is not None:
                        self.last_id = id_
                    self.messages.append(Received(id_, event, data, time.monotonic()))
                    if event == "end" and self.stop_after_end:
                        return True
                event, data, id_ = "message", "", None
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data = value
            elif name == "id":
                id_ = value
        return False

    def ids(self) -> list[str]:
        return [m.id for m in self.messages if m.id is not None]


# ---------------------------------------------------------------- driving deploys


def persisted() -> PersistedState:
    return PersistedState(
        workspace="default", store="postgres", location="pg://states/default/1", serial=1,
        lineage="lin", sha256="0" * 64, size=10, state_version=1,
    )


async def retrying(what: str, op: Any, limit: float = 120) -> Any:
    """Run ``op()`` until it succeeds (the database may be away)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            return await op()
        except Exception as exc:
            assert time.monotonic() < deadline, f"{what}: still failing: {exc!r}"
            await asyncio.sleep(0.2)


async def advance(services: Services, deploy_id: str, command: Any) -> str:
    """Execute ``command`` as a worker, through an outage: retried until it is recorded, and
    not repeated if it was recorded but its answer lost. Returns the status after it."""
    from service import store

    async def version() -> int:
        async with services.pool.connection() as conn:
            return len(await store.read_stream(conn, deploy_id))

    async def status() -> str:
        async with services.pool.connection() as conn:
            view = await store.get_deploy(conn, deploy_id)
            return str(view.status)

    before = await retrying("version", version)
    while True:
        try:
            _, view = await services.deploys.execute(deploy_id, command, WORKER)
            return str(view.status)
        except Exception:
            await asyncio.sleep(0.2)
            if await retrying("version", version) > before:
                return await retrying("status", status)


async def _canonical(services: Services, deploy_id: str) -> list[str]:
    from service import store
    from service.logs import read_logs

    async with services.pool.connection() as conn:
        events = await store.read_stream(conn, deploy_id)
        lines = await read_logs(conn, deploy_id)
    keyed = [((e.version, 0, 0), str(e.version)) for e in events]
    keyed += [((ln.after_version, 1, ln.seq), f"{ln.after_version}.{ln.seq}") for ln in lines]
    return [k for _, k in sorted(keyed)]


async def _positions(services: Services) -> list[str]:
    async with services.pool.connection() as conn:
        cur = await conn.execute("SELECT position FROM events ORDER BY position")
        return [str(r[0]) for r in await cur.fetchall()]


# ---------------------------------------------------------------- scenario 2


async def test_postgres_restart_api_answers_503_then_recovers_and_streams_resume(
    cluster: Any, writer_services: Services, tmp_path: Path
) -> None:
    """Scenario 2, the API's part: PostgreSQL is stopped (deploys running, streams open) and
    started again. Meanwhile the API process answers 503 JSON with Retry-After; afterwards it
    answers 2xx again by itself; the SSE clients (open streams and reconnecting ones) end with
    every message exactly once, in order. Then a `pg_ctl restart -m fast` too."""
    services = writer_services
    async with services.pool.connection() as conn:
        root = await create_token(conn, "root", admin=True)
        ann = await create_token(conn, "ann")
    api = ApiProcess(cluster.url, tmp_path)
    try:
        await api.ready()
        async with httpx.AsyncClient(base_url=api.base, timeout=60) as client:
            created = []
            for _ in range(2):
                r = await client.post(
                    "/deploys", json={"files": {"main.tf": MAIN_TF}, "max_attempts": 10},
                    headers={"Authorization": f"Bearer {ann}"},
                )
                assert r.status_code == 202, r.text
                created.append(r.json()["id"])
        deploy_id, other_id = created

        # Streams: the deploy's (its owner), and the admin's global one.
        # A third one loses its connection during the outage and reconnects (Last-Event-ID).
        follow = EventSource(api.base, f"/deploys/{deploy_id}/stream", ann)
        everything = EventSource(api.base, "/events/stream", root, stop_after_end=False)
        rejoin = EventSource(api.base, f"/deploys/{deploy_id}/stream", ann)
        readers = [asyncio.create_task(s.run()) for s in (follow, everything, rejoin)]
        await asyncio.wait_for(
            asyncio.gather(follow.open.wait(), everything.open.wait(), rejoin.open.wait()), 30
        )

        # "Deploys run": a worker-like writer appends log lines and events throughout.
        writing = True
        written = 0
        committed: list[float] = []  # when each log line's commit returned

        async def writer() -> None:
            nonlocal written
            attempt = 1
            await advance(services, deploy_id, StartAttempt(worker="w"))
            await advance(services, other_id, StartAttempt(worker="w"))
            while writing:
                async def line(n: int = written, a: int = attempt) -> None:
                    async with services.pool.connection() as conn:
                        await append_lines(conn, deploy_id, a, "stdout", [f"line {n}"])

                # A line whose commit answer was lost may be written twice: a second, distinct
                # line (its own seq), never a duplicate message.
                await retrying("log", line)
                committed.append(time.monotonic())
                written += 1
                if written % 40 == 0 and attempt < 9:
                    await advance(services, deploy_id, AttemptFailed(reason="apply_failed",
                                                                     message="boom"))
                    attempt += 1
                    await advance(services, deploy_id, StartAttempt(worker="w"))
                await asyncio.sleep(0.05)

        # Probing: one GET after another, answered (status, body, Retry-After) or failed.
        probes: list[tuple[float, float, int, Any, str | None]] = []
        probing = True

        async def prober() -> None:
            async with httpx.AsyncClient(base_url=api.base, timeout=60) as c:
                while probing:
                    sent = time.monotonic()
                    try:
                        r = await c.get(f"/deploys/{deploy_id}",
                                        headers={"Authorization": f"Bearer {ann}"})
                        body = r.json()
                        probes.append((sent, time.monotonic(), r.status_code, body,
                                       r.headers.get("retry-after")))
                    except (httpx.HTTPError, ValueError) as exc:
                        probes.append((sent, time.monotonic(), 0, repr(exc), None))
                    await asyncio.sleep(0.1)

        writer_task = asyncio.create_task(writer())
        prober_task = asyncio.create_task(prober())
        await asyncio.sleep(2)
        assert follow.messages and everything.messages
        before = len(follow.messages)

        outage = 8.0
        await asyncio.to_thread(cluster.stop, "fast")
        down_at = time.monotonic()
        await asyncio.sleep(1)
        readers[2].cancel()  # the connection drops (a proxy, a laptop lid) ...
        with contextlib.suppress(asyncio.CancelledError):
            await readers[2]
        readers[2] = asyncio.create_task(rejoin.run())  # ... and EventSource reconnects
        await asyncio.sleep(outage - 1)
        # PostgreSQL accepts connections before start() returns (it then checks its database):
        # the outage, for the "only 503s" check below, ends when the start begins.
        starting_at = time.monotonic()
        await asyncio.to_thread(cluster.start)
        back_at = time.monotonic()

        def first_after(t: float, ok: Any) -> float | None:
            done = [p[1] for p in probes if p[1] >= t and ok(p)]
            return min(done) - t if done else None

        def resumed() -> bool:  # a 2xx, and a line written after the outage was delivered
            after = [t for t in committed if t > back_at]
            return first_after(back_at, lambda p: 200 <= p[2] < 300) is not None and any(
                m.at > after[0] for m in follow.messages
            ) if after else False

        deadline = time.monotonic() + 120
        while not resumed():
            assert time.monotonic() < deadline, (probes[-5:], api.log()[-3000:])
            await asyncio.sleep(0.05)
        to_2xx = first_after(back_at, lambda p: 200 <= p[2] < 300)
        first_write = min(t for t in committed if t > back_at)
        to_sse = min(m.at for m in follow.messages if m.at > back_at) - back_at
        write_to_sse = min(m.at for m in follow.messages if m.at > first_write) - first_write

        # During the outage: 503 JSON with Retry-After, answered at once (issue 12, part 9:
        # within a second once the service knows PostgreSQL is away, not after the pool's wait).
        during = [p for p in probes if down_at + 1 < p[1] < starting_at]
        answers = [p for p in during if p[2] == 503]
        assert answers, f"no 503 while PostgreSQL was down: {[(round(p[0] - down_at, 1), round(p[1] - down_at, 1), p[2]) for p in probes if p[1] > down_at][:8]}"
        assert all(p[2] == 503 for p in during), {p[2] for p in during}
        for p in answers:
            assert p[3]["status_code"] == 503 and p[3]["detail"], p
            assert p[4] is not None and int(p[4]) > 0
        times = sorted(p[1] - p[0] for p in answers)
        slowest, typical = times[-1], times[len(times) // 2]
        first = [p for p in probes if p[1] > down_at]
        first_503 = min(p[1] for p in first if p[2] == 503) - down_at
        assert slowest < 1.0, f"a 503 took {slowest:.2f} s"

        # A second outage: `pg_ctl restart`, immediate.
        await asyncio.sleep(1.5)
        await asyncio.to_thread(_pg_ctl_restart, cluster)
        restarted_at = time.monotonic()
        deadline = time.monotonic() + 120
        while not any(m.at > restarted_at + 0.5 for m in follow.messages):
            assert time.monotonic() < deadline, api.log()[-3000:]
            await asyncio.sleep(0.05)
        to_sse_2 = min(m.at for m in follow.messages if m.at > restarted_at) - restarted_at

        # The end: stop writing, finish the deploy; the stream ends with `end`.
        await asyncio.sleep(1)
        writing = False
        await writer_task
        await advance(services, deploy_id, AttemptSucceeded(state=persisted()))
        await advance(services, other_id, AttemptFailed(reason="apply_failed", message="last"))
        await asyncio.wait_for(asyncio.gather(readers[0], readers[2]), 60)
        positions = await _positions(services)
        deadline = time.monotonic() + 60
        while everything.ids()[-1:] != positions[-1:]:
            assert time.monotonic() < deadline, (everything.ids()[-3:], positions[-3:])
            await asyncio.sleep(0.05)
        probing = False
        await prober_task
        readers[1].cancel()

        expected = await _canonical(services, deploy_id)
        got = follow.ids()
        assert len(got) == len(set(got)), "a message arrived twice"
        assert got == expected
        assert follow.messages[-1].event == "end"
        assert everything.ids() == positions
        # The reconnecting one: 503 JSON with Retry-After while the database was away, then
        # its stream again from where it was.
        refused = [st for st in rejoin.statuses if st[1] != 200]
        assert refused and all(st[1] == 503 for st in refused), refused
        assert all(st[2] and st[2]["status_code"] == 503 and st[3] for st in refused)
        assert rejoin.connects >= 2 and rejoin.ids() == expected
        # (It may be back before start() returned: PostgreSQL answers before that.)
        rejoined = min(st[0] for st in rejoin.statuses if st[1] == 200 and st[0] > starting_at)
        assert len(follow.messages) > before
        assert api.proc.poll() is None, api.log()[-3000:]
        print(
            f"\nscenario 2 (API process, PostgreSQL stopped {outage:.0f} s): first 503 "
            f"{first_503:.2f} s after the stop; {len(answers)} answers 503 + Retry-After during "
            f"the outage (median {typical * 1000:.0f} ms, slowest {slowest * 1000:.0f} ms); "
            f"PostgreSQL back -> first 2xx {to_2xx:.2f} s, -> SSE delivery "
            f"resumed {to_sse:.2f} s (first write after it {first_write - back_at:.2f} s, "
            f"commit -> SSE {write_to_sse:.2f} s); "
            f"pg_ctl restart -> SSE delivery resumed {to_sse_2:.2f} s; stream reconnects: "
            f"deploy {follow.connects - 1}, global {everything.connects - 1}; a client that "
            f"lost its connection got {len(refused)} x 503 and was back "
            f"{rejoined - starting_at:.2f} s after PostgreSQL's start began; "
            f"{len(got)} deploy messages and {len(positions)} events, each once, in order"
        )
    finally:
        api.kill()


def _pg_ctl_restart(pg: Any) -> None:
    """`pg_ctl restart` with a log file: without -l the server keeps pg_ctl's stdout open, so
    a captured run never returns."""
    log = pg.directory / "postgres.log"
    subprocess.run(
        pg._cmd("pg_ctl", "restart", "-w", "-t", "120", "-m", "fast", "-D", str(pg.pgdata),
                "-l", str(log)),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd="/", check=True, timeout=180,
    )


# ---------------------------------------------------------------- scenario 5


async def test_sigterm_closes_open_streams_at_once_and_exits_0(
    cluster: Any, writer_services: Services, tmp_path: Path
) -> None:
    """Scenario 5, the API's part: SIGTERM to an API process with open SSE streams (deploy
    streams and the admin's global stream) closes them promptly, so their clients reconnect
    (here, to a second API process, with Last-Event-ID) and go on with no gap and no
    duplicate; the process exits 0."""
    services = writer_services
    async with services.pool.connection() as conn:
        root = await create_token(conn, "root", admin=True)
        ann = await create_token(conn, "ann")
    first, second = ApiProcess(cluster.url, tmp_path), ApiProcess(cluster.url, tmp_path)
    try:
        await asyncio.gather(first.ready(), second.ready())
        async with httpx.AsyncClient(base_url=first.base, timeout=60) as client:
            r = await client.post("/deploys", json={"files": {"main.tf": MAIN_TF}},
                                  headers={"Authorization": f"Bearer {ann}"})
            assert r.status_code == 202, r.text
            deploy_id = r.json()["id"]
        await advance(services, deploy_id, StartAttempt(worker="w"))

        streams = [EventSource(first.base, f"/deploys/{deploy_id}/stream", ann) for _ in range(8)]
        streams.append(EventSource(first.base, "/events/stream", root, stop_after_end=False))
        readers = [asyncio.create_task(s.run()) for s in streams]
        await asyncio.wait_for(asyncio.gather(*(s.open.wait() for s in streams)), 30)

        async def write(n: int) -> None:
            async with services.pool.connection() as conn:
                await append_lines(conn, deploy_id, 1, "stdout", [f"line {n}"])

        for n in range(5):
            await write(n)
        expected_now = await _canonical(services, deploy_id)
        deadline = time.monotonic() + 30
        while any(s.ids()[-1:] != expected_now[-1:] for s in streams[:-1]):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

        for s in streams:  # where the clients go once the first process closes their stream
            s.base = second.base
        sent = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(not s.closed_at for s in streams):
            assert time.monotonic() < deadline, first.log()[-3000:]
            await asyncio.sleep(0.005)
        closed = [s.closed_at[0] - sent for s in streams]
        code = await asyncio.to_thread(first.proc.wait, 30)
        exited = time.monotonic() - sent
        assert code == 0, first.log()[-3000:]
        assert "Traceback" not in first.log(), first.log()[-3000:]

        # The clients are on the second process now: more lines, then the end.
        for n in range(5, 10):
            await write(n)
        await advance(services, deploy_id, AttemptSucceeded(state=persisted()))
        await asyncio.wait_for(asyncio.gather(*readers[:-1]), 60)
        expected = await _canonical(services, deploy_id)
        positions = await _positions(services)
        deadline = time.monotonic() + 30
        while streams[-1].ids()[-1:] != positions[-1:]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        readers[-1].cancel()
        for s in streams[:-1]:
            assert s.ids() == expected and s.messages[-1].event == "end"
            assert s.connects == 2
        assert streams[-1].ids() == positions and streams[-1].connects == 2
        print(
            f"\nscenario 5 (SIGTERM to an API process with {len(streams)} open streams): "
            f"streams closed after {min(closed):.2f}-{max(closed):.2f} s, process exited 0 "
            f"after {exited:.2f} s; every client resumed on the other process, no gap, no "
            "duplicate"
        )
    finally:
        first.kill()
        second.kill()


async def test_a_request_waiting_through_an_outage_is_served_when_postgres_is_back(
    cluster: Any,
) -> None:
    """psycopg_pool gives up reconnecting after its reconnect window and tries again only for a
    new request: a request that was already waiting (a worker recording an outcome) then sat
    out its whole timeout after PostgreSQL was back (16 s in scenario 2). service/db.py starts
    the next window itself, so the waiting request gets its connection once PostgreSQL
    answers, long before its 40 s timeout."""
    from service.db import open_pool

    pool = await open_pool(cluster.url, wait=40.0, name="waiting-test")
    try:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        await asyncio.to_thread(cluster.stop, "fast")

        async def wait_for_a_connection() -> float:  # finds the pooled one dead, then waits
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
            return time.monotonic()

        waiting = asyncio.create_task(wait_for_a_connection())
        await asyncio.sleep(8)  # past the reconnect window (service/db.py), many times
        assert not waiting.done()
        starting_at = time.monotonic()
        await asyncio.to_thread(cluster.start)
        served_at = await waiting  # a PoolTimeout here is the bug
        print(
            f"\na request waiting through the outage was served {served_at - starting_at:.2f} s "
            "after PostgreSQL's start began"
        )
    finally:
        await pool.close()
