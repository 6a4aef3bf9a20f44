"""One attempt of a deploy, start to end: the worker's side of the lifecycle.

a place under the cap (``runner.reserve``) -> the run's inputs and steps -> its container /
sandbox (``runner.prepare``) -> ``Started`` -> terraform runs (output into the log store,
bounded) -> the state it left is checked and persisted -> the outcome goes to the decider
(``Succeeded``, ``Failed`` + ``Retried``, ``Cancelled``, or for a plan run ``PlanMade``) -> if
the state cannot be persisted, destroy what the apply made; if it is not a state at all, rescue
what there is and fail (``state_invalid``).

Which run an attempt makes follows the deploy's state (``service.planning.run_for``): a whole
run; a plan (speculative, or one that waits for approval: its plan file is sealed and kept
before ``PlanMade``); or the apply of an approved saved plan, with the lock file it was made with.

This module holds the attempt from its job to ``Started``, and the run with its watchers (a
cancel, the worker's hand-over); the pieces: what a run gets (``deployer_request``), its output
on the way to the log table (``deployer_log``), the conclusion -- state first, then the outcome
(``deployer_outcome``) -- and a state that cannot be kept (``deployer_rescue``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from service import store, workspaces
from service.deployer_log import LogWriter
from service.deployer_outcome import Outcomes, failure_reason
from service.deployer_request import run_request
from service.deploys import Deploys, NotFound
from service.lifecycle import (
    AttemptFailed,
    DeployState,
    IllegalTransition,
    StartAttempt,
    fold,
)
from service.planning import PlanUnavailable
from service.providers import Providers
from service.queue import WorkerStopping
from service.runners.base import (
    Reservation,
    Runner,
    RunnerError,
    RunRequest,
    RunResult,
    Slot,
    Step,
)
from service.secrets import Masker, SecretBox
from service.settings import Settings
from service.statestores.base import StateStore

log = logging.getLogger("tfdeploy.deployer")

CANCEL_POLL_SECONDS = 1.0


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Deployer:
    def __init__(
        self,
        settings: Settings,
        deploys: Deploys,
        runner: Runner,
        state_store: StateStore,
        secret_box: SecretBox,
        *,
        worker_name: str | None = None,
    ) -> None:
        self.settings = settings
        self.deploys = deploys
        self.pool = deploys.pool
        self.runner = runner
        self.state_store = state_store
        self.box = secret_box
        # Providers: mirror, host cache, the run's CLI config (docs/providers.md).
        self.providers = Providers(settings)
        self.worker = worker_name or default_worker_name()
        self.actor = f"worker:{self.worker}"
        #: deploys whose attempt runs in this process now: recovery leaves them alone, and the
        #: worker keeps their jobs' heartbeats fresh (service/recovery.py)
        self.active: set[str] = set()
        #: runs whose outcome could not be recorded, kept for recovery with what they hold (the
        #: state terraform left, a local place): (deploy id, attempt) -> slot. Recovery, once it
        #: concluded the attempt from what the run left, gives them back (``release_kept``).
        self.kept: dict[tuple[str, int], Slot] = {}
        #: set when the worker is told to stop: a job that gets its slot after that gives the
        #: job back instead of starting terraform (prefetched jobs wait for slots; see worker.py)
        self.stopping = asyncio.Event()
        #: set when the stopping worker's grace is over: running attempts are interrupted (state
        #: kept) and handed over to another worker, without spending the deploy's budget
        self.handing_over = asyncio.Event()
        #: each attempt's conclusion: state first, then the outcome (service/deployer_outcome.py)
        self.outcomes = Outcomes(settings, deploys, runner, state_store, secret_box, self.actor)

    def hand_over(self, why: str) -> None:
        """Interrupt every running attempt now (SIGINT: terraform writes its state), persist
        what it left and queue the next attempt for another worker (``worker_stopped``)."""
        if not self.handing_over.is_set():
            log.warning("interrupting %d running deploy(s): %s", len(self.active), why)
            self.handing_over.set()

    # ------------------------------------------------------------ entry point

    async def handle(
        self,
        deploy_id: str,
        attempt: int,
        reservation: Reservation | None = None,
        *,
        no_runner: str | None = None,
    ) -> None:
        """Run ``attempt`` of ``deploy_id`` if it is still wanted; a stale job does nothing.

        ``reservation``: a place under the cap the caller already holds (a dispatcher reserves
        before it takes a deploy off the queue); without one, a place is reserved here, before
        the attempt's inputs are read. Either way it is given back if nothing runs.
        ``no_runner``: the caller could not reserve a place because the runner cannot work at
        all (why): the attempt fails with ``runner_error`` at once."""
        try:
            async with self.pool.connection() as conn:
                stream = await store.read_stream(conn, deploy_id)
                state = fold(e.event for e in stream)
                # Asked again as the attempt is about to start: the owner may have removed
                # the requester (or an admin disabled them) while the deploy waited.
                revoked = (
                    await workspaces.requester_standing(conn, state.workspace_id, state.owner)
                    if state.phase == "queued" and state.workspace_id and state.owner
                    else None
                )
            if state.phase != "queued" or state.next_attempt != attempt:
                log.info(
                    "skipping job for %s attempt %s: deploy is %s", deploy_id, attempt, state.phase
                )
                if reservation is not None:
                    await reservation.release()
                return
        except BaseException:
            if reservation is not None:
                await reservation.release()
            raise
        if revoked is not None:
            # It must not run against the workspace's later state. Final, not retried.
            if reservation is not None:
                await reservation.release()
            await self._start_and_fail(deploy_id, "access_revoked", revoked)
            return
        if no_runner is not None and reservation is None:
            # Without a runner there is no attempt; count it as one so the budget bounds it.
            await self._start_and_fail(deploy_id, "runner_error", no_runner)
            return
        self.active.add(deploy_id)
        try:
            await self._handle_queued(deploy_id, attempt, state, reservation)
        finally:
            self.active.discard(deploy_id)

    async def _handle_queued(
        self,
        deploy_id: str,
        attempt: int,
        state: DeployState,
        reservation: Reservation | None,
    ) -> None:
        if reservation is None:
            try:
                reservation = await self.runner.reserve()
            except RunnerError as exc:
                # Without a runner there is no attempt; count it as one so the budget bounds it.
                await self._start_and_fail(deploy_id, "runner_error", str(exc))
                return
        try:
            request = await self.prepare(
                deploy_id, attempt, state.workspace, state.action, deploy=state
            )
        except PlanUnavailable as exc:
            # The approved plan cannot be applied (stale, gone): the attempt fails, and the
            # next one plans again from the workspace's latest state.
            await reservation.release()
            await self._start_and_fail(deploy_id, exc.reason, str(exc))
            return
        except BaseException:
            await reservation.release()
            raise
        try:
            slot = await self.runner.prepare(reservation, request)
        except RunnerError as exc:
            await self._start_and_fail(deploy_id, "runner_error", str(exc))
            return
        if self.stopping.is_set():
            # Not started: nothing to keep. The job goes back to the queue for another worker
            # (queue.py retries WorkerStopping at once) rather than run past a shutdown.
            await slot.release()
            raise WorkerStopping(f"worker {self.worker} is stopping; attempt {attempt} not started")
        try:
            await self.deploys.execute(
                deploy_id, StartAttempt(runner=self.runner.name, worker=self.worker), self.actor
            )
        except (IllegalTransition, NotFound):
            await slot.release()  # cancelled while it waited for a slot
            return
        except BaseException:
            await slot.release()
            raise
        try:
            await self._run_started(deploy_id, slot.request, slot)
        except BaseException:
            # Started is recorded: whatever the run left stays for recovery to conclude from.
            self.kept.setdefault((deploy_id, attempt), slot)
            raise

    async def _start_and_fail(self, deploy_id: str, reason: str, message: str) -> None:
        with contextlib.suppress(IllegalTransition):
            await self.deploys.execute(
                deploy_id, StartAttempt(runner=self.runner.name, worker=self.worker), self.actor
            )
            await self.deploys.execute(
                deploy_id,
                AttemptFailed(
                    reason=reason, message=message, retry_delay=self.settings.retry_delay
                ),
                self.actor,
            )

    async def prepare(
        self,
        deploy_id: str,
        attempt: int,
        workspace: str,
        action: str,
        *,
        steps: list[Step] | None = None,
        run: int | None = None,
        deploy: DeployState | None = None,
    ) -> RunRequest:
        """The request of a run of ``attempt`` (``service.deployer_request.run_request``): its
        inputs, the workspace's latest state, and ``steps`` -- without them, the run the deploy
        is at; PlanUnavailable when an approved plan cannot be applied."""
        return await run_request(
            deploy_id,
            attempt,
            steps=steps,
            run=run,
            deploy=deploy,
            pool=self.pool,
            box=self.box,
            state_store=self.state_store,
            providers=self.providers,
            settings=self.settings,
        )

    # ------------------------------------------------------------ the attempt

    async def _run_started(self, deploy_id: str, request: RunRequest, slot: Slot) -> None:
        masker = Masker(request.secrets)
        writer = LogWriter(self.pool, deploy_id, request.attempt, masker)
        cancel = asyncio.Event()
        handed_over = False

        async def watch_hand_over() -> None:
            nonlocal handed_over
            await self.handing_over.wait()
            handed_over = True
            await writer.line(
                "system",
                "worker stopping: interrupting terraform; its state is kept and another worker "
                "goes on with the next attempt",
            )
            cancel.set()

        watchers = [
            asyncio.create_task(self._watch_cancel(deploy_id, cancel)),
            asyncio.create_task(watch_hand_over()),
        ]
        concluded = False
        try:
            try:
                result = await self.runner.run(slot, writer.line, cancel)
            except RunnerError as exc:
                await writer.line("system", f"runner error: {exc}")
                result = RunResult(exit_code=-1, state=None, error=str(exc))
                reason = "runner_error"
            else:
                reason = (
                    "worker_stopped"
                    if handed_over and result.interrupted
                    else failure_reason(result)
                )
            await self.conclude(deploy_id, request, result, reason, writer, slot=slot)
            concluded = True
        finally:
            for watcher in watchers:
                watcher.cancel()
            for watcher in watchers:
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await writer.close()
            # The slot (the exited container, the temp dir) holds the state terraform left: it
            # goes only once that state is persisted and the outcome recorded. If concluding
            # failed (PostgreSQL away past the bound, the job cancelled), it is left for
            # recovery / an operator rather than lose the state (docs/reliability.md).
            if concluded:
                await slot.release()
            else:
                self.kept[(deploy_id, request.attempt)] = slot
                log.error(
                    "outcome of %s attempt %s not recorded; its run is kept",
                    deploy_id,
                    request.attempt,
                )

    async def release_kept(self, deploy_id: str, attempt: int) -> None:
        """Give back what a run kept for recovery (its place under the cap above all), once
        recovery concluded the attempt from what it left."""
        slot = self.kept.pop((deploy_id, attempt), None)
        if slot is not None:
            with contextlib.suppress(Exception):
                await slot.release()

    async def _watch_cancel(self, deploy_id: str, cancel: asyncio.Event) -> None:
        while not cancel.is_set():
            await asyncio.sleep(CANCEL_POLL_SECONDS)
            with contextlib.suppress(Exception):
                view = await self.deploys.get(deploy_id)
                if view is not None and view.cancel_requested:
                    cancel.set()

    async def conclude_recovered(
        self,
        deploy_id: str,
        request: RunRequest,
        result: RunResult,
        note: str,
        lost: str = "worker_lost",
    ) -> None:
        """Conclude an attempt whose worker died (``service/recovery.py``): the same path as a
        normal outcome, with ``lost`` as the failure reason (``worker_lost``; ``runner_lost``
        for an attempt whose job vanished under it), unless the run's state itself is refused
        (``state_invalid``)."""
        writer = LogWriter(self.pool, deploy_id, request.attempt, Masker(request.secrets))
        reason = "state_invalid" if result.state_problem is not None else lost
        try:
            await writer.line("system", note)
            await self.conclude(deploy_id, request, result, reason, writer)
        finally:
            await writer.close()

    async def conclude(
        self,
        deploy_id: str,
        request: RunRequest,
        result: RunResult,
        reason: str,
        writer: LogWriter,
        *,
        slot: Slot | None = None,
    ) -> None:
        """State first, then the outcome (``Outcomes.conclude``, service/deployer_outcome.py).
        ``reason`` ``worker_stopped``: this worker interrupted the run to stop (not a user's
        cancel). ``slot``: the run's, still held (a destroy may use its place)."""
        await self.outcomes.conclude(deploy_id, request, result, reason, writer, slot=slot)
