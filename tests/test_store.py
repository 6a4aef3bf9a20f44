"""The event store against a real PostgreSQL: append-only, optimistic concurrency, a gap-free
global feed, the read model written with the append (and rebuilt from the events), the deploy
list's keyset pagination, the audit query and the commit-time NOTIFY.

Every test gets a fresh migrated database (``database_url``) and a pool on it (``pool``).
Event sequences are generated through ``service.lifecycle.decide``, so every stream is legal.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from datetime import datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

import msgspec
import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from service import store
from service.events import MemberSet, PlanChange, PlanSummary, Requested, Started, to_data
from service.lifecycle import (
    STATUSES,
    Approve,
    AttemptFailed,
    AttemptInterrupted,
    AttemptSucceeded,
    Cancel,
    DeployState,
    Discard,
    PersistedState,
    PlanMade,
    Replay,
    RequestDeploy,
    StartAttempt,
    StateNotPersisted,
    decide,
    fold,
    shown_attempt,
    status_of,
)
from service.projection import StoredEvent

# The lock key of the "lock_appends" query (service/sql/queries.sql).
APPEND_LOCK = 7310002

OWNERS = ("alice", "bob", "carol")
WORKSPACES = ("w1", "w2", "w3")
# Memberships made by ``make_workspaces``: (owner, workspace) -> {member: role}.
MEMBERS = {("alice", "w1"): {"bob": "read"}, ("carol", "w2"): {"alice": "deploy", "bob": "read"}}


def ws_id(owner: str, workspace: str) -> str:
    """The id of ``owner``'s workspace ``workspace`` (names are per user)."""
    return str(uuid5(NAMESPACE_URL, f"tfdeploy:{owner}:{workspace}"))


async def make_workspaces(conn: psycopg.AsyncConnection[Any]) -> None:
    """Every owner's w1..w3, the MEMBERS, and their MemberSet events in the workspace streams."""
    async with conn.transaction():
        for owner in OWNERS:
            await conn.execute(
                "INSERT INTO users (name) VALUES (%s) ON CONFLICT DO NOTHING", (owner,)
            )
        for owner in OWNERS:
            for workspace in WORKSPACES:
                await conn.execute(
                    "INSERT INTO workspaces (id, owner, name) VALUES (%s, %s, %s)",
                    (ws_id(owner, workspace), owner, workspace),
                )
        for (owner, workspace), members in MEMBERS.items():
            for user, role in members.items():
                await conn.execute(
                    "INSERT INTO workspace_members (workspace_id, user_name, role) VALUES (%s, %s, %s)",
                    (ws_id(owner, workspace), user, role),
                )
                await store.append_workspace(
                    conn, ws_id(owner, workspace), None, [MemberSet(user=user, role=role)], f"user:{owner}"
                )


def readable(viewer: str) -> set[str]:
    """The workspace ids ``viewer`` may read: owned, or a member of."""
    return {ws_id(viewer, w) for w in WORKSPACES} | {
        ws_id(*key) for key, members in MEMBERS.items() if viewer in members
    }


class Rollback(Exception):
    """Raised inside a transaction to roll it back on purpose."""


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def conn(database_url):
    """An autocommit connection: reads outside transactions, ``conn.transaction()`` for writes."""
    c = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    yield c
    await c.close()


