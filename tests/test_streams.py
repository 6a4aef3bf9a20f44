"""The SSE streams and the LISTEN fan-out, over a real uvicorn server and a real PostgreSQL.

httpx's ASGITransport buffers a whole response, so streams are read over real HTTP from a
uvicorn server started in the test (127.0.0.1, a free port): a client closing its connection
is then a real disconnect.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn

from service import store
from service.api.app import create_app
from service.api.streams import StreamOptions
from service.auth import create_token, list_tokens, revoke_token
from service.deploys import NewDeploy
from service.lifecycle import AttemptFailed, AttemptSucceeded, PersistedState, StartAttempt
from service.logs import append_lines, read_logs
from service.notify import Batch, Hub, hub_of
from service.services import Services

MAIN_TF = 'resource "terraform_data" "x" {}\n'
WORKER = "worker:w"


# ---------------------------------------------------------------- fixtures


class NoSignalServer(uvicorn.Server):
    """The test owns the process's signals (as the CLI does)."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    def capture_signals(self):  # type: ignore[no-untyped-def]
        import contextlib

        return contextlib.nullcontext()


@dataclass
class Server:
    url: str
    services: Services
    tokens: dict[str, str]
    client: httpx.AsyncClient

    @property
    def hub(self) -> Hub:
        return hub_of(self.services)

    def headers(self, user: str | None, last_id: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        return headers


async def start_server(
    services: Services, tokens: dict[str, str], options: StreamOptions
) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    app = create_app(services, stream_options=options)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        lifespan="on",
        log_level="warning",
        timeout_graceful_shutdown=1,
        backlog=1024,
    )
    server = NoSignalServer(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, f"http://127.0.0.1:{port}"


@pytest.fixture
def stream_options() -> StreamOptions:
    return StreamOptions(ping=15.0, send_timeout=5.0)


@pytest.fixture
async def server(
    services: Services, tokens: dict[str, str], stream_options: StreamOptions
) -> AsyncIterator[Server]:
    uv, task, url = await start_server(services, tokens, stream_options)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    timeout = httpx.Timeout(30.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        yield Server(url, services, tokens, client)
    uv.should_exit = True
    await asyncio.wait_for(task, 10)


# ---------------------------------------------------------------- an SSE client


@dataclass
class Message:
    event: str = "message"
    data: str = ""
    id: str | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return json.loads(self.data)


async def messages(response: httpx.Response, *, comments: bool = False) -> AsyncIterator[Message]:
    """Parse an SSE body by the spec's rules: fields until a blank line; ``:`` lines are
    comments (yielded as a Message with event "comment" when ``comments``)."""
    current = Message()
    data: list[str] = []
    seen = False
    async for line in response.aiter_lines():
        if line == "":
            if seen and (data or current.event != "message" or current.id is not None):
                current.data = "\n".join(data)
                yield current
            current, data, seen = Message(), [], False
            continue
        if line.startswith(":"):
            if comments:
                yield Message(event="comment", data=line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        seen = True
        if name == "data":
            data.append(value)
        elif name == "event":
            current.event = value
        elif name == "id":
            current.id = value
        elif name == "retry":
            pass


async def collect(
    srv: Server,
    url: str,
    *,
    user: str | None = "ann",
    last_id: str | None = None,
    until: Callable[[Message], bool] | None = None,
    count: int | None = None,
    within: float = 15.0,
) -> list[Message]:
    """Read messages until the server closes, ``until`` holds for one, or ``count`` arrived."""
    out: list[Message] = []

    async def run() -> None:
        async with srv.client.stream("GET", url, headers=srv.headers(user, last_id)) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            async for message in messages(response):
                out.append(message)
                if (until and until(message)) or (count is not None and len(out) >= count):
                    return

    await asyncio.wait_for(run(), within)
    return out


# ---------------------------------------------------------------- driving deploys


def new_deploy(max_attempts: int = 3, workspace: str = "default") -> NewDeploy:
    return NewDeploy(
        workspace=workspace, action="apply", files={"main.tf": MAIN_TF}, max_attempts=max_attempts
    )


async def request(services: Services, owner: str = "ann", **kw: Any) -> str:
    view, _ = await services.deploys.request(new_deploy(**kw), owner=owner, actor=f"user:{owner}")
    return view.id


def persisted(version: int = 1) -> PersistedState:
    return PersistedState(
        workspace="default",
        store="postgres",
        location=f"pg://states/default/{version}",
        serial=version,
        lineage="lin",
        sha256=f"{version:064x}",
        size=10,
        state_version=version,
    )


async def start(services: Services, deploy_id: str) -> None:
    await services.deploys.execute(deploy_id, StartAttempt(worker="w"), WORKER)


async def fail(services: Services, deploy_id: str, reason: str = "apply_failed") -> None:
    await services.deploys.execute(deploy_id, AttemptFailed(reason=reason, message="boom"), WORKER)


async def succeed(services: Services, deploy_id: str) -> None:
    await services.deploys.execute(deploy_id, AttemptSucceeded(state=persisted()), WORKER)


async def log(services: Services, deploy_id: str, *lines: str, attempt: int = 1) -> int:
    async with services.pool.connection() as conn:
        return await append_lines(conn, deploy_id, attempt, "stdout", list(lines))


async def canonical(services: Services, deploy_id: str) -> list[str]:
    """Every id of a deploy's stream, in the documented order, from the tables."""
    async with services.pool.connection() as conn:
        events = await store.read_stream(conn, deploy_id)
        lines = await read_logs(conn, deploy_id)
    keyed = [((e.version, 0, 0), str(e.version)) for e in events]
    keyed += [((ln.after_version, 1, ln.seq), f"{ln.after_version}.{ln.seq}") for ln in lines]
    return [k for _, k in sorted(keyed)]


async def eventually(check: Callable[[], bool], within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        await asyncio.sleep(0.02)


def stream_url(deploy_id: str) -> str:
    return f"/deploys/{deploy_id}/stream"


# ---------------------------------------------------------------- the message format


async def test_deploy_stream_format_and_statuses(server: Server, services: Services) -> None:
    deploy_id = await request(services)
    got: list[Message] = []

    async def read() -> None:
        got.extend(await collect(server, stream_url(deploy_id), until=lambda m: m.event == "end"))

    reader = asyncio.create_task(read())
    await eventually(lambda: len(got) > 0 or server.hub.subscriber_count == 1, what="subscriber")
    await start(services, deploy_id)
    await log(services, deploy_id, "init", "apply 1")
    await fail(services, deploy_id)  # Failed (not final) + Retried
    await start(services, deploy_id)
    await log(services, deploy_id, "apply 2", attempt=2)
    await succeed(services, deploy_id)  # StatePersisted + Succeeded
    await asyncio.wait_for(reader, 15)

    kinds = [(m.event, m.id) for m in got]
    assert kinds == [
        ("Requested", "1"),
        ("Started", "2"),
        ("log", "2.1"),
        ("log", "2.2"),
        ("Failed", "3"),
        ("Retried", "4"),
        ("Started", "5"),
        ("log", "5.3"),
        ("StatePersisted", "6"),
        ("Succeeded", "7"),
        ("end", None),
    ]
    statuses = [m.json["deploy"]["status"] for m in got if m.event not in ("log", "end")]
    assert statuses == [
        "queued",
        "deploying",
        "retrying",
        "retrying",
        "retrying",
        "retrying",
        "succeeded",
    ]
    attempts = [m.json["deploy"]["attempt"] for m in got if m.event not in ("log", "end")]
    assert attempts == [1, 1, 2, 2, 2, 2, 2]

    first = got[0].json
    assert set(first) == {"event", "deploy"}
    assert first["event"]["type"] == "Requested" and first["event"]["version"] == 1
    assert first["event"]["deploy_id"] == deploy_id
    assert set(first["event"]) == {
        "position",
        "deploy_id",
        "version",
        "type",
        "data",
        "recorded_at",
        "actor",
        "stream",
        "workspace_id",
    }
    assert first["deploy"]["id"] == deploy_id and first["deploy"]["max_attempts"] == 3
    assert first["deploy"]["version"] == 1

    line = got[2].json
    assert line == {"seq": 1, "attempt": 1, "stream": "stdout", "line": "init", "after_version": 2}
    assert got[7].json["attempt"] == 2

    # The status after the last event equals GET /deploys/{id}.
    response = await server.client.get(f"/deploys/{deploy_id}", headers=server.headers("ann"))
    last = [m for m in got if m.event == "Succeeded"][0].json["deploy"]
    assert response.json() == last
    assert got[-1].json["deploy"]["status"] == "succeeded"
    assert [m.id for m in got if m.id] == await canonical(services, deploy_id)
    await eventually(lambda: server.hub.subscriber_count == 0, what="release")


async def test_failed_deploy_ends_and_a_replay_is_seen_on_reconnect(
    server: Server, services: Services
) -> None:
    deploy_id = await request(services, max_attempts=1)
    await start(services, deploy_id)
    await log(services, deploy_id, "boom")
    await fail(services, deploy_id)
    got = await collect(server, stream_url(deploy_id))  # ends by itself
    assert [(m.event, m.id) for m in got] == [
        ("Requested", "1"),
        ("Started", "2"),
        ("log", "2.1"),
        ("Failed", "3"),
        ("end", None),
    ]
    assert got[-1].json["deploy"]["status"] == "failed"
    assert got[-1].json["deploy"]["error"]["reason"] == "apply_failed"

    # The bytes on the wire: "id", "event", one "data" line, a blank line; "end" has no id.
    raw = (await server.client.get(stream_url(deploy_id), headers=server.headers("ann"))).text
    assert raw.startswith('id: 1\nevent: Requested\ndata: {"event":{"position":')
    assert (
        '\n\nid: 2.1\nevent: log\ndata: {"seq":1,"attempt":1,"stream":"stdout","line":"boom",'
        in raw
    )
    assert '\n\nevent: end\ndata: {"deploy":{"id":' in raw and raw.endswith("}\n\n")
    assert raw.count("\n\n") == 5

    # Reconnecting at the end, with nothing new: end again, at once.
    again = await collect(server, stream_url(deploy_id), last_id="3", within=5)
    assert [m.event for m in again] == ["end"]

    # An admin replays it: the same reconnect now follows the deploy again.
    response = await server.client.post(
        f"/deploys/{deploy_id}/replay", headers=server.headers("root")
    )
    assert response.status_code == 202, response.text
    after = await collect(server, stream_url(deploy_id), last_id="3", count=1)
    assert after[0].event == "Retried" and after[0].id == "4"
    assert after[0].json["deploy"]["status"] == "retrying"
    assert after[0].json["event"]["data"]["by"] == "admin"


# ---------------------------------------------------------------- resume ids


async def test_resume_ids_header_query_and_garbage(server: Server, services: Services) -> None:
    deploy_id = await request(services, max_attempts=1)
    await log(services, deploy_id, "a", "b")  # after_version 1: 1.1, 1.2
    await start(services, deploy_id)
    await log(services, deploy_id, "c")  # 2.3
    await succeed(services, deploy_id)  # 3 StatePersisted, 4 Succeeded
    url = stream_url(deploy_id)

    async def ids(last: str | None = None, query: str | None = None) -> list[str | None]:
        u = url + (f"?last_event_id={query}" if query is not None else "")
        return [m.id for m in await collect(server, u, last_id=last)]

    assert await ids() == ["1", "1.1", "1.2", "2", "2.3", "3", "4", None]
    assert await ids("1") == ["1.1", "1.2", "2", "2.3", "3", "4", None]
    assert await ids("1.1") == ["1.2", "2", "2.3", "3", "4", None]
    assert await ids("2") == ["2.3", "3", "4", None]
    assert await ids("2.3") == ["3", "4", None]
    assert await ids("4") == [None]
    assert await ids(query="2") == ["2.3", "3", "4", None]
    assert await ids(query="1.2") == ["2", "2.3", "3", "4", None]
    # The header wins over the query (EventSource keeps its URL and sends the newer id).
    assert await ids("2.3", query="1") == ["3", "4", None]
    assert await ids("0") == await ids()

    for garbage in ("abc", "1.x", "-1", "1.2.3", "1e3", "5", "9.1"):  # 5, 9: beyond version 4
        response = await server.client.get(url, headers=server.headers("ann", garbage))
        assert response.status_code == 400, garbage
        assert response.json()["status_code"] == 400
        response = await server.client.get(
            url, params={"last_event_id": garbage}, headers=server.headers("ann")
        )
        assert response.status_code == 400, garbage


async def test_resume_under_concurrent_writers_delivers_everything_once_in_order(
    server: Server, services: Services
) -> None:
    """A client that drops its connection every few messages and resumes with Last-Event-ID
    (or ?last_event_id=), while an event writer and several log writers work concurrently,
    ends with every event and log line exactly once, in the canonical order."""
    attempts = 12
    deploy_id = await request(services, max_attempts=attempts)
    rng = random.Random(4)
    loggers_done = asyncio.Event()

    async def log_writer(name: str) -> None:
        for i in range(40):
            n = rng.randint(1, 3)
            await log(services, deploy_id, *[f"{name}-{i}-{k}" for k in range(n)])
            await asyncio.sleep(rng.random() * 0.01)

    async def event_writer() -> None:
        for _ in range(1, attempts):
            await start(services, deploy_id)
            await asyncio.sleep(rng.random() * 0.03)
            await fail(services, deploy_id)
            await asyncio.sleep(rng.random() * 0.03)
        await start(services, deploy_id)
        await loggers_done.wait()
        await succeed(services, deploy_id)

    async def loggers() -> None:
        await asyncio.gather(*(log_writer(f"w{k}") for k in range(4)))
        loggers_done.set()

    received: list[Message] = []
    reconnects = 0

    async def reader() -> None:
        nonlocal reconnects
        last: str | None = None
        while True:
            take = rng.randint(1, 7)
            query = rng.random() < 0.3
            url = stream_url(deploy_id)
            headers = server.headers("ann", None if query else last)
            params = {"last_event_id": last} if (query and last) else None
            async with server.client.stream("GET", url, headers=headers, params=params) as r:
                assert r.status_code == 200
                n = 0
                async for m in messages(r):
                    if m.event == "end":
                        return
                    received.append(m)
                    last = m.id
                    n += 1
                    if n >= take:
                        break
            reconnects += 1

    await asyncio.wait_for(asyncio.gather(event_writer(), loggers(), reader()), 60)
    ids = [m.id or "" for m in received]
    expected = await canonical(services, deploy_id)
    assert len(ids) == len(set(ids)), "a message arrived twice"
    assert ids == expected
    assert sum(1 for i in ids if "." not in i) == 1 + 3 * (attempts - 1) + 3
    assert sum(1 for i in ids if "." in i) >= 4 * 40
    assert reconnects > 20
    # The data agrees with the ids.
    for m in received:
        if m.event == "log":
            v, s = (m.id or "").split(".")
            assert (m.json["after_version"], m.json["seq"]) == (int(v), int(s))
        else:
            assert m.json["event"]["version"] == int(m.id or 0)
            assert m.json["event"]["type"] == m.event
    await eventually(lambda: server.hub.subscriber_count == 0, what="release")


# ---------------------------------------------------------------- the LISTEN connection


async def test_listen_connection_killed_mid_stream_loses_nothing(
    server: Server, services: Services
) -> None:
    deploy_id = await request(services, max_attempts=5)
    got: list[Message] = []
    arrived = asyncio.Event()

    async def read() -> None:
        async with server.client.stream(
            "GET", stream_url(deploy_id), headers=server.headers("ann")
        ) as r:
            async for m in messages(r):
                got.append(m)
                arrived.set()
                if m.event == "end":
                    return

    reader = asyncio.create_task(read())
    await eventually(lambda: bool(got), what="first message")
    hub = server.hub
    assert await hub.start(within=5)
    old_pid, connects = hub.backend_pid, hub.connects
    await start(services, deploy_id)
    await eventually(lambda: len(got) == 2, what="Started")

    async with services.pool.connection() as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
    # Events and log lines while the listener is down (or reconnecting) ...
    await log(services, deploy_id, "during the outage")
    await fail(services, deploy_id)
    await eventually(lambda: hub.connects > connects, what="reconnect")
    assert hub.backend_pid != old_pid
    # ... and after it is back.
    await start(services, deploy_id)
    await log(services, deploy_id, "after", attempt=2)
    await succeed(services, deploy_id)
    await asyncio.wait_for(reader, 15)
    assert [m.id for m in got if m.id] == await canonical(services, deploy_id)
    assert got[-1].event == "end"


async def test_listener_killed_repeatedly_streams_keep_up(
    server: Server, services: Services
) -> None:
    """The listening connection is killed again and again while events are appended."""
    deploy_id = await request(services, max_attempts=6)
    hub = server.hub
    got: list[Message] = []

    async def read() -> None:
        got.extend(
            await collect(
                server, stream_url(deploy_id), until=lambda m: m.event == "end", within=30
            )
        )

    reader = asyncio.create_task(read())
    await eventually(lambda: hub.subscriber_count == 1, what="subscriber")
    for _ in range(5):
        await hub.start(within=5)
        async with services.pool.connection() as conn:
            await conn.execute("SELECT pg_terminate_backend(%s)", (hub.backend_pid,))
        await start(services, deploy_id)
        await fail(services, deploy_id)
    await start(services, deploy_id)
    await succeed(services, deploy_id)
    await asyncio.wait_for(reader, 30)
    assert [m.id for m in got if m.id] == await canonical(services, deploy_id)


async def test_streams_poll_while_listen_is_impossible(server: Server, services: Services) -> None:
    """A hub that cannot connect at all: the streams still deliver everything, by polling."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub = Hub(f"postgresql://x@127.0.0.1:{port}/x", poll_interval=0.2, max_backoff=0.5)
    services.extras["hub"] = hub
    deploy_id = await request(services, max_attempts=2)
    got: list[Message] = []

    async def read() -> None:
        got.extend(await collect(server, stream_url(deploy_id), until=lambda m: m.event == "end"))

    reader = asyncio.create_task(read())
    await eventually(lambda: hub.subscriber_count == 1, what="subscriber")
    await start(services, deploy_id)
    await log(services, deploy_id, "polled")
    await fail(services, deploy_id)
    await start(services, deploy_id)
    await succeed(services, deploy_id)
    await asyncio.wait_for(reader, 15)
    assert not hub.connected.is_set() and hub.connects == 0
    assert [m.id for m in got if m.id] == await canonical(services, deploy_id)


# ---------------------------------------------------------------- fan-out


async def test_200_subscribers_all_receive_the_next_event(
    server: Server, services: Services
) -> None:
    deploy_id = await request(services)
    n = 200
    received: dict[int, float] = {}
    ready = 0

    async def subscriber(i: int) -> None:
        nonlocal ready
        async with server.client.stream(
            "GET", stream_url(deploy_id), headers=server.headers("ann" if i % 2 else "root")
        ) as r:
            assert r.status_code == 200
            async for m in messages(r):
                if m.event == "Requested":
                    ready += 1
                elif m.event == "Started":
                    received[i] = time.perf_counter()
                    return

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(subscriber(i)) for i in range(n)]
    await eventually(lambda: ready == n, within=25, what="200 subscribers")
    assert server.hub.subscriber_count == n
    connected = time.perf_counter() - t0
    committed = time.perf_counter()
    await start(services, deploy_id)
    committed = (committed + time.perf_counter()) / 2
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert len(received) == n
    latencies = sorted(t - committed for t in received.values())
    print(
        f"\n200 subscribers: connected in {connected:.2f}s; Started received by all in "
        f"{latencies[-1] * 1000:.0f} ms (median {latencies[n // 2] * 1000:.0f} ms)"
    )
    await eventually(lambda: server.hub.subscriber_count == 0, what="release")


async def test_event_from_another_process_reaches_a_subscriber(
    server: Server, services: Services, tmp_path: Any
) -> None:
    deploy_id = await request(services)
    got: list[Message] = []

    received_at: list[float] = []

    async def read() -> None:
        got.extend(await collect(server, stream_url(deploy_id), count=2, within=60))
        received_at.append(time.time())

    reader = asyncio.create_task(read())
    await eventually(lambda: server.hub.subscriber_count == 1, what="subscriber")
    assert await server.hub.start(within=5)
    snippet = f"""
import asyncio
import time
from service.lifecycle import StartAttempt
from service.services import open_services
from service.settings import from_env

async def main():
    services = await open_services(from_env({{}}, data_dir={str(tmp_path)!r}), {services.database_url!r}, pool_size=1)
    try:
        await services.deploys.execute({deploy_id!r}, StartAttempt(worker="other"), "worker:other")
        print(time.time(), flush=True)  # committed
    finally:
        await services.close()

asyncio.run(main())
"""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        snippet,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    committed = float(out.decode().split()[-1])
    await asyncio.wait_for(reader, 10)
    print(f"\ncross-process: commit -> receipt {1000 * (received_at[0] - committed):.1f} ms")
    assert [m.event for m in got] == ["Requested", "Started"]
    assert got[1].json["event"]["actor"] == "worker:other"
    assert got[1].json["deploy"]["status"] == "deploying"


async def test_commit_to_receipt_latency(server: Server, services: Services) -> None:
    deploy_id = await request(services, max_attempts=30)
    got: list[tuple[Message, float]] = []

    async def read() -> None:
        async with server.client.stream(
            "GET", stream_url(deploy_id), headers=server.headers("ann")
        ) as r:
            async for m in messages(r):
                got.append((m, time.perf_counter()))

    reader = asyncio.create_task(read())
    await eventually(lambda: len(got) == 1, what="Requested")
    latencies = []
    for i in range(20):
        before = len(got)
        await log(services, deploy_id, f"line {i}")
        committed = time.perf_counter()
        seen = before
        await eventually(lambda: len(got) > seen, what="line")  # noqa: B023
        latencies.append(got[before][1] - committed)
    reader.cancel()
    latencies.sort()
    # Printed, not asserted: the machine is shared (speed belongs in bench/).
    print(
        f"\ncommit -> receipt: median {latencies[10] * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms over 20 log lines"
    )


# ---------------------------------------------------------------- the shared feed


class ListSource:
    """A FeedSource over a list the test appends to (keys 1, 2, 3, ...), counting reads."""

    def __init__(self, rows: list[int], page: int = 100) -> None:
        self.rows, self.page = rows, page
        self.reads = 0
        self.failures = 0  # the next reads that fail

    async def start(self) -> int:
        return len(self.rows)

    async def read(self, after: int) -> Batch[int]:
        await asyncio.sleep(0)  # a real read gives the loop a turn
        if self.failures:
            self.failures -= 1
            raise psycopg.OperationalError("the database is away")
        self.reads += 1
        new = self.rows[after : after + self.page]
        return Batch([(k, f"{k}\n".encode()) for k in new], new[-1] if new else after,
                     more=len(new) == self.page)


async def test_feed_reads_once_for_all_its_subscribers_and_keeps_a_bounded_window(
    database_url: str,
) -> None:
    hub = Hub(database_url, poll_interval=0.1)
    assert await hub.start(within=5)
    rows = [1, 2, 3]
    sources: list[ListSource] = []

    def source() -> ListSource:
        sources.append(ListSource(rows))
        return sources[-1]

    subs = [hub.subscribe("d", source=source, capacity=5) for _ in range(50)]
    other = hub.subscribe("e")  # a direct subscriber of another deploy: not woken
    try:
        feed = subs[0].feed
        assert feed is not None and len(sources) == 1 and all(s.feed is feed for s in subs)
        assert hub.subscriber_count == 51 and set(hub.feeds) == {"d"}
        await eventually(lambda: feed.started, what="feed start")
        # It starts at the end: what came before, each subscriber reads itself.
        assert (feed.base, feed.head, len(feed)) == (3, 3, 0)
        assert feed.take(3) == ([], 3) and feed.take(2) is None
        for sub in subs:
            assert await sub.wait(1)
        assert await other.wait(0)

        rows.extend([4, 5])
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute("SELECT pg_notify('tfdeploy_logs', 'd 4')")
            await conn.execute("SELECT pg_notify('tfdeploy_logs', 'd 5')")
        await eventually(lambda: feed.head == 5, what="read")
        for sub in subs:  # everyone woken, after the read
            assert await sub.wait(1)
        assert sources[0].reads in (1, 2)  # one per wake-up (two if the notifications split)
        assert feed.take(3) == ([b"4\n", b"5\n"], 5)
        assert feed.take(4) == ([b"5\n"], 5)
        assert not await other.wait(0.1)

        # More than the window holds: the oldest go; a subscriber before them must read itself.
        rows.extend(range(6, 31))
        sources[0].failures = 1  # and the first try fails: retried without another wake-up
        hub.wake_all()
        await eventually(lambda: feed.head == 30, what="retried read")
        assert (feed.base, feed.head, len(feed)) == (25, 30, 5)
        assert feed.take(25) == ([b"26\n", b"27\n", b"28\n", b"29\n", b"30\n"], 30)
        assert feed.take(27, max_bytes=1) == ([b"28\n"], 28)
        assert feed.take(24) is None and feed.take(5) is None
        assert feed.take(99) == ([], 99)  # read past the window by itself: waits for more
    finally:
        for sub in subs:
            sub.close()
        other.close()
        await hub.close()
    assert hub.feeds == {} and hub.subscriber_count == 0


@pytest.mark.parametrize("stream_options", [StreamOptions(ping=15.0, send_timeout=10.0)])
async def test_many_subscribers_share_reads_and_get_identical_complete_sequences(
    server: Server, services: Services
) -> None:
    """Deploy streams and global streams, joining at different times (some resuming from an
    id), while events and log lines are written concurrently: every stream gets exactly the
    canonical sequence after its id; the rows come from shared reads, each stream reading the
    database itself only to catch up when it starts."""
    attempts = 6
    deploy_id = await request(services, max_attempts=attempts)
    hub = server.hub
    rng = random.Random(11)
    results: dict[str, tuple[str | None, list[str]]] = {}
    writing = asyncio.Event()
    loggers_done = asyncio.Event()

    async def follow_deploy(name: str, last_id: str | None) -> None:
        got = await collect(
            server,
            stream_url(deploy_id),
            user=rng.choice(["ann", "root"]),
            last_id=last_id,
            until=lambda m: m.event == "end",
            within=90,
        )
        assert got[-1].event == "end"
        results[name] = (last_id, [m.id or "" for m in got[:-1]])

    async def follow_all(name: str, last_id: str | None) -> None:
        got = await collect(
            server,
            "/events/stream",
            user="root",
            last_id=last_id,
            until=lambda m: m.json["data"].get("workspace") == "sentinel",
            within=90,
        )
        results[name] = (last_id, [m.id or "" for m in got])

    async def late_joiners() -> list[asyncio.Task[None]]:
        tasks = []
        await writing.wait()
        for k in range(12):
            await asyncio.sleep(rng.random() * 0.1)
            ids = await canonical(services, deploy_id)
            last = rng.choice([None, *ids])
            tasks.append(asyncio.create_task(follow_deploy(f"late-deploy-{k}", last)))
            if k % 3 == 0:
                async with services.pool.connection() as conn:
                    cur = await conn.execute("SELECT position FROM events ORDER BY position")
                    positions = [str(r[0]) for r in await cur.fetchall()]
                last = rng.choice(positions)
                tasks.append(asyncio.create_task(follow_all(f"late-all-{k}", last)))
        return tasks

    async def log_writer(name: str) -> None:
        for i in range(30):
            await log(services, deploy_id, *[f"{name}-{i}-{k}" for k in range(rng.randint(1, 3))])
            await asyncio.sleep(rng.random() * 0.02)

    async def event_writer() -> None:
        for _ in range(1, attempts):
            await start(services, deploy_id)
            await asyncio.sleep(rng.random() * 0.05)
            await fail(services, deploy_id)
        await start(services, deploy_id)
        await loggers_done.wait()
        await succeed(services, deploy_id)

    async def other_deploys() -> None:
        for _ in range(5):
            other = await request(services, owner="bob")
            await start(services, other)
            await asyncio.sleep(rng.random() * 0.05)

    async def writers() -> None:
        writing.set()
        await asyncio.gather(*(log_writer(f"w{k}") for k in range(3)))
        loggers_done.set()

    early = [asyncio.create_task(follow_deploy(f"early-deploy-{k}", None)) for k in range(12)]
    early += [asyncio.create_task(follow_all(f"early-all-{k}", None)) for k in range(4)]
    await eventually(lambda: hub.subscriber_count == len(early), what="early subscribers")
    own_before = hub.own_reads
    joiners = asyncio.create_task(late_joiners())
    await asyncio.wait_for(asyncio.gather(writers(), event_writer(), other_deploys()), 60)
    late = await joiners
    await request(services, owner="root", workspace="sentinel")  # the global streams' last
    await asyncio.wait_for(asyncio.gather(*early, *late), 90)

    expected = await canonical(services, deploy_id)
    async with services.pool.connection() as conn:
        cur = await conn.execute("SELECT position FROM events ORDER BY position")
        positions = [str(r[0]) for r in await cur.fetchall()]
    streams = len(early) + len(late)
    assert len(results) == streams
    for name, (last_id, ids) in results.items():
        if "deploy" in name:
            assert ids == expected[expected.index(last_id) + 1 :] if last_id else expected, name
        else:
            after = int(last_id or 0)
            assert ids == [p for p in positions if int(p) > after], name
    delivered = sum(len(ids) for _, ids in results.values())
    own = hub.own_reads - own_before
    print(
        f"\n{streams} streams, {delivered} messages delivered: {hub.shared_reads} shared reads, "
        f"{own} reads of their own"
    )
    # Catching up only: a read to start, another if the feed had moved on meanwhile.
    assert own <= 4 * streams
    assert hub.shared_reads > 0
    await eventually(lambda: hub.subscriber_count == 0, what="release")
    assert hub.feeds == {}


async def _raw_stream(port: int, path: str, token: str) -> tuple[asyncio.StreamReader, Any]:
    """A client with tiny receive buffers: when it stops reading, the server's writes block."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
    return reader, writer


async def _raw_messages(reader: asyncio.StreamReader) -> AsyncIterator[tuple[str, str | None]]:
    """(event, id) of each SSE message of a chunked body."""
    buf = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            return
        buf += await reader.readexactly(size)
        await reader.readexactly(2)
        *blocks, buf = buf.split(b"\n\n")
        for block in blocks:
            fields = dict(
                line.split(": ", 1) for line in block.decode().split("\n") if ": " in line
            )
            if "event" in fields:
                yield fields["event"], fields.get("id")


@pytest.mark.parametrize(
    "stream_options",
    [StreamOptions(ping=15.0, send_timeout=60.0, window=50, log_batch=100)],
)
async def test_a_lagging_subscriber_falls_behind_the_window_and_catches_up(
    server: Server, services: Services, stream_options: StreamOptions
) -> None:
    """A client that stops reading for a while (its writes block, the shared window moves on
    without it) resumes and still gets everything once, in order: it reads the database
    itself until it is back inside the window. Meanwhile a healthy client is not held up."""
    deploy_id = await request(services)
    hub = server.hub
    port = int(server.url.rsplit(":", 1)[1])
    reader, writer = await _raw_stream(port, stream_url(deploy_id), server.tokens["ann"])
    lagging = _raw_messages(reader)
    assert await lagging.__anext__() == ("Requested", "1")
    await eventually(lambda: hub.subscriber_count == 1, what="lagging subscriber")
    feed = hub.feeds[deploy_id]
    (lagging_sub,) = feed.subs

    healthy: list[str] = []

    async def read_healthy() -> None:
        got = await collect(server, stream_url(deploy_id), until=lambda m: m.event == "end",
                            within=120)
        healthy.extend(m.id or "" for m in got[:-1])

    healthy_task = asyncio.create_task(read_healthy())
    await eventually(lambda: hub.subscriber_count == 2, what="healthy subscriber")
    largest = 0
    await start(services, deploy_id)
    payload = "y" * 1000
    for batch in range(30):  # ~3 MB: far more than the lagging client's buffers take
        await log(services, deploy_id, *[f"{batch}-{i} {payload}" for i in range(100)])
        largest = max(largest, len(feed))
    await succeed(services, deploy_id)
    await asyncio.wait_for(healthy_task, 120)
    expected = await canonical(services, deploy_id)
    assert healthy == expected

    ids = ["1"]
    async for event, id_ in lagging:
        if event == "end":
            break
        ids.append(id_ or "")
    writer.close()
    assert ids == expected
    assert lagging_sub.own_reads > 1  # it caught up by reading itself
    assert largest <= stream_options.window
    await eventually(lambda: hub.subscriber_count == 0, what="release")


# ---------------------------------------------------------------- slow clients


@pytest.mark.parametrize(
    "stream_options", [StreamOptions(ping=15.0, send_timeout=1.0, window=500)]
)
async def test_a_frozen_client_does_not_delay_others_and_is_dropped(
    server: Server, services: Services, stream_options: StreamOptions
) -> None:
    """The policy for a client that stops reading: the process keeps no queue for it. Its
    stream holds only a cursor (and the one write in flight); the deploy's shared window
    never holds more than ``window`` messages however far behind it is; and once one write
    waits longer than ``send_timeout`` it is dropped."""
    deploy_id = await request(services)
    port = int(server.url.rsplit(":", 1)[1])
    # A client that connects, asks, and never reads: a tiny receive buffer fills at once.
    frozen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    frozen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    frozen.connect(("127.0.0.1", port))
    frozen.sendall(
        f"GET {stream_url(deploy_id)} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {server.tokens['ann']}\r\n\r\n".encode()
    )
    await eventually(lambda: server.hub.subscriber_count == 1, what="frozen subscriber")
    got = 0
    total = 30_000

    async def healthy() -> None:
        nonlocal got
        async with server.client.stream(
            "GET", stream_url(deploy_id), headers=server.headers("ann")
        ) as r:
            async for m in messages(r):
                if m.event == "log":
                    got += 1
                    if got == total:
                        return

    reader = asyncio.create_task(healthy())
    await eventually(lambda: server.hub.subscriber_count == 2, what="healthy subscriber")
    largest = 0

    def sample() -> None:
        nonlocal largest
        largest = max([largest, *(len(f) for f in server.hub.feeds.values())])

    t0 = time.perf_counter()
    payload = "x" * 200
    for batch in range(total // 1000):
        await log(services, deploy_id, *[f"{batch}-{i} {payload}" for i in range(1000)])
        sample()
    await eventually(lambda: (sample(), reader.done())[1], within=30, what="healthy reader")
    await reader
    elapsed = time.perf_counter() - t0
    assert 0 < largest <= stream_options.window
    # The frozen one was dropped once a send waited longer than send_timeout.
    await eventually(lambda: server.hub.subscriber_count == 0, within=10, what="frozen dropped")
    frozen.close()
    print(
        f"\n{total} lines (~{total * 260 // 1_000_000} MB) to a healthy client in {elapsed:.2f}s "
        "beside a frozen one"
    )


# ---------------------------------------------------------------- keep-alive and release


@pytest.mark.parametrize("stream_options", [StreamOptions(ping=0.2, send_timeout=5.0)])
async def test_keep_alive_comment_when_idle_and_disconnect_releases(
    server: Server, services: Services
) -> None:
    deploy_id = await request(services)
    seen: list[Message] = []
    async with server.client.stream(
        "GET", stream_url(deploy_id), headers=server.headers("ann")
    ) as r:
        async for m in messages(r, comments=True):
            seen.append(m)
            if sum(1 for s in seen if s.event == "comment") >= 2:
                break
        assert server.hub.subscriber_count == 1
    assert seen[0].event == "Requested"
    assert [s.data for s in seen[1:]] == ["ping", "ping"]
    await eventually(lambda: server.hub.subscriber_count == 0, within=5, what="release")

    # The global feed too.
    async with server.client.stream("GET", "/events/stream", headers=server.headers("root")) as r:
        async for m in messages(r, comments=True):
            if m.event == "comment":
                break
        assert server.hub.subscriber_count == 1
    await eventually(lambda: server.hub.subscriber_count == 0, within=5, what="release")


def test_default_keep_alive_is_at_most_15_seconds() -> None:
    assert 0 < StreamOptions().ping <= 15


# ---------------------------------------------------------------- auth


async def test_stream_auth(server: Server, services: Services) -> None:
    deploy_id = await request(services, owner="ann", max_attempts=1)
    await start(services, deploy_id)
    await fail(services, deploy_id)  # a finished deploy: its stream ends by itself
    url = stream_url(deploy_id)
    c = server.client

    assert (await c.get(url)).status_code == 401
    assert (await c.get(url, headers=server.headers("bob"))).status_code == 404
    assert (await c.get(stream_url("nope"), headers=server.headers("ann"))).status_code == 404
    assert (
        await c.get(
            stream_url("00000000-0000-0000-0000-000000000000"), headers=server.headers("ann")
        )
    ).status_code == 404
    # Owner and admin, by header or by ?access_token= (EventSource).
    for token in (server.tokens["ann"], server.tokens["root"]):
        got = await collect(server, f"{url}?access_token={token}", user=None)
        assert got[-1].event == "end"
    assert len(await collect(server, url, user="root")) == 4

    # A revoked token is refused when connecting.
    async with services.pool.connection() as conn:
        gone = await create_token(conn, "carl", admin=True)
        await revoke_token(conn, max(t["id"] for t in await list_tokens(conn)))
    response = await c.get(url, params={"access_token": gone})
    assert response.status_code == 401
    assert response.json() == {"status_code": 401, "detail": "invalid token"}
    response = await c.get("/events/stream", params={"access_token": gone})
    assert response.status_code == 401

    # The global feed: admin only.
    assert (await c.get("/events/stream")).status_code == 401
    response = await c.get("/events/stream", headers=server.headers("ann"))
    assert response.status_code == 403 and response.json()["status_code"] == 403
    got = await collect(
        server, f"/events/stream?access_token={server.tokens['root']}", user=None, count=4
    )
    # ann's "default" was claimed by the deploy: its WorkspaceCreated, in the workspace's stream.
    assert [m.event for m in got] == ["WorkspaceCreated", "Requested", "Started", "Failed"]
    assert got[0].json["stream"] == "workspace" and got[0].json["deploy_id"] is None
    for garbage in ("x", "1.2", "-3"):
        response = await c.get("/events/stream", headers=server.headers("root", garbage))
        assert response.status_code == 400


async def test_streams_are_in_the_openapi_document(server: Server) -> None:
    response = await server.client.get("/schema/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/deploys/{deploy_id}/stream" in paths and "/events/stream" in paths


# ---------------------------------------------------------------- the global feed


async def test_events_stream_gap_free_ordered_and_resumable_under_concurrent_writers(
    server: Server, services: Services
) -> None:
    before = await request(services, owner="bob")  # an event from before the client
    rng = random.Random(7)

    async def writer(k: int) -> None:
        for _ in range(4):
            deploy_id = await request(services, owner=rng.choice(["ann", "bob"]), max_attempts=2)
            await start(services, deploy_id)
            await fail(services, deploy_id)
            await start(services, deploy_id)
            await (succeed if k % 2 else fail)(services, deploy_id)

    received: list[Message] = []
    reconnects = 0

    async def reader() -> None:
        nonlocal reconnects
        last: str | None = None
        while True:
            take = rng.randint(1, 9)
            use_query = rng.random() < 0.3
            headers = server.headers("root", None if use_query else last)
            params = {"last_event_id": last} if use_query and last else None
            async with server.client.stream(
                "GET", "/events/stream", headers=headers, params=params
            ) as r:
                assert r.status_code == 200
                n = 0
                async for m in messages(r):
                    received.append(m)
                    last = m.id
                    if m.json["data"].get("workspace") == "sentinel":
                        return  # appended after every writer finished: nothing follows
                    n += 1
                    if n >= take:
                        break
            reconnects += 1

    async def writers_then_sentinel() -> None:
        await asyncio.gather(*(writer(k) for k in range(6)))
        await request(services, owner="root", workspace="sentinel")

    await asyncio.wait_for(asyncio.gather(writers_then_sentinel(), reader()), 60)

    async with services.pool.connection() as conn:
        cur = await conn.execute("SELECT position, type FROM events ORDER BY position")
        rows = await cur.fetchall()
    assert [int(m.id or 0) for m in received] == [r[0] for r in rows]  # all, once, in order
    assert [m.event for m in received] == [r[1] for r in rows]
    # The first: the WorkspaceCreated of bob's "default" (a workspace stream: no deploy_id),
    # then its Requested.
    assert (received[0].event, received[0].json["deploy_id"]) == ("WorkspaceCreated", None)
    assert received[1].json["deploy_id"] == before
    for m in received:
        assert m.json["position"] == int(m.id or 0) and m.json["type"] == m.event
    assert reconnects > 10
    await eventually(lambda: server.hub.subscriber_count == 0, what="release")


# ---------------------------------------------------------------- the hub alone


async def test_hub_wakes_by_deploy_and_all(database_url: str) -> None:
    hub = Hub(database_url, poll_interval=60)
    a, b, everything = hub.subscribe("a"), hub.subscribe("b"), hub.subscribe(None)
    try:
        for sub in (a, b, everything):  # a fresh subscription starts awake
            assert await sub.wait(0)
        assert await hub.start(within=5)
        for sub in (a, b, everything):  # woken once when LISTEN took effect
            assert await sub.wait(1)
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute("SELECT pg_notify('tfdeploy_logs', 'a 1')")
            assert await a.wait(2)
            assert not await b.wait(0.1) and not await everything.wait(0.1)
            await conn.execute("SELECT pg_notify('tfdeploy_events', '9 b 1')")
            assert await b.wait(2) and await everything.wait(2)
            assert not await a.wait(0.1)
        assert hub.subscriber_count == 3
        a.close()
        a.close()
        assert hub.subscriber_count == 2
    finally:
        b.close()
        everything.close()
        await hub.close()
    assert hub.subscriber_count == 0 and not hub.connected.is_set()


async def test_hub_polls_while_the_database_is_unreachable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub = Hub(f"postgresql://x@127.0.0.1:{port}/x", poll_interval=0.1, max_backoff=0.2)
    with hub.subscribe("d") as sub:
        assert await sub.wait(0)
        wakes = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            if await sub.wait(0.3):
                wakes += 1
        assert wakes >= 5 and not hub.connected.is_set()
    await hub.close()


@pytest.mark.parametrize("stream_options", [StreamOptions(ping=15.0, send_timeout=5.0, auth_recheck=0.2)])
async def test_an_open_stream_ends_when_its_token_is_revoked(
    server: Server, services: Services
) -> None:
    deploy_id = await request(services)
    # An admin's token: it sees ann's deploy and the global feed.
    async with services.pool.connection() as conn:
        token = await create_token(conn, "eve", admin=True)
    for path in (stream_url(deploy_id), "/events/stream"):
        ended = asyncio.Event()

        async def follow(path: str = path, ended: asyncio.Event = ended) -> list[Message]:
            got: list[Message] = []
            async with server.client.stream(
                "GET", path, headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status_code == 200
                async for m in messages(r):
                    got.append(m)
            ended.set()
            return got

        task = asyncio.create_task(follow())
        await eventually(lambda: server.hub.subscriber_count == 1, within=10, what="subscribed")
        assert not ended.is_set()
        async with services.pool.connection() as conn:
            await conn.execute(
                "UPDATE api_tokens SET revoked_at = now()"
                " WHERE user_id = (SELECT id FROM users WHERE name = 'eve')"
            )
        got = await asyncio.wait_for(task, 10)  # the stream ends by itself
        assert got and got[0].event in ("Requested", "WorkspaceCreated")
        await eventually(lambda: server.hub.subscriber_count == 0, within=5, what="release")
        async with services.pool.connection() as conn:  # live again for the next path
            await conn.execute(
                "UPDATE api_tokens SET revoked_at = NULL"
                " WHERE user_id = (SELECT id FROM users WHERE name = 'eve')"
            )


def test_a_log_message_is_written_as_sse_starlette_would_write_it() -> None:
    """encode_line formats log messages itself (it is most of a flood's work); byte for byte
    what message() gives, whatever the line holds."""
    import msgspec

    from service.api.feeds import LogOut, encode_line, message

    for text in ("plain", 'quotes " and \\ back', "cr\rlf\ncrlf\r\n", "\u2028\u2029 \x00 \x1b[1m",
                 "한국어 ✓", "data: fake\n\nid: 9", ""):
        line = LogOut(seq=12, attempt=2, stream="stderr", line=text, after_version=3)
        expected = message(msgspec.json.encode(line).decode(), event="log", id="3.12").encode()
        assert encode_line(line) == expected, text
