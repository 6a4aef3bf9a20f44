"""Per-user limits of the API (issue 12, parts 4, 6 and 9; service/api/limits.py, service/db.py,
service/logs.py): requests per user, open event streams per user (across processes, and a
process that dies), bounded validation of big bodies, uvicorn's limit_concurrency, fail-fast
while PostgreSQL is away, and logs served in bounded pages.

Measured figures are printed (run with -s); assertions on time are generous.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn

from service.api.app import create_app
from service.api.limits import (
    FD_RESERVE,
    MAX_CONNECTIONS,
    StreamSlots,
    ValidationGate,
    connection_limit,
    stream_slots,
)
from service.api.streams import StreamOptions
from service.auth import authenticate, create_token, disable_user, hash_token, revoke_token
from service.db import FAIL_FAST, DatabaseAway, open_pool
from service.logs import append_lines
from service.queries import q
from service.services import Services, open_services
from service.settings import from_env

ROOT = Path(__file__).resolve().parent.parent
MAIN_TF = 'resource "terraform_data" "x" {}\n'


# ---------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def limited(database_url: str, tmp_path: Path, **settings: Any) -> AsyncIterator[Services]:
    """Services with the given settings (the limits' defaults unless said otherwise)."""
    values: dict[str, Any] = {"data_dir": str(tmp_path / "data")}
    values.update(settings)
    services = await open_services(from_env({}, **values), database_url, pool_size=10)
    try:
        yield services
    finally:
        await services.close()


@contextlib.asynccontextmanager
async def asgi(services: Services, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(services, **kw)
    transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://tfdeploy.test") as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def tokens_for(services: Services, *names: str, admin: str | None = None) -> dict[str, str]:
    async with services.pool.connection() as conn:
        out = {n: await create_token(conn, n) for n in names}
        if admin:
            out[admin] = await create_token(conn, admin, admin=True)
    return out


async def away_from_the_window_edge(services: Services, window: int) -> None:
    """Windows are fixed: start a burst that must fit in one window well inside it."""
    async with services.pool.connection() as conn:
        cur = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
        row = await cur.fetchone()
    assert row is not None
    into = row[0] % window
    if into > window - 15:
        await asyncio.sleep(window - into + 0.5)


def vmhwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def vmrss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """`python -m service.cli serve [--workers N]` on a free port, its output in a file."""

    def __init__(self, database_url: str, tmp_path: Path, workers: int = 1, **env: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"api-{self.port}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TFDEPLOY_")}
        environ.update(
            TFDEPLOY_DATABASE_URL=database_url,
            TFDEPLOY_DATA_DIR=str(tmp_path / "data"),
            TFDEPLOY_RUNNER="local",
            PYTHONUNBUFFERED="1",
            **env,
        )
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port)]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT,
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

    def stop(self) -> None:
        """SIGTERM (with --workers, the parent passes it on to its processes, each in a process
        group of its own), then SIGKILL whatever is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            children = self.children()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                for pid in [self.proc.pid, *children]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait(30)

    def children(self) -> list[int]:
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(stat.parent.name))
        return out


@contextlib.asynccontextmanager
async def _client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
        yield c


class _NoSignals(uvicorn.Server):
    def capture_signals(self):  # type: ignore[no-untyped-def]
        return contextlib.nullcontext()


@contextlib.asynccontextmanager
async def _uvicorn(services: Services, options: StreamOptions) -> AsyncIterator[str]:
    config = uvicorn.Config(create_app(services, stream_options=options), host="127.0.0.1",
                            port=0, lifespan="on", log_level="warning",
                            timeout_graceful_shutdown=1)
    server = _NoSignals(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


# ---------------------------------------------------------------- requests per user


async def test_requests_past_the_limit_are_429_with_retry_after(database_url, tmp_path) -> None:
    async with limited(database_url, tmp_path, rate_limit="20/h") as services:
        tokens = await tokens_for(services, "ann", "bob")
        await away_from_the_window_edge(services, 3600)
        async with asgi(services) as c:
            remaining = []
            for _ in range(20):
                r = await c.get("/deploys", headers=bearer(tokens["ann"]))
                assert r.status_code == 200, r.text
                remaining.append(int(r.headers["ratelimit-remaining"]))
                assert r.headers["ratelimit-limit"] == "20"
                assert r.headers["ratelimit-policy"] == "20; w=3600"
            assert remaining == list(range(19, -1, -1))
            # Past the limit: the contract's JSON error, with when to come back.
            for path in ("/deploys", "/workspaces", "/deploys/nope"):
                r = await c.get(path, headers=bearer(tokens["ann"]))
                assert r.status_code == 429, r.text
                body = r.json()
                assert body["status_code"] == 429 and "20 requests per hour" in body["detail"]
                retry = int(r.headers["retry-after"])
                assert 0 < retry <= 3600 and r.headers["ratelimit-remaining"] == "0"
            # Writes are refused before anything happens.
            r = await c.post("/deploys", json={"files": {"main.tf": MAIN_TF}},
                             headers=bearer(tokens["ann"]))
            assert r.status_code == 429
            async with services.pool.connection() as conn:
                cur = await conn.execute("SELECT count(*) FROM deploys")
                assert await cur.fetchone() == (0,)
            # Another user is not affected.
            r = await c.get("/deploys", headers=bearer(tokens["bob"]))
            assert r.status_code == 200 and r.headers["ratelimit-remaining"] == "19"


async def test_the_limit_is_per_user_whatever_the_token_and_unknown_tokens_count_per_address(
    database_url, tmp_path
) -> None:
    async with limited(database_url, tmp_path, rate_limit="6/h") as services:
        tokens = await tokens_for(services, "ann")
        async with services.pool.connection() as conn:
            second = await create_token(conn, "ann")
        await away_from_the_window_edge(services, 3600)
        async with asgi(services) as c:
            for token in (tokens["ann"], second, tokens["ann"], second, tokens["ann"], second):
                assert (await c.get("/deploys", headers=bearer(token))).status_code == 200
            for token in (tokens["ann"], second):
                assert (await c.get("/deploys", headers=bearer(token))).status_code == 429
            # Tokens that name nobody: 401, counted against the client's address (this
            # client's, 192.0.2.7), then 429.
            for i in range(6):
                r = await c.get("/deploys", headers=bearer(f"tfd_guess{i}"))
                assert r.status_code == 401, r.text
            r = await c.get("/deploys", headers=bearer("tfd_guess-again"))
            assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        async with services.pool.connection() as conn:
            cur = await conn.execute("SELECT key, hits FROM request_counts ORDER BY key")
            counted = dict(await cur.fetchall())
        assert counted["address:192.0.2.7"] == 7
        assert [k for k in counted if k.startswith("user:")] and max(counted.values()) == 8


async def test_requests_without_a_token_are_not_counted(database_url, tmp_path) -> None:
    async with limited(database_url, tmp_path, rate_limit="2/h") as services:
        tokens = await tokens_for(services, "ann")
        await away_from_the_window_edge(services, 3600)
        async with asgi(services) as c:
            for _ in range(5):
                assert (await c.get("/health")).status_code == 200
                assert (await c.get("/")).status_code == 200
                assert (await c.get("/static/app.js")).status_code == 200
                assert (await c.get("/schema/openapi.json")).status_code == 200
                assert (await c.get("/deploys")).status_code == 401  # no token: no database
                assert (await c.get("/deploys", headers={"Authorization": "Basic x"})).status_code == 401
            # The token-bearing requests still have their whole budget.
            assert (await c.get("/deploys", headers=bearer(tokens["ann"]))).status_code == 200
            assert (await c.get("/deploys", headers=bearer(tokens["ann"]))).status_code == 200
            assert (await c.get("/deploys", headers=bearer(tokens["ann"]))).status_code == 429
        async with services.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM request_counts")
            assert await cur.fetchone() == (1,)


async def test_concurrent_requests_of_one_user_are_counted_exactly(database_url, tmp_path) -> None:
    async with limited(database_url, tmp_path, rate_limit="40/h") as services:
        tokens = await tokens_for(services, "ann")
        await away_from_the_window_edge(services, 3600)
        async with asgi(services) as c:
            answers = await asyncio.gather(
                *(c.get("/deploys", headers=bearer(tokens["ann"])) for _ in range(100))
            )
        codes = sorted(r.status_code for r in answers)
        assert codes.count(200) == 40 and codes.count(429) == 60


async def test_the_limit_holds_across_the_processes_of_serve_workers(
    database_url, tmp_path
) -> None:
    """`tfdeploy serve --workers 3`: three processes on one socket count together, so the user
    gets the limit once, not three times."""
    async with limited(database_url, tmp_path) as services:
        tokens = await tokens_for(services, "ann")
        await away_from_the_window_edge(services, 3600)
    api = ServeProcess(database_url, tmp_path, workers=3, TFDEPLOY_RATE_LIMIT="30/h")
    try:
        await api.ready()
        # A fresh connection per request: the kernel hands them to the three processes.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=api.base, limits=limits, timeout=30) as c:
            answers = await asyncio.gather(
                *(c.get("/deploys", headers=bearer(tokens["ann"])) for _ in range(90))
            )
        codes = [r.status_code for r in answers]
        assert codes.count(200) == 30 and codes.count(429) == 60, codes
    finally:
        api.stop()


async def test_the_counting_statement_finds_the_principal_exactly_as_find_token(
    services: Services,
) -> None:
    """authenticate_and_count repeats find_token's rules (service/sql/limits.sql): same answer
    for live, admin, revoked, expired and disabled users' tokens, and unknown ones."""
    async with services.pool.connection() as conn:
        live = await create_token(conn, "ann")
        admin = await create_token(conn, "root", admin=True)
        revoked = await create_token(conn, "ann")
        expired = await create_token(conn, "ann")
        disabled = await create_token(conn, "dan")
        cur = await conn.execute(
            "SELECT id FROM api_tokens ORDER BY id DESC LIMIT 1 OFFSET 2"
        )
        row = await cur.fetchone()
        assert row is not None
        await revoke_token(conn, row[0])
        await conn.execute(
            "UPDATE api_tokens SET expires_at = now() - interval '1 minute' WHERE token_hash = %s",
            (hash_token(expired),),
        )
        await disable_user(conn, "dan")
        await conn.commit()
        for token in (live, admin, revoked, expired, disabled, "tfd_unknown"):
            expected = await authenticate(conn, token)
            cur = await conn.execute(
                q("authenticate_and_count"),
                {"token_hash": hash_token(token), "address": "198.51.100.1", "window": 60},
            )
            got = await cur.fetchone()
            assert got is not None
            token_id, user_id, name, is_admin, hits, reset = got
            if expected is None:
                assert token_id is None, token
            else:
                assert (name, is_admin, token_id, user_id) == (
                    expected.name, expected.admin, expected.token_id, expected.user_id
                )
            assert hits >= 1 and 0 < reset <= 60


