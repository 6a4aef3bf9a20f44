"""Recovery of deploys whose worker died (killed, host lost): runs in every worker.

procrastinate's workers write a heartbeat every ``HEARTBEAT_INTERVAL`` seconds. Every
``SCAN_INTERVAL`` seconds each worker looks for ``run_deploy`` jobs still ``doing`` whose worker's
heartbeat is older than ``STALLED_AFTER`` (procrastinate's ``get_stalled_jobs``), and for each:

- the deploy is still ``queued`` for that attempt (the worker died before ``Started``): any
  container it had created is removed and the job goes back to ``todo`` (``retry_job``);
- the deploy is ``running`` that attempt: the attempt's orphaned run (its container found by
  its labels, its local sandbox by its run record; the latest run of the attempt) is taken over — collected if it had exited (also when the dead worker's terraform had ended but
  its state was not yet persisted: runners keep the container / temp dir until the outcome is
  recorded), otherwise interrupted (SIGINT, grace, SIGKILL) — and concluded exactly like a
  normal outcome (``Deployer.conclude``: state checked and persisted first,
  then ``AttemptSucceeded`` or ``AttemptFailed(reason="worker_lost")``, whose ``Retried`` queues
  the next attempt at once); then the job is finished (``failed``) so the workspace lock frees.
  A local orphan still holds its place under the cap (its process tree holds the slot's lock)
  until it is interrupted here, so the cap counts it meanwhile;
- anything else (the outcome was recorded but the job not closed): the job is finished.

Two recoverers never act on one job: each takes a transaction-scoped advisory lock on the job id
and checks, under it, that the job is still ``doing`` with a stale heartbeat; and the lifecycle
refuses a second outcome for one attempt (``IllegalTransition``).

A live worker keeps the heartbeat of the jobs it runs fresh on its own (``keep_alive``), even
while procrastinate's worker is being restarted after a connection loss, so a deploy that is
still running is not taken for dead; it also never recovers a deploy it runs itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from procrastinate import utils as pc_utils
from procrastinate.jobs import Status

from service import store
from service.deployer import Deployer
from service.lifecycle import fold
from service.queue import TASK_NAME
from service.runners.base import RunResult
from service.runners.docker import DockerRunner

log = logging.getLogger("tfdeploy.recovery")

# The recovery bound (docs/reliability.md): a dead worker's job is seen stale STALLED_AFTER s
# after its last heartbeat, and found by the next scan (SCAN_INTERVAL); then a running
# container gets the runner's grace period (10 s) to stop. Kill -> next attempt's Started is
# thus at most HEARTBEAT_INTERVAL + STALLED_AFTER + SCAN_INTERVAL + grace + collection time
# (about 25 s plus a few seconds of work). Constants, not settings: the heartbeat and the
# stalled threshold must agree across all workers sharing a database.
HEARTBEAT_INTERVAL = 2.0
STALLED_AFTER = 10.0
SCAN_INTERVAL = 3.0
LOCK_NAMESPACE = 0x7466_6472  # "tfdr": advisory locks of recovery, keyed by job id

STILL_STALLED = """
SELECT 1
  FROM procrastinate_jobs j
  LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
 WHERE j.id = %(job_id)s
   AND j.status = 'doing'
   AND (j.worker_id IS NULL OR w.id IS NULL
        OR w.last_heartbeat < now() - make_interval(secs => %(secs)s))
"""

# Every deploy ends (#12): a deploy that is queued, deploying or retrying always has a live job
# (todo or doing) -- the job is inserted with the event that queues it, and finished only after
# the outcome is recorded. One without (procrastinate marked its job failed or aborted, or it
# was deleted) would wait for ever: recovery finds it, ORPHAN_GRACE seconds after its last event
# (reads that raced an append see it again next scan), and concludes it.
ORPHANED_DEPLOYS = """
SELECT d.id::text AS id
FROM deploys d
WHERE d.status IN ('queued', 'deploying', 'retrying')
  AND d.updated_at < now() - make_interval(secs => %(grace)s)
  AND NOT EXISTS (SELECT FROM procrastinate_jobs j
                  WHERE j.status IN ('todo', 'doing') AND j.args->>'deploy_id' = d.id::text)
ORDER BY d.updated_at
LIMIT %(limit)s
"""
STILL_ORPHANED = """
SELECT 1 FROM deploys d
WHERE d.id = %(id)s::uuid AND d.status IN ('queued', 'deploying', 'retrying')
  AND NOT EXISTS (SELECT FROM procrastinate_jobs j
                  WHERE j.status IN ('todo', 'doing') AND j.args->>'deploy_id' = d.id::text)
