"""The command handler against a real database: events, read model and queued jobs commit together."""

from __future__ import annotations

import asyncio

import pytest

from service import store
from service.deploys import Deploys, IdempotencyMismatch, NewDeploy, NotFound
from service.lifecycle import AttemptFailed, Cancel, IllegalTransition, Replay, StartAttempt
from service.queue import Queue


@pytest.fixture
async def deploys(pool, database_url):
    queue = Queue(database_url)
    await queue.open()
    yield Deploys(pool, queue, encrypt=lambda d: b"x" * len(d), digest_key=b"k")
    await queue.close()


def new(**kw) -> NewDeploy:
    base = {"workspace": "w", "action": "apply", "files": {"main.tf": "# hi"}, "max_attempts": 3}
    base.update(kw)
    return NewDeploy(**base)


async def jobs(pool):
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT args->>'deploy_id', (args->>'attempt')::int, lock, scheduled_at IS NOT NULL "
            "FROM procrastinate_jobs ORDER BY id"
        )
        return await cur.fetchall()


async def test_request_records_event_inputs_secrets_and_job(deploys, pool):
    view, created = await deploys.request(new(secrets={"token": "s3cr3t"}), owner="ann", actor="user:ann")
    assert created and view.status == "queued" and view.attempt == 1 and view.max_attempts == 3
    # The job is on the workspace's lock: its id (ann's "w", claimed by this request).
    assert view.workspace == "w" and view.workspace_owner == "ann" and view.workspace_id
    assert await jobs(pool) == [(view.id, 1, f"workspace:{view.workspace_id}", False)]
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM deploy_secrets")
        assert (await cur.fetchone())[0] == 1
        cur = await conn.execute("SELECT files FROM deploy_inputs")
        assert (await cur.fetchone())[0] == {"main.tf": "# hi"}
        events = await store.read_stream(conn, view.id)
    assert [e.type for e in events] == ["Requested"]
    assert events[0].data["workspace_id"] == view.workspace_id
    assert "s3cr3t" not in repr(events[0].data)
    assert events[0].data["secret_names"] == ["token"]


async def test_idempotency_key(deploys, pool):
    a, created_a = await deploys.request(new(), owner="ann", actor="user:ann", idempotency_key="k1")
    b, created_b = await deploys.request(new(), owner="ann", actor="user:ann", idempotency_key="k1")
    assert created_a and not created_b and a.id == b.id
    with pytest.raises(IdempotencyMismatch):
        await deploys.request(new(workspace="other"), owner="ann", actor="user:ann", idempotency_key="k1")
    # Another owner's identical key is a different deploy.
    c, created_c = await deploys.request(new(), owner="bob", actor="user:bob", idempotency_key="k1")
    assert created_c and c.id != a.id
    assert len(await jobs(pool)) == 2


async def test_concurrent_idempotent_requests_make_one_deploy(deploys, pool):
    results = await asyncio.gather(
        *(deploys.request(new(), owner="ann", actor="user:ann", idempotency_key="same") for _ in range(8))
    )
    assert len({v.id for v, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(await jobs(pool)) == 1


async def test_failure_queues_retry_with_delay_and_final_failure_forgets_secrets(deploys, pool):
    view, _ = await deploys.request(new(max_attempts=2, secrets={"t": "v"}), owner="ann", actor="user:ann")
    await deploys.execute(view.id, StartAttempt(worker="w1"), "worker:w1")
    _, v = await deploys.execute(view.id, AttemptFailed(reason="apply_failed", retry_delay=5), "worker:w1")
    assert v.status == "retrying" and v.attempt == 2
    queued = await jobs(pool)
    assert queued[-1] == (view.id, 2, f"workspace:{view.workspace_id}", True)
    await deploys.execute(view.id, StartAttempt(worker="w1"), "worker:w1")
    _, v = await deploys.execute(view.id, AttemptFailed(reason="apply_failed"), "worker:w1")
    assert v.status == "failed" and v.error.reason == "apply_failed"
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM deploy_secrets")
        assert (await cur.fetchone())[0] == 0
    _, v = await deploys.execute(view.id, Replay(by="admin:root", budget=3), "admin:root")
    assert v.status == "retrying" and v.attempt == 3 and v.max_attempts == 5
    assert (await jobs(pool))[-1][:2] == (view.id, 3)


async def test_illegal_and_unknown(deploys):
    view, _ = await deploys.request(new(), owner="ann", actor="user:ann")
    await deploys.execute(view.id, Cancel(by="user:ann"), "user:ann")
    with pytest.raises(IllegalTransition, match="cancelled"):
        await deploys.execute(view.id, Cancel(by="user:ann"), "user:ann")
    with pytest.raises(NotFound):
        await deploys.execute("00000000-0000-0000-0000-000000000000", Cancel(by="x"), "x")


async def test_concurrent_commands_on_one_deploy_settle(deploys):
    view, _ = await deploys.request(new(), owner="ann", actor="user:ann")
    results = await asyncio.gather(
        *(deploys.execute(view.id, StartAttempt(worker=f"w{i}"), f"worker:w{i}") for i in range(5)),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, Exception)]
    assert len(ok) == 1
    assert all(isinstance(r, IllegalTransition) for r in results if isinstance(r, Exception))
