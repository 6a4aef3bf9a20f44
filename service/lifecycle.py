"""The deploy lifecycle as a Decider: pure, no I/O.

- ``INITIAL``: the state of a deploy that has no events yet.
- ``evolve(state, event)``: folds one event in; ``fold(events)`` replays a stream.
- ``decide(command, state)``: the events that follow a command (a user's request, or an outcome
  reported by the worker), or ``IllegalTransition`` when the command makes no sense now.
- ``status_of(state)``: the status a client sees.

The rules ``decide`` applies to a failure's reason and to a new plan under an earlier approval
are ``service.lifecycle_rules`` (``failure_reason``, ``FINAL_REASONS``, ``within_approved``).

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
    Approved,
    Cancelled,
    CancelRequested,
    Destroyed,
    Discarded,
    Event,
    Failed,
    PlanChange,
    Planned,
    PlanSummary,
    Requested,
    Retried,
    Started,
    StatePersisted,
    StateRescued,
    Step,
    Succeeded,
)
from service.lifecycle_rules import (
    FINAL_REASONS,
    WITHIN_APPROVED,
    FailureKind,
    RunStep,
    failure_reason,
    within_approved,
)

Phase = Literal[
    "new", "queued", "running", "planned", "succeeded", "failed", "cancelled", "discarded"
]
Status = Literal[
    "queued", "deploying", "retrying", "planned", "succeeded", "failed", "cancelled", "discarded"
]
STATUSES: tuple[Status, ...] = (
    "queued", "deploying", "retrying", "planned", "succeeded", "failed", "cancelled", "discarded"
)
TERMINAL: frozenset[Phase] = frozenset({"succeeded", "failed", "cancelled", "discarded"})
TERMINAL_STATUSES: frozenset[str] = frozenset(TERMINAL)

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
    workspace_id: str = ""
    workspace_owner: str = ""
    action: Action = "apply"
    auto_approve: bool = True
    owner: str = ""
    max_attempts: int = 0
    attempt: int = 0  # the last attempt that started; 0 before the first
    next_attempt: int = 1  # the attempt that runs when the deploy is next started
    step: Step = "run"  # what the last started run did
    next_step: Step = "run"  # what the next started run does
    cancel_requested: bool = False
    cancel_by: str = ""
    error: ErrorInfo | None = None
    state_version: int | None = None  # the workspace state version this deploy last persisted
    plan: Planned | None = None  # the latest plan
    # The changes of the latest plan a PERSON approved: the re-plan rule measures new plans
    # against it (service.lifecycle_rules.within_approved).
    approved: tuple[PlanChange, ...] | None = None

    @property
    def speculative(self) -> bool:
        """A speculative plan (action "plan"): it never applies and never holds its workspace."""
        return self.action == "plan"

    @property
    def first_step(self) -> Step:
        """What every attempt starts with: a whole run, or a plan that waits for approval."""
        return "plan" if not self.auto_approve and not self.speculative else "run"


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
    workspace_id: str = ""
    workspace_owner: str = ""
    auto_approve: bool = True


class StartAttempt(_Command, frozen=True, kw_only=True):
    runner: str = ""
    worker: str = ""


class AttemptSucceeded(_Command, frozen=True, kw_only=True):
    state: PersistedState


class AttemptFailed(_Command, frozen=True, kw_only=True):
    # The service's own reason (timeout, runner_lost, worker_lost, output_limit, ...), or
    # "apply_failed" when terraform itself failed: then ``step`` and ``kind`` say where and how,
    # and ``failure_reason`` turns them into the recorded reason.
    reason: str
    message: str = ""
    exit_code: int | None = None
    step: RunStep | None = None
    kind: FailureKind | None = None
    state: PersistedState | None = None  # what the failed attempt left, already persisted
    retry_delay: float = 0.0  # the base delay; it grows per attempt
    # False: the service stopped the attempt for its own sake (a worker shutting down), so it
    # does not spend the deploy's budget: never final, and the next attempt is granted on top.
    counted: bool = True


class StateNotPersisted(_Command, frozen=True, kw_only=True):
    """The state a run left cannot be kept: the store refused it after an apply (the shell then
    tried to destroy what the apply made), or it is not a usable tfstate at all (``reason``
    "state_invalid": missing, a link, garbage, too large; nothing to destroy with, so the shell
    rescues what it could read). Either way the deploy fails: a retry would start from an older
    state and make again what this run made."""

    message: str
    reason: Literal["state_not_persisted", "state_invalid"] = "state_not_persisted"
    destroyed: bool
    destroy_message: str = ""
    rescue_location: str | None = None  # the emergency copy, when the destroy failed too
    rescue_sha256: str = ""


class AttemptInterrupted(_Command, frozen=True, kw_only=True):
    """The runner stopped terraform because a cancel was requested."""

    state: PersistedState | None = None


class PlanMade(_Command, frozen=True, kw_only=True):
    """A run made a plan (its changes read from ``terraform show -json``, values left out); the
    shell kept the saved plan first (``plan_id``) when it may be applied."""

    summary: PlanSummary
    changes: list[PlanChange] = []
    changed: bool = True  # anything to apply at all (resources or outputs)
    plan_sha256: str = ""
    plan_id: str = ""
    base_state_version: int | None = None


class Approve(_Command, frozen=True, kw_only=True):
    """A person approves the latest plan. ``state_version`` is the workspace's latest state
    version now: a plan made against another one is stale (refused)."""

    by: str
    state_version: int | None


class Discard(_Command, frozen=True, kw_only=True):
    by: str
    reason: Literal["discarded", "expired"] = "discarded"


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
    | PlanMade
    | Approve
    | Discard
    | Cancel
    | Replay
)


# ---------------------------------------------------------------- evolve


def evolve(state: DeployState, event: Event) -> DeployState:
    """Fold one event into the state. Total: unknown-in-context events change only what they say."""
    replace = msgspec.structs.replace
    match event:
        case Requested():
            requested = replace(
                state,
                phase="queued",
                workspace=event.workspace,
                workspace_id=event.workspace_id,
                workspace_owner=event.workspace_owner,
                action=event.action,
                auto_approve=event.auto_approve,
                owner=event.owner,
                max_attempts=event.max_attempts,
                next_attempt=1,
            )
            return replace(requested, next_step=requested.first_step)
        case Started():
            return replace(
                state,
                phase="running",
                attempt=event.attempt,
                next_attempt=event.attempt + 1,
                step=event.step,
            )
        case StatePersisted():
            return replace(state, state_version=event.state_version)
        case Failed():
            error = ErrorInfo(event.reason, event.message)
            if event.final:
                return replace(state, phase="failed", error=error)
            return replace(
                state,
                phase="queued",
                error=error,
                next_attempt=event.attempt + 1,
                next_step=state.first_step,
            )
        case Planned():
            # Waiting for a person unless something follows at once (a speculative plan or one
            # with nothing to do: Succeeded; one within the approved changes: Approved).
            phase: Phase = "planned" if event.awaits_approval else state.phase
            return replace(state, plan=event, phase=phase)
        case Approved():
            approved = state.approved
            if not event.rule and state.plan is not None:
                approved = tuple(state.plan.changes)
            return replace(
                state,
                phase="queued",
                next_attempt=event.attempt,
                next_step="apply",
                approved=approved,
            )
        case Discarded():
            return replace(
                state,
                phase="discarded",
                error=ErrorInfo(event.reason, f"plan {event.reason} by {event.by}"),
            )
        case Retried():
            # A retry (or an admin replay) opens a new round: a cancel request that an earlier
            # attempt never acted on (e.g. that attempt ended state_not_persisted) must not leak
            # into it -- otherwise the next failure would turn into Cancelled and a fresh Cancel
            # would be swallowed as "already requested".
            return replace(
                state,
                phase="queued",
                next_attempt=event.attempt,
                next_step=state.first_step,
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


def _planned(command: PlanMade, state: DeployState, *, awaits: bool) -> Planned:
    return Planned(
        attempt=state.attempt,
        summary=command.summary,
        changes=list(command.changes),
        plan_sha256=command.plan_sha256,
        plan_id=command.plan_id,
        base_state_version=command.base_state_version,
        changed=command.changed,
        awaits_approval=awaits,
    )


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
                    workspace_id=command.workspace_id,
                    workspace_owner=command.workspace_owner,
                    auto_approve=command.auto_approve,
                )
            ]

        case StartAttempt():
            if state.phase != "queued":
                raise _refuse(state, "start")
            return [
                Started(
                    attempt=state.next_attempt,
                    runner=command.runner,
                    worker=command.worker,
                    step=state.next_step,
                )
            ]

        case AttemptSucceeded():
            if state.phase != "running" or state.step == "plan" or state.speculative:
                # A plan run ends with PlanMade.
                raise _refuse(state, "record a success for")
            return [*_persisted(command.state, state.attempt), Succeeded(attempt=state.attempt)]

        case PlanMade():
            if state.phase != "running" or (state.step != "plan" and not state.speculative):
                raise _refuse(state, "record a plan for")
            if state.cancel_requested:
                return [Cancelled(by=state.cancel_by, attempt=state.attempt)]
            if state.speculative or not command.changed:
                # Nothing will be applied: the plan itself is the result.
                return [_planned(command, state, awaits=False), Succeeded(attempt=state.attempt)]
            if not command.plan_id:
                raise IllegalTransition(
                    f"cannot record a plan that was not kept (no plan_id) for a deploy that is "
                    f"{status_of(state)}: a plan that may be applied must be kept",
                    status=status_of(state),
                )
            if state.approved is not None and within_approved(command.changes, state.approved):
                return [
                    _planned(command, state, awaits=False),
                    Approved(attempt=state.attempt, by="system", rule=WITHIN_APPROVED),
                ]
            return [_planned(command, state, awaits=True)]

        case Approve():
            if state.phase != "planned" or state.plan is None:
                raise _refuse(state, "approve")
            if state.plan.base_state_version != command.state_version:
                raise IllegalTransition(
                    "cannot approve a stale plan of a deploy that is planned: the workspace's "
                    f"state changed since it was made (made against version "
                    f"{state.plan.base_state_version}, now {command.state_version}); discard it "
                    "and plan again",
                    status=status_of(state),
                )
            return [Approved(attempt=state.plan.attempt, by=command.by)]

        case Discard():
            if state.phase != "planned":
                raise _refuse(state, "discard")
            return [Discarded(by=command.by, reason=command.reason)]

        case AttemptFailed():
            if state.phase != "running":
                raise _refuse(state, "record a failure for")
            events = _persisted(command.state, state.attempt)
            if state.cancel_requested:
                return [*events, Cancelled(by=state.cancel_by, attempt=state.attempt)]
            reason = failure_reason(command.reason, command.step, command.kind)
            final = command.counted and (
                reason in FINAL_REASONS or state.attempt >= state.max_attempts
            )
            events.append(
                Failed(
                    attempt=state.attempt,
                    reason=reason,
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
                    reason=command.reason,
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
            if state.phase in ("queued", "planned"):
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
        case "planned" | "succeeded" | "failed" | "cancelled" | "discarded":
            return state.phase
    raise ValueError("a deploy with no events has no status")


def shown_attempt(state: DeployState) -> int:
    """Attempt k of n as shown to a client: the one running, or the one waiting to run."""
    if state.phase == "planned" and state.plan is not None:
        return state.plan.attempt
    if state.phase == "queued":
        return state.next_attempt
    return state.attempt