# ---------------------------------------------------------------- open event streams per user


async def _open_stream(c: httpx.AsyncClient, path: str, token: str) -> tuple[Any, Any]:
    """An open stream: (its response context, the response), status checked by the caller."""
    cm = c.stream("GET", path, params={"access_token": token})
    response = await cm.__aenter__()
    return cm, response


async def _deploy(c: httpx.AsyncClient, token: str) -> str:
    r = await c.post("/deploys", json={"files": {"main.tf": MAIN_TF}}, headers=bearer(token))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def _wait_for(cond: Any, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not await cond():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def _count(services: Services, user: str, lease: float = 20.0) -> int:
    async with services.pool.connection() as conn:
        cur = await conn.execute(q("count_open_streams"), {"user": user, "lease": lease})
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def test_open_streams_past_the_limit_are_429_and_a_closed_one_frees_its_slot(
    database_url, tmp_path
) -> None:
    async with limited(database_url, tmp_path, max_streams_per_user=3) as services:
        tokens = await tokens_for(services, "ann", "bob", admin="root")
        async with _uvicorn(services, StreamOptions()) as url, _client(url) as c:
            deploy = await _deploy(c, tokens["ann"])
            held = []
            for _ in range(3):
                cm, r = await _open_stream(c, f"/deploys/{deploy}/stream", tokens["ann"])
                assert r.status_code == 200
                held.append(cm)
            r = await c.get(f"/deploys/{deploy}/stream", params={"access_token": tokens["ann"]})
            assert r.status_code == 429, r.text
            assert "at most 3" in r.json()["detail"] and int(r.headers["retry-after"]) > 0
            # bob's own streams are his; the admin's global stream counts for the admin.
            bob_deploy = await _deploy(c, tokens["bob"])
            cm, r = await _open_stream(c, f"/deploys/{bob_deploy}/stream", tokens["bob"])
            assert r.status_code == 200
            held.append(cm)
            for _ in range(3):
                cm, r = await _open_stream(c, "/events/stream", tokens["root"])
                assert r.status_code == 200
                held.append(cm)
            r = await c.get("/events/stream", params={"access_token": tokens["root"]})
            assert r.status_code == 429
            assert await _count(services, "ann") == 3
            # One of ann's ends: its slot is free again.
            await held.pop(0).__aexit__(None, None, None)
            await _wait_for(lambda: _is(services, "ann", 2))
            cm, r = await _open_stream(c, f"/deploys/{deploy}/stream", tokens["ann"])
            assert r.status_code == 200
            held.append(cm)
            for cm in held:
                await cm.__aexit__(None, None, None)
            await _wait_for(lambda: _is(services, "ann", 0))
            await _wait_for(lambda: _is(services, "root", 0))


async def _is(services: Services, user: str, n: int) -> bool:
    return await _count(services, user) == n


async def test_open_streams_are_counted_across_processes_and_a_dead_one_stops_counting(
    database_url, tmp_path
) -> None:
    """Two API processes (two apps with their own pools, hubs and stream slots, one database):
    the user's streams on both count together. Then one process dies without a word (its
    refresh stops, nothing is released): its streams stop counting once its lease is over."""
    options = StreamOptions(slot_refresh=0.2, slot_lease=1.5)
    async with (
        limited(database_url, tmp_path, max_streams_per_user=3) as one,
        limited(database_url, tmp_path, max_streams_per_user=3) as two,
    ):
        tokens = await tokens_for(one, "ann")
        async with (
            _uvicorn(one, options) as url1,
            _uvicorn(two, options) as url2,
            _client(url1) as c1,
            _client(url2) as c2,
        ):
            deploy = await _deploy(c1, tokens["ann"])
            path = f"/deploys/{deploy}/stream"
            held = []
            for c in (c1, c1, c2):
                cm, r = await _open_stream(c, path, tokens["ann"])
                assert r.status_code == 200
                held.append(cm)
            for c in (c1, c2):
                r = await c.get(path, params={"access_token": tokens["ann"]})
                assert r.status_code == 429
            # Process one dies: its slots are neither refreshed nor released.
            dead = one.extras["stream_slots"]
            assert isinstance(dead, StreamSlots) and len(dead.held) == 2
            dead.closed = True  # its refresher stops; nothing is written for it any more
            assert dead._refresher is not None
            dead._refresher.cancel()
            died = time.monotonic()
            r = await c2.get(path, params={"access_token": tokens["ann"]})
            assert r.status_code == 429  # still within the lease
            while True:
                cm, r = await _open_stream(c2, path, tokens["ann"])
                if r.status_code == 200:
                    held.append(cm)
                    break
                await cm.__aexit__(None, None, None)
                assert time.monotonic() - died < 10
                await asyncio.sleep(0.1)
            freed = time.monotonic() - died
            assert freed >= options.slot_lease - 0.5
            # The live process keeps its streams counted past the lease (its refresh).
            await asyncio.sleep(options.slot_lease + 0.5)
            assert await _count(two, "ann", lease=options.slot_lease) == 2
            for cm in held:
                with contextlib.suppress(Exception):
                    await cm.__aexit__(None, None, None)
        print(f"\na dead process's streams stopped counting {freed:.2f} s after it died "
              f"(lease {options.slot_lease} s)")


async def test_a_release_that_was_not_written_is_set_right_by_the_next_refresh(
    services: Services,
) -> None:
    slots = StreamSlots(services, lease=20.0, refresh=0.1)
    stream = await slots.acquire("ann")
    other = await slots.acquire("ann")
    assert await _count(services, "ann") == 2
    # The release's DELETE is lost (the database was away): only memory knows.
    slots.held.pop(stream)
    await _wait_for(lambda: _is(services, "ann", 1), 5)
    # Rows lost (an UNLOGGED table after a crash) come back with the refresh too.
    async with services.pool.connection() as conn:
        await conn.execute("DELETE FROM open_streams")
    await _wait_for(lambda: _is(services, "ann", 1), 5)
    slots.release(other)
    await _wait_for(lambda: _is(services, "ann", 0), 5)
    await slots.close()
    async with services.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM api_processes")
        assert await cur.fetchone() == (0,)


async def test_stream_slots_of_the_services_are_made_once(services: Services) -> None:
    first = stream_slots(services)
    assert stream_slots(services) is first
    await first.close()
    assert stream_slots(services) is not first  # a closed one is replaced


# ---------------------------------------------------------------- validation of big bodies


def _big_body(i: int, size: int = 1024 * 1024 - 4096) -> bytes:
    """A ``POST /deploys`` body of about ``size`` bytes of plain HCL."""
    block = (
        'resource "terraform_data" "r{n}" {{\n'
        '  input = {{ name = "web-{n}", tags = ["a", "b", "c"], size = {n} }}\n'
        "}}\n"
    )
    parts, total, n = [], 0, 0
    while total < size:
        parts.append(block.format(n=n))
        total += len(parts[-1])
        n += 1
    return json.dumps({"workspace": f"big{i}", "files": {"main.tf": "".join(parts)}}).encode()


# The API for the pace test, in a process of its own (its event loop and GIL are not the
# client's): keep-alive comments every 0.2 s, and the validation gate with ``threads`` threads.
PACE_SERVER = """
import asyncio, sys
import uvicorn
from service.api.app import create_app
from service.api.limits import ValidationGate
from service.api.streams import StreamOptions
from service.services import open_services
from service.settings import from_env

async def main(url, data_dir, port, threads):
    settings = from_env({}, data_dir=data_dir, rate_limit="1000000/s", log_level="warning")
    services = await open_services(settings, url)
    services.extras["validation_gate"] = ValidationGate(threads)
    app = create_app(services, stream_options=StreamOptions(ping=0.2))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    try:
        await uvicorn.Server(config).serve()
    finally:
        await services.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def _pace_under_big_bodies(
    database_url: str, tmp_path: Path, tokens: dict[str, str], users: list[str], threads: int
) -> dict[str, list[float]]:
    """Keep-alive gaps of one stream and small GET latencies, idle and while every user in
    ``users`` sends two 1 MiB bodies at once, to an API process whose gate has ``threads``
    threads."""
    bodies = [await asyncio.to_thread(_big_body, i) for i in range(2 * len(users))]
    port = _free_port()
    log_path = tmp_path / f"pace-{threads}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", PACE_SERVER, database_url, str(tmp_path / "data"), str(port),
             str(threads)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    out: dict[str, list[float]] = {"idle_get": [], "busy_get": [], "idle_gap": [], "busy_gap": []}
    try:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get("/health")).status_code == 200:
                        break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            deploy = await _deploy(c, tokens["ann"])
            # A pool grown to its size first (connections are made one at a time: a cold pool
            # would make the first burst wait for that, not for validation).
            for _ in range(3):
                await asyncio.gather(*(c.get(f"/deploys/{deploy}", headers=bearer(tokens[u]))
                                       for u in users * 3))
            phase = "idle"
            stop = asyncio.Event()

            async def follow() -> None:
                async with c.stream("GET", f"/deploys/{deploy}/stream",
                                    params={"access_token": tokens["ann"]}) as r:
                    last = time.monotonic()
                    async for _ in r.aiter_raw():
                        now = time.monotonic()
                        out[f"{phase}_gap"].append(now - last)
                        last = now
                        if stop.is_set():
                            return

            async def poll() -> None:
                while not stop.is_set():
                    sent = time.monotonic()
                    r = await c.get(f"/deploys/{deploy}", headers=bearer(tokens["ann"]))
                    assert r.status_code == 200
                    out[f"{phase}_get"].append(time.monotonic() - sent)
                    await asyncio.sleep(0.05)

            follower = asyncio.create_task(follow())
            poller = asyncio.create_task(poll())
            await asyncio.sleep(2.0)
            phase = "busy"

            async def send(user: str, i: int) -> int:
                r = await c.post("/deploys", content=bodies[i],
                                 headers={**bearer(tokens[user]), "Content-Type": "application/json"})
                return r.status_code

            started = time.monotonic()
            codes = await asyncio.gather(*(send(u, i) for i, u in enumerate(users * 2)))
            took = time.monotonic() - started
            stop.set()
            await poller
            with contextlib.suppress(Exception):
                await asyncio.wait_for(follower, 2)
            assert codes == [202] * len(codes), codes
    finally:
        proc.terminate()
        proc.wait(30)
    out["took"] = [took]
    return out


def _p(values: list[float], q_: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q_ * len(values)))] if values else 0.0


async def test_big_bodies_in_parallel_do_not_starve_keepalives_or_small_requests(
    database_url, tmp_path
) -> None:
    """Eight users each send two 1 MiB bodies at once while a stream's keep-alives (every
    0.2 s) and a small GET every 50 ms go on: with the gate (one validation thread, one body per
    user, the GIL handed back within 0.5 ms), both keep their pace. Printed: the same with eight
    threads (no bound, as before)."""
    users = [f"u{i}" for i in range(8)]
    figures = {}
    async with limited(database_url, tmp_path) as services:
        tokens = await tokens_for(services, "ann", *users)
    for threads in (1, 8):
        figures[threads] = await _pace_under_big_bodies(
            database_url, tmp_path, tokens, users, threads
        )
    for threads, f in figures.items():
        print(
            f"\nvalidation threads {threads}: 16 x 1 MiB bodies in {f['took'][0]:.1f} s; "
            f"small GET p50/p95/max idle {_p(f['idle_get'], .5)*1000:.0f}/"
            f"{_p(f['idle_get'], .95)*1000:.0f}/{max(f['idle_get'])*1000:.0f} ms, busy "
            f"{_p(f['busy_get'], .5)*1000:.0f}/{_p(f['busy_get'], .95)*1000:.0f}/"
            f"{max(f['busy_get'])*1000:.0f} ms; keep-alive gap max idle "
            f"{max(f['idle_gap']):.2f} s, busy {max(f['busy_gap'] or [0]):.2f} s"
        )
    bounded = figures[1]
    assert bounded["busy_gap"], "no keep-alive while the bodies were validated"
    assert max(bounded["busy_gap"]) < 0.2 + 1.0
    assert _p(bounded["busy_get"], 0.95) < max(0.5, 10 * _p(bounded["idle_get"], 0.95))


async def test_the_validation_gate_takes_one_body_per_user_and_bounds_its_threads() -> None:
    gate = ValidationGate(2)
    running: list[str] = []
    peak = {"all": 0, "ann": 0}

    def work(user: str) -> str:
        running.append(user)
        peak["all"] = max(peak["all"], len(running))
        peak["ann"] = max(peak["ann"], running.count("ann"))
        time.sleep(0.05)
        running.remove(user)
        return user

    users = ["ann"] * 6 + ["bob", "cat", "dan"] * 2
    done = await asyncio.gather(*(gate.run(u, work, u) for u in users))
    assert sorted(done) == sorted(users)
    assert peak == {"all": 2, "ann": 1}
    # A waiter whose client went away is dropped; the gate is not left taken.
    waiting = asyncio.create_task(gate.run("ann", work, "ann"))
    blocker = asyncio.create_task(gate.run("ann", work, "ann"))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, blocker, return_exceptions=True)
    assert await gate.run("ann", work, "ann") == "ann"
    assert gate._users == {} and gate._uses == {}
    gate.close()


# ---------------------------------------------------------------- uvicorn's limit_concurrency


def test_uvicorn_limit_concurrency_follows_the_descriptor_limit(tmp_path) -> None:
    from service.cli.serving import _server

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert connection_limit() == 1024 - FD_RESERVE
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
        assert connection_limit() == min(MAX_CONNECTIONS, min(hard, 1 << 20) - FD_RESERVE)
        server = _server(object(), from_env({}, data_dir=str(tmp_path)), "127.0.0.1", 0)
        assert server.config.limit_concurrency == connection_limit()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------- fail fast while PostgreSQL is away


async def test_a_fail_fast_request_is_given_up_the_moment_the_pool_finds_postgres_away(
    database_url,
) -> None:
    """The pool's status turns away when a connection attempt fails: fail-fast requests then
    get DatabaseAway at once, those already waiting for a connection too; other requests (a
    worker's) wait as before. A successful connection attempt turns it back."""
    pool = await open_pool(database_url, max_size=1, wait=30.0, name="fail-fast-test")
    try:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        held = await pool.getconn()  # the pool's only connection: the next request waits

        async def fast() -> float:
            FAIL_FAST.set(True)
            started = time.monotonic()
            with pytest.raises(DatabaseAway):
                async with pool.connection():
                    pass
            return time.monotonic() - started

        async def patient() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")

        waiting = asyncio.create_task(fast())
        worker = asyncio.create_task(patient())
        await asyncio.sleep(0.3)
        assert not waiting.done()
        pool.status.failed(psycopg.OperationalError("connection refused (simulated)"))
        waited = await asyncio.wait_for(waiting, 2)
        assert 0.25 < waited < 1.0
        assert (await asyncio.wait_for(fast(), 1)) < 0.05  # at once while away
        assert not worker.done()  # a worker's request still waits for its connection
        pool.status.connected()
        await pool.putconn(held)
        await asyncio.wait_for(worker, 5)
        FAIL_FAST.set(True)
        async with pool.connection() as conn:  # back: served
            await conn.execute("SELECT 1")
    finally:
        FAIL_FAST.set(False)
        await pool.close()


async def test_a_failed_connection_attempt_is_what_turns_the_pool_away(database_url) -> None:
    port = _free_port()  # nothing listens there
    url = database_url.rsplit("@", 1)[0] + f"@127.0.0.1:{port}/nothing"
    pool = await open_pool(url, wait=30.0, name="nowhere")
    try:
        deadline = time.monotonic() + 5
        while not pool.status.away:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        FAIL_FAST.set(True)
        started = time.monotonic()
        with pytest.raises(DatabaseAway):
            async with pool.connection():
                pass
        assert time.monotonic() - started < 0.05
    finally:
        FAIL_FAST.set(False)
        await pool.close()


async def test_the_api_answers_503_at_once_while_the_pool_knows_postgres_is_away(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    services.pool.status.failed(psycopg.OperationalError("simulated"))  # type: ignore[attr-defined]
    try:
        started = time.monotonic()
        r = await client.get("/deploys", headers=bearer(tokens["ann"]))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"status_code": 503, "detail": "database unavailable"}
        assert time.monotonic() - started < 0.5
        assert (await client.get("/health")).status_code == 503
        assert (await client.get("/static/app.js")).status_code == 200  # no database needed
    finally:
        services.pool.status.connected()  # type: ignore[attr-defined]
    assert (await client.get("/deploys", headers=bearer(tokens["ann"]))).status_code == 200


# ---------------------------------------------------------------- logs, a page at a time


async def test_logs_are_served_in_exact_pages(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    deploy = await _deploy(client, tokens["ann"])
    lines = [f"line {i}" for i in range(1, 2501)]
    async with services.pool.connection() as conn:
        for i in range(0, len(lines), 700):
            await append_lines(conn, deploy, 1, "stdout", lines[i:i + 700])
    ann = bearer(tokens["ann"])
    whole = await client.get(f"/deploys/{deploy}/logs", headers=ann)
    assert whole.text == "\n".join(lines) and whole.headers["x-last-seq"] == "2500"
    assert whole.headers["content-type"] == "text/plain; charset=utf-8"
    assert whole.headers["cache-control"] == "no-store"
    got: list[str] = []
    after, pages = 0, 0
    while True:
        r = await client.get(f"/deploys/{deploy}/logs", params={"after": after, "limit": 1000},
                             headers=ann)
        assert r.status_code == 200
        last = int(r.headers["x-last-seq"])
        if last == after:
            assert r.text == ""
            break
        page = r.text.split("\n")
        assert len(page) == last - after and len(page) <= 1000
        got += page
        after, pages = last, pages + 1
    assert got == lines and pages == 3
    # The earlier name of `after` still works; both at once must agree.
    r = await client.get(f"/deploys/{deploy}/logs", params={"after_seq": 2498}, headers=ann)
    assert r.text == "line 2499\nline 2500" and r.headers["x-last-seq"] == "2500"
    r = await client.get(f"/deploys/{deploy}/logs", params={"after_seq": 5, "after": 5,
                                                           "limit": 2}, headers=ann)
    assert r.text == "line 6\nline 7" and r.headers["x-last-seq"] == "7"
    r = await client.get(f"/deploys/{deploy}/logs", params={"after_seq": 5, "after": 6}, headers=ann)
    assert r.status_code == 400
    for bad in ("0", "100001", "x"):
        r = await client.get(f"/deploys/{deploy}/logs", params={"limit": bad}, headers=ann)
        assert r.status_code in (400, 422), (bad, r.text)
    # A page is fixed when it is asked for: lines written while it is sent are the next page's.
    r = await client.get(f"/deploys/{deploy}/logs", params={"after": 2500}, headers=ann)
    assert r.text == "" and r.headers["x-last-seq"] == "2500"
    # Another user: as for an unknown deploy.
    r = await client.get(f"/deploys/{deploy}/logs", headers=bearer(tokens["bob"]))
    assert r.status_code == 404


async def test_a_page_does_not_grow_while_it_is_sent(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    from service.logs import page_end, text_between

    deploy = await _deploy(client, tokens["ann"])
    async with services.pool.connection() as conn:
        await append_lines(conn, deploy, 1, "stdout", [f"a{i}" for i in range(10)])
        upto = await page_end(conn, deploy, 0, None)
        await append_lines(conn, deploy, 1, "stdout", ["late"])
    chunks = [c async for c in text_between(services.pool, deploy, 0, upto, batch=3)]
    assert len(chunks) == 4 and b"".join(chunks).decode() == "\n".join(f"a{i}" for i in range(10))


async def test_a_200k_line_log_is_served_with_the_api_process_memory_bounded(
    database_url, tmp_path
) -> None:
    """~200,000 lines (~20 MB) served by a real `tfdeploy serve` process: its peak RSS grows
    by a few MiB, not by the log's size (before: the whole log as one string)."""
    n, width = 200_000, 100
    async with limited(database_url, tmp_path) as services:
        tokens = await tokens_for(services, "ann")
        async with asgi(services) as c:
            deploy = await _deploy(c, tokens["ann"])
        async with services.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO deploy_logs (deploy_id, seq, attempt, stream, line, after_version) "
                "SELECT %s, g, 1, 'stdout', lpad(g::text, %s, 'x'), 1 FROM generate_series(1, %s) g",
                (deploy, width, n),
            )
    api = ServeProcess(database_url, tmp_path, TFDEPLOY_RATE_LIMIT="1000/s")
    try:
        await api.ready()
        async with httpx.AsyncClient(base_url=api.base, timeout=120) as c:
            # Warm up the route (imports, the pool) on a short page first.
            r = await c.get(f"/deploys/{deploy}/logs", params={"limit": 10},
                            headers=bearer(tokens["ann"]))
            assert r.status_code == 200
            # The peak so far (imports, start-up) is not this request's: start it again here.
            Path(f"/proc/{api.proc.pid}/clear_refs").write_text("5")
            before_rss, before_peak = vmrss_kib(api.proc.pid), vmhwm_kib(api.proc.pid)
            size, started = 0, time.monotonic()
            async with c.stream("GET", f"/deploys/{deploy}/logs",
                                headers=bearer(tokens["ann"])) as r:
                assert r.status_code == 200 and r.headers["x-last-seq"] == str(n)
                async for chunk in r.aiter_bytes():
                    size += len(chunk)
            took = time.monotonic() - started
            peak = vmhwm_kib(api.proc.pid)
        assert size == n * width + (n - 1)
        grew = (peak - max(before_peak, before_rss)) / 1024
        print(f"\n{n} log lines ({size / 1e6:.1f} MB) served in {took:.2f} s; the API process's "
              f"peak RSS grew by {max(grew, 0):.1f} MiB (RSS before {before_rss / 1024:.0f} MiB)")
        assert grew < 16, f"peak RSS grew by {grew:.1f} MiB"
    finally:
        api.stop()

