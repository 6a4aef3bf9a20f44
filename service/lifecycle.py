"""The deploy lifecycle as a Decider: pure, no I/O.

- ``INITIAL``: the state of a deploy that has no events yet.
- ``evolve(state, event)``: folds one event in; ``fold(events)`` replays a stream.
- ``decide(command, state)``: the events that follow a command (a user's request, or an outcome
  reported by the worker), or ``IllegalTransition`` when the command makes no sense now.
- ``status_of(state)``: the status a client sees.

The shell (``service.deploys``) loads a stream, calls ``decide``, appends the result with the
expected version, and performs the effects.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import reduce
from typing import Literal

import msgspec

from service.events import (
    Action,
    Cancelled,
    CancelRequested,
    Destroyed,
    Event,
    Failed,
    Requested,
    Retried,
    Started,
    StatePersisted,
    StateRescued,
    Succeeded,
)

Phase = Literal["new", "queued", "running", "succeeded", "failed", "cancelled"]
Status = Literal["queued", "deploying", "retrying", "succeeded", "failed", "cancelled"]
STATUSES: tuple[Status, ...] = ("queued", "deploying", "retrying", "succeeded", "failed", "cancelled")
TERMINAL: frozenset[Phase] = frozenset({"succeeded", "failed", "cancelled"})

# Retry delays grow per attempt: base, 2*base, 4*base ... capped here.
MAX_RETRY_DELAY = 3600.0


class IllegalTransition(Exception):
    """A command that the deploy's current state does not allow."""

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


class ErrorInfo(msgspec.Struct, frozen=True):
    reason: str
    message: str = ""


class DeployState(msgspec.Struct, frozen=True, kw_only=True):
    phase: Phase = "new"
    workspace: str = ""
    action: Action = "apply"
    owner: str = ""
    max_attempts: int = 0
    attempt: int = 0  # the last attempt that started; 0 before the first
    next_attempt: int = 1  # the attempt that runs when the deploy is next started
    cancel_requested: bool = False
    cancel_by: str = ""
    error: ErrorInfo | None = None
    state_version: int | None = None  # the workspace state version this deploy last persisted


INITIAL = DeployState()


# ---------------------------------------------------------------- commands


class _Command(msgspec.Struct, frozen=True, kw_only=True):
    pass


class PersistedState(msgspec.Struct, frozen=True, kw_only=True):
    """Where the shell stored a tfstate (before telling the decider)."""

    workspace: str
    store: str
    location: str
    serial: int
    lineage: str
    sha256: str
    size: int
    state_version: int


class RequestDeploy(_Command, frozen=True, kw_only=True):
    workspace: str
    action: Action
    max_attempts: int
    owner: str
    files: dict[str, str]
    variables: dict[str, str] = {}
    secret_names: list[str] = []


class StartAttempt(_Command, frozen=True, kw_only=True):
    runner: str = ""
    worker: str = ""


class AttemptSucceeded(_Command, frozen=True, kw_only=True):
    state: PersistedState


class AttemptFailed(_Command, frozen=True, kw_only=True):
    reason: str
    message: str = ""
    exit_code: int | None = None
    state: PersistedState | None = None  # what the failed attempt left, already persisted
    retry_delay: float = 0.0  # the base delay; it grows per attempt
    # False: the service stopped the attempt for its own sake (a worker shutting down), so it
    # does not spend the deploy's budget: never final, and the next attempt is granted on top.
    counted: bool = True


class StateNotPersisted(_Command, frozen=True, kw_only=True):
    """Apply succeeded but the state store refused; the shell then tried to destroy."""

    message: str
    destroyed: bool
    destroy_message: str = ""
    rescue_location: str | None = None  # the emergency copy, when the destroy failed too
    rescue_sha256: str = ""


class AttemptInterrupted(_Command, frozen=True, kw_only=True):
    """The runner stopped terraform because a cancel was requested."""

    state: PersistedState | None = None


class Cancel(_Command, frozen=True, kw_only=True):
    by: str


class Replay(_Command, frozen=True, kw_only=True):
    by: str
    budget: int  # attempts granted afresh


Command = (
    RequestDeploy
    | StartAttempt
    | AttemptSucceeded
    | AttemptFailed
    | StateNotPersisted
    | AttemptInterrupted
    | Cancel
    | Replay
)


# ---------------------------------------------------------------- evolve


def evolve(state: DeployState, event: Event) -> DeployState:
    """Fold one event into the state. Total: unknown-in-context events change only what they say."""
    replace = msgspec.structs.replace
    match event:
        case Requested():
            return replace(
                state,
                phase="queued",
                workspace=event.workspace,
                action=event.action,
                owner=event.owner,
                max_attempts=event.max_attempts,
                next_attempt=1,
            )
        case Started():
            return replace(
                state, phase="running", attempt=event.attempt, next_attempt=event.attempt + 1
            )
        case StatePersisted():
            return replace(state, state_version=event.state_version)
        case Failed():
            error = ErrorInfo(event.reason, event.message)
            if event.final:
                return replace(state, phase="failed", error=error)
            return replace(state, phase="queued", error=error, next_attempt=event.attempt + 1)
        case Retried():
            # A retry (or an admin replay) opens a new round: a cancel request that an earlier
            # attempt never acted on (e.g. that attempt ended state_not_persisted) must not leak
            # into it -- otherwise the next failure would turn into Cancelled and a fresh Cancel
            # would be swallowed as "already requested".
            return replace(
                state,
                phase="queued",
                next_attempt=event.attempt,
                max_attempts=event.max_attempts,
                error=state.error,
                cancel_requested=False,
                cancel_by="",
            )
        case Destroyed() | StateRescued():
            return state
        case Succeeded():
            return replace(state, phase="succeeded", error=None)
        case CancelRequested():
            return replace(state, cancel_requested=True, cancel_by=event.by)
        case Cancelled():
            return replace(
                state,
                phase="cancelled",
                cancel_requested=True,
                cancel_by=event.by,
                error=ErrorInfo("cancelled", f"cancelled by {event.by}"),
            )
    raise TypeError(f"not an event: {event!r}")  # pragma: no cover