"""
ORPHAN_GRACE = 5.0
ORPHANS_PER_SCAN = 50
ORPHAN_LOCKS = 0x7466_646F  # "tfdo": advisory locks of recovery, keyed by deploy id

KEEP_ALIVE = """
UPDATE procrastinate_workers w
   SET last_heartbeat = now()
  FROM procrastinate_jobs j
 WHERE j.worker_id = w.id
   AND j.status = 'doing'
   AND j.task_name = %(task)s
   AND j.args->>'deploy_id' = ANY(%(ids)s)
"""


class Recovery:
    def __init__(self, pool: Any, queue: Any, deployer: Deployer) -> None:
        self.pool = pool
        self.manager = queue.app.job_manager
        self.deployer = deployer
        self.runner = deployer.runner

    # -- the loops ------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Scan every SCAN_INTERVAL seconds until ``stopping`` is set; errors (a database
        outage) are logged and the next scan tries again."""
        while not stopping.is_set():
            try:
                await self.scan_once()
                await self.scan_orphaned()
            except Exception:
                log.warning("recovery scan failed; next one in %.0fs", SCAN_INTERVAL, exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), SCAN_INTERVAL)

    async def keep_alive(self) -> None:
        """Keep the heartbeat of the jobs this process runs fresh (until cancelled)."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            ids = sorted(self.deployer.active)
            if not ids:
                continue
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(KEEP_ALIVE, {"task": TASK_NAME, "ids": ids})
            except Exception as exc:
                log.debug("keep-alive failed: %s", exc)

    # -- one scan -------------------------------------------------------------------------

    async def scan_once(self) -> list[tuple[int, str]]:
        """Recover every stalled job once; returns (job id, what was done) for each acted on."""
        jobs = await self.manager.get_stalled_jobs(
            task_name=TASK_NAME, seconds_since_heartbeat=STALLED_AFTER
        )
        done = []
        for job in jobs:
            kwargs = job.task_kwargs or {}
            deploy_id, attempt = str(kwargs.get("deploy_id")), int(kwargs.get("attempt", 0))
            if deploy_id in self.deployer.active:
                continue  # it runs here: not dead (our heartbeat was late)
            assert job.id is not None
            try:
                outcome = await self.recover(job.id, deploy_id, attempt)
            except Exception:
                log.exception("recovery of job %s (deploy %s) failed; will try again", job.id, deploy_id)
                continue
            if outcome is not None:
                done.append((job.id, outcome))
        return done

    async def scan_orphaned(self) -> list[tuple[str, str]]:
        """Conclude every deploy left unfinished without a live job; returns (deploy id, what
        was done) for each acted on."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                ORPHANED_DEPLOYS, {"grace": ORPHAN_GRACE, "limit": ORPHANS_PER_SCAN}
            )
            ids = [row[0] for row in await cur.fetchall()]
        done = []
        for deploy_id in ids:
            if deploy_id in self.deployer.active:
                continue  # it runs here
            try:
                outcome = await self.recover_orphaned(deploy_id)
            except Exception:
                log.exception("recovery of deploy %s (no live job) failed; will try again", deploy_id)
                continue
            if outcome is not None:
                done.append((deploy_id, outcome))
        return done

    async def recover_orphaned(self, deploy_id: str) -> str | None:
        """One deploy without a live job, unless another recoverer holds it or it has one again.
        Queued: a job is queued for it again (nothing ran, nothing is spent). Running: its run
        is taken over like a dead worker's and concluded (``runner_lost``): retried while
        attempts remain."""
        async with self.pool.connection() as guard, guard.transaction():
            cur = await guard.execute(
                "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (ORPHAN_LOCKS, deploy_id)
            )
            if not (await cur.fetchone())[0]:
                return None
            cur = await guard.execute(STILL_ORPHANED, {"id": deploy_id})
            if await cur.fetchone() is None:
                return None
            async with self.pool.connection() as conn:
                stream = await store.read_stream(conn, deploy_id)
            state = fold(e.event for e in stream)
            if state.phase == "queued":
                await self.deployer.deploys.requeue(deploy_id)
                log.warning("deploy %s: its job was lost before it started; queued again", deploy_id)
                return "requeued"
            if state.phase == "running":
                await self._conclude_orphan(
                    deploy_id, state.attempt, state.workspace, state.action, lost="runner_lost",
                    note="its job was lost while the attempt ran",
                )
                log.warning("deploy %s attempt %s: its job was lost; concluded", deploy_id, state.attempt)
                return "concluded"
            return None

    async def recover(self, job_id: int, deploy_id: str, attempt: int) -> str | None:
        """Take over one stalled job, unless another recoverer holds it or it is no longer
        stalled. Returns what was done, or None."""
        async with self.pool.connection() as guard, guard.transaction():
            cur = await guard.execute(
                "SELECT pg_try_advisory_xact_lock(%s, (%s::bigint %% 2147483647)::int)",
                (LOCK_NAMESPACE, job_id),
            )
            if not (await cur.fetchone())[0]:
                return None
            cur = await guard.execute(STILL_STALLED, {"job_id": job_id, "secs": STALLED_AFTER})
            if await cur.fetchone() is None:
                return None
            return await self._take_over(job_id, deploy_id, attempt)

    async def _take_over(self, job_id: int, deploy_id: str, attempt: int) -> str:
        async with self.pool.connection() as conn:
            stream = await store.read_stream(conn, deploy_id)
        state = fold(e.event for e in stream)
        if stream and state.phase == "queued" and state.next_attempt == attempt:
            # Died before Started: nothing ran. A container it had created is removed; the job
            # goes back to the queue (it keeps its workspace lock and its place).
            await self._remove_containers(deploy_id, attempt)
            await self.manager.retry_job_by_id_async(job_id=job_id, retry_at=pc_utils.utcnow())
            log.warning("deploy %s attempt %s: worker lost before start; job %s requeued", deploy_id, attempt, job_id)
            return "requeued"
        if stream and state.phase == "running" and state.attempt == attempt:
            await self._conclude_orphan(deploy_id, attempt, state.workspace, state.action)
            outcome = "concluded"
        else:
            await self._remove_containers(deploy_id, attempt)
            outcome = "closed"  # its outcome is recorded already; only the job was left open
        await self.manager.finish_job_by_id_async(job_id=job_id, status=Status.FAILED, delete_job=False)
        log.warning("deploy %s attempt %s: worker lost; job %s %s", deploy_id, attempt, job_id, outcome)
        return outcome

    async def _conclude_orphan(
        self,
        deploy_id: str,
        attempt: int,
        workspace: str,
        action: str,
        *,
        lost: str = "worker_lost",
        note: str = "worker lost",
    ) -> None:
        request = await self.deployer.prepare(deploy_id, attempt, workspace, action)
        result: RunResult | None = None
        containers: list[dict[str, Any]] = []
        if isinstance(self.runner, DockerRunner):
            containers = await self._containers(deploy_id, attempt)
            # Every run of the attempt is stopped; the latest that started tells its end.
            for c in sorted(containers, key=lambda c: int(c["run"]) if c["run"].isdigit() else 1):
                collected = await self.runner.collect_orphan(c["id"])
                if collected is not None:
                    result = collected
            note = (
                f"{note}: took over its container ({len(containers)} found); "
                f"exit code {result.exit_code}" if result is not None else
                f"{note}: no started container of the attempt was found"
            )
        else:
            collect = getattr(self.runner, "collect_orphan", None)
            if collect is not None:
                result = await collect(deploy_id, attempt)
            note = (
                f"{note}: took over its terraform process; exit code {result.exit_code}"
                if result is not None else f"{note}: its terraform run could not be found"
            )
        if result is None:
            result = RunResult(exit_code=-1, state=None, error=note)
        await self.deployer.conclude_recovered(deploy_id, request, result, note, lost=lost)
        # Only now, with the state persisted and the outcome recorded, does what held the state
        # go: a recoverer that dies before this leaves it to the next one. A run this very
        # process kept (its outcome could not be recorded) gives its place back too.
        await self._remove_containers(deploy_id, attempt)
        await self.deployer.release_kept(deploy_id, attempt)

    async def _containers(self, deploy_id: str, attempt: int) -> list[dict[str, Any]]:
        assert isinstance(self.runner, DockerRunner)
        return [
            c
            for c in await self.runner.find_orphans(include_own=True)
            if c["deploy_id"] == deploy_id and c["attempt"] == str(attempt)
        ]

    async def _remove_containers(self, deploy_id: str, attempt: int) -> None:
        if isinstance(self.runner, DockerRunner):
            for c in await self._containers(deploy_id, attempt):
                await self.runner.remove_container(c["id"])
        else:
            discard = getattr(self.runner, "discard_orphan", None)
            if discard is not None:
                await discard(deploy_id, attempt)