async def connect(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


def requested(owner: str = "alice", workspace: str = "w1", max_attempts: int = 3) -> Requested:
    return Requested(
        workspace=workspace,
        action="apply",
        max_attempts=max_attempts,
        owner=owner,
        files={"main.tf": "a" * 64},
        workspace_id=ws_id(owner, workspace),
        workspace_owner=owner,
    )


def persisted(rng: random.Random, workspace: str) -> PersistedState:
    v = rng.randint(1, 10_000)
    return PersistedState(
        workspace=workspace,
        store="postgres",
        location=f"postgres://{workspace}/{v}",
        serial=v,
        lineage="lineage-1",
        sha256=f"{v:064x}",
        size=100 + v,
        state_version=v,
    )


def candidates(
    state: DeployState,
    rng: random.Random,
    owner: str,
    workspace: str,
    *,
    cancels: bool = True,
    succeed: bool = True,
    max_attempts: tuple[int, int] = (1, 3),
) -> list[tuple[Any, str]]:
    """Commands (with the actor that gives them) that make sense in ``state``."""
    worker = f"worker:w{rng.randint(1, 3)}"
    user = f"user:{owner}"
    match state.phase:
        case "new":
            return [
                (
                    RequestDeploy(
                        workspace=workspace,
                        action=rng.choice(("apply", "destroy", "apply", "plan")),
                        max_attempts=rng.randint(*max_attempts),
                        owner=owner,
                        files={"main.tf": "b" * 64},
                        variables={"region": rng.choice(("kr-1", "kr-2"))},
                        secret_names=rng.choice(([], ["token"])),
                        auto_approve=rng.random() < 0.6,
                    ),
                    user,
                )
            ]
        case "queued":
            out: list[tuple[Any, str]] = [(StartAttempt(runner="local", worker=worker), worker)]
            if cancels:
                out.append((Cancel(by=user), user))
            return out
        case "planned":
            base = state.plan.base_state_version if state.plan else None
            return [
                (Approve(by=user, state_version=base), user),
                (Approve(by=user, state_version=base), user),
                (Discard(by=user), user),
            ]
        case "running" if state.step == "plan" or state.speculative:
            plan = PlanMade(
                summary=PlanSummary(add=1),
                changes=[PlanChange(address="terraform_data.a", type="terraform_data", actions=["create"])],
                changed=rng.random() < 0.8,
                plan_sha256="d" * 64,
                plan_id="" if state.speculative else f"plan:{rng.randint(1, 99)}",
                base_state_version=state.state_version,
            )
            failed = AttemptFailed(reason="apply_failed", step="plan", kind="other", retry_delay=2.0)
            return [(plan, worker), (plan, worker), (failed, worker)]
        case "running":
            failed = AttemptFailed(
                reason=rng.choice(("apply_failed", "timeout", "runner_error")),
                message="boom",
                exit_code=rng.choice((None, 1, 2)),
                state=rng.choice((None, persisted(rng, workspace))),
                retry_delay=2.0,
            )
            out = [(failed, worker), (failed, worker)]
            if succeed:
                out.append((AttemptSucceeded(state=persisted(rng, workspace)), worker))
            destroyed = rng.random() < 0.5
            out.append(
                (
                    StateNotPersisted(
                        message="state store down",
                        destroyed=destroyed,
                        destroy_message="destroyed" if destroyed else "destroy failed",
                        rescue_location=None if destroyed else rng.choice((None, "emergency/1")),
                        rescue_sha256="c" * 64,
                    ),
                    worker,
                )
            )
            if cancels and not state.cancel_requested:
                out.append((Cancel(by=user), user))
            if state.cancel_requested:
                out.append(
                    (
                        AttemptInterrupted(state=rng.choice((None, persisted(rng, workspace)))),
                        worker,
                    )
                )
            return out
        case "failed":
            return [(Replay(by="admin:root", budget=rng.randint(1, 2)), "admin:root")]
    return []


async def step(
    conn: psycopg.AsyncConnection[Any],
    deploy_id: str,
    rng: random.Random,
    owner: str,
    workspace: str,
    **kw: Any,
) -> list[StoredEvent] | None:
    """Read the stream, decide a random legal command, append it (caller's transaction).
    None when the deploy is terminal or the command changed nothing."""
    stream = await store.read_stream(conn, deploy_id)
    state = fold(e.event for e in stream)
    options = candidates(state, rng, owner, workspace, **kw)
    if not options:
        return None
    command, actor = rng.choice(options)
    events = [
        msgspec.structs.replace(e, workspace_id=ws_id(owner, workspace), workspace_owner=owner)
        if isinstance(e, Requested)
        else e
        for e in decide(command, state)
    ]
    if not events:
        return None
    prior = stream if rng.random() < 0.7 else None  # both paths of append()
    return await store.append(conn, deploy_id, len(stream), events, actor, prior=prior)


async def drive(
    pool: Any, count: int, seed: int, concurrency: int = 8
) -> dict[str, tuple[str, str]]:
    """``count`` deploys driven through random legal lifecycles by ``concurrency`` writers.
    Returns deploy id -> (owner, workspace)."""
    rng = random.Random(seed)
    plan = {str(uuid4()): (rng.choice(OWNERS), rng.choice(WORKSPACES)) for _ in range(count)}
    ids = list(plan)
    async with pool.connection() as conn:
        await make_workspaces(conn)

    async def worker(k: int) -> None:
        wrng = random.Random(seed * 100 + k)
        async with pool.connection() as conn:
            for deploy_id in ids[k::concurrency]:
                owner, workspace = plan[deploy_id]
                for _ in range(wrng.randint(1, 9)):
                    state = fold(e.event for e in await store.read_stream(conn, deploy_id))
                    await conn.commit()
                    if state.phase == "failed" and wrng.random() < 0.6:
                        break  # leave some failed, replay others
                    async with conn.transaction():
                        done = await step(conn, deploy_id, wrng, owner, workspace)
                        if done and wrng.random() < 0.3:
                            # a second append in the same transaction, after the first
                            await step(conn, deploy_id, wrng, owner, workspace)
                    if done is None and state.phase != "running":
                        break

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return plan


async def all_events(conn: psycopg.AsyncConnection[Any]) -> list[StoredEvent]:
    return await store.read_all_after(conn, 0, limit=1_000_000)


async def table(conn: psycopg.AsyncConnection[Any], name: str, order: str) -> list[tuple[Any, ...]]:
    cur = await conn.execute(f"SELECT * FROM {name} ORDER BY {order}")
    return await cur.fetchall()


async def waiting_on(conn: psycopg.AsyncConnection[Any], key: int) -> int:
    """How many sessions of this database wait for advisory lock ``key``."""
    cur = await conn.execute(
        """SELECT count(*) FROM pg_locks
           WHERE locktype = 'advisory' AND NOT granted AND classid = 0 AND objid = %s
             AND objsubid = 1 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())""",
        (key,),
    )
    return (await cur.fetchone())[0]


# --------------------------------------------------------------------------- 1. append-only


REFUSED = [
    ("UPDATE events SET actor = 'mallory'", False),
    (
        "UPDATE events SET data = '{}'::jsonb WHERE position = (SELECT min(position) FROM events)",
        False,
    ),
    ("DELETE FROM events", False),
    ("DELETE FROM events WHERE deploy_id = %(d)s", True),
    ("WITH gone AS (DELETE FROM events RETURNING 1) SELECT count(*) FROM gone", False),
    ("TRUNCATE events", False),
    ("TRUNCATE events RESTART IDENTITY CASCADE", False),
    (
        "INSERT INTO events (deploy_id, version, type, data, actor) VALUES (%(d)s, 1, 'Requested', '{}', 'x') "
        "ON CONFLICT (deploy_id, version) DO UPDATE SET actor = 'mallory'",
        True,
    ),
    (
        "MERGE INTO events e USING (SELECT min(position) AS p FROM events) s ON e.position = s.p "
        "WHEN MATCHED THEN UPDATE SET actor = 'mallory'",
        False,
    ),
    (
        "MERGE INTO events e USING (SELECT position AS p FROM events) s ON e.position = s.p "
        "WHEN MATCHED THEN DELETE",
        False,
    ),
]


@pytest.mark.parametrize("in_transaction", [False, True], ids=["autocommit", "transaction"])
async def test_events_refuse_update_delete_truncate(conn, owner_database_url, in_transaction):
    d1, d2 = str(uuid4()), str(uuid4())
    async with conn.transaction():
        await store.append(conn, d1, 0, [requested()], "user:alice")
    async with conn.transaction():
        await store.append(conn, d1, 1, [Started(attempt=1)], "worker:w1")
        await store.append(conn, d2, 0, [requested("bob")], "user:bob")
    before = await table(conn, "events", "position")
    assert len(before) == 3

    # Raw SQL, not through store.py, as the tables' owner: the triggers stop even it (the
    # service role is refused earlier, for want of the privilege: test_database_roles.py).
    raw = await connect(owner_database_url)
    try:
        for sql, with_param in REFUSED:
            params = {"d": d1} if with_param else None
            with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
                if in_transaction:
                    async with raw.transaction():
                        await raw.execute(sql, params)
                else:
                    await raw.execute(sql, params)
            assert await table(raw, "events", "position") == before, sql

        # Appending still works, and positions go on from where they were.
        async with conn.transaction():
            new = await store.append(conn, d2, 1, [Started(attempt=1)], "worker:w1")
        assert new[0].position > before[-1][0]
        assert len(await table(raw, "events", "position")) == 4
    finally:
        await raw.close()


# --------------------------------------------------------------------------- 2. optimistic concurrency


async def _race(
    pool, deploy_id: str, events_for, *, use_prior: bool, hold: float = 0.05
) -> list[Any]:
    """Two writers read the stream, meet at a barrier, then both append at the version they read.
    The first to take the append lock holds it for ``hold`` seconds, so the other one is surely
    waiting for it (its check runs after the winner committed)."""
    barrier = asyncio.Barrier(2)

    async def writer(tag: str) -> Any:
        async with pool.connection() as conn:
            try:
                async with conn.transaction():
                    stream = await store.read_stream(conn, deploy_id)
                    await barrier.wait()
                    new = await store.append(
                        conn,
                        deploy_id,
                        len(stream),
                        events_for(tag),
                        f"worker:{tag}",
                        prior=stream if use_prior else None,
                    )
                    await asyncio.sleep(hold)
                    return new
            except store.VersionConflict as exc:
                return exc

    return await asyncio.gather(writer("a"), writer("b"))


@pytest.mark.parametrize("use_prior", [True, False])
async def test_concurrent_writers_at_the_same_version_exactly_one_wins(pool, conn, use_prior):
    # Creating: both writers expect version 0.
    d = str(uuid4())
    results = await _race(pool, d, lambda tag: [requested(owner=tag)], use_prior=use_prior)
    winners = [r for r in results if isinstance(r, list)]
    losers = [r for r in results if isinstance(r, store.VersionConflict)]
    assert len(winners) == 1 and len(losers) == 1
    assert (losers[0].deploy_id, losers[0].expected, losers[0].actual) == (d, 0, 1)
    stream = await store.read_stream(conn, d)
    assert [(e.version, e.actor) for e in stream] == [(1, winners[0][0].actor)]
    assert (await store.get_deploy(conn, d)).owner == winners[0][0].event.owner

    # An existing stream, several events per append: both expect version 1.
    results = await _race(
        pool,
        d,
        lambda tag: [Started(attempt=1, worker=tag), Started(attempt=2, worker=tag)],
        use_prior=use_prior,
    )
    winners = [r for r in results if isinstance(r, list)]
    losers = [r for r in results if isinstance(r, store.VersionConflict)]
    assert len(winners) == 1 and len(losers) == 1
    assert (losers[0].expected, losers[0].actual) == (1, 3)
    stream = await store.read_stream(conn, d)
    # no gap, no overwrite: versions 1..3, the winner's two events intact
    assert [e.version for e in stream] == [1, 2, 3]
    assert [e.position for e in stream[1:]] == [e.position for e in winners[0]]
    assert {e.event.worker for e in stream[1:]} == {winners[0][0].event.worker}
    view = await store.get_deploy(conn, d)
    assert view.version == 3 and view.attempt == 2

    # The loser reloads and decides again: it lands after the winner.
    async with conn.transaction():
        stream = await store.read_stream(conn, d)
        await store.append(conn, d, len(stream), [Started(attempt=3)], "worker:loser", prior=stream)
    assert [e.version for e in await store.read_stream(conn, d)] == [1, 2, 3, 4]


async def test_append_and_commit_commits_the_whole_transaction_in_one_go(pool, conn, database_url):
    """append_and_commit: the caller's earlier statements, its ``before`` writes, the append and
    the COMMIT land together; a stale version or a failing write commits nothing; the append
    lock is released by the commit."""
    d = str(uuid4())
    async with pool.connection() as c:  # a transaction begun by psycopg, as Deploys does
        await c.execute("INSERT INTO deploy_secrets (deploy_id, ciphertext) VALUES (%s, 'x')", (d,))
        inputs = {"deploy_id": d, "files": Jsonb({"main.tf": "#"}), "variables": Jsonb({}), "sha256": "s"}
        stored = await store.append_and_commit(
            c, d, 0, [requested()], "user:alice", prior=[], before=[("insert_inputs", inputs)]
        )
        assert c.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE  # committed
    assert [(e.version, e.type) for e in stored] == [(1, "Requested")]
    assert await store.read_stream(conn, d) == stored
    view = await store.get_deploy(conn, d)
    assert (view.status, view.version, view.created_at, view.updated_at) == (
        "queued", 1, stored[0].recorded_at, stored[0].recorded_at,
    )
    cur = await conn.execute(
        "SELECT (SELECT count(*) FROM deploy_inputs WHERE deploy_id = %s),"
        " (SELECT count(*) FROM deploy_secrets WHERE deploy_id = %s)", (d, d)
    )
    assert await cur.fetchone() == (1, 1)
    assert await waiting_on(conn, APPEND_LOCK) == 0
    cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
    assert (await cur.fetchone())[0] == 0  # the commit released the append locks

    # A stale expected version: VersionConflict with the actual one, nothing of the
    # transaction commits (the pool's context rolls it back).
    with pytest.raises(store.VersionConflict) as info:
        async with pool.connection() as c:
            await c.execute("INSERT INTO deploy_secrets (deploy_id, ciphertext) VALUES (%s, 'y')", (uuid4(),))
            await store.append_and_commit(c, d, 0, [requested()], "user:alice", prior=[])
    assert (info.value.expected, info.value.actual) == (0, 1)
    cur = await conn.execute("SELECT count(*) FROM deploy_secrets")
    assert (await cur.fetchone())[0] == 1

    # A ``before`` write that fails (here a duplicate input row) takes the append with it.
    with pytest.raises(errors.UniqueViolation):
        async with pool.connection() as c:
            await store.append_and_commit(
                c, d, 1, [Started(attempt=1)], "worker:w1", before=[("insert_inputs", inputs)]
            )
    assert [e.version for e in await store.read_stream(conn, d)] == [1]
    assert (await store.get_deploy(conn, d)).status == "queued"

    # An existing stream, prior read by the store itself: the view keeps the stream's created_at.
    async with pool.connection() as c:
        new = await store.append_and_commit(c, d, 1, [Started(attempt=1)], "worker:w1")
    view = await store.get_deploy(conn, d)
    assert (view.status, view.version, view.created_at, view.updated_at) == (
        "deploying", 2, stored[0].recorded_at, new[0].recorded_at,
    )


async def test_many_rounds_of_racing_writers(pool, conn):
    """Twenty deploys, each raced by two writers at once, without holding the lock artificially."""
    ids = [str(uuid4()) for _ in range(20)]
    rounds = await asyncio.gather(
        *(_race(pool, d, lambda tag: [requested(owner=tag)], use_prior=True, hold=0) for d in ids)
    )
    for results in rounds:
        assert sorted(type(r).__name__ for r in results) == ["VersionConflict", "list"]
    cur = await conn.execute(
        "SELECT deploy_id, count(*), max(version) FROM events GROUP BY deploy_id"
    )
    assert sorted((str(r[0]), r[1], r[2]) for r in await cur.fetchall()) == sorted(
        (d, 1, 1) for d in ids
    )


async def test_repeatable_read_writers_also_get_a_version_conflict(conn, database_url):
    """Under REPEATABLE READ the loser's snapshot predates the winner's commit; the unique
    (deploy_id, version) constraint still refuses it, reported as a VersionConflict."""
    d = str(uuid4())
    async with conn.transaction():
        await store.append(conn, d, 0, [requested()], "user:alice")
    conns = [await psycopg.AsyncConnection.connect(database_url) for _ in range(2)]
    for c in conns:
        await c.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
    barrier = asyncio.Barrier(2)

    async def writer(conn, tag):
        try:
            async with conn.transaction():
                stream = await store.read_stream(conn, d)
                await barrier.wait()
                new = await store.append(
                    conn, d, len(stream), [Started(attempt=1, worker=tag)], tag, prior=stream
                )
                await asyncio.sleep(0.05)
                return new
        except store.VersionConflict as exc:
            return exc

    try:
        results = await asyncio.gather(writer(conns[0], "a"), writer(conns[1], "b"))
    finally:
        for c in conns:
            await c.close()
    assert sorted(type(r).__name__ for r in results) == ["VersionConflict", "list"]
    assert [e.version for e in await store.read_stream(conn, d)] == [1, 2]


@pytest.mark.parametrize("expected", [0, 1, 3, 7])
async def test_stale_or_future_expected_version_is_refused(conn, expected):
    d = str(uuid4())
    async with conn.transaction():
        await store.append(conn, d, 0, [requested(), Started(attempt=1)], "user:alice")
    events_before = await store.read_stream(conn, d)
    view_before = await table(conn, "deploys", "id")
    with pytest.raises(store.VersionConflict) as info:
        async with conn.transaction():
            await store.append(conn, d, expected, [Started(attempt=9)], "worker:late")
    assert (info.value.expected, info.value.actual) == (expected, 2)
    assert await store.read_stream(conn, d) == events_before
    assert await table(conn, "deploys", "id") == view_before

    # A deploy with no events is at version 0: anything else is a conflict too.
    with pytest.raises(store.VersionConflict) as info:
        async with conn.transaction():
            await store.append(conn, str(uuid4()), 1, [requested()], "user:alice")
    assert info.value.actual == 0
    assert len(await all_events(conn)) == 2


# --------------------------------------------------------------------------- 3. the global feed

# Why the feed is gap-free: positions come from an identity sequence, and a sequence hands out
# numbers at INSERT time, not at COMMIT time. Without serialisation, transaction A could take
# position 10, transaction B position 11, B commit first, and a follower reading
# "position > 9" would see 11, move its cursor to 11, and never look at 10 when A commits later
# (test_without_the_lock_a_follower_skips_a_late_commit shows exactly that).
# store.append takes pg_advisory_xact_lock(APPEND_LOCK) before reading the version and taking a
# position, and the lock is released only when the transaction ends (after its commit is visible).
# So position-taking transactions run one at a time: while one holds an uncommitted position N,
# nobody can take N+1, and once anything above N is visible, N is either committed and visible
# or rolled back for good. A reader therefore never sees a position above one that may still commit.


async def test_without_the_lock_a_follower_skips_a_late_commit(database_url):
    """The hazard the append lock removes, shown with raw INSERTs that bypass store.append."""
    a, b, reader = (
        await connect(database_url),
        await connect(database_url),
        await connect(database_url),
    )
    insert = "INSERT INTO events (deploy_id, version, type, data, actor) VALUES (%s, 1, 'Requested', %s, 'x') RETURNING position"
    data = Jsonb(to_data(requested()))
    try:
        async with a.transaction():
            p_a = (await (await a.execute(insert, (uuid4(), data))).fetchone())[0]
            async with b.transaction():
                p_b = (await (await b.execute(insert, (uuid4(), data))).fetchone())[0]
            # b committed, a not yet
            seen = await store.read_all_after(reader, 0)
            assert [e.position for e in seen] == [p_b] and p_a < p_b
            last = seen[-1].position
        # a commits late: a follower at "position > last" never sees it
        assert await store.read_all_after(reader, last) == []
        assert [e.position for e in await store.read_all_after(reader, 0)] == [p_a, p_b]
    finally:
        for c in (a, b, reader):
            await c.close()


async def test_an_append_waits_for_the_uncommitted_one_before_it(pool, database_url):
    """With the lock: while A's append is uncommitted, B's append (another deploy) waits, and a
    follower sees nothing new; when A commits, the follower sees A then B."""
    reader = await connect(database_url)
    appended, release = asyncio.Event(), asyncio.Event()

    async def writer_a() -> list[StoredEvent]:
        async with pool.connection() as conn, conn.transaction():
            new = await store.append(conn, str(uuid4()), 0, [requested()], "user:a")
            appended.set()
            await release.wait()
            return new

    async def writer_b() -> list[StoredEvent]:
        async with pool.connection() as conn, conn.transaction():
            return await store.append(conn, str(uuid4()), 0, [requested()], "user:b")

    try:
        task_a = asyncio.create_task(writer_a())
        await appended.wait()
        task_b = asyncio.create_task(writer_b())
        for _ in range(200):
            if await waiting_on(reader, APPEND_LOCK) == 1:
                break
            await asyncio.sleep(0.01)
        assert await waiting_on(reader, APPEND_LOCK) == 1  # B waits for A's lock
        assert not task_b.done()
        assert await store.read_all_after(reader, 0) == []
        release.set()
        new_a, new_b = await task_a, await task_b
        seen = await store.read_all_after(reader, 0)
        assert [e.position for e in seen] == [new_a[0].position, new_b[0].position]
        assert new_a[0].position < new_b[0].position
    finally:
        release.set()
        await reader.close()


async def test_global_feed_is_gap_free_under_concurrent_writers(pool, conn, database_url):
    writers, txns_per_writer = 16, 26
    shared = [str(uuid4()) for _ in range(4)]
    async with conn.transaction():
        for i, d in enumerate(shared):
            # a big budget: shared deploys cycle through failures and retries for the whole test
            await store.append(
                conn, d, 0, [requested(OWNERS[i % 3], f"shared{i}", max_attempts=1000)], "user:x"
            )

    committed: list[StoredEvent] = await all_events(conn)  # the shared deploys' Requested
    rolled_back: list[StoredEvent] = []
    conflicts = 0
    done = asyncio.Event()

    async def writer(k: int) -> None:
        nonlocal conflicts
        wrng = random.Random(1000 + k)
        owner, workspace = OWNERS[k % 3], f"ws{k}"
        own = str(uuid4())
        async with pool.connection() as wconn:
            finished = 0
            while finished < txns_per_writer:
                share = wrng.random() < 0.4
                deploy_id = wrng.choice(shared) if share else own
                new: list[StoredEvent] | None = None
                try:
                    async with wconn.transaction():
                        if wrng.random() < 0.3:  # widen the read -> append window: more conflicts
                            await store.read_stream(wconn, deploy_id)
                            await asyncio.sleep(wrng.uniform(0, 0.003))
                        new = await step(
                            wconn,
                            deploy_id,
                            wrng,
                            owner,
                            workspace,
                            cancels=not share,
                            succeed=not share,
                        )
                        if new is None:
                            if not share:
                                own = str(uuid4())  # terminal: start another deploy
                            continue
                        if wrng.random() < 0.25:  # hold the lock, commit late
                            await asyncio.sleep(wrng.uniform(0.001, 0.006))
                        if wrng.random() < 0.1:
                            raise Rollback
                    committed.extend(new)
                    finished += 1
                except store.VersionConflict:
                    conflicts += 1
                except Rollback:
                    rolled_back.extend(new or [])

    async def reader() -> list[StoredEvent]:
        seen: list[StoredEvent] = []
        last = 0
        rconn = await connect(database_url)
        try:
            while True:
                writers_finished = done.is_set()  # read before the query: the last pass drains all
                batch = await store.read_all_after(rconn, last, limit=13)
                for e in batch:
                    assert e.position > last, "the feed went backwards"
                    last = e.position
                seen.extend(batch)
                if not batch:
                    if writers_finished:
                        return seen
                    await asyncio.sleep(0.0005)
        finally:
            await rconn.close()

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(k) for k in range(writers)))
    done.set()
    seen = await reading

    assert len(committed) >= 400
    assert conflicts > 0 and rolled_back  # the run did exercise contention and rollbacks
    key = lambda e: (e.position, e.deploy_id, e.version, e.type)  # noqa: E731
    assert [key(e) for e in seen] == sorted(key(e) for e in committed)  # each once, in order
    assert not {e.position for e in rolled_back} & {e.position for e in seen}
    assert [key(e) for e in await all_events(conn)] == [key(e) for e in seen]
    cur = await conn.execute(
        "SELECT deploy_id FROM events GROUP BY deploy_id HAVING max(version) <> count(*)"
    )
    assert await cur.fetchall() == []  # every stream is 1..n, no gap, no overwrite
    live = await table(conn, "deploys", "id")
    async with conn.transaction():
        await store.rebuild_projections(conn)
    assert await table(conn, "deploys", "id") == live