def fold(events: Iterable[Event], state: DeployState = INITIAL) -> DeployState:
    return reduce(evolve, events, state)


# ---------------------------------------------------------------- decide


def retry_delay(base: float, failed_attempt: int) -> float:
    """The wait before the attempt after ``failed_attempt``: base, 2*base, 4*base, ..."""
    delay: float = base * 2.0 ** max(failed_attempt - 1, 0)
    return min(delay, MAX_RETRY_DELAY)


def _refuse(state: DeployState, what: str) -> IllegalTransition:
    status = status_of(state) if state.phase != "new" else None
    where = f"a deploy that is {status}" if status else "a deploy that does not exist"
    return IllegalTransition(f"cannot {what} {where}", status=status)


def _persisted(state: PersistedState | None, attempt: int) -> list[Event]:
    if state is None:
        return []
    return [StatePersisted(attempt=attempt, **msgspec.structs.asdict(state))]


def decide(command: Command, state: DeployState) -> list[Event]:
    """The events that follow ``command`` given ``state``; raises IllegalTransition."""
    match command:
        case RequestDeploy():
            if state.phase != "new":
                raise _refuse(state, "request again")
            if command.max_attempts < 1:
                raise IllegalTransition("max_attempts must be at least 1")
            return [
                Requested(
                    workspace=command.workspace,
                    action=command.action,
                    max_attempts=command.max_attempts,
                    owner=command.owner,
                    files=command.files,
                    variables=command.variables,
                    secret_names=command.secret_names,
                )
            ]

        case StartAttempt():
            if state.phase != "queued":
                raise _refuse(state, "start")
            return [Started(attempt=state.next_attempt, runner=command.runner, worker=command.worker)]

        case AttemptSucceeded():
            if state.phase != "running":
                raise _refuse(state, "record a success for")
            return [*_persisted(command.state, state.attempt), Succeeded(attempt=state.attempt)]

        case AttemptFailed():
            if state.phase != "running":
                raise _refuse(state, "record a failure for")
            events = _persisted(command.state, state.attempt)
            if state.cancel_requested:
                return [*events, Cancelled(by=state.cancel_by, attempt=state.attempt)]
            final = command.counted and state.attempt >= state.max_attempts
            events.append(
                Failed(
                    attempt=state.attempt,
                    reason=command.reason,
                    message=command.message,
                    exit_code=command.exit_code,
                    final=final,
                    counted=command.counted,
                )
            )
            if not final:
                events.append(
                    Retried(
                        attempt=state.attempt + 1,
                        by="worker",
                        delay_seconds=retry_delay(command.retry_delay, state.attempt),
                        max_attempts=state.max_attempts + (0 if command.counted else 1),
                    )
                )
            return events

        case StateNotPersisted():
            if state.phase != "running":
                raise _refuse(state, "record a state failure for")
            outcome: list[Event] = []
            if command.destroyed:
                outcome.append(Destroyed(attempt=state.attempt, message=command.destroy_message))
            elif command.rescue_location is not None:
                outcome.append(
                    StateRescued(
                        attempt=state.attempt,
                        location=command.rescue_location,
                        sha256=command.rescue_sha256,
                        message=command.destroy_message,
                    )
                )
            outcome.append(
                Failed(
                    attempt=state.attempt,
                    reason="state_not_persisted",
                    message=command.message,
                    final=True,
                )
            )
            return outcome

        case AttemptInterrupted():
            if state.phase != "running" or not state.cancel_requested:
                raise _refuse(state, "interrupt")
            return [
                *_persisted(command.state, state.attempt),
                Cancelled(by=state.cancel_by, attempt=state.attempt),
            ]

        case Cancel():
            if state.phase == "queued":
                return [Cancelled(by=command.by, attempt=None)]
            if state.phase == "running":
                # Asking twice changes nothing: the first request is already on its way.
                return [] if state.cancel_requested else [CancelRequested(by=command.by)]
            raise _refuse(state, "cancel")

        case Replay():
            if state.phase != "failed":
                raise _refuse(state, "replay")
            if command.budget < 1:
                raise IllegalTransition("a replay needs a budget of at least 1 attempt")
            return [
                Retried(
                    attempt=state.attempt + 1,
                    by="admin",
                    delay_seconds=0.0,
                    max_attempts=state.attempt + command.budget,
                )
            ]
    raise TypeError(f"not a command: {command!r}")  # pragma: no cover


# ---------------------------------------------------------------- status


def status_of(state: DeployState) -> Status:
    """The status a client sees (CONTRACT): queued, deploying, retrying, or a terminal one."""
    match state.phase:
        case "queued":
            return "queued" if state.next_attempt <= 1 else "retrying"
        case "running":
            return "deploying" if state.attempt <= 1 else "retrying"
        case "succeeded" | "failed" | "cancelled":
            return state.phase
    raise ValueError("a deploy with no events has no status")


def shown_attempt(state: DeployState) -> int:
    """Attempt k of n as shown to a client: the one running, or the one waiting to run."""
    if state.phase == "queued":
        return state.next_attempt
    return state.attempt
