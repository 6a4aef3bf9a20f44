"""The job queue: procrastinate in the same PostgreSQL. Two tasks: ``run_deploy`` and, in a queue
of its own, the periodic ``maintenance`` (retention: service/maintenance.py).

A job carries only a deploy id and the attempt it is meant to run; the deploy's event stream
decides whether that is still wanted (a stale job of a cancelled deploy does nothing). Jobs of one
workspace share a procrastinate ``lock``, so they run one at a time, in the order queued.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import procrastinate
from procrastinate.jobs import Job
from procrastinate.retry import BaseRetryStrategy, RetryDecision

from service.statestores.base import StateStoreError

QUEUE_NAME = "deploys"
# procrastinate's own worker runs only this queue: periodic maintenance (service/maintenance.py).
# Deploy jobs are claimed by the dispatcher (service/dispatch.py), never fetched by it.
MAINTENANCE_QUEUE = "maintenance"
TASK_NAME = "tfdeploy.run_deploy"

MAINTENANCE_TASK = "tfdeploy.maintenance"

Handler = Callable[[str, int], Awaitable[None]]
MaintenanceHandler = Callable[[], Awaitable[object]]


def workspace_lock(workspace: str) -> str:
    return f"workspace:{workspace}"


STORE_RETRY_MAX_WAIT = 60


class WorkerStopping(Exception):
    """Raised by a job that got its slot after its worker was told to stop: the attempt was
    not started, so the job goes straight back to the queue for another worker."""


class StoreUnavailableRetry(BaseRetryStrategy):
    """Run the job again later when the state store could not be read before the attempt began.

    A StateStoreError reaches the job only from reading the workspace's latest state before
    ``Started`` (after it, the deployer keeps state failures in the lifecycle: destroy, then
    ``Failed(state_not_persisted)``). Without a retry the job would end failed and the deploy
    stay queued with no job at all; with it the deploy stays queued until the store answers:
    2, 4, 8 ... 60 s apart, for as long as it takes (a cancel turns the next run into a no-op).
    A job that its stopping worker gave back unstarted (WorkerStopping) is free again at once.
    """

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if isinstance(exception, WorkerStopping):
            return RetryDecision(retry_in={"seconds": 0})
        if not isinstance(exception, StateStoreError):
            return None
        return RetryDecision(retry_in={"seconds": min(2 ** (job.attempts + 1), STORE_RETRY_MAX_WAIT)})


class Queue:
    # When the maintenance job is deferred (procrastinate's periodic deferrer, in every worker;
    # the database keeps one job per tick however many workers there are). Cron, with an
    # optional sixth field for seconds.
    maintenance_cron = "*/10 * * * *"

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        connector = procrastinate.PsycopgConnector(conninfo=url, min_size=1, max_size=pool_size)
        self.app = procrastinate.App(connector=connector, worker_defaults={"install_signal_handlers": False})
        self._handler: Handler | None = None
        self._maintenance: MaintenanceHandler | None = None

        # One maintenance job at a time (lock), and at most one waiting (queueing lock: ticks
        # missed while no worker ran do not pile up).
        @self.app.periodic(cron=self.maintenance_cron, periodic_id="retention")
        @self.app.task(
            name=MAINTENANCE_TASK,
            queue=MAINTENANCE_QUEUE,
            lock=MAINTENANCE_QUEUE,
            queueing_lock=MAINTENANCE_QUEUE,
        )
        async def maintenance(timestamp: int) -> None:
            if self._maintenance is None:
                raise RuntimeError("no maintenance handler installed in this process")
            await self._maintenance()

        self.maintenance = maintenance

        @self.app.task(name=TASK_NAME, queue=QUEUE_NAME, retry=StoreUnavailableRetry())
        async def run_deploy(deploy_id: str, attempt: int) -> None:
            if self._handler is None:
                raise RuntimeError("no deploy handler installed in this process")
            await self._handler(deploy_id, attempt)

        self.run_deploy = run_deploy

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    def set_maintenance(self, handler: MaintenanceHandler) -> None:
        self._maintenance = handler

    def run_job(
        self,
        *,
        deploy_id: str,
        attempt: int,
        workspace: str,
        delay: float = 0.0,
        holds_workspace: bool = True,
    ) -> Job:
        """The job that runs ``attempt``, as procrastinate makes it (queue, task, the workspace's
        lock, the schedule), not yet inserted: the caller inserts it in the transaction that
        appends the events, so it commits with them or not at all (service/deploys.py).

        The workspace's lock backs the claim's rule (service/dispatch.py) in the database: two
        jobs of one workspace are never taken at once. A speculative plan does not hold its
        workspace, so its job has no lock."""
        options: dict[str, Any] = {"lock": workspace_lock(workspace) if holds_workspace else None}
        if delay > 0:
            options["schedule_in"] = {"seconds": delay}
        return self.run_deploy.configure(**options).make_new_job(
            deploy_id=deploy_id, attempt=attempt
        )

    async def open(self) -> None:
        await self.app.open_async()

    async def close(self) -> None:
        await self.app.close_async()