# --------------------------------------------------------------------------- 4. the read model


async def test_read_model_commits_and_rolls_back_with_the_append(conn, database_url):
    d = str(uuid4())
    other = await connect(database_url)
    try:
        # A new deploy, rolled back: neither the events nor the row remain.
        with pytest.raises(Rollback):
            async with conn.transaction():
                await store.append(conn, d, 0, [requested()], "user:alice")
                # written in this transaction: visible here, not to anyone else yet
                assert (await store.get_deploy(conn, d)).status == "queued"
                assert await store.get_deploy(other, d) is None
                assert await store.read_stream(other, d) == []
                raise Rollback
        assert await store.read_stream(conn, d) == []
        assert await store.get_deploy(conn, d) is None
        assert await table(other, "deploys", "id") == []

        async with conn.transaction():
            await store.append(conn, d, 0, [requested()], "user:alice")
        row_before = await table(conn, "deploys", "id")

        # An existing deploy: a rolled-back append leaves the row as it was.
        with pytest.raises(Rollback):
            async with conn.transaction():
                await store.append(conn, d, 1, [Started(attempt=1)], "worker:w1")
                assert (await store.get_deploy(conn, d)).status == "deploying"
                assert (await store.get_deploy(other, d)).status == "queued"
                raise Rollback
        assert [e.version for e in await store.read_stream(conn, d)] == [1]
        assert await table(conn, "deploys", "id") == row_before

        # A failure later in the same transaction takes the append down with it.
        with pytest.raises(errors.UniqueViolation):
            async with conn.transaction():
                await store.append(conn, d, 1, [Started(attempt=1)], "worker:w1")
                for _ in range(2):
                    await conn.execute(
                        "INSERT INTO deploy_inputs (deploy_id, files, sha256) VALUES (%s, '{}', 'x')",
                        (d,),
                    )
        assert [e.version for e in await store.read_stream(conn, d)] == [1]
        assert await table(conn, "deploys", "id") == row_before

        # Committed: both at once.
        async with conn.transaction():
            new = await store.append(conn, d, 1, [Started(attempt=1)], "worker:w1")
        view = await store.get_deploy(other, d)
        assert (view.status, view.version, view.updated_at) == ("deploying", 2, new[0].recorded_at)
        assert [e.version for e in await store.read_stream(other, d)] == [1, 2]
    finally:
        await other.close()


