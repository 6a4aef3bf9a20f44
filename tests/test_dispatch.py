"""The dispatcher end to end, with real workers and real terraform (service/dispatch.py):
fair turns between users, the per-user limit, a host at its cap takes nothing off the queue (an
idle host that joins gets the next deploy), and every deploy ends -- a worker that breaks at any
step before recording the outcome leaves nothing waiting for ever (service/recovery.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_execution import ONE_RESOURCE, TERMINAL

from service.api.app import create_app
from service.auth import create_token
from service.services import Services, open_services
from service.settings import from_env
from service.worker import Worker

SLEEPS = """
variable "seconds" {}
resource "terraform_data" "slow" {
  input = var.seconds
  provisioner "local-exec" { command = "sleep ${var.seconds}" }
}
"""


class Site:
    """The API, with clients for ann and bob, and workers that can be started and stopped, each
    a 'host' of its own (its own data dir: its own places under its own cap)."""

    def __init__(self, services: Services, client: httpx.AsyncClient, tokens: dict[str, str]):
        self.services, self.client, self.tokens = services, client, tokens
        self.workers: list[tuple[Worker, asyncio.Task[None], Services]] = []

    async def submit(self, user: str, seconds: float, workspace: str) -> str:
        r = await self.client.post(
            "/deploys",
            json={"files": {"main.tf": SLEEPS}, "variables": {"seconds": str(seconds)},
                  "workspace": workspace},
            headers={"Authorization": f"Bearer {self.tokens[user]}"},
        )
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    async def events(self, deploy_id: str) -> list[dict[str, Any]]:
        r = await self.client.get(
            f"/deploys/{deploy_id}/events", headers={"Authorization": f"Bearer {self.tokens['root']}"}
        )
        return list(r.json()["items"])

    async def status(self, deploy_id: str) -> str:
        r = await self.client.get(
            f"/deploys/{deploy_id}", headers={"Authorization": f"Bearer {self.tokens['root']}"}
        )
        return str(r.json()["status"])

    async def wait(self, deploy_id: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self.status(deploy_id)
            if status in TERMINAL:
                return status
            await asyncio.sleep(0.1)
        raise AssertionError(f"deploy {deploy_id} still {status} after {timeout}s")

    async def started_at(self, deploy_id: str) -> datetime:
        for e in await self.events(deploy_id):
            if e["type"] == "Started":
                return datetime.fromisoformat(e["recorded_at"])
        raise AssertionError(f"{deploy_id} never started")

    async def start_worker(self, tmp_path: Path, name: str, **overrides: Any) -> Worker:
        values: dict[str, Any] = dict(
            data_dir=str(tmp_path / f"host-{name}"),
            runner="local",
            runner_network="none",
            retry_delay=0.05,
            max_concurrency=1,
        )
        values.update(overrides)
        services = await open_services(from_env({}, **values), self.services.database_url)
        worker = Worker(services, name=name)
        self.workers.append((worker, asyncio.create_task(worker.run()), services))
        return worker

    async def close(self) -> None:
        for worker, task, services in self.workers:
            worker.stop()
            worker.deployer.hand_over("test over")
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 60)
            await worker.close()
            await services.close()


@contextlib.asynccontextmanager
async def site(database_url: str, tmp_path: Path) -> AsyncIterator[Site]:
    services = await open_services(from_env({}, data_dir=str(tmp_path / "api")), database_url)
    async with services.pool.connection() as conn:
        tokens = {
            "ann": await create_token(conn, "ann"),
            "bob": await create_token(conn, "bob"),
            "root": await create_token(conn, "root", admin=True),
        }
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        s = Site(services, client, tokens)
        try:
            yield s
        finally:
            await s.close()
            await services.close()


async def test_one_users_burst_never_makes_another_wait_beyond_one_turnover(
    database_url: str, tmp_path: Path
) -> None:
    """Cap 2: ann queues 8 deploys of 3 s, then bob one. Bob's starts when the first of ann's
    running ones ends (one turnover), not after all of hers."""
    async with site(database_url, tmp_path) as s:
        anns = [await s.submit("ann", 3, f"a{i}") for i in range(8)]
        await s.start_worker(tmp_path, "w", max_concurrency=2)
        deadline = time.monotonic() + 60
        while len([e for d in anns[:2] for e in await s.events(d) if e["type"] == "Started"]) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        bobs = await s.submit("bob", 1, "b")
        assert await s.wait(bobs) == "succeeded"
        bob_started = await s.started_at(bobs)
        for d in anns:
            assert await s.wait(d) == "succeeded"
        starts = [(bob_started, "bob")]
        ends = []
        for d in anns:
            starts.append((await s.started_at(d), "ann"))
            if d in anns[:2]:
                ends += [
                    datetime.fromisoformat(e["recorded_at"])
                    for e in await s.events(d) if e["type"] == "Succeeded"
                ]
        order = [who for _, who in sorted(starts)]
        # the two that ran when bob asked, then bob: the next place to free was his
        assert order.index("bob") == 2, order
        first_end = min(ends)
        print(f"\nbob started {(bob_started - first_end).total_seconds() * 1000:.0f} ms after the "
              "first place freed")
        assert (bob_started - first_end).total_seconds() < 2.0


async def test_one_user_never_runs_more_than_the_per_user_limit(
    database_url: str, tmp_path: Path
) -> None:
    async with site(database_url, tmp_path) as s:
        anns = [await s.submit("ann", 1.5, f"a{i}") for i in range(3)]
        bobs = await s.submit("bob", 1.5, "b")
        await s.start_worker(tmp_path, "w", max_concurrency=3, max_running_per_user=1)
        for d in [*anns, bobs]:
            assert await s.wait(d) == "succeeded"
        spans = []
        for d in anns:
            events = await s.events(d)
            at = {e["type"]: datetime.fromisoformat(e["recorded_at"]) for e in events}
            spans.append((at["Started"], at["Succeeded"]))
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, spans  # ann's ran one after another
        # bob's ran beside ann's first: the limit is per user, the cap was free
        assert await s.started_at(bobs) < spans[0][1]


async def test_an_idle_host_that_joins_gets_the_next_deploy(database_url: str, tmp_path: Path) -> None:
    """Two hosts, cap 1 each. Host A runs a 12 s deploy; a 1 s deploy is queued: A is at its cap
    and takes nothing. Host B joins, idle: the short deploy starts there within seconds."""
    async with site(database_url, tmp_path) as s:
        long = await s.submit("ann", 12, "long")
        await s.start_worker(tmp_path, "host-a")
        deadline = time.monotonic() + 60
        while await s.status(long) != "deploying":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        short = await s.submit("bob", 1, "short")
        await asyncio.sleep(2)
        assert await s.status(short) == "queued"  # A holds no job it cannot start
        async with s.services.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT status FROM procrastinate_jobs WHERE args->>'deploy_id' = %s", (short,)
            )
            assert [r[0] for r in await cur.fetchall()] == ["todo"]
        joined = time.monotonic()
        await s.start_worker(tmp_path, "host-b")
        deadline = time.monotonic() + 30
        while await s.status(short) == "queued":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        waited = time.monotonic() - joined
        print(f"\nthe short deploy started {waited:.2f} s after host B joined")
        assert waited < 5.0
        assert await s.wait(short) == "succeeded"
        started = [e for e in await s.events(short) if e["type"] == "Started"]
        assert started[0]["data"]["worker"] == "host-b"
        assert await s.status(long) == "deploying"  # the short one did not wait for it


class Break(Exception):
    """A worker breaking at some step (the test's stand-in for a bug or a killed job)."""


@pytest.mark.parametrize("step", ["prepare", "start", "conclude"])
async def test_every_deploy_ends_whatever_step_its_worker_broke_at(
    database_url: str, tmp_path: Path, step: str
) -> None:
    """The worker raises once at a step between taking the job and recording the outcome; the
    job is closed as failed and the deploy is left without one. Recovery finds it (it has no
    live job) and concludes it: queued again if nothing ran, taken over and concluded
    (runner_lost, then retried) if it ran -- the deploy always ends, here succeeded."""
    async with site(database_url, tmp_path) as s:
        deploy = await s.submit("ann", 0, "w")
        worker = await s.start_worker(tmp_path, "w")
        deployer = worker.deployer
        broken = {"done": False}

        def once(name: str) -> None:
            original = getattr(deployer, name)

            async def breaking(*args: Any, **kwargs: Any) -> Any:
                if not broken["done"]:
                    broken["done"] = True
                    raise Break(name)
                return await original(*args, **kwargs)

            setattr(deployer, name, breaking)

        once({"prepare": "prepare", "start": "_run_started", "conclude": "conclude"}[step])
        assert await s.wait(deploy, timeout=90) == "succeeded"
        assert broken["done"]
        types = [e["type"] for e in await s.events(deploy)]
        if step == "prepare":  # nothing ran: queued again, one attempt in all
            assert types == ["Requested", "Started", "StatePersisted", "Succeeded"], types
        else:  # the attempt ran (or was about to): concluded, and the next one succeeded
            assert types.count("Succeeded") == 1 and types[-1] == "Succeeded", types
            failed = [e for e in await s.events(deploy) if e["type"] == "Failed"]
            if failed:
                assert failed[0]["data"]["reason"] == "runner_lost", failed


async def test_a_queued_deploy_whose_job_was_lost_runs(database_url: str, tmp_path: Path) -> None:
    async with site(database_url, tmp_path) as s:
        r = await s.client.post(
            "/deploys", json={"files": {"main.tf": ONE_RESOURCE}, "workspace": "lost"},
            headers={"Authorization": f"Bearer {s.tokens['ann']}"},
        )
        deploy = r.json()["id"]
        async with s.services.pool.connection() as conn:  # procrastinate marked it failed
            await conn.execute(
                "UPDATE procrastinate_jobs SET status = 'failed' WHERE args->>'deploy_id' = %s",
                (deploy,),
            )
        await s.start_worker(tmp_path, "w")
        assert await s.wait(deploy, timeout=60) == "succeeded"
