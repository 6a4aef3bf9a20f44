"""The worker process: procrastinate's worker running ``Deployer.handle``, supervised.

procrastinate's worker stops when its database connection drops; the supervisor starts it again
with a growing pause, so a PostgreSQL restart costs a short pause, not the worker.

Alongside it run the recovery of deploys whose worker died (``service/recovery.py``) and the
keep-alive of this process's own jobs' heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from service.deployer import Deployer, default_worker_name
from service.maintenance import Maintenance
from service.queue import MAINTENANCE_QUEUE, QUEUE_NAME
from service.recovery import HEARTBEAT_INTERVAL, STALLED_AFTER, Recovery
from service.runners import Runner, make_runner
from service.services import Services
from service.statestores import StateStore, make_state_store

log = logging.getLogger("tfdeploy.worker")

RESTART_PAUSE_MAX = 10.0
# Jobs fetched beyond the cap: they wait in the runner's acquire_slot, already folded and
# prepared, so a freed slot is refilled at once instead of after the ended job's bookkeeping,
# the next fetch and the next fold (docs/benchmarks.md, cap utilisation). The cap itself is the
# runner's; these only wait.
PREFETCH_MAX = 4
# procrastinate fetches again at once while it finds jobs, and on the NOTIFY of an inserted job;
# once a fetch found none (the queued jobs' workspaces were busy), a workspace lock released by a
# job ending is noticed only at this poll -- so keep it short.
FETCH_POLL_SECONDS = 0.25


def queue_concurrency(cap: int) -> int:
    """Jobs one worker runs at once: the cap plus up to PREFETCH_MAX waiting for a slot."""
    return cap + min(cap, PREFETCH_MAX)


class Worker:
    def __init__(
        self,
        services: Services,
        *,
        name: str | None = None,
        runner: Runner | None = None,
        state_store: StateStore | None = None,
    ) -> None:
        self.services = services
        self.settings = services.settings
        self.name = name or default_worker_name()
        self.runner = runner or make_runner(self.settings)
        self.state_store = state_store or make_state_store(self.settings, services.pool)
        self.deployer = Deployer(
            self.settings,
            services.deploys,
            self.runner,
            self.state_store,
            services.extras["secret_box"],
            worker_name=self.name,
        )
        services.queue.set_handler(self.deployer.handle)
        services.queue.set_maintenance(Maintenance(services, self.state_store).run)
        self.recovery = Recovery(services.pool, services.queue, self.deployer)
        self._stopping = asyncio.Event()
        self._grace_timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        """Run until ``stop()``; restart procrastinate's worker whenever it dies.

        On ``stop()`` no new job is taken; running ones finish, or are handed over when the
        shutdown grace is over (``stop()``'s docstring)."""
        side = [
            asyncio.create_task(self.recovery.run(self._stopping), name="recovery"),
            asyncio.create_task(self.recovery.keep_alive(), name="keep-alive"),
        ]
        try:
            await self._supervise()
        finally:
            for task in side:
                task.cancel()
            for task in side:
                with contextlib.suppress(BaseException):
                    await task

    async def _supervise(self) -> None:
        pause = 0.5
        while not self._stopping.is_set():
            worker_task = asyncio.create_task(
                self.services.queue.app.run_worker_async(
                    queues=[QUEUE_NAME, MAINTENANCE_QUEUE],
                    name=self.name,
                    concurrency=queue_concurrency(self.settings.max_concurrency),
                    install_signal_handlers=False,
                    listen_notify=True,
                    fetch_job_polling_interval=FETCH_POLL_SECONDS,
                    delete_jobs="successful",
                    # No shutdown_graceful_timeout (procrastinate's default: wait): past it,
                    # procrastinate would cancel the job and mark it aborted, leaving the deploy
                    # "deploying" with no job. Our grace (stop()) interrupts terraform and
                    # records the outcome instead.
                    # Frequent heartbeats: a dead worker's jobs are recovered STALLED_AFTER
                    # seconds after its last one (service/recovery.py, docs/reliability.md).
                    update_heartbeat_interval=HEARTBEAT_INTERVAL,
                    stalled_worker_timeout=STALLED_AFTER,
                )
            )
            stop_task = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait({worker_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if stop_task in done:
                worker_task.cancel()
                with contextlib.suppress(BaseException):
                    await worker_task
                break
            stop_task.cancel()
            exc = worker_task.exception() if not worker_task.cancelled() else None
            log.warning("queue worker stopped (%s); restarting in %.1fs", exc, pause)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=pause)
            pause = min(pause * 2, RESTART_PAUSE_MAX)

    def stop(self) -> None:
        """Stop taking jobs; let running deploys finish for the shutdown grace
        (``TFDEPLOY_SHUTDOWN_GRACE``, by default the deploy timeout). Past it -- or at once, on
        a second call (a second SIGTERM / Ctrl-C) -- they are interrupted with their state kept
        and handed over: ``Failed(worker_stopped)``, not counted against the budget, and the
        next attempt queued for another worker."""
        if self._stopping.is_set():
            self.deployer.hand_over("asked to stop again")
            return
        self.deployer.stopping.set()
        self._stopping.set()
        grace = self.settings.shutdown_grace_in_effect
        self._grace_timer = asyncio.get_running_loop().call_later(
            grace, self.deployer.hand_over, f"shutdown grace of {grace:g}s is over"
        )

    async def close(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        await self.runner.close()