@pytest.mark.parametrize("prior", ["empty", "partial"])
async def test_append_with_an_incomplete_prior_still_writes_the_full_view(conn, prior):
    """``prior`` saves a read, but a prior that is not the whole stream (empty, or read with
    after_version) must not produce a read model folded from a fragment of the stream."""
    d = str(uuid4())
    async with conn.transaction():
        await store.append(conn, d, 0, [requested("bob", "w2")], "user:bob")
        await store.append(conn, d, 1, [Started(attempt=1)], "worker:w1")
    given = [] if prior == "empty" else await store.read_stream(conn, d, after_version=1)
    async with conn.transaction():
        await store.append(conn, d, 2, [Started(attempt=2)], "worker:w1", prior=given)
    live = await table(conn, "deploys", "id")
    assert (live[0][1], live[0][2], live[0][4]) == ("bob", "w2", "retrying")
    async with conn.transaction():
        await store.rebuild_projections(conn)
    assert await table(conn, "deploys", "id") == live


async def test_rebuild_reproduces_the_live_read_model_exactly(pool, conn):
    plan = await drive(pool, count=300, seed=11)
    live = await table(conn, "deploys", "id")
    events_before = await table(conn, "events", "position")
    assert len(live) == 300
    assert len(events_before) > 800
    statuses = {row[4] for row in live}
    assert statuses == set(STATUSES)  # every status is represented

    # The live rows agree with an independent fold of each stream.
    streams: dict[str, list[StoredEvent]] = {}
    for e in await all_events(conn):
        streams.setdefault(e.deploy_id, []).append(e)
    for row in live:
        stream = streams[str(row[0])]
        state = fold(e.event for e in stream)
        assert (row[1], row[2]) == plan[str(row[0])]
        assert (row[4], row[5], row[6], row[11]) == (
            status_of(state),
            shown_attempt(state),
            state.max_attempts,
            len(stream),
        )
        assert (row[12], row[13]) == (stream[0].recorded_at, stream[-1].recorded_at)

    # Rebuild over an intact read model: identical, full rows.
    async with conn.transaction():
        assert await store.rebuild_projections(conn) == 300
    assert await table(conn, "deploys", "id") == live

    # Rebuild over a damaged one: stale, missing and stray rows are all repaired.
    await conn.execute(
        "UPDATE deploys SET status = 'bogus', version = 0 WHERE id IN (SELECT id FROM deploys LIMIT 20)"
    )
    await conn.execute(
        "DELETE FROM deploys WHERE id IN (SELECT id FROM deploys ORDER BY id DESC LIMIT 15)"
    )
    await conn.execute(
        "INSERT INTO deploys (id, owner, workspace, action, status, attempt, max_attempts, version, created_at, updated_at) "
        "VALUES (%s, 'x', 'x', 'apply', 'queued', 1, 3, 1, now(), now())",
        (uuid4(),),
    )
    async with conn.transaction():
        assert await store.rebuild_projections(conn) == 300
    assert await table(conn, "deploys", "id") == live
    assert await table(conn, "events", "position") == events_before


