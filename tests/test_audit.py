"""The audit trail: GET /events against brute force, pagination while events are appended, the
time filters when the clock steps back, the auditors' SQL views (and every SQL block of
docs/audit.md), and the metrics' presence and movement.

Nothing here asserts on timings; bench/audit.py measures speed.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import msgspec
import psycopg
import pytest
from psycopg.types.json import Jsonb

from service import store, workspaces
from service.api.events import audit_page
from service.deploys import NewDeploy
from service.lifecycle import (
    AttemptFailed,
    AttemptInterrupted,
    AttemptSucceeded,
    Cancel,
    PersistedState,
    Replay,
    StartAttempt,
    StateNotPersisted,
)
from service.notify import hub_of
from service.services import Services

ROOT = Path(__file__).resolve().parent.parent
MAIN_TF = 'resource "null_resource" "x" {}\n'
ACTOR_RE = re.compile(r"^(user|admin|worker):[^\s:]+$")
# Memberships populate() grants: (workspace ref, member, role).
MEMBERS = (("ann:big", "cat", "deploy"), ("bob:shared", "ann", "read"), ("cat:w-cat", "bob", "read"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def persisted(workspace: str, version: int = 1) -> PersistedState:
    return PersistedState(
        workspace=workspace,
        store="postgres",
        location="postgres",
        serial=version,
        lineage="l",
        sha256="0" * 64,
        size=2,
        state_version=version,
    )


async def request(services: Services, owner: str, workspace: str, max_attempts: int = 2) -> str:
    """A deploy by ``owner`` to ``workspace``: their own name, or ``other:name`` (a workspace
    they are a member of)."""
    new = NewDeploy(
        workspace=workspace, action="apply", files={"main.tf": MAIN_TF}, max_attempts=max_attempts
    )
    target = None
    if ":" in workspace:
        async with services.pool.connection() as conn:
            target = await workspaces.find(conn, *workspace.split(":"))
        assert target is not None
    view, _ = await services.deploys.request(
        new, owner=owner, actor=f"user:{owner}", workspace=target
    )
    return view.id


async def drive(services: Services, deploy_id: str, story: str, worker: str) -> None:
    """Take a queued deploy through one of a few stories, as the worker and people would."""
    w = f"worker:{worker}"
    run = services.deploys.execute
    if story == "succeed":
        await run(deploy_id, StartAttempt(worker=worker), w)
        await run(deploy_id, AttemptSucceeded(state=persisted("x")), w)
    elif story == "fail":  # max_attempts=2: Failed, Retried, Failed(final)
        for _ in range(2):
            await run(deploy_id, StartAttempt(worker=worker), w)
            await run(deploy_id, AttemptFailed(reason="apply_failed", message="boom"), w)
    elif story == "replayed":
        await drive(services, deploy_id, "fail", worker)
        await run(deploy_id, Replay(by="admin:root", budget=1), "admin:root")
        await run(deploy_id, StartAttempt(worker=worker), w)
        await run(deploy_id, AttemptSucceeded(state=persisted("x")), w)
    elif story == "cancel_queued":
        view = await services.deploys.get(deploy_id)
        assert view is not None
        await run(deploy_id, Cancel(by=f"user:{view.owner}"), f"user:{view.owner}")
    elif story == "admin_cancels_running":
        await run(deploy_id, StartAttempt(worker=worker), w)
        await run(deploy_id, Cancel(by="admin:root"), "admin:root")
        await run(deploy_id, AttemptInterrupted(state=None), w)
    elif story == "state_lost":
        await run(deploy_id, StartAttempt(worker=worker), w)
        await run(deploy_id, StateNotPersisted(message="store down", destroyed=True), w)
    elif story != "queued":  # pragma: no cover
        raise ValueError(story)


STORIES = (
    "succeed",
    "fail",
    "replayed",
    "cancel_queued",
    "admin_cancels_running",
    "state_lost",
    "queued",
)


async def populate(services: Services, owner_url: str, seed: int = 5) -> list[str]:
    """~50 deploys of ann, bob and cat in workspaces of different sizes (ann's "big" has many),
    a few members (MEMBERS), and cat deploying to ann:big as a member."""
    rng = random.Random(seed)
    ids = []
    # Each workspace made first (its WorkspaceCreated), then the members (MemberSet events).
    for owner, workspace in (("ann", "big"), ("bob", "shared"), ("cat", "w-cat")):
        deploy_id = await request(services, owner, workspace)
        await drive(services, deploy_id, "succeed", "w1")
        ids.append(deploy_id)
    async with services.pool.connection() as conn:  # members are users
        for user in ("ann", "bob", "cat"):
            await conn.execute("INSERT INTO users (name) VALUES (%s) ON CONFLICT DO NOTHING", (user,))
    for ref, user, role in MEMBERS:
        async with services.pool.connection() as conn:
            ws = await workspaces.find(conn, *ref.split(":"))
        assert ws is not None
        await workspaces.set_member(services.pool, ws, user, role, f"user:{ws.owner}")  # type: ignore[arg-type]
    plan = (
        [("ann", "big")] * 15
        + [("bob", "big")] * 4
        + [("ann", "shared")] * 4
        + [("bob", "shared")] * 3
        + [("bob", "w-bob")] * 6
        + [("ann", "w-ann")] * 5
        + [("cat", "w-cat")] * 2
        + [("cat", "big")] * 2
        + [("cat", "ann:big")] * 3
    )
    rng.shuffle(plan)
    for i, (owner, workspace) in enumerate(plan):
        deploy_id = await request(services, owner, workspace)
        await drive(services, deploy_id, STORIES[i % len(STORIES)], f"w{i % 3 + 1}")
        ids.append(deploy_id)
    # A settled reltuples, so the cut-off stays put (only the table's owner may ANALYZE it).
    async with await psycopg.AsyncConnection.connect(owner_url, autocommit=True) as conn:
        await conn.execute("ANALYZE deploys")
    return ids


class World(msgspec.Struct, kw_only=True):
    """Every event (position order) and who may see what."""

    events: list[dict[str, Any]]
    deploys: dict[str, tuple[str, str]]  # id -> (requester, workspace id)
    workspaces: dict[str, tuple[str, str]]  # id -> (owner, name)
    members: dict[str, dict[str, str]]  # workspace id -> {user: role}

    def ws_id(self, ref: str) -> str | None:
        owner, _, name = ref.partition(":")
        return next((i for i, w in self.workspaces.items() if w == (owner, name)), None)

    def readable(self, user: str) -> set[str]:
        return {
            i for i, (o, _) in self.workspaces.items() if o == user or user in self.members.get(i, {})
        }


async def everything(services: Services) -> World:
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT position, deploy_id::text, type, actor, recorded_at, stream_kind"
            " FROM events ORDER BY position"
        )
        cols = ("position", "deploy_id", "type", "actor", "recorded_at", "stream")
        events = [dict(zip(cols, row, strict=True)) for row in await cur.fetchall()]
        cur = await conn.execute("SELECT id::text, owner, workspace_id::text FROM deploys")
        deploys = {row[0]: (row[1], row[2]) for row in await cur.fetchall()}
        cur = await conn.execute("SELECT id::text, owner, name FROM workspaces")
        spaces = {row[0]: (row[1], row[2]) for row in await cur.fetchall()}
        cur = await conn.execute("SELECT workspace_id::text, user_name, role FROM workspace_members")
        members: dict[str, dict[str, str]] = {}
        for ws, user, role in await cur.fetchall():
            members.setdefault(ws, {})[user] = role
    return World(events=events, deploys=deploys, workspaces=spaces, members=members)


def brute(world: World, f: dict[str, Any], viewer: str | None) -> list[int] | None:
    """The positions GET /events answers ``viewer`` (None: an admin) for filters ``f``; None
    when it answers 404 (a workspace ref they may not see)."""
    ws = ws_stream = None
    if "workspace" in f:
        ws = world.ws_id(f["workspace"])
        if ws is None or (viewer is not None and ws not in world.readable(viewer)):
            return None
        ws_stream = viewer is None or world.workspaces[ws][0] == viewer

    def visible(e: dict[str, Any]) -> bool:
        if e["stream"] == "workspace":
            if ws is not None and not (ws_stream and e["deploy_id"] == ws):
                return False
            return viewer is None or world.workspaces[e["deploy_id"]][0] == viewer
        requester, in_ws = world.deploys[e["deploy_id"]]
        if ws is not None and in_ws != ws:
            return False
        return viewer is None or requester == viewer or in_ws in world.readable(viewer)

    return [
        e["position"]
        for e in world.events
        if visible(e)
        and ("deploy_id" not in f or e["deploy_id"] == f["deploy_id"])
        and ("type" not in f or e["type"] == f["type"])
        and ("actor" not in f or e["actor"] == f["actor"])
        and ("since" not in f or e["recorded_at"] >= f["since"])
        and ("until" not in f or e["recorded_at"] < f["until"])
        and ("after" not in f or e["position"] > f["after"])
    ]


def scope_size(world: World, f: dict[str, Any], viewer: str | None) -> int | None:
    """How many streams audit_page's scope holds (None: no scope, every event is read)."""
    if "workspace" in f:
        ws = world.ws_id(f["workspace"])
        own = viewer is None or world.workspaces[ws or ""][0] == viewer
        return sum(w == ws for _, w in world.deploys.values()) + own
    if viewer is None:
        return None
    readable = world.readable(viewer)
    return sum(o == viewer or w in readable for o, w in world.deploys.values()) + sum(
        o == viewer for o, _ in world.workspaces.values()
    )


def query_of(f: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in f.items()}


async def pages(
    client: httpx.AsyncClient, token: str, f: dict[str, Any], limit: int
) -> list[int] | None:
    """Follow ``next`` to the end; checks each page's shape and order on the way. None when the
    answer is 404 (a workspace the caller may not see)."""
    query = {**query_of(f), "limit": limit}
    out: list[int] = []
    for _ in range(10_000):
        response = await client.get("/events", headers=bearer(token), params=query)
        if response.status_code == 404 and "workspace" in f:
            assert response.json()["detail"] == "workspace not found"
            return None
        assert response.status_code == 200, (f, response.text)
        body = response.json()
        items = body["items"]
        assert len(items) <= limit
        out.extend(e["position"] for e in items)
        if body["next"] is None:
            return out
        assert items and body["next"] == items[-1]["position"]
        query["after"] = body["next"]
    raise AssertionError("pagination did not end")  # pragma: no cover


async def cutoff(services: Services, limit: int) -> float:
    """The scope size up to which audit_page joins (queries.sql), for coverage checks."""
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT ceil(sqrt(%s * greatest(reltuples, 1) / 4)) FROM pg_class WHERE oid = 'deploys'::regclass",
            (limit,),
        )
        row = await cur.fetchone()
    return float(row[0]) if row else 0.0


