"""An attempt's conclusion: the state first, then the outcome.

The state terraform left is checked and persisted (``StateInvalid`` if the index cannot read it)
before the outcome goes to the decider: ``AttemptSucceeded``, ``AttemptFailed`` (where and how
terraform failed, ``failure_reason`` / ``attempt_failed``; the lifecycle names the reason),
``AttemptInterrupted``, or for a plan run ``PlanMade`` -- its plan kept first. A state that
cannot be kept goes to ``service.deployer_rescue`` (destroy, or rescue, and fail). An outcome is
never dropped because PostgreSQL is away: it is recorded again, with a growing pause, for at most
the deploy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any

import msgspec
import psycopg
import psycopg_pool

from service import lockfiles, planning
from service.deployer_log import LogWriter
from service.deployer_rescue import destroy_unkept, refused_state
from service.deploys import Deploys
from service.lifecycle import (
    AttemptFailed,
    AttemptInterrupted,
    AttemptSucceeded,
    IllegalTransition,
    PersistedState,
    PlanMade,
)
from service.runners.base import Runner, RunRequest, RunResult, Slot
from service.secrets import Masker, SecretBox
from service.settings import Settings
from service.statestores import index, put_with_retries
from service.statestores.base import StateStore, StateStoreError

log = logging.getLogger("tfdeploy.deployer")

# An outcome is never dropped because PostgreSQL is away (restart, failover): the deployer waits
# for it with a growing pause, at most the deploy timeout in all (docs/reliability.md).
DB_RETRY_PAUSE_MAX = 5.0
DB_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg_pool.PoolTimeout,
)


class Outcomes:
    """Concludes the attempts of one worker: ``conclude`` (the deployer's, and recovery's for
    a dead worker's run)."""

    def __init__(
        self,
        settings: Settings,
        deploys: Deploys,
        runner: Runner,
        state_store: StateStore,
        secret_box: SecretBox,
        actor: str,
    ) -> None:
        self.settings = settings
        self.deploys = deploys
        self.pool = deploys.pool
        self.runner = runner
        self.state_store = state_store
        self.box = secret_box
        self.actor = actor  # whom the outcome events are recorded by: the worker

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
        """Not a state at all: rescue what it held, fail the attempt (``state_invalid``)."""
        command = await refused_state(
            deploy_id, request, result, problem, writer, pool=self.pool, keyring=self.box.keyring
        )
        try:
            await self._execute_retrying(deploy_id, command)
        except IllegalTransition:
            log.warning("outcome of %s no longer applies: %s", deploy_id, command)

    async def _destroy_unkept(
        self,
        deploy_id: str,
        request: RunRequest,
        state: bytes,
        why: str,
        writer: LogWriter,
        slot: Slot | None = None,
    ) -> None:
        """A state the store refused: destroy with it in hand, else rescue it; then fail."""
        command = await destroy_unkept(
            deploy_id, request, state, why, writer, slot,
            runner=self.runner, pool=self.pool, keyring=self.box.keyring,
            deploy_timeout=self.settings.deploy_timeout,
        )
        try:
            await self._execute_retrying(deploy_id, command)
        except IllegalTransition:
            log.error("could not record the state failure of %s", deploy_id)

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