async def test_rebuild_in_small_batches_is_exact_and_invisible_until_commit(
    pool, conn, database_url, monkeypatch
):
    """The single pass fetches and writes in batches: stream boundaries that fall on a fetch
    or write boundary fold the same, and a reader sees the old read model until the rebuild
    commits (never a half-written one)."""
    await drive(pool, count=120, seed=23)
    live = await table(conn, "deploys", "id")
    monkeypatch.setattr(store, "REBUILD_FETCH", 7)  # fewer events than most streams
    monkeypatch.setattr(store, "REBUILD_WRITE", 5)
    await conn.execute("UPDATE deploys SET status = 'bogus' WHERE id IN (SELECT id FROM deploys LIMIT 30)")
    damaged = await table(conn, "deploys", "id")
    other = await connect(database_url)
    try:
        async with conn.transaction():
            assert await store.rebuild_projections(conn) == 120
            assert await table(conn, "deploys", "id") == live  # done, in this transaction
            assert await table(other, "deploys", "id") == damaged  # not yet for anyone else
        assert await table(other, "deploys", "id") == live
    finally:
        await other.close()

    # Outside a transaction (autocommit), it still runs as one.
    await conn.execute("DELETE FROM deploys WHERE id IN (SELECT id FROM deploys LIMIT 10)")
    assert await store.rebuild_projections(conn) == 120
    assert await table(conn, "deploys", "id") == live


