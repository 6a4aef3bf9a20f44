"""The fair claim (``tfdeploy_claim``, migration 0010) against a real PostgreSQL: which deploy job
a worker with a free place takes next (CONTRACT "Deploy lifecycle": fair between users, one
deploy of a workspace at a time in order, a planned deploy or the CLI's lock holds its
workspace, a speculative plan never waits, a per-user limit), and the notifications that wake
the dispatchers."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from procrastinate.jobs import Status

from service.db import autocommit
from service.deploys import NewDeploy
from service.dispatch import CLAIM, NEXT_DUE
from service.events import PlanChange, PlanSummary
from service.lifecycle import (
    AttemptFailed,
    AttemptSucceeded,
    Discard,
    PersistedState,
    PlanMade,
    StartAttempt,
)
from service.queue import QUEUE_NAME
from service.services import Services

MAIN_TF = 'resource "terraform_data" "x" {}\n'


class Queue:
    """Deploys requested through the real command handler, and claims made as a worker would."""

    def __init__(self, services: Services, worker_id: int) -> None:
        self.services = services
        self.worker_id = worker_id
        self.names: dict[str, str] = {}  # deploy id -> a readable name

    async def request(
        self, name: str, owner: str, workspace: str, *, action: str = "apply", auto_approve: bool = True
    ) -> str:
        new = NewDeploy(
            workspace=workspace,
            action=action,
            files={"main.tf": MAIN_TF},
            max_attempts=2,
            auto_approve=auto_approve,
        )
        view, _ = await self.services.deploys.request(new, owner=owner, actor=f"user:{owner}")
        self.names[view.id] = name
        return view.id

    async def claim(self, max_per_user: int | None = None) -> tuple[str | None, int | None]:
        """(the name of the deploy claimed or None, its job id)."""
        async with autocommit(self.services.pool) as conn:
            cur = await conn.execute(
                CLAIM,
                {"queue": QUEUE_NAME, "worker_id": self.worker_id, "max_per_user": max_per_user},
            )
            row = await cur.fetchone()
        if row is None:
            return None, None
        names = [d.name for d in cur.description]  # type: ignore[union-attr]
        job = dict(zip(names, row, strict=True))
        assert job["status"] == "doing" and job["worker_id"] == self.worker_id
        return self.names[job["args"]["deploy_id"]], job["id"]

    async def claims(self, n: int, max_per_user: int | None = None) -> list[str | None]:
        return [(await self.claim(max_per_user))[0] for _ in range(n)]

    async def finish(self, job_id: int) -> None:
        await self.services.queue.app.job_manager.finish_job_by_id_async(
            job_id=job_id, status=Status.SUCCEEDED, delete_job=True
        )

    async def run_to_success(self, deploy_id: str, job_id: int) -> None:
        """What a worker does with a claimed job: Started, the outcome, the job finished."""
        d = self.services.deploys
        await d.execute(deploy_id, StartAttempt(worker="w"), "worker:w")
        await d.execute(deploy_id, AttemptSucceeded(state=persisted()), "worker:w")
        await self.finish(job_id)


def persisted() -> PersistedState:
    return PersistedState(
        workspace="w", store="postgres", location="postgres:w/1", serial=1, lineage="l",
        sha256="0" * 64, size=2, state_version=1,
    )


@pytest.fixture
async def q(services: Services, tokens: dict[str, str]) -> Queue:
    worker_id = await services.queue.app.job_manager.register_worker()
    return Queue(services, worker_id)


def ids(q: Queue, name: str) -> str:
    return next(d for d, n in q.names.items() if n == name)


async def test_one_users_burst_does_not_make_another_wait(q: Queue) -> None:
    for i in range(1, 5):
        await q.request(f"a{i}", "ann", f"wa{i}")
    await q.request("b1", "bob", "wb1")
    # ann's oldest first; then bob, who has none running; then ann's next (FIFO per user).
    assert await q.claims(4) == ["a1", "b1", "a2", "a3"]


async def test_fewest_running_first_then_the_oldest_deploy(q: Queue) -> None:
    await q.request("b1", "bob", "x1")
    await q.request("a1", "ann", "x2")
    await q.request("b2", "bob", "x3")
    await q.request("c1", "cat", "x4")
    # all at 0: the oldest (b1); then ann and cat at 0 (ann's is older); then cat; then bob.
    assert await q.claims(5) == ["b1", "a1", "c1", "b2", None]


async def test_deploys_of_one_workspace_run_one_at_a_time_in_order(q: Queue) -> None:
    first = await q.request("w1", "ann", "site")
    await q.request("w2", "ann", "site")
    await q.request("other", "ann", "elsewhere")
    name, job = await q.claim()
    assert name == "w1"
    # w2 waits behind w1, even though its user has the same count as anyone else
    assert await q.claims(2) == ["other", None]
    assert job is not None
    await q.run_to_success(first, job)
    assert await q.claims(2) == ["w2", None]


async def test_a_deploy_waiting_for_its_retry_still_holds_its_workspace(q: Queue) -> None:
    first = await q.request("w1", "ann", "site")
    await q.request("w2", "ann", "site")
    _, job = await q.claim()
    d = q.services.deploys
    await d.execute(first, StartAttempt(worker="w"), "worker:w")
    await d.execute(first, AttemptFailed(reason="apply_failed", retry_delay=30), "worker:w")
    assert job is not None
    await q.finish(job)
    # w1's next attempt is due in 30 s: w2 (newer) still waits; nothing to claim now
    assert await q.claims(1) == [None]
    async with autocommit(q.services.pool) as conn:
        cur = await conn.execute(NEXT_DUE, {"queue": QUEUE_NAME})
        due = (await cur.fetchone())[0]
    assert due is not None


async def test_a_planned_deploy_holds_its_workspace_until_discarded(q: Queue) -> None:
    p = await q.request("p", "ann", "site", auto_approve=False)
    await q.request("later", "ann", "site")
    name, job = await q.claim()
    assert name == "p" and job is not None
    d = q.services.deploys
    await d.execute(p, StartAttempt(worker="w"), "worker:w")
    await d.execute(
        p,
        PlanMade(
            summary=PlanSummary(add=1),
            changes=[PlanChange(address="terraform_data.x", type="terraform_data", actions=["create"])],
            plan_id="plan:1",
        ),
        "worker:w",
    )
    await q.finish(job)
    assert (await d.get(p)).status == "planned"  # type: ignore[union-attr]
    assert await q.claims(1) == [None]  # held by the plan waiting for approval
    await d.execute(p, Discard(by="user:ann"), "user:ann")
    assert await q.claims(2) == ["later", None]


async def test_a_speculative_plan_neither_waits_for_nor_holds_its_workspace(q: Queue) -> None:
    await q.request("apply", "ann", "site")
    name, _ = await q.claim()
    assert name == "apply"
    await q.request("plan", "ann", "site", action="plan")
    await q.request("plan2", "ann", "site", action="plan")
    await q.request("next", "ann", "site")
    # both plans start while the apply runs; the next apply waits for the apply only
    assert await q.claims(3) == ["plan", "plan2", None]


async def test_the_cli_lock_holds_the_workspace(q: Queue, services: Services) -> None:
    deploy = await q.request("w1", "ann", "site")
    view = await services.deploys.get(deploy)
    assert view is not None
    async with autocommit(services.pool) as conn:
        await conn.execute(
            "INSERT INTO workspace_locks (workspace_id, lock_id, info, holder)"
            " VALUES (%s, 'cli-1', '{}', 'ann')",
            (view.workspace_id,),
        )
    assert await q.claims(1) == [None]
    async with autocommit(services.pool) as conn:
        await conn.execute("DELETE FROM workspace_locks WHERE workspace_id = %s", (view.workspace_id,))
    assert await q.claims(1) == ["w1"]


async def test_the_per_user_limit(q: Queue) -> None:
    for i in range(3):
        await q.request(f"a{i}", "ann", f"s{i}")
    await q.request("b0", "bob", "t0")
    assert await q.claims(4, max_per_user=1) == ["a0", "b0", None, None]
    assert await q.claims(1, max_per_user=2) == ["a1"]


async def test_concurrent_claims_never_take_one_job_twice_or_two_of_a_workspace(
    q: Queue, services: Services
) -> None:
    for i in range(6):
        await q.request(f"a{i}", "ann", f"ws{i % 3}")
    got = await asyncio.gather(*(q.claim() for _ in range(8)))
    names = [n for n, _ in got if n is not None]
    assert len(names) == len(set(names)) == 3  # one per workspace, the oldest of each
    assert sorted(names) == ["a0", "a1", "a2"]


async def notifications(url: str, channel: str, action: Any) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f'LISTEN "{channel}"')
        await action()
        got = 0
        gen = conn.notifies(timeout=1.0)
        async for _ in gen:
            got += 1
        return got


async def test_dispatchers_are_woken_when_a_job_ends_and_when_a_plan_is_discarded(
    q: Queue, services: Services, database_url: str
) -> None:
    p = await q.request("p", "ann", "site", auto_approve=False)
    _, job = await q.claim()
    assert job is not None
    d = services.deploys
    await d.execute(p, StartAttempt(worker="w"), "worker:w")
    await d.execute(
        p,
        PlanMade(summary=PlanSummary(add=1), changes=[], plan_id="plan:1"),
        "worker:w",
    )
    assert await notifications(database_url, "tfdeploy_dispatch", lambda: q.finish(job)) >= 1
    assert (
        await notifications(
            database_url, "tfdeploy_dispatch", lambda: d.execute(p, Discard(by="user:ann"), "user:ann")
        )
        >= 1
    )