# ---------------------------------------------------------------- every filter combination


async def test_every_filter_combination_over_http_matches_brute_force(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient, owner_database_url: str
) -> None:
    ids = await populate(services, owner_database_url)
    world = await everything(services)
    events = world.events
    assert len(events) > 150
    # Every event records who did it: a user, an admin or a worker.
    assert all(ACTOR_RE.match(e["actor"]) for e in events)
    assert {e["actor"].split(":")[0] for e in events} == {"user", "admin", "worker"}
    assert {e["stream"] for e in events} == {"deploy", "workspace"}

    times = [e["recorded_at"] for e in events]
    positions = [e["position"] for e in events]
    busiest = max(ids, key=lambda d: sum(e["deploy_id"] == d for e in events))
    bobs = next(d for d in ids if world.deploys[d][0] == "bob")
    anns_big = world.ws_id("ann:big")
    n = len(events)
    choices: dict[str, list[Any]] = {
        "deploy_id": [busiest, bobs, str(uuid4()), anns_big],
        # refs: owned, a member's, another's, and one nobody has
        "workspace": ["ann:big", "bob:shared", "bob:w-bob", "cat:w-cat", "bob:big", "ann:nope"],
        "type": [
            "Failed", "Requested", "Retried", "Cancelled", "Started", "CancelRequested",
            "MemberSet", "WorkspaceCreated",
        ],
        "actor": ["worker:w1", "admin:root", "user:ann", "user:bob", "user:nobody", "user:cat"],
        # on an event's own time: since is inclusive, until exclusive
        "since": [times[n // 3], times[0], times[-1] + timedelta(microseconds=1), times[n // 2]],
        "until": [
            times[2 * n // 3],
            times[-1],
            times[0],
            times[n // 2] + timedelta(microseconds=1),
        ],
        "after": [positions[n // 2], 0, positions[-1], positions[n // 5]],
    }
    keys = list(choices)
    principals = [("root", None), ("ann", "ann"), ("bob", "bob"), ("cat", "cat")]
    checked = nonempty = refused = 0
    small_limit = 3
    big_scope = await cutoff(services, small_limit)
    modes: set[str] = set()
    rng = random.Random(7)

    def matching(viewer: str | None) -> dict[str, Any]:
        """Values of every filter that one event visible to ``viewer`` matches."""
        e = rng.choice([e for e in events if e["position"] in (brute(world, {}, viewer) or [])])
        in_ws = e["deploy_id"] if e["stream"] == "workspace" else world.deploys[e["deploy_id"]][1]
        owner, name = world.workspaces[in_ws]
        return {
            "deploy_id": e["deploy_id"],
            "workspace": f"{owner}:{name}",
            "type": e["type"],
            "actor": e["actor"],
            "since": rng.choice([t for t in times if t <= e["recorded_at"]]),
            "until": rng.choice(
                [t for t in times if t > e["recorded_at"]] or [e["recorded_at"] + timedelta(1)]
            ),
            "after": rng.choice([p for p in positions if p < e["position"]] or [0]),
        }

    for size in range(len(keys) + 1):
        for j, subset in enumerate(itertools.combinations(keys, size)):  # all 128 subsets
            for k, (user, viewer) in enumerate(principals):
                # Two value sets per subset and user: rotating through the choices (often
                # matching nothing), and values that some event the user may see matches.
                rotating = {
                    key: choices[key][(j + k + i) % len(choices[key])]
                    for i, key in enumerate(subset)
                }
                one = matching(viewer)
                for variant, f in enumerate((rotating, {key: one[key] for key in subset})):
                    expect = brute(world, f, viewer)
                    whole = await pages(client, tokens[user], f, 1000)
                    assert whole == expect, (user, f)
                    checked += 1
                    nonempty += bool(expect)
                    refused += expect is None
                    # Small pages too, for a share of them: keyset pagination, and the scope
                    # join (small scope) or scan (large) that the limit decides between.
                    if (j + k + variant) % 4 or expect is None:
                        continue
                    assert await pages(client, tokens[user], f, small_limit) == expect, (user, f)
                    size_ = scope_size(world, f, viewer)
                    if size_ is not None:
                        modes.add("scan" if size_ > big_scope else "join")
    assert checked == 2 * 128 * len(principals)
    assert nonempty > checked // 3  # not a vacuous comparison
    assert 0 < refused < checked // 4  # some refs were not the user's to see: 404
    assert modes == {"scan", "join"}


async def test_event_fields_and_bad_parameters(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    d = await request(services, "ann", "w")
    await drive(services, d, "replayed", "w1")
    body = (await client.get("/events", headers=bearer(tokens["ann"]))).json()
    assert body["next"] is None
    created, first = body["items"][:2]
    assert set(first) >= {
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
    assert first["type"] == "Requested" and first["actor"] == "user:ann" and first["version"] == 1
    assert first["stream"] == "deploy" and first["deploy_id"] == d
    # The claim of ann's "w", in the workspace's own stream.
    assert (created["type"], created["stream"], created["deploy_id"]) == (
        "WorkspaceCreated", "workspace", None
    )
    assert created["workspace_id"] == first["workspace_id"] and created["version"] == 1
    replay = [e for e in body["items"] if e["type"] == "Retried" and e["data"]["by"] == "admin"]
    assert [e["actor"] for e in replay] == ["admin:root"]
    for params in ({"until": "soon"}, {"since": "2025-13-01"}, {"deploy_id": "x"}, {"after": "-1"}):
        response = await client.get("/events", headers=bearer(tokens["ann"]), params=params)
        assert response.status_code in (400, 422), params


# ---------------------------------------------------------------- pagination under appends


async def test_pagination_stays_exact_while_events_are_appended(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient, owner_database_url: str
) -> None:
    """Readers page through filtered views while writers append; following ``next`` (and, once
    the writers stop, reading on from the last position) sees every matching event exactly once,
    in position order -- the ones that existed before, and the ones appended meanwhile."""
    await populate(services, owner_database_url, seed=9)
    finished = asyncio.Event()

    async def writer(i: int) -> None:
        rng = random.Random(i)
        for _ in range(15):  # about 70 events per writer
            owner, workspace = rng.choice(
                [("ann", "big"), ("bob", "big"), ("bob", "w-bob"), ("cat", "w-cat")]
            )
            d = await request(services, owner, workspace)
            await drive(services, d, rng.choice(STORIES), f"w{i}")

    async def reader(user: str, f: dict[str, Any], limit: int) -> tuple[list[int], int]:
        seen: list[int] = []
        query = {**f, "limit": limit}
        reads_while_writing = 0
        while True:
            writers_done = finished.is_set()  # then this read sees every append
            reads_while_writing += not writers_done
            response = await client.get("/events", headers=bearer(tokens[user]), params=query)
            assert response.status_code == 200
            body = response.json()
            seen.extend(e["position"] for e in body["items"])
            if body["items"]:
                query["after"] = body["items"][-1]["position"]
            if body["next"] is None:
                if writers_done:
                    return seen, reads_while_writing
                await asyncio.sleep(0.01)  # caught up with the writers: wait for more

    views = [
        ("root", {}, 4),
        ("root", {"type": "Started"}, 2),
        ("root", {"workspace": "ann:big"}, 3),
        ("ann", {}, 3),
        ("bob", {"workspace": "bob:big"}, 2),
        ("cat", {"workspace": "ann:big"}, 2),  # a member's view
        ("root", {"actor": "worker:w1"}, 5),
    ]
    writers = [asyncio.create_task(writer(i)) for i in (1, 2, 3)]
    readers = [asyncio.create_task(reader(u, f, lim)) for u, f, lim in views]
    await asyncio.gather(*writers)
    finished.set()
    results = await asyncio.gather(*readers)
    world = await everything(services)
    viewers = {"root": None, "ann": "ann", "bob": "bob", "cat": "cat"}
    for (user, f, _), (seen, reads_while_writing) in zip(views, results, strict=True):
        assert reads_while_writing > 5, (user, f)  # the pages really were read among the appends
        assert seen == sorted(set(seen)), (user, f)  # in order, nobody twice
        assert seen == brute(world, f, viewers[user]), (user, f)  # and nothing missed


# ---------------------------------------------------------------- the time filters and the clock


async def test_time_filters_are_exact_when_the_clock_steps_back_less_than_a_day(
    services: Services,
) -> None:
    """The time filters also bound positions, read a day beyond the window (queries.sql): a
    clock that steps back (NTP, a VM restored) by less than a day changes nothing."""
    base = datetime(2025, 3, 1, tzinfo=UTC)
    offsets = []
    t = timedelta(0)
    for i in range(90):
        t += timedelta(minutes=7)
        # The clock steps back three times: each event then is 23 h, 23.5 h and 23.2 h earlier
        # than the latest time recorded before it -- under a day each time.
        t -= {20: timedelta(hours=23), 50: timedelta(hours=4), 70: timedelta(hours=2)}.get(
            i, timedelta(0)
        )
        offsets.append(t)
    deploy_ids = [str(uuid4()) for _ in range(6)]
    spaces = [str(uuid4()) for _ in range(3)]
    async with services.pool.connection() as conn:
        for k, ws in enumerate(spaces):
            await conn.execute(
                "INSERT INTO workspaces (id, owner, name) VALUES (%s, 'ann', %s)", (ws, f"ws{k}")
            )
        for k, d in enumerate(deploy_ids):
            await conn.execute(
                "INSERT INTO deploys (id, owner, workspace, action, status, attempt, max_attempts,"
                " version, created_at, updated_at, workspace_id) VALUES (%s, 'ann', %s, 'apply',"
                " 'queued', 1, 3, 1, now(), now(), %s)",
                (d, f"ws{k % 3}", spaces[k % 3]),
            )
        for i, off in enumerate(offsets):
            d = deploy_ids[i % len(deploy_ids)]
            await conn.execute(
                "INSERT INTO events (deploy_id, version, type, data, actor, recorded_at)"
                " VALUES (%s, %s, 'Started', %s, 'worker:w1', %s)",
                (d, i // len(deploy_ids) + 1, Jsonb({"attempt": 1}), base + off),
            )
        cur = await conn.execute("SELECT max(stepped_back) FROM audit_clock_steps")
        row = await cur.fetchone()
        assert row and timedelta(hours=23) < row[0] < timedelta(days=1)
    world = await everything(services)
    times = sorted({e["recorded_at"] for e in world.events})
    edges = [base - timedelta(days=2), *times[::3], times[-1] + timedelta(seconds=1)]
    edges += [x + timedelta(microseconds=1) for x in times[1::7]]
    async with services.pool.connection() as conn:
        for since, until in itertools.product([None, *edges], [None, *edges[::2]]):
            for viewer, workspace in ((None, None), ("ann", None), ("bob", None), (None, "ann:ws1")):
                f = {
                    k: v
                    for k, v in (("since", since), ("until", until), ("workspace", workspace))
                    if v
                }
                got = await audit_page(
                    conn,
                    after=0,
                    limit=1000,
                    viewer=viewer,
                    workspace_id=world.ws_id(workspace) if workspace else None,
                    **{k: v for k, v in f.items() if k != "workspace"},
                )
                assert [e.position for e in got] == brute(world, f, viewer), f


async def test_a_larger_step_back_shows_in_audit_clock_steps(services: Services) -> None:
    d = str(uuid4())
    now = datetime.now(UTC)
    async with services.pool.connection() as conn:
        for version, at in enumerate((now, now - timedelta(days=2)), start=1):
            await conn.execute(
                "INSERT INTO events (deploy_id, version, type, data, actor, recorded_at)"
                " VALUES (%s, %s, 'Requested', '{}', 'user:ann', %s)",
                (d, version, at),
            )
        cur = await conn.execute("SELECT stepped_back FROM audit_clock_steps")
        assert [r[0] for r in await cur.fetchall()] == [timedelta(days=2)]


# ---------------------------------------------------------------- the auditors' views


async def story_for_views(services: Services) -> dict[str, str]:
    d = {
        "replayed": await request(services, "ann", "web"),
        "cancelled": await request(services, "ann", "web"),
        "admin_cancelled": await request(services, "bob", "api"),
        "state_lost": await request(services, "bob", "api"),
    }
    await drive(services, d["replayed"], "replayed", "w1")
    await drive(services, d["cancelled"], "cancel_queued", "w1")
    await drive(services, d["admin_cancelled"], "admin_cancels_running", "w2")
    await drive(services, d["state_lost"], "state_lost", "w2")
    return d


async def rows(conn: Any, sql: str, *args: Any) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        await cur.execute(sql, args)
        return await cur.fetchall()


async def test_view_deploy_timeline(services: Services) -> None:
    d = await story_for_views(services)
    async with services.pool.connection() as conn:
        timeline = await rows(
            conn,
            "SELECT * FROM audit_deploy_timeline WHERE deploy_id = %s ORDER BY version",
            d["replayed"],
        )
    stream = await services.deploys.stream(d["replayed"])
    assert [r["type"] for r in timeline] == [e.type for e in stream]
    assert [r["version"] for r in timeline] == list(range(1, len(stream) + 1))
    assert {(r["workspace"], r["owner"]) for r in timeline} == {("web", "ann")}
    assert timeline[0]["since_previous"] is None and timeline[0]["since_requested"] == timedelta(0)
    for before, row in itertools.pairwise(timeline):
        assert row["since_previous"] == row["recorded_at"] - before["recorded_at"] >= timedelta(0)
        assert row["since_requested"] == before["since_requested"] + row["since_previous"]
    assert [r["attempt"] for r in timeline if r["type"] == "Started"] == [1, 2, 3]
    assert [r["actor"] for r in timeline if r["type"] == "Retried"] == ["worker:w1", "admin:root"]


async def test_view_attempts(services: Services) -> None:
    d = await story_for_views(services)
    running = await request(services, "cat", "c")
    await services.deploys.execute(running, StartAttempt(worker="w3"), "worker:w3")
    async with services.pool.connection() as conn:
        attempts = await rows(conn, "SELECT * FROM audit_attempts ORDER BY started_position")
    by_deploy: dict[str, list[tuple[Any, ...]]] = {}
    for a in attempts:
        by_deploy.setdefault(str(a["deploy_id"]), []).append(
            (a["attempt"], a["outcome"], a["reason"])
        )
        if a["outcome"] is not None:
            assert a["duration"] == a["ended_at"] - a["started_at"] >= timedelta(0)
    assert by_deploy[d["replayed"]] == [
        (1, "Failed", "apply_failed"),
        (2, "Failed", "apply_failed"),
        (3, "Succeeded", None),
    ]
    assert by_deploy[d["admin_cancelled"]] == [(1, "Cancelled", None)]
    assert by_deploy[d["state_lost"]] == [(1, "Failed", "state_not_persisted")]
    assert d["cancelled"] not in by_deploy  # cancelled while queued: no attempt
    assert by_deploy[running] == [(1, None, None)]
    assert {a["worker"] for a in attempts} == {"worker:w1", "worker:w2", "worker:w3"}


async def test_view_failures_by_day(services: Services) -> None:
    await story_for_views(services)
    async with services.pool.connection() as conn:
        got = await rows(conn, "SELECT * FROM audit_failures_by_day ORDER BY reason")
        cur = await conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date")
        today = (await cur.fetchone())[0]  # type: ignore[index]
    assert [
        (r["day"], r["reason"], r["failed_attempts"], r["failed_deploys"], r["deploys"])
        for r in got
    ] == [
        (today, "apply_failed", 2, 1, 1),  # two failed attempts, the second final; then replayed
        (today, "state_not_persisted", 1, 1, 1),
    ]


async def test_view_interventions(services: Services) -> None:
    d = await story_for_views(services)
    async with services.pool.connection() as conn:
        got = await rows(conn, "SELECT * FROM audit_interventions ORDER BY position")
    assert [
        (r["action"], r["type"], r["actor"], str(r["deploy_id"]), r["owner"], r["on_behalf"])
        for r in got
    ] == [
        ("replay", "Retried", "admin:root", d["replayed"], "ann", True),
        ("cancel", "Cancelled", "user:ann", d["cancelled"], "ann", False),
        ("cancel", "CancelRequested", "admin:root", d["admin_cancelled"], "bob", True),
    ]
    assert got[0]["attempt"] == 3 and got[0]["max_attempts"] == 3


async def test_every_sql_block_of_docs_audit_md_runs(
    services: Services, superuser_database_url: str
) -> None:
    d = await story_for_views(services)
    text = (ROOT / "docs" / "audit.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 5
    # As an administrator (one block creates a role), as auditors run them.
    async with await psycopg.AsyncConnection.connect(superuser_database_url) as conn:
        for block in blocks:
            sql = block.replace("00000000-0000-0000-0000-000000000000", d["replayed"])
            async with conn.transaction(force_rollback=True):
                cur = await conn.execute(sql.encode())
                if cur.description is not None:
                    await cur.fetchall()
    # And the append-only rule the document states holds (the triggers of migration 0001).
    async with services.pool.connection() as conn:
        for statement in ("UPDATE events SET actor = 'x'", "DELETE FROM events", "TRUNCATE events"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                async with conn.transaction():
                    await conn.execute(statement)


async def test_audit_page_is_planned_for_its_own_values(
    services: Services, owner_database_url: str
) -> None:
    """The API runs the audit query with a plan per page, even on a connection that has run it
    often enough for psycopg to prepare it (docs/audit.md)."""
    await populate(services, owner_database_url, seed=3)
    async with services.pool.connection() as conn:
        for i in range(12):
            await audit_page(conn, after=0, limit=5, type="Failed" if i % 2 else None)
        cur = await conn.execute(
            "SELECT coalesce(sum(generic_plans), 0) FROM pg_prepared_statements"
            " WHERE statement LIKE '%%cutoff AS MATERIALIZED%%'"  # the audit query
        )
        assert (await cur.fetchone())[0] == 0  # type: ignore[index]
        # The settings are the query's own: the connection goes back to the pool unchanged.
        cur = await conn.execute(
            "SELECT current_setting('plan_cache_mode'), current_setting('jit')"
        )
        assert await cur.fetchone() != ("force_custom_plan", "off")
    async with services.pool.connection() as conn:  # plain store.audit_page still answers
        assert len(await store.audit_page(conn, after=0, limit=5)) == 5


# ---------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics", headers=bearer(client.admin_token))  # type: ignore[attr-defined]
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(response.text)


@pytest.fixture
def admin_client(client: httpx.AsyncClient, tokens: dict[str, str]) -> httpx.AsyncClient:
    """``client``, with the admin token /metrics needs."""
    client.admin_token = tokens["root"]  # type: ignore[attr-defined]
    return client


async def test_metrics_are_all_there_in_prometheus_format(admin_client: httpx.AsyncClient) -> None:
    response = await admin_client.get("/metrics", headers=bearer(admin_client.admin_token))  # type: ignore[attr-defined]
    text = response.text
    for name, kind in (
        ("tfdeploy_database_up", "gauge"),
        ("tfdeploy_deploys", "gauge"),
        ("tfdeploy_queue_jobs", "gauge"),
        ("tfdeploy_attempts_running", "gauge"),
        ("tfdeploy_workers", "gauge"),
        ("tfdeploy_events_total", "counter"),
        ("tfdeploy_state_store_failures_total", "counter"),
        ("tfdeploy_states_rescued_total", "counter"),
        ("tfdeploy_attempt_duration_seconds", "histogram"),
        ("tfdeploy_sse_subscribers", "gauge"),
        ("tfdeploy_db_pool_connections", "gauge"),
    ):
        assert f"# TYPE {name} {kind}\n" in text, name
        assert f"# HELP {name} " in text, name
    m = parse_metrics(text)
    for outcome in ("succeeded", "failed", "cancelled"):
        assert m[f'tfdeploy_attempt_duration_seconds_bucket{{outcome="{outcome}",le="+Inf"}}'] == 0
        assert m[f'tfdeploy_attempt_duration_seconds_count{{outcome="{outcome}"}}'] == 0
    # Every sample line is "name{labels} number".
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? [0-9.e+-]+", line), line


async def test_metrics_move_with_the_deploys(
    services: Services, admin_client: httpx.AsyncClient
) -> None:
    client = admin_client
    m0 = await scrape(client)  # also where the attempt histogram starts counting
    assert m0["tfdeploy_database_up"] == 1 and m0["tfdeploy_events_total"] == 0

    d = await request(services, "ann", "web", max_attempts=2)
    m1 = await scrape(client)
    assert m1['tfdeploy_deploys{status="queued"}'] == 1
    assert m1['tfdeploy_queue_jobs{state="ready"}'] == 1
    assert m1["tfdeploy_events_total"] == 2  # WorkspaceCreated (ann's "web"), Requested
    assert m1["tfdeploy_attempts_running"] == 0

    await services.deploys.execute(d, StartAttempt(worker="w1"), "worker:w1")
    m2 = await scrape(client)
    assert m2['tfdeploy_deploys{status="queued"}'] == 0
    assert m2['tfdeploy_deploys{status="deploying"}'] == 1
    assert m2["tfdeploy_attempts_running"] == 1
    assert m2["tfdeploy_events_total"] == 3

    # A failure with a retry delay: the next job waits in the queue, scheduled.
    await services.deploys.execute(
        d, AttemptFailed(reason="apply_failed", retry_delay=600), "worker:w1"
    )
    m3 = await scrape(client)
    assert m3["tfdeploy_attempts_running"] == 0
    assert m3['tfdeploy_deploys{status="retrying"}'] == 1
    assert m3['tfdeploy_queue_jobs{state="scheduled"}'] == 1
    assert m3['tfdeploy_attempt_duration_seconds_count{outcome="failed"}'] == 1
    assert m3['tfdeploy_attempt_duration_seconds_bucket{outcome="failed",le="+Inf"}'] == 1
    assert m3['tfdeploy_attempt_duration_seconds_bucket{outcome="failed",le="1"}'] == 1  # quick
    assert m3['tfdeploy_attempt_duration_seconds_sum{outcome="failed"}'] >= 0

    # The retry runs (attempt 2: status retrying while it runs) and loses its state.
    await services.deploys.execute(d, StartAttempt(worker="w2"), "worker:w2")
    m4 = await scrape(client)
    assert m4["tfdeploy_attempts_running"] == 1 and m4['tfdeploy_deploys{status="retrying"}'] == 1
    await services.deploys.execute(
        d,
        StateNotPersisted(
            message="store down", destroyed=False, rescue_location="state_emergency:1"
        ),
        "worker:w2",
    )
    m5 = await scrape(client)
    assert (
        m5["tfdeploy_state_store_failures_total"] == m0["tfdeploy_state_store_failures_total"] + 1
    )
    assert m5["tfdeploy_states_rescued_total"] == 1
    assert m5['tfdeploy_deploys{status="failed"}'] == 1
    assert m5['tfdeploy_attempt_duration_seconds_count{outcome="failed"}'] == 2
    assert (
        m5["tfdeploy_events_total"] == m3["tfdeploy_events_total"] + 3
    )  # Started, Rescued, Failed

    # A success and a cancel of a running attempt land in their own series.
    e = await request(services, "bob", "api")
    await drive(services, e, "succeed", "w1")
    f = await request(services, "bob", "api")
    await drive(services, f, "admin_cancels_running", "w1")
    g = await request(services, "bob", "api")
    await drive(services, g, "cancel_queued", "w1")  # no attempt: not in the histogram
    m6 = await scrape(client)
    assert m6['tfdeploy_attempt_duration_seconds_count{outcome="succeeded"}'] == 1
    assert m6['tfdeploy_attempt_duration_seconds_count{outcome="cancelled"}'] == 1
    assert m6['tfdeploy_deploys{status="cancelled"}'] == 2
    # Counters never go down between scrapes.
    for name, value in m5.items():
        if name.endswith(("_total", "_count")) or "_bucket" in name:
            assert m6[name] >= value, name


async def test_metrics_count_workers_and_sse_subscribers(
    services: Services, admin_client: httpx.AsyncClient
) -> None:
    client = admin_client
    assert (await scrape(client))["tfdeploy_workers"] == 0
    async with services.pool.connection() as conn:
        await conn.execute("INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now())")
        await conn.execute(
            "INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now() - interval '5 minutes')"
        )
    assert (await scrape(client))["tfdeploy_workers"] == 1  # the other one stopped beating

    d = await request(services, "ann", "web")
    hub = hub_of(services)
    before = (await scrape(client))["tfdeploy_sse_subscribers"]
    with hub.subscribe(d), hub.subscribe(None):
        assert (await scrape(client))["tfdeploy_sse_subscribers"] == before + 2
    assert (await scrape(client))["tfdeploy_sse_subscribers"] == before