async def test_rebuild_without_events_empties_the_read_model(conn):
    await conn.execute(
        "INSERT INTO deploys (id, owner, workspace, action, status, attempt, max_attempts, version, created_at, updated_at) "
        "VALUES (%s, 'x', 'x', 'apply', 'queued', 1, 3, 1, now(), now())",
        (uuid4(),),
    )
    async with conn.transaction():
        assert await store.rebuild_projections(conn) == 0
    assert await table(conn, "deploys", "id") == []


# --------------------------------------------------------------------------- 5. list_deploys


async def pages(conn, limit: int, between=None, **filters) -> list[Any]:
    out: list[Any] = []
    cursor = None
    while True:
        page = await store.list_deploys(conn, cursor=cursor, limit=limit, **filters)
        assert len(page) <= limit
        out.extend(page)
        if len(page) < limit:
            return out
        cursor = (page[-1].created_at, page[-1].id)
        if between is not None:
            await between()


def newest_first(views) -> list[tuple[datetime, UUID]]:
    return [(v.created_at, UUID(v.id)) for v in views]


async def test_list_deploys_filters_and_keyset_pages(pool, conn):
    plan = await drive(pool, count=90, seed=5)
    everything = await store.list_deploys(conn, limit=10_000)
    assert len(everything) == 90
    assert {v.id: v.workspace_id for v in everything} == {d: ws_id(*plan[d]) for d in plan}
    workspace_ids = (ws_id("alice", "w1"), ws_id("carol", "w2"), ws_id("bob", "w3"))
    combos = itertools.product(
        (None, *OWNERS, "nobody"), (None, *STATUSES), (None, *workspace_ids), (None, *OWNERS)
    )
    rng = random.Random(4)
    for i, (owner, status, workspace_id, viewer) in enumerate(combos):
        if status is not None and rng.random() < 0.7:
            continue  # a sample of the status filters is enough
        expect = sorted(
            (
                v
                for v in everything
                if (owner is None or v.owner == owner)
                and (status is None or v.status == status)
                and (workspace_id is None or v.workspace_id == workspace_id)
                and (viewer is None or v.owner == viewer or v.workspace_id in readable(viewer))
            ),
            key=lambda v: (v.created_at, UUID(v.id)),
            reverse=True,
        )
        limit = (1, 3, 7, 100)[i % 4]
        filters = {"owner": owner, "status": status, "workspace_id": workspace_id, "viewer": viewer}
        got = await pages(conn, limit, **filters)
        assert [v.id for v in got] == [v.id for v in expect], (filters, limit)
        assert got == expect


