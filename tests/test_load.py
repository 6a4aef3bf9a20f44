"""Issue 6, scenario 6 -- load: 500 deploys in a burst, cap 4, real processes end to end.

The API is a real uvicorn process (``tfdeploy serve``), 32 HTTP clients post the deploys at once,
two worker processes (``tfdeploy worker``, local runner) share one data dir and so one set of slot
locks. Then, from the database: every deploy succeeded, the cap held (exactly, from the events),
every stream is a legal run of the state machine, nothing is duplicated, and the read model is
what a rebuild gives. Nothing is asserted on speed; makespan and throughput are printed (-s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import pytest

from service import store
from service.auth import create_token
from service.events import (
    Cancelled,
    CancelRequested,
    Destroyed,
    Failed,
    Requested,
    Retried,
    Started,
    StatePersisted,
    StateRescued,
    Succeeded,
)
from service.lifecycle import (
    INITIAL,
    AttemptFailed,
    AttemptInterrupted,
    AttemptSucceeded,
    Cancel,
    Command,
    DeployState,
    PersistedState,
    Replay,
    RequestDeploy,
    StartAttempt,
    StateNotPersisted,
    decide,
    evolve,
)
from service.projection import StoredEvent, view_of
from service.runners.local import LocalRunner
from service.settings import from_env

ROOT = Path(__file__).resolve().parent.parent
DEPLOYS = 500
WORKSPACES = 125  # 4 deploys each: the workspace lock and the state chain are exercised too
CLIENTS = 32
CAP = 4
WORKERS = 2

TINY = """
resource "terraform_data" "item" {
  input = "%(n)d"
}
"""

# The event that ends an attempt (the run is over and its outcome is recorded).
ENDS_ATTEMPT = ("Succeeded", "Failed", "Cancelled")


# ---------------------------------------------------------------- legality of a stream


def _persisted(e: StatePersisted | None) -> PersistedState | None:
    if e is None:
        return None
    fields = msgspec.structs.asdict(e)
    fields.pop("attempt")
    return PersistedState(**fields)


def command_at(events: Sequence[Any], i: int, state: DeployState) -> tuple[Command, int]:
    """The command that made the events from ``i`` on, and how many it made. Only the grouping
    is inferred here; ``check_stream`` has ``decide`` say whether the command was legal and made
    exactly those events."""
    e = events[i]
    sp = e if isinstance(e, StatePersisted) else None
    nxt = events[i + 1] if sp is not None and i + 1 < len(events) else e
    lead = 1 if sp is not None else 0
    match nxt:
        case Requested():
            return RequestDeploy(
                workspace=e.workspace, action=e.action, max_attempts=e.max_attempts,
                owner=e.owner, files=e.files, variables=e.variables,
                secret_names=e.secret_names,
            ), 1
        case Started():
            return StartAttempt(runner=e.runner, worker=e.worker), 1
        case Succeeded():
            assert sp is not None, "a success without its state"
            return AttemptSucceeded(state=_persisted(sp)), 2  # type: ignore[arg-type]
        case Failed() if nxt.reason == "state_not_persisted" and sp is None:
            return StateNotPersisted(message=nxt.message, destroyed=False), 1
        case Failed():
            retried = events[i + lead + 1] if i + lead + 1 < len(events) else None
            base = 0.0
            if isinstance(retried, Retried) and retried.by == "worker":
                base = retried.delay_seconds / 2.0 ** max(nxt.attempt - 1, 0)
            return AttemptFailed(
                reason=nxt.reason, message=nxt.message, exit_code=nxt.exit_code,
                state=_persisted(sp), retry_delay=base,
            ), lead + 1 + (1 if isinstance(retried, Retried) and not nxt.final else 0)
        case Destroyed() | StateRescued():
            fail = events[i + 1]
            assert isinstance(fail, Failed)
            return StateNotPersisted(
                message=fail.message, destroyed=isinstance(e, Destroyed),
                destroy_message=e.message,
                rescue_location=e.location if isinstance(e, StateRescued) else None,
                rescue_sha256=e.sha256 if isinstance(e, StateRescued) else "",
            ), 2
        case Cancelled() if nxt.attempt is None:
            return Cancel(by=nxt.by), 1
        case Cancelled():
            return AttemptInterrupted(state=_persisted(sp)), lead + 1
        case CancelRequested():
            return Cancel(by=e.by), 1
        case Retried() if e.by == "admin":
            return Replay(by="admin", budget=e.max_attempts - state.attempt), 1
        case _:
            raise AssertionError(f"no command makes {type(e).__name__} here: {events}")


def check_stream(records: Sequence[StoredEvent]) -> DeployState:
    """Fail unless the stream is exactly what ``decide`` answers to some sequence of commands,
    each legal in the state the earlier events (folded with ``evolve``) left. Returns the state."""
    events = [r.event for r in records]
    assert [r.version for r in records] == list(range(1, len(records) + 1)), "versions not 1..n"
    state, i = INITIAL, 0
    while i < len(events):
        command, n = command_at(events, i, state)
        made = decide(command, state)  # raises IllegalTransition if illegal here
        if isinstance(command, RequestDeploy):
            # The workspace (claimed or found) is the shell's fact, not a decision: the shell
            # names it in the Requested event (service/deploys.py).
            made = [
                msgspec.structs.replace(
                    m, workspace_id=events[i].workspace_id, workspace_owner=events[i].workspace_owner
                )
                for m in made
            ]
        assert made == events[i : i + n], f"decide({command}) made {made}, stored {events[i:i + n]}"
        for e in made:
            state = evolve(state, e)
        i += n
    return state


# ---------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TFDEPLOY_")}
    env.update(
        TFDEPLOY_DATABASE_URL=database_url,
        TFDEPLOY_DATA_DIR=str(data_dir),
        TFDEPLOY_RUNNER="local",
        TFDEPLOY_MAX_CONCURRENCY=str(CAP),
        TFDEPLOY_RETRY_DELAY="0.05",
        TFDEPLOY_LOG_LEVEL="warning",
        TFDEPLOY_RATE_LIMIT="100000/s",  # one user's 500 POSTs as fast as they go
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


@contextlib.contextmanager
def processes(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:  # SIGTERM: workers finish what runs (nothing, by now) and exit
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)


def spawn(procs: list[subprocess.Popen[bytes]], args: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "wb") as out:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        ))


async def wait_http(url: str, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    async with httpx.AsyncClient() as c:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get(f"{url}/health")).status_code == 200:
                    return
            assert time.monotonic() < deadline, "the API did not come up"
            await asyncio.sleep(0.2)


class SlotSampler(threading.Thread):
    """Probes the local runner's slot locks (any process's) as often as it can."""

    def __init__(self, runner: LocalRunner) -> None:
        super().__init__(daemon=True)
        self.runner, self.peak, self.samples = runner, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            while not self.done.is_set():
                held = loop.run_until_complete(self.runner.running())
                self.peak, self.samples = max(self.peak, held), self.samples + 1
                self.done.wait(0.01)
        finally:
            loop.close()


# ---------------------------------------------------------------- the test


async def test_500_deploys_in_a_burst_cap_4(database_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = _free_port()
    api = f"http://127.0.0.1:{port}"
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        token = await create_token(conn, "ann")
    with processes(tmp_path) as procs:
        spawn(procs, ["serve", "--host", "127.0.0.1", "--port", str(port)],
              _env(database_url, data_dir), tmp_path / "api.log")
        for w in range(WORKERS):
            spawn(procs, ["worker"], _env(database_url, data_dir), tmp_path / f"worker{w}.log")
        await wait_http(api)
        sampler = SlotSampler(LocalRunner(from_env({}, data_dir=str(data_dir), max_concurrency=CAP)))
        sampler.start()

        todo = list(range(DEPLOYS))
        ids: dict[int, str] = {}
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)

        retried: list[str] = []

        async def client(c: httpx.AsyncClient) -> None:
            while todo:
                n = todo.pop()
                body = {"files": {"main.tf": TINY % {"n": n}}, "workspace": f"load{n % WORKSPACES}"}
                # As a real client would: an Idempotency-Key, and a retry when the connection
                # breaks without an answer. A retry must not make a second deploy -- the checks
                # below would see it (one stream per n, 500 in all).
                headers = {"Idempotency-Key": f"load-{n}"}
                for tries in range(3):
                    try:
                        r = await c.post("/deploys", json=body, headers=headers)
                        break
                    except httpx.TransportError as exc:
                        alive = [p.poll() for p in procs]
                        if tries == 2 or any(code is not None for code in alive):
                            log = (tmp_path / "api.log").read_text(errors="replace")[-4000:]
                            raise AssertionError(
                                f"{exc!r}; exit codes {alive}; API log:\n{log}"
                            ) from exc
                        retried.append(f"{n}: {exc!r}")
                assert r.status_code == 202, r.text
                ids[n] = r.json()["id"]

        t0 = time.perf_counter()
        async with httpx.AsyncClient(
            base_url=api, headers={"Authorization": f"Bearer {token}"}, limits=limits, timeout=60
        ) as c:
            await asyncio.gather(*(client(c) for _ in range(CLIENTS)))
        accepted = time.perf_counter() - t0

        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            deadline = time.monotonic() + 600
            while True:
                cur = await conn.execute(
                    "SELECT count(*) FILTER (WHERE status IN ('succeeded', 'failed', 'cancelled')),"
                    " count(*) FILTER (WHERE status = 'succeeded') FROM deploys"
                )
                ended, succeeded = await cur.fetchone()  # type: ignore[misc]
                if ended >= DEPLOYS:
                    break
                assert all(p.poll() is None for p in procs), "a service process died"
                assert time.monotonic() < deadline, f"only {ended} of {DEPLOYS} ended"
                await asyncio.sleep(0.1)
            makespan = time.perf_counter() - t0
            sampler.done.set()
            sampler.join(10)

            print(
                f"\nload: {DEPLOYS} deploys, {CLIENTS} clients, cap {CAP}, {WORKERS} workers: "
                f"accepted in {accepted:.1f} s ({DEPLOYS / accepted:.0f}/s), "
                f"makespan {makespan:.1f} s, throughput {DEPLOYS / makespan:.1f} deploys/s; "
                f"slots held at most {sampler.peak} ({sampler.samples} samples); "
                f"{len(retried)} POSTs retried after a broken connection {retried[:5]}"
            )
            assert succeeded == DEPLOYS
            assert sampler.peak <= CAP
            await check_events(conn, sorted(ids.values()))
            await check_projection(conn)
            await check_states(conn)


async def _all_events(conn: psycopg.AsyncConnection[Any]) -> list[StoredEvent]:
    async with conn.transaction():
        ids = [r[0] for r in await (await conn.execute("SELECT DISTINCT deploy_id FROM events")).fetchall()]
        out: list[StoredEvent] = []
        for deploy_id in ids:
            out.extend(await store.read_stream(conn, deploy_id))
    return out


async def check_events(conn: psycopg.AsyncConnection[Any], ids: list[str]) -> None:
    events = await _all_events(conn)
    # Positions: unique and gap-free (appends hold the position lock; nothing rolled back).
    positions = sorted(e.position for e in events)
    assert positions == list(range(positions[0], positions[0] + len(positions)))
    # Streams: unique (deploy, version), one Started per attempt, each a legal run.
    streams: dict[str, list[StoredEvent]] = defaultdict(list)
    for e in events:
        if e.stream == "deploy":  # (the workspaces' own streams hold their WorkspaceCreated)
            streams[e.deploy_id].append(e)
    assert sorted(streams) == ids
    assert sorted(e.type for e in events if e.stream == "workspace") == ["WorkspaceCreated"] * WORKSPACES
    assert len({(e.deploy_id, e.version) for e in events}) == len(events)
    for records in streams.values():
        records.sort(key=lambda e: e.version)
        starts = Counter(e.event.attempt for e in records if isinstance(e.event, Started))
        assert all(n == 1 for n in starts.values()), starts
        assert check_stream(records).phase == "succeeded"
        assert [e.type for e in records] == ["Requested", "Started", "StatePersisted", "Succeeded"]
    # The cap, exactly: in global order, never more than CAP attempts between their Started and
    # the event that ends them.
    running = peak = 0
    for e in sorted(events, key=lambda e: e.position):
        if e.type == "Started":
            running += 1
            peak = max(peak, running)
        elif e.type in ENDS_ATTEMPT:
            running -= 1
    assert running == 0
    print(f"load: at most {peak} attempts between Started and their outcome (cap {CAP})")
    assert peak <= CAP


async def check_projection(conn: psycopg.AsyncConnection[Any]) -> None:
    select = (
        "SELECT id, owner, workspace, action, status, attempt, max_attempts, cancel_requested,"
        " state_version, error_reason, error_message, version, created_at, updated_at"
        " FROM deploys ORDER BY id"
    )
    live = await (await conn.execute(select)).fetchall()
    # The live read model against a rebuild from the events (rolled back: nothing changes).
    async with conn.transaction(force_rollback=True):
        assert await store.rebuild_projections(conn) == len(live)
        rebuilt = await (await conn.execute(select)).fetchall()
    assert rebuilt == live
    # And against view_of over each stream, through the store's own read of the read model.
    for row in live:
        stream = await store.read_stream(conn, row[0])
        assert await store.get_deploy(conn, row[0]) == view_of(stream)


async def check_states(conn: psycopg.AsyncConnection[Any]) -> None:
    """One state version per attempt, numbered 1..k per workspace in the order the deploys ran."""
    rows = await (await conn.execute(
        "SELECT workspace, version, deploy_id, attempt FROM state_versions ORDER BY workspace, version"
    )).fetchall()
    assert len(rows) == DEPLOYS
    assert len({(r[2], r[3]) for r in rows}) == DEPLOYS
    per: dict[str, list[int]] = defaultdict(list)
    for workspace, version, _, _ in rows:
        per[workspace].append(version)
    assert len(per) == WORKSPACES
    assert all(v == list(range(1, len(v) + 1)) for v in per.values())


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
