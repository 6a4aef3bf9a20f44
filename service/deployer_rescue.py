"""A state that cannot be kept, and what is done about it (``StateNotPersisted``, final).

- The store refused the state an apply left (``destroy_unkept``): destroy what the apply made
  with that state in hand, in a run of its own; if that fails too, rescue the state into the
  emergency copy in PostgreSQL (``StateRescued``) so nothing is lost track of.
- The run left something that is not a state at all (``refused_state``: missing, a link, too
  large, not a tfstate): rescue what it held if it could be read, and fail with
  ``state_invalid``.

Each returns the command for the lifecycle; ``service.deployer_outcome`` records it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import msgspec

from service.deployer_log import LogWriter
from service.lifecycle import StateNotPersisted
from service.runners.base import Runner, RunnerError, RunRequest, RunResult, Slot, Step
from service.secrets import KeyRing
from service.statestores import index

log = logging.getLogger("tfdeploy.deployer")


async def refused_state(
    deploy_id: str,
    request: RunRequest,
    result: RunResult,
    problem: str,
    writer: LogWriter,
    *,
    pool: Any,
    keyring: KeyRing,
) -> StateNotPersisted:
    """The run left something that is not a state the service can keep (missing, a link,
    too large, not a tfstate): rescue what it held if it could be read within the cap
    (state_emergency); the command fails the attempt with reason ``state_invalid``. Nothing
    is persisted: the workspace keeps its last good state."""
    await writer.line("system", f"state refused: {problem}")
    where, location, sha = "", None, ""
    content = result.rejected_state
    if content is not None:
        try:
            sha = _sha(content)
            async with pool.connection() as conn, conn.transaction():
                location = await index.save_emergency(
                    conn, request.workspace, deploy_id, request.attempt, content,
                    sha, f"state refused: {problem}", keyring=keyring,
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
    return StateNotPersisted(
        reason="state_invalid",
        message=message[-2000:],
        destroyed=False,
        rescue_location=location,
        rescue_sha256=sha,
    )


async def destroy_unkept(
    deploy_id: str,
    request: RunRequest,
    state: bytes,
    why: str,
    writer: LogWriter,
    slot: Slot | None = None,
    *,
    runner: Runner,
    pool: Any,
    keyring: KeyRing,
    deploy_timeout: float,
) -> StateNotPersisted:
    """The apply made resources whose state we cannot keep: destroy them with the state in
    hand (a run of its own, in the place of ``slot`` where the runner keeps one). If that
    fails too, keep the state in PostgreSQL so nothing is lost track of. The command says
    which."""
    destroy = msgspec.structs.replace(
        request,
        run=request.run + 1,
        steps=[Step(name="init"), Step(name="destroy")],
        state=state,
        saved_plan=None,
        timeout=deploy_timeout,
    )
    destroyed, message = False, ""
    try:
        reservation = await runner.reserve(within=slot)
        run_slot = await runner.prepare(reservation, destroy)
        try:
            await writer.line("system", "destroying what the apply created")
            outcome = await runner.run(run_slot, writer.line, asyncio.Event())
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
        async with pool.connection() as conn, conn.transaction():
            rescue_location = await index.save_emergency(
                conn, request.workspace, deploy_id, request.attempt, state, rescue_sha,
                f"state not persisted ({why}); destroy failed ({message})",
                keyring=keyring,
            )
        await writer.line("system", f"destroy failed; state kept at {rescue_location}")
    await writer.flush()
    return StateNotPersisted(
        message=f"the state could not be persisted: {why}",
        destroyed=destroyed,
        destroy_message=message[-2000:],
        rescue_location=rescue_location,
        rescue_sha256=rescue_sha,
    )


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()