async def test_list_deploys_breaks_created_at_ties_by_id(conn):
    """Deploys created in the same microsecond: the (created_at, id) keyset still pages exactly."""
    from service.projection import DeployView

    at = datetime.fromisoformat("2025-01-01T00:00:00+00:00")
    async with conn.transaction():
        for i in range(25):
            created = at if i < 20 else at + timedelta(seconds=i)
            await store.write_view(
                conn,
                DeployView(
                    id=str(uuid4()),
                    owner=OWNERS[i % 2],
                    workspace="w1",
                    action="apply",
                    status="queued",
                    attempt=1,
                    max_attempts=3,
                    created_at=created,
                    updated_at=created,
                    version=1,
                ),
            )
    for limit in (1, 4, 6):
        for owner in (None, "alice"):
            got = await pages(conn, limit, owner=owner)
            keys = newest_first(got)
            assert keys == sorted(set(keys), reverse=True)
            assert len(got) == (25 if owner is None else 13)


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"owner": "bob"},
        {"workspace_id": "the busiest"},
        {"status": "queued"},
        {"viewer": "alice"},
    ],
)
async def test_list_deploys_pages_stay_exact_while_deploys_are_appended(pool, conn, filters):
    plan = await drive(pool, count=60, seed=9)
    if "workspace_id" in filters:  # the workspace with the most deploys: pages enough
        busiest = Counter(ws_id(*plan[d]) for d in plan).most_common(1)[0][0]
        filters = {"workspace_id": busiest}
    rng = random.Random(3)
    before = await pages(conn, 10_000, **filters)
    added: list[str] = []

    async def between() -> None:
        async with pool.connection() as w, w.transaction():
            d = str(uuid4())
            added.append(d)
            await store.append(
                w, d, 0, [requested(rng.choice(OWNERS), rng.choice(WORKSPACES))], "user:x"
            )
            if "status" not in filters:
                # existing deploys move on too (their created_at does not change)
                for view in await store.list_deploys(w, status="queued", limit=2):
                    await store.append(
                        w, view.id, view.version, [Started(attempt=view.attempt)], "worker:w1"
                    )

    got = await pages(conn, 2, between=between, **filters)
    keys = newest_first(got)
    assert keys == sorted(set(keys), reverse=True)  # newest first, nobody twice
    ids = [v.id for v in got]
    old = [i for i in ids if i not in added]
    assert sorted(old) == sorted(v.id for v in before)  # every earlier deploy exactly once
    assert len(added) >= max(2, len(before) // 2 - 1)  # appended between (nearly) every page


# --------------------------------------------------------------------------- 6. audit_page


async def test_audit_page_matches_a_brute_force_filter(pool, conn):
    plan = await drive(pool, count=40, seed=21)
    events = await all_events(conn)
    assert len(events) > 100
    owner_of = {e.deploy_id: e.event.owner for e in events if e.type == "Requested"}
    workspace_of = {e.deploy_id: e.event.workspace for e in events if e.type == "Requested"}
    assert {d: (owner_of[d], workspace_of[d]) for d in plan} == plan
    # The workspace streams (MemberSet events) are in the table too: their owner is the viewer
    # who may see them.
    ws_owner = {ws_id(o, w): o for o in OWNERS for w in WORKSPACES}
    in_ws = [e for e in events if e.stream == "workspace"]
    assert {e.deploy_id for e in in_ws} == {ws_id(*key) for key in MEMBERS}

    def ws_of(e: StoredEvent) -> str:
        return e.deploy_id if e.stream == "workspace" else ws_id(*plan[e.deploy_id])

    assert all(e.workspace_id == ws_of(e) for e in events)

    times = sorted(e.recorded_at for e in events)
    some_deploy = max(plan, key=lambda d: sum(e.deploy_id == d for e in events))
    choices: dict[str, list[Any]] = {
        "deploy_id": [some_deploy, str(uuid4()), ws_id("alice", "w1")],
        "workspace_id": [ws_id("carol", "w2"), ws_id("alice", "w1"), str(uuid4())],
        "workspace_stream": [True, False],
        "type": ["Failed", "Requested", "Retried", "MemberSet"],
        "actor": ["admin:root", "worker:w1", "user:bob", "user:carol"],
        "viewer": ["bob", "alice", "carol"],
        # boundaries exactly on an event's time: since is inclusive, until exclusive
        "since": [times[len(times) // 3], times[0], times[-1] + timedelta(seconds=1)],
        "until": [times[2 * len(times) // 3], times[-1]],
        "after": [events[len(events) // 2].position, events[-1].position],
    }

    def in_workspace(e: StoredEvent, f: dict[str, Any]) -> bool:
        if e.stream == "workspace":
            return bool(f.get("workspace_stream")) and e.deploy_id == f["workspace_id"]
        return ws_of(e) == f["workspace_id"]

    def seen_by(e: StoredEvent, viewer: str) -> bool:
        if e.stream == "workspace":
            return ws_owner[e.deploy_id] == viewer
        return owner_of[e.deploy_id] == viewer or ws_of(e) in readable(viewer)

    def brute(f: dict[str, Any]) -> list[int]:
        return [
            e.position
            for e in events
            if ("deploy_id" not in f or e.deploy_id == f["deploy_id"])
            and ("workspace_id" not in f or in_workspace(e, f))
            and ("type" not in f or e.type == f["type"])
            and ("actor" not in f or e.actor == f["actor"])
            and ("viewer" not in f or seen_by(e, f["viewer"]))
            and ("since" not in f or e.recorded_at >= f["since"])
            and ("until" not in f or e.recorded_at < f["until"])
            and ("after" not in f or e.position > f["after"])
        ]

    async def paged(conn, f: dict[str, Any], limit: int) -> list[int]:
        out: list[int] = []
        after = f.get("after", 0)
        rest = {k: v for k, v in f.items() if k != "after"}
        while True:
            page = await store.audit_page(conn, after=after, limit=limit, **rest)
            assert len(page) <= limit
            out.extend(e.position for e in page)
            if not page:
                return out
            after = page[-1].position

    combos: list[dict[str, Any]] = [{}]
    combos += [{k: v} for k, vs in choices.items() for v in vs]  # each filter alone
    keys = list(choices)
    for a, b in itertools.combinations(keys, 2):  # every pair
        combos.append({a: choices[a][0], b: choices[b][0]})
    rng = random.Random(2)
    for _ in range(20):  # random larger combinations, mostly empty
        picked = rng.sample(keys, rng.randint(3, len(keys)))
        combos.append({k: rng.choice(choices[k]) for k in picked})
    for _ in range(40):  # random larger combinations that some event matches
        e = rng.choice(events)
        matching = {
            "deploy_id": e.deploy_id,
            "workspace_id": ws_of(e),
            "workspace_stream": e.stream == "workspace" or rng.random() < 0.5,
            "type": e.type,
            "actor": e.actor,
            "viewer": ws_owner[ws_of(e)] if e.stream == "workspace" else owner_of[e.deploy_id],
            "since": rng.choice([t for t in times if t <= e.recorded_at]),
            "until": rng.choice(
                [t for t in times if t > e.recorded_at] or [e.recorded_at + timedelta(1)]
            ),
            "after": rng.randint(0, e.position - 1),
        }
        picked = rng.sample(keys, rng.randint(3, len(keys)))
        combos.append({k: matching[k] for k in picked})
    combos.append({k: vs[0] for k, vs in choices.items()})  # all at once
    combos.append(
        {
            "deploy_id": some_deploy,
            "workspace_id": ws_id(*plan[some_deploy]),
            "viewer": owner_of[some_deploy],
            "since": times[0],
            "until": times[-1] + timedelta(seconds=1),
            "after": 0,
        }
    )

    nonempty = 0
    for i, f in enumerate(combos):
        expect = brute(f)
        nonempty += bool(expect)
        assert await paged(conn, f, limit=(3, 17, 1000)[i % 3]) == expect, f
        whole = await store.audit_page(
            conn,
            limit=100_000,
            after=f.get("after", 0),
            **{k: v for k, v in f.items() if k != "after"},
        )
        assert [e.position for e in whole] == expect, f
        assert all(e.workspace_id == ws_of(e) for e in whole)
    assert nonempty > len(combos) // 2  # the combinations are not vacuous


# --------------------------------------------------------------------------- 8. NOTIFY


async def notifications(conn, wait: float, stop_after: int | None = None) -> list[str]:
    """The tfdeploy_events payloads heard within ``wait`` seconds (or the first ``stop_after``)."""
    return [
        n.payload
        async for n in conn.notifies(timeout=wait, stop_after=stop_after)
        if n.channel == "tfdeploy_events"
    ]


async def test_append_notifies_on_commit_only(conn, database_url):
    listener = await connect(database_url)
    await listener.execute("LISTEN tfdeploy_events")
    d = str(uuid4())
    try:
        async with conn.transaction():
            new = await store.append(conn, d, 0, [requested()], "user:alice")
            new += await store.append(
                conn, d, 1, [Started(attempt=1), Started(attempt=2)], "worker:w1"
            )
            assert await notifications(listener, 0.3) == []  # not before the commit
        expected = [f"{e.position} {e.deploy_id} {e.version}" for e in new]
        assert await notifications(listener, 5, stop_after=3) == expected
        assert [p.split()[1] for p in expected] == [d] * 3

        # Rolled back: nothing. A committed append afterwards is the next thing heard.
        with pytest.raises(Rollback):
            async with conn.transaction():
                await store.append(conn, d, 3, [Started(attempt=3)], "worker:w1")
                raise Rollback
        with pytest.raises(store.VersionConflict):
            async with conn.transaction():
                await store.append(conn, d, 1, [Started(attempt=3)], "worker:w1")
        async with conn.transaction():
            sentinel = await store.append(conn, str(uuid4()), 0, [requested()], "user:bob")
        got = await notifications(listener, 5, stop_after=1)
        assert got == [f"{sentinel[0].position} {sentinel[0].deploy_id} 1"]
        assert await notifications(listener, 0.3) == []
    finally:
        await listener.close()
