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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import socket
import time
from typing import Any

import msgspec
import psycopg
import psycopg_pool

from service import lockfiles, planning, store
from service.deploys import Deploys, NotFound
from service.lifecycle import (
    AttemptFailed,
    AttemptInterrupted,
    AttemptSucceeded,
    DeployState,
    IllegalTransition,
    PersistedState,
    PlanMade,
    StartAttempt,
    StateNotPersisted,
    fold,
)
from service.logs import append_lines
from service.planning import PlanUnavailable
from service.providers import Providers
from service.queries import q
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
from service.statestores import index, put_with_retries
from service.statestores.base import StateStore, StateStoreError
from service.workspaces import key_of as workspace_key

log = logging.getLogger("tfdeploy.deployer")

CANCEL_POLL_SECONDS = 1.0
LOG_FLUSH_SECONDS = 0.1
# Output waiting for the log table, at most: past it, ``LogWriter.line`` waits for a flush, and
# with it the runner's reading of terraform's output (backpressure, not memory).
LOG_BUFFER_BYTES = 1024 * 1024
# An outcome is never dropped because PostgreSQL is away (restart, failover): the deployer waits
# for it with a growing pause, at most the deploy timeout in all (docs/reliability.md).
DB_RETRY_PAUSE_MAX = 5.0
DB_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg_pool.PoolTimeout,
)


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class LogWriter:
    """Buffers terraform's output and writes it in small batches, masked, in order. The buffer
    is bounded (``LOG_BUFFER_BYTES``): a producer faster than the log table waits."""

    def __init__(self, pool: Any, deploy_id: str, attempt: int, masker: Masker) -> None:
        self.pool, self.deploy_id, self.attempt, self.masker = pool, deploy_id, attempt, masker
        self._buffer: list[tuple[str, str]] = []
        self._bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._wake = asyncio.Event()
        self._closed = False
        self._lock = asyncio.Lock()  # one flush at a time keeps lines in order
        self._task = asyncio.create_task(self._flusher())

    async def line(self, stream: str, text: str) -> None:
        while self._bytes >= LOG_BUFFER_BYTES and not self._closed:
            self._room.clear()
            self._wake.set()
            await self._room.wait()
        masked = self.masker.mask(text.rstrip("\n"))
        self._buffer.append((stream, masked))
        self._bytes += len(masked) + 16
        self._wake.set()

    async def flush(self) -> None:
        """Write every buffered line now: called before an outcome event is appended, so a
        deploy's output precedes the event that ends its attempt."""
        await self._flush()

    async def _flush(self) -> None:
        async with self._lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        while self._buffer:
            batch, self._buffer = self._buffer, []
            size, self._bytes = self._bytes, 0
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    # Consecutive lines of one stream go in one call.
                    for stream, group in itertools.groupby(batch, key=lambda x: x[0]):
                        lines = [text for _, text in group]
                        await append_lines(conn, self.deploy_id, self.attempt, stream, lines)
            except Exception:  # a log outage must not fail the deploy; keep the lines
                self._buffer[:0] = batch
                self._bytes += size
                log.exception("log write failed for %s; will retry", self.deploy_id)
                await asyncio.sleep(1)
                if self._closed:
                    return
            else:
                self._room.set()

    async def _flusher(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()
            await asyncio.sleep(LOG_FLUSH_SECONDS)

    async def close(self) -> None:
        self._closed = True
        self._room.set()
        self._wake.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._flush()


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
            if state.phase != "queued" or state.next_attempt != attempt:
                log.info("skipping job for %s attempt %s: deploy is %s", deploy_id, attempt, state.phase)
                if reservation is not None:
                    await reservation.release()
                return
        except BaseException:
            if reservation is not None:
                await reservation.release()
            raise
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
                AttemptFailed(reason=reason, message=message, retry_delay=self.settings.retry_delay),
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
        """The request of a run of ``attempt``: its inputs, the workspace's latest state, and
        ``steps``. Without ``steps``, the run the deploy is at (``deploy``, else read from its
        stream): a queued deploy's next run, a running one's current run (recovery) --
        ``planning.run_for``. The apply of an approved plan gets the saved plan and the lock
        file it was made with; if that plan is gone, or (for a run about to start) its base is
        no longer the workspace's latest state, PlanUnavailable."""
        kind = "run"
        if steps is None:
            if deploy is None:
                async with self.pool.connection() as conn:
                    deploy = fold(e.event for e in await store.read_stream(conn, deploy_id))
            kind = deploy.next_step if deploy.phase == "queued" else deploy.step
            steps, composed = planning.run_for(deploy, kind)
            run = run or composed
        saved: planning.SavedPlan | None = None
        async with self.pool.connection() as conn:
            cur = await conn.execute(q("get_inputs"), {"deploy_id": deploy_id})
            files, variables, _ = await cur.fetchone()
            cur = await conn.execute(q("get_secrets"), {"deploy_id": deploy_id})
            row = await cur.fetchone()
            # The workspace's key (its id) keys its state, whatever name the stream gave.
            workspace = await workspace_key(conn, deploy_id)
            latest = await index.latest(conn, workspace)
            kept_lock = await lockfiles.latest(conn, workspace)
            if kind == "apply" and deploy is not None:
                plan_id = deploy.plan.plan_id if deploy.plan is not None else ""
                try:
                    saved = await planning.load_plan(conn, self.box.keyring, deploy_id, plan_id)
                except PlanUnavailable:
                    if deploy.phase == "queued":
                        raise
                    # Recovery concludes a run that already happened: it needs the run's
                    # state and secrets, not the plan it applied.
                    saved = None
                now = latest.version if latest is not None else None
                base = saved.base_state_version if saved is not None else now
                if deploy.phase == "queued" and now != base:
                    raise PlanUnavailable(
                        "plan_stale",
                        f"the approved plan was made against state version {base}, but the "
                        f"workspace is at {now}: planning again",
                    )
        if saved is not None:
            # The providers the plan was made with: its lock file wins over the deploy's own.
            files = {k: v for k, v in files.items() if k != lockfiles.LOCK_FILE_NAME}
            if saved.lock_file is not None:
                kept_lock = saved.lock_file.decode()
        secrets = self.box.decrypt(bytes(row[0])) if row else {}
        start_state = None
        if latest is not None:
            start_state = await self.state_store.get(workspace, latest.version, latest.location)
        return RunRequest(
            deploy_id=deploy_id,
            attempt=attempt,
            run=run or 1,
            workspace=workspace,
            steps=steps,
            # The files, the lock file to use and how providers install (a host-side fill of
            # the provider cache may happen here, before the run takes a place under the cap).
            **await self.providers.run_inputs(files, kept_lock),
            saved_plan=saved.plan if saved is not None else None,
            state=start_state,
            variables=variables,
            secrets=secrets,
            timeout=self.settings.deploy_timeout,
            max_output_bytes=self.settings.max_output_bytes,
            max_state_bytes=self.settings.max_state_bytes,
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
                reason = "worker_stopped" if handed_over and result.interrupted else failure_reason(result)
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
                log.error("outcome of %s attempt %s not recorded; its run is kept", deploy_id, request.attempt)

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
        """State first, then the outcome: persist what terraform left, then AttemptSucceeded /
        AttemptFailed / AttemptInterrupted (a plan run that ended well: PlanMade, its plan
        kept first); destroy if the state cannot be kept, rescue and fail (``state_invalid``)
        if it is not a state. ``reason`` ``worker_stopped``: this worker interrupted the run to
        stop (not a user's cancel). ``slot``: the run's, still held (a destroy may use its
        place)."""
        masker = writer.masker
        # PostgreSQL holds the index (and by default the state): if it is away, wait for it
        # rather than treat a short outage as a refusing store.
        await self._wait_for_db()
        handed_over = reason == "worker_stopped"
        # A run that ended well just as the stopping worker interrupted it is simply done.
        ok = (
            result.exit_code == 0
            and result.failed_step is None
            and not (result.timed_out or result.runner_lost or result.output_limited)
            and (handed_over or not result.interrupted)
        )
        if result.state_problem is not None:
            await self._state_invalid(deploy_id, request, result, result.state_problem, writer)
            return
        persisted: PersistedState | None = None
        content = result.state
        plan_run = planning.makes_plan(request.steps)
        base: int | None = None
        if plan_run and slot is not None and content != request.state:
            # terraform plan writes no state: a changed terraform.tfstate is the configuration's
            # own code (a provider, an external data source) at work. Taking it would let a plan
            # -- a speculative one, or one nobody approved yet -- write the workspace's state,
            # and a state that is never a persisted version would make every attempt persist it
            # and plan again, without end. A run watched from its start keeps the state it was
            # given (the latest version, or one the runner adopted); only a recovered run, whose
            # start is not known here, is judged by what it left.
            await writer.line(
                "system",
                "terraform.tfstate changed during the plan (not by terraform): ignored; the "
                "plan run keeps the state it started from",
            )
            content = request.state
        if plan_run:
            # A plan run leaves the state it started from (terraform plan writes none): it is
            # persisted only if it is not a persisted version already (a state the Docker runner
            # adopted from an earlier attempt's container), so that it is not lost -- never
            # because it differs from the latest (a recoverer's request may be newer).
            unpersisted_start = False
            if content is not None:
                try:
                    async with self.pool.connection() as conn:
                        base = await planning.base_version(conn, request.workspace, content)
                except LookupError:
                    unpersisted_start = True
            changed = unpersisted_start
        else:
            changed = content is not None and (
                ok or request.state is None or _sha(content) != _sha(request.state)
            )
        if changed and content is not None:
            try:
                persisted = await self._persist(
                    deploy_id, request, content, lock_file=lockfiles.from_result(result) if ok else None
                )
            except StateInvalid as exc:
                await self._state_invalid(deploy_id, request, result, str(exc), writer)
                return
            except (StateStoreError, ValueError) as exc:
                await writer.line("system", f"state could not be persisted: {exc}")
                await self._destroy_unkept(deploy_id, request, content, str(exc), writer, slot)
                return
        error = masker.mask(result.error or f"terraform exited with {result.exit_code}")
        if result.failed_step is not None and result.diagnostics:
            # terraform's own diagnostics say what is wrong better than the output's tail
            error = masker.mask(result.diagnostics)
        if handed_over and not ok:
            error = f"the worker stopped; attempt interrupted with its state kept\n{error}"
        if result.interrupted and not handed_over:
            command: Any = AttemptInterrupted(state=persisted)
        elif ok and plan_run:
            command = await self._plan_outcome(deploy_id, request, result, base, persisted, masker)
        elif ok and persisted is not None:
            command = AttemptSucceeded(state=persisted)
        else:
            if ok:  # it ended well but left no state to record its success with
                error = "the run ended without a state to record"
            command = attempt_failed(
                result,
                "runner_error" if ok else reason,
                message=error[-2000:],
                state=persisted,
                # A lost or stopped worker is no reason to back off: the next attempt may start
                # at once; a stopped one's attempt is not the deploy's fault and is not counted.
                retry_delay=0.0
                if reason in ("worker_lost", "worker_stopped", "runner_lost")
                else self.settings.retry_delay,
                counted=not handed_over,
            )
        await writer.flush()
        try:
            await self._execute_retrying(deploy_id, command)
        except IllegalTransition:
            log.warning("outcome of %s no longer applies: %s", deploy_id, command)

    async def _plan_outcome(
        self,
        deploy_id: str,
        request: RunRequest,
        result: RunResult,
        base: int | None,
        persisted: PersistedState | None,
        masker: Masker,
    ) -> PlanMade | AttemptFailed:
        """A plan run that ended well: its changes (``planning.read_plan``, no values), the
        plan file sealed into ``saved_plans`` FIRST when it may be applied (not for a
        speculative plan, nor one with nothing to do), then PlanMade -- made against ``base``,
        the state version the run started from."""

        def failed(
            message: str, *, step: Any = None, reason: str = "apply_failed", counted: bool = True
        ) -> AttemptFailed:
            return AttemptFailed(
                reason=reason,
                message=message,
                exit_code=result.exit_code,
                step=step,
                kind="other" if step is not None else None,
                state=persisted,
                retry_delay=self.settings.retry_delay if counted else 0.0,
                counted=counted,
            )

        if persisted is not None:
            # It started from a state that was not a persisted version; now it is one, and the
            # plan was not made against any version a person could approve: plan again.
            return failed(
                "the plan was made from a state an earlier attempt left unpersisted; that state "
                f"is now version {persisted.state_version} and the next attempt plans from it",
                reason="plan_stale",
                counted=False,
            )
        if result.plan_json is None:
            return failed("the run left no plan JSON", step="show_plan")
        try:
            reading = await asyncio.to_thread(planning.read_plan, result.plan_json)
        except planning.PlanUnreadable as exc:
            return failed(str(exc), step="show_plan")
        view = await self.deploys.get(deploy_id)
        speculative = view is not None and view.action == "plan"
        plan_id, sha = "", ""
        if reading.changed and not speculative:
            if result.plan is None:
                return failed("the run left no plan file", step="plan")

            async def keep() -> tuple[str, str]:
                async with self.pool.connection() as conn:
                    return await planning.save_plan(
                        conn,
                        self.box.keyring,
                        deploy_id=deploy_id,
                        attempt=request.attempt,
                        plan=result.plan or b"",
                        lock_file=lockfiles.from_result(result),
                        base_state_version=base,
                    )

            plan_id, sha = await self._db_retrying(f"keeping the plan of {deploy_id}", keep)
        # An address may carry a secret (an instance key of for_each over it): masked like the
        # log, the same way in every attempt, so plans of one deploy still compare.
        changes = [
            msgspec.structs.replace(c, address=masker.mask(c.address)) if masker else c
            for c in reading.changes
        ]
        return PlanMade(
            summary=reading.summary,
            changes=changes,
            changed=reading.changed,
            plan_sha256=sha,
            plan_id=plan_id,
            base_state_version=base,
        )

    async def _state_invalid(
        self, deploy_id: str, request: RunRequest, result: RunResult, problem: str, writer: LogWriter
    ) -> None:
        """The run left something that is not a state the service can keep (missing, a link,
        too large, not a tfstate): rescue what it held if it could be read within the cap
        (state_emergency), and fail the attempt with reason ``state_invalid``. Nothing is
        persisted: the workspace keeps its last good state."""
        await writer.line("system", f"state refused: {problem}")
        where, location, sha = "", None, ""
        content = result.rejected_state
        if content is not None:
            try:
                sha = _sha(content)
                async with self.pool.connection() as conn, conn.transaction():
                    location = await index.save_emergency(
                        conn, request.workspace, deploy_id, request.attempt, content,
                        sha, f"state refused: {problem}", keyring=self.box.keyring,
                    )
                where = f"; what it held is kept at {location}"
                await writer.line("system", f"the refused state is kept at {location}")
            except Exception as exc:  # the outcome must still be recorded
                location, sha = None, ""
                log.warning("could not rescue the refused state of %s: %s", deploy_id, exc)
        message = writer.masker.mask(f"the run's state cannot be kept: {problem}{where}")
        await writer.flush()
        # Final: a retry would start from the last good state and make again what this run
        # made (service.lifecycle: StateNotPersisted).
        command = StateNotPersisted(
            reason="state_invalid",
            message=message[-2000:],
            destroyed=False,
            rescue_location=location,
            rescue_sha256=sha,
        )
        try:
            await self._execute_retrying(deploy_id, command)
        except IllegalTransition:
            log.warning("outcome of %s no longer applies: %s", deploy_id, command)

    async def _db_retrying(self, what: str, fn: Any) -> Any:
        """``await fn()``, again after a pause while PostgreSQL does not answer (connection
        errors only), for at most the deploy timeout."""
        deadline = time.monotonic() + max(self.settings.deploy_timeout, 60.0)
        pause = 0.5
        while True:
            try:
                return await fn()
            except DB_ERRORS as exc:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("%s: PostgreSQL unavailable (%s); retrying in %.1fs", what, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, DB_RETRY_PAUSE_MAX)

    async def _wait_for_db(self) -> None:
        async def ping() -> None:
            async with self.pool.connection() as conn:
                await conn.execute("SELECT 1")

        with contextlib.suppress(*DB_ERRORS):  # past the bound, the steps below fail loudly
            await self._db_retrying("waiting for PostgreSQL", ping)

    async def _execute_retrying(self, deploy_id: str, command: Any) -> Any:
        """Append an outcome, retried on connection errors. A retry after a commit whose
        answer was lost meets IllegalTransition (the outcome is already there): never twice."""
        return await self._db_retrying(
            f"recording the outcome of {deploy_id}",
            lambda: self.deploys.execute(deploy_id, command, self.actor),
        )

    async def _persist(
        self, deploy_id: str, request: RunRequest, content: bytes, *, lock_file: bytes | None = None
    ) -> PersistedState:
        try:
            # Up to max_state_bytes of JSON: parsed off the event loop.
            serial, lineage, sha256, size = await asyncio.to_thread(index.state_meta, content)
        except (ValueError, RecursionError) as exc:
            raise StateInvalid(str(exc) or "not a tfstate") from None
        workspace = request.workspace
        async with self.pool.connection() as conn:
            version = await index.next_version(conn, workspace)
        stored = await put_with_retries(self.state_store, workspace, version, content, sha256)
        async with self.pool.connection() as conn, conn.transaction():
            await index.record_version(
                conn, workspace, version, deploy_id, request.attempt, stored, serial, lineage, sha256, size
            )
            if lock_file is not None:  # a successful run's: the next deploy starts from it
                await lockfiles.save(conn, workspace, version, lock_file)
        return PersistedState(
            workspace=workspace,
            store=stored.store,
            location=stored.location,
            serial=serial,
            lineage=lineage,
            sha256=sha256,
            size=size,
            state_version=version,
        )

    async def _destroy_unkept(
        self,
        deploy_id: str,
        request: RunRequest,
        state: bytes,
        why: str,
        writer: LogWriter,
        slot: Slot | None = None,
    ) -> None:
        """The apply made resources whose state we cannot keep: destroy them with the state in
        hand (a run of its own, in the place of ``slot`` where the runner keeps one). If that
        fails too, keep the state in PostgreSQL so nothing is lost track of."""
        destroy = msgspec.structs.replace(
            request,
            run=request.run + 1,
            steps=[Step(name="init"), Step(name="destroy")],
            state=state,
            saved_plan=None,
            timeout=self.settings.deploy_timeout,
        )
        destroyed, message = False, ""
        try:
            reservation = await self.runner.reserve(within=slot)
            run_slot = await self.runner.prepare(reservation, destroy)
            try:
                await writer.line("system", "destroying what the apply created")
                outcome = await self.runner.run(run_slot, writer.line, asyncio.Event())
            finally:
                # Nothing to keep: the state in hand is rescued below if the destroy failed.
                await run_slot.release()
            destroyed = outcome.ok
            message = "" if destroyed else (outcome.error or f"destroy exited with {outcome.exit_code}")
        except RunnerError as exc:
            message = f"destroy could not run: {exc}"
        # terraform's error text may hold a secret (a destroy-time provisioner's output).
        message = writer.masker.mask(message)
        rescue_location, rescue_sha = None, ""
        if not destroyed:
            rescue_sha = _sha(state)
            async with self.pool.connection() as conn, conn.transaction():
                rescue_location = await index.save_emergency(
                    conn, request.workspace, deploy_id, request.attempt, state, rescue_sha,
                    f"state not persisted ({why}); destroy failed ({message})",
                    keyring=self.box.keyring,
                )
            await writer.line("system", f"destroy failed; state kept at {rescue_location}")
        await writer.flush()
        command = StateNotPersisted(
            message=f"the state could not be persisted: {why}",
            destroyed=destroyed,
            destroy_message=message[-2000:],
            rescue_location=rescue_location,
            rescue_sha256=rescue_sha,
        )
        try:
            await self._execute_retrying(deploy_id, command)
        except IllegalTransition:
            log.error("could not record the state failure of %s", deploy_id)


class StateInvalid(Exception):
    """A state the runner let through but the index cannot read (a last net)."""


def failure_reason(result: RunResult) -> str:
    """The service's reason for a run that returned without success: its own (the runner lost,
    a timeout, the output limit), else "apply_failed" -- terraform itself failed, and the
    lifecycle names it from the step and kind (service.lifecycle.failure_reason)."""
    if result.runner_lost:
        return "runner_lost"
    if result.timed_out:
        return "timeout"
    if result.output_limited:
        return "output_limit"
    return "apply_failed"


def attempt_failed(
    result: RunResult,
    reason: str,
    *,
    message: str,
    state: PersistedState | None,
    retry_delay: float,
    counted: bool,
) -> AttemptFailed:
    """The lifecycle command for a failed run: where terraform failed (``step``) and how
    (``kind``, from its diagnostics) go to the lifecycle, which decides the reason and whether
    a retry can help (service.lifecycle.failure_reason)."""
    step = result.failed_step if result.failed_step in _RUN_STEPS else None
    kind = result.failure_kind if result.failure_kind in ("config", "network", "other") else None
    return AttemptFailed(
        reason=reason,
        message=message,
        exit_code=result.exit_code,
        state=state,
        retry_delay=retry_delay,
        counted=counted,
        step=step,
        kind=kind,
    )


_RUN_STEPS = frozenset(("init", "validate", "plan", "show_plan", "apply", "destroy", "apply_plan"))


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()
