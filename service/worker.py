"""The worker process: the deploy dispatcher's lanes running ``Deployer.handle``, and
procrastinate's own worker for the maintenance tasks, both supervised.

Deploy jobs are taken by ``service/dispatch.py`` (a lane holds a place under the host's cap,
then claims the fairest job); procrastinate's worker runs only the ``maintenance`` queue (its
periodic tasks). procrastinate's worker stops when its database connection drops; the
supervisor starts it again with a growing pause. The dispatcher rides out an outage itself.

Alongside them run the recovery of deploys whose worker died (``service/recovery.py``) and the
keep-alive of this process's own jobs' heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from service import planning
from service.deployer import Deployer, default_worker_name
from service.dispatch import Dispatcher, lane_count
from service.maintenance import Maintenance
from service.queue import MAINTENANCE_QUEUE
from service.recovery import HEARTBEAT_INTERVAL, STALLED_AFTER, Recovery
from service.runners import Runner, make_runner
from service.services import Services
from service.statestores import StateStore, make_state_store

log = logging.getLogger("tfdeploy.worker")

RESTART_PAUSE_MAX = 10.0


class Worker:
    def __init__(
        self,
        services: Services,
        *,
        name: str | None = None,
        runner: Runner | None = None,
        state_store: StateStore | None = None,
        local_fallback: bool = False,
    ) -> None:
        """``local_fallback``: with TFDEPLOY_RUNNER unset and no Docker engine, use the local
        runner (``tfdeploy up``) instead of refusing to start (RunnerError)."""
        self.services = services
        self.settings = services.settings
        self.name = name or default_worker_name()
        self.runner = runner or make_runner(self.settings, local_fallback=local_fallback)
        services.extras["runner"] = self.runner.name  # what /health names
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
        if not services.extras.get("maintenance_tasks"):
            # Periodic tasks, once per process (their jobs run on the maintenance queue).
            planning.register_plan_expiry(
                services.queue.app, services.deploys, self.settings.plan_ttl,
                queue=MAINTENANCE_QUEUE,
            )
            services.extras["maintenance_tasks"] = True
        self.recovery = Recovery(services.pool, services.queue, self.deployer)
        self.dispatcher = Dispatcher(
            pool=services.pool,
            manager=services.queue.app.job_manager,
            listen_url=services.database_url,
            runner=self.runner,
            run_job=self._run_job,
            lanes=lane_count(self.settings.max_concurrency),
            max_per_user=self.settings.max_running_per_user,
            heartbeat_interval=HEARTBEAT_INTERVAL,
        )
        self._stopping = asyncio.Event()
        self._grace_timer: asyncio.TimerHandle | None = None

    async def _run_job(self, job: Any, reservation: Any, no_runner: str | None) -> None:
        """A claimed job, run in the place its lane holds (``handle`` gives the place back
        when nothing runs); without a place, failed with why the runner could give none."""
        kwargs = job.task_kwargs or {}
        await self.deployer.handle(
            str(kwargs["deploy_id"]), int(kwargs["attempt"]), reservation, no_runner=no_runner
        )

    async def run(self) -> None:
        """Run until ``stop()``.

        On ``stop()`` no new job is taken; running ones finish, or are handed over when the
        shutdown grace is over (``stop()``'s docstring)."""
        side = [
            asyncio.create_task(self.recovery.run(self._stopping), name="recovery"),
            asyncio.create_task(self.recovery.keep_alive(), name="keep-alive"),
            asyncio.create_task(self._supervise_maintenance(), name="maintenance"),
        ]
        try:
            await self.dispatcher.run(self._stopping)
        finally:
            for task in side:
                task.cancel()
            for task in side:
                with contextlib.suppress(BaseException):
                    await task

    async def _supervise_maintenance(self) -> None:
        """procrastinate's worker on the maintenance queue (periodic tasks), restarted with a
        growing pause whenever it stops (its database connection dropped)."""
        pause = 0.5
        while not self._stopping.is_set():
            try:
                await self.services.queue.app.run_worker_async(
                    queues=[MAINTENANCE_QUEUE],
                    name=f"{self.name}-maintenance",
                    concurrency=1,
                    install_signal_handlers=False,
                    listen_notify=True,
                    delete_jobs="successful",
                    update_heartbeat_interval=HEARTBEAT_INTERVAL,
                    stalled_worker_timeout=STALLED_AFTER,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("maintenance worker stopped (%s); restarting in %.1fs", exc, pause)
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

