"""The deploy dispatcher: which deploy starts next, on which host.

procrastinate stays the queue (its jobs table, its defer, retry and finish, its worker registry
and heartbeats); what it does not do is choose. Its fetch takes jobs by priority then id, and a
worker that fetches holds a job while it waits for a place under its cap -- so one user's burst
made everyone else wait, and a busy host kept deploys that an idle host could have started.

Here every worker runs a few LANES. A lane first holds a free place under its host's cap
(``runner.reserve()``: a host at its cap takes nothing off the queue), then claims the job that
should start next (``tfdeploy_claim``, migration 0010: the oldest deploy of the user with the
fewest running, workspaces held by a running or planned deploy, an older one, or the CLI's lock
skipped, a per-user limit), runs it, and finishes the job. A lane with a place and nothing to
claim sleeps until something may have changed: a job inserted or retried
(procrastinate's NOTIFY), a job ended or a deploy ended (``tfdeploy_dispatch``), or the next
retry falls due -- no polling beyond a slow fallback while the listener is away.

There are more lanes than places (the cap plus up to PREFETCH_LANES): the extra ones wait in
``reserve()`` holding nothing, so a place freed when terraform ends is taken at once while the
lane that ran it still records the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import psycopg
from procrastinate import utils as pc_utils
from procrastinate.jobs import Job, Status
from psycopg.rows import dict_row

from service.db import autocommit
from service.queue import QUEUE_NAME, WorkerStopping
from service.runners.base import RunnerError
from service.statestores.base import StateStoreError

log = logging.getLogger("tfdeploy.dispatch")

CLAIM = "SELECT * FROM tfdeploy_claim(%(queue)s, %(worker_id)s, %(max_per_user)s)"
# Anything to take, and when the next retry falls due: a read, no lock, nothing taken.
PROBE = (
    "SELECT tfdeploy_pick(%(queue)s, %(max_per_user)s) IS NOT NULL AS ready,"
    " tfdeploy_next_due(%(queue)s) AS next_due"
)
NEXT_DUE = "SELECT tfdeploy_next_due(%(queue)s)"
CHANNELS = ("tfdeploy_dispatch", f"procrastinate_queue_v1#{QUEUE_NAME}")
HEARTBEAT = """
UPDATE procrastinate_workers SET last_heartbeat = now() WHERE id = %(worker_id)s RETURNING id
"""
ADOPT_JOBS = """
UPDATE procrastinate_jobs SET worker_id = %(worker_id)s
WHERE id = ANY(%(job_ids)s) AND status = 'doing'
"""

PREFETCH_LANES = 4  # lanes beyond the cap: they wait for a place, holding nothing
IDLE_FALLBACK = 5.0  # the longest an idle lane sleeps without a notification
LISTEN_RETRY_MAX = 5.0
STORE_RETRY_MAX_WAIT = 60  # a job whose state store cannot be read: 2, 4, ... 60 s

# Runs a claimed job in the place the lane holds, and gives the place back when nothing runs
# (a stale job: cancelled, already run) -- Deployer.handle. Without a place (None), the third
# argument says why the runner could not give one: the attempt fails with that reason.
RunJob = Callable[[Job, Any, str | None], Awaitable[None]]


def lane_count(cap: int) -> int:
    return cap + min(cap, PREFETCH_LANES)


class Wake:
    """Wakes every idle lane of this process at once; a lane that was busy when the wake came
    does not miss it (it compares generations)."""

    def __init__(self) -> None:
        self.generation = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seen: int, within: float) -> None:
        if self.generation != seen:
            return
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), within)


class Dispatcher:
    def __init__(
        self,
        *,
        pool: Any,
        manager: Any,
        listen_url: str,
        runner: Any,
        run_job: RunJob,
        lanes: int,
        max_per_user: int | None,
        heartbeat_interval: float,
    ) -> None:
        self.pool = pool
        self.manager = manager  # procrastinate's JobManager
        self.listen_url = listen_url
        self.runner = runner
        self.run_job = run_job
        self.lanes = lanes
        self.max_per_user = max_per_user
        self.heartbeat_interval = heartbeat_interval
        self.worker_id: int | None = None
        self.wake = Wake()
        self.busy: dict[int, Job] = {}  # job id -> job, while a lane runs it
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------ running

    async def run(self, stopping: asyncio.Event) -> None:
        """Dispatch until ``stopping`` is set, then let the lanes that run a deploy finish (the
        deployer's hand-over bounds how long) and unregister."""
        self._stopping = stopping
        self.worker_id = await self._register()
        side = [
            asyncio.create_task(self._heartbeat(), name="dispatch-heartbeat"),
            asyncio.create_task(self._listen(), name="dispatch-listen"),
        ]
        lanes = [asyncio.create_task(self._lane(i), name=f"lane-{i}") for i in range(self.lanes)]
        try:
            await asyncio.gather(*lanes)
        finally:
            for task in lanes:
                task.cancel()
            for task in side:
                task.cancel()
            for task in [*lanes, *side]:
                with contextlib.suppress(BaseException):
                    await task
            if self.worker_id is not None:
                with contextlib.suppress(Exception):
                    await self.manager.unregister_worker(self.worker_id)

    async def _register(self) -> int:
        pause = 0.5
        while True:
            try:
                return int(await self.manager.register_worker())
            except Exception as exc:
                if self._stopping.is_set():
                    raise
                log.warning("cannot register the dispatcher (%s); again in %.1fs", exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, LISTEN_RETRY_MAX)

    async def _lane(self, index: int) -> None:
        """Wait until some deploy may start, hold a place (waiting while the host is at its
        cap), claim, run. A lane holds a place only while it claims and runs: an idle one holds
        none, so a run that needs a second place (a destroy after the state store refused) is
        never starved by lanes waiting for work."""
        pause = 0.5
        while not self._stopping.is_set():
            if not await self._work_waiting():
                return  # stopping
            try:
                reservation = await self._reserve()
            except RunnerError as exc:
                # The runner cannot work at all (the engine gone past its wait): the deploy
                # that should start next fails its attempt with the reason (runner_error, the
                # budget bounding it) rather than wait for ever (Deployer.handle without a
                # place tries to reserve one itself and records the failure).
                log.warning("no place can be reserved (%s)", exc)
                job = await self._claim_once()
                if job is not None:
                    await self._run(job, None, str(exc))
                else:
                    await self._sleep(self.wake.generation, pause)
                    pause = min(pause * 2, LISTEN_RETRY_MAX)
                continue
            pause = 0.5
            if reservation is None:
                return
            handed = False  # the place went to the job (which gives it back itself)
            try:
                job = await self._claim_once()
                if job is None:
                    continue  # another lane or host took it first
                if self._stopping.is_set():
                    # Taken just as the worker was told to stop: straight back to the queue.
                    await self._retry(job, 0)
                    return
                handed = True
                await self._run(job, reservation)
            finally:
                if not handed:
                    with contextlib.suppress(Exception):
                        await reservation.release()

    async def _reserve(self) -> Any:
        """A place under the host's cap, or None once stopping."""
        reserve = asyncio.create_task(self.runner.reserve())
        stop = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({reserve, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if reserve in done:
            reservation = reserve.result()
            if self._stopping.is_set():
                await reservation.release()
                return None
            return reservation
        reserve.cancel()
        with contextlib.suppress(BaseException):
            reservation = await reserve
            await reservation.release()
        return None

    async def _work_waiting(self) -> bool:
        """Sleep until a deploy may start (True), or the worker stops (False). Wakes on the
        dispatch notifications, at the next retry's due time, and every IDLE_FALLBACK seconds
        in case a notification was lost."""
        pause = 0.5
        while not self._stopping.is_set():
            seen = self.wake.generation
            try:
                ready, next_due = await self._probe()
            except (psycopg.Error, OSError) as exc:
                log.warning("dispatch probe failed (%s); again in %.1fs", exc, pause)
                await self._sleep(seen, pause)
                pause = min(pause * 2, LISTEN_RETRY_MAX)
                continue
            pause = 0.5
            if ready:
                return True
            timeout = IDLE_FALLBACK if next_due is None else max(0.0, min(IDLE_FALLBACK, next_due))
            await self._sleep(seen, timeout)
        return False

    async def _sleep(self, seen: int, within: float) -> None:
        stop = asyncio.create_task(self._stopping.wait())
        woken = asyncio.create_task(self.wake.wait(seen, within))
        try:
            await asyncio.wait({stop, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            woken.cancel()

    async def _probe(self) -> tuple[bool, float | None]:
        params = {"queue": QUEUE_NAME, "max_per_user": self.max_per_user}
        async with autocommit(self.pool) as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(PROBE, params)
            row = await cur.fetchone()
        assert row is not None
        at = row["next_due"]
        due = None if at is None else max(0.0, (at - pc_utils.utcnow()).total_seconds())
        return bool(row["ready"]), due

    async def _claim_once(self) -> Job | None:
        """One claim (its lock is held only while PostgreSQL runs it); None if nothing may start
        now or the database does not answer (the lane goes back to waiting)."""
        params = {
            "queue": QUEUE_NAME,
            "worker_id": self.worker_id,
            "max_per_user": self.max_per_user,
        }
        try:
            async with autocommit(self.pool) as conn, conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(CLAIM, params)
                row = await cur.fetchone()
        except (psycopg.Error, OSError) as exc:
            log.warning("claim failed: %s", exc)
            return None
        return Job.from_row(row) if row is not None else None

    async def _run(self, job: Job, reservation: Any, no_runner: str | None = None) -> None:
        assert job.id is not None
        self.busy[job.id] = job
        try:
            try:
                await self.run_job(job, reservation, no_runner)
            except WorkerStopping:
                await self._retry(job, 0)
                return
            except StateStoreError as exc:
                # Before Started: the workspace's state could not be read. The deploy stays
                # queued; its job comes back later (2, 4, ... 60 s).
                wait = min(2 ** (job.attempts + 1), STORE_RETRY_MAX_WAIT)
                log.warning("job %s: state store unavailable (%s); again in %ss", job.id, exc, wait)
                await self._retry(job, wait)
                return
            except Exception:
                # The deploy's outcome may be missing: recovery finds a deploy left without a
                # live job and concludes it (service/recovery.py).
                log.exception("job %s (%s) failed", job.id, job.task_kwargs)
                await self._finish(job, Status.FAILED)
                return
            await self._finish(job, Status.SUCCEEDED)
        finally:
            self.busy.pop(job.id, None)

    async def _finish(self, job: Job, status: Status) -> None:
        await self._db_retrying(
            f"finishing job {job.id}",
            lambda: self.manager.finish_job(
                job=job, status=status, delete_job=status == Status.SUCCEEDED
            ),
        )

    async def _retry(self, job: Job, seconds: float) -> None:
        at = pc_utils.utcnow() + timedelta(seconds=seconds)
        await self._db_retrying(
            f"requeueing job {job.id}", lambda: self.manager.retry_job(job=job, retry_at=at)
        )

    async def _db_retrying(self, what: str, fn: Callable[[], Awaitable[Any]]) -> None:
        """Closing a job must not be lost to a short outage (the job would stay 'doing' until
        recovery takes it for dead)."""
        pause, deadline = 0.5, time.monotonic() + 300
        while True:
            try:
                await fn()
                return
            except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
                if time.monotonic() > deadline:
                    log.error("%s: gave up (%s); recovery will close it", what, exc)
                    return
                log.warning("%s failed (%s); again in %.1fs", what, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, LISTEN_RETRY_MAX)

    # ------------------------------------------------------------ heartbeat and wake-ups

    async def _heartbeat(self) -> None:
        """Keep this dispatcher's worker row alive. If it was pruned (a long outage made it
        look dead to another worker), register again and take the running jobs back."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(HEARTBEAT, {"worker_id": self.worker_id})
                    alive = await cur.fetchone()
                    if alive is None:
                        self.worker_id = int(await self.manager.register_worker())
                        await conn.execute(
                            ADOPT_JOBS,
                            {"worker_id": self.worker_id, "job_ids": list(self.busy)},
                        )
                        log.warning("dispatcher re-registered as worker %s", self.worker_id)
            except Exception as exc:
                log.debug("heartbeat failed: %s", exc)

    async def _listen(self) -> None:
        """LISTEN for what may let a waiting deploy start; wake every idle lane on each."""
        pause = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.listen_url, autocommit=True
                ) as conn:
                    for channel in CHANNELS:
                        await conn.execute(f'LISTEN "{channel}"')
                    pause = 0.5
                    self.wake.notify()  # whatever happened while we were not listening
                    async for _ in conn.notifies():
                        self.wake.notify()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("dispatch listener lost (%s); again in %.1fs", exc, pause)
            self.wake.notify()
            await asyncio.sleep(pause)
            pause = min(pause * 2, LISTEN_RETRY_MAX)
