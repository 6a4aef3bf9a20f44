"""The pure deploy lifecycle: the Decider in service.lifecycle and the read model in
service.projection. No I/O, no database: given events, when a command, then events (or a refusal).

CONTRACT "Deploy lifecycle": max_attempts counts every attempt, the first included; Failed on the
last attempt makes the deploy failed; StatePersisted comes before Succeeded; a state that cannot be
persisted is destroyed and the deploy fails with reason state_not_persisted; cancel works for
queued and running deploys; replay (admin) only re-queues a failed deploy with a fresh budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from service.events import (
    EVENT_TYPES,
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
    Succeeded,
    encode_data,
    from_data,
    to_data,
    type_name,
)
from service.lifecycle import (
    INITIAL,
    MAX_RETRY_DELAY,
    STATUSES,
    Approve,
    AttemptFailed,
    AttemptInterrupted,
    AttemptSucceeded,
    Cancel,
    Command,
    DeployState,
    Discard,
    ErrorInfo,
    IllegalTransition,
    PersistedState,
    PlanMade,
    Replay,
    RequestDeploy,
    StartAttempt,
    StateNotPersisted,
    decide,
    evolve,
    fold,
    retry_delay,
    shown_attempt,
    status_of,
)
from service.lifecycle_rules import FINAL_REASONS
from service.projection import DeployView, StoredEvent, view_of

# ====================================================================== helpers


def persisted(version: int = 1, **over: object) -> PersistedState:
    fields: dict[str, object] = dict(
        workspace="ws",
        store="postgres",
        location=f"pg://states/ws/{version}",
        serial=version,
        lineage="lin-1",
        sha256=f"{version:064x}",
        size=100 + version,
        state_version=version,
    )
    fields.update(over)
    return PersistedState(**fields)  # type: ignore[arg-type]


def state_persisted(attempt: int, version: int = 1) -> StatePersisted:
    return StatePersisted(attempt=attempt, **msgspec.structs.asdict(persisted(version)))


REQUEST = RequestDeploy(
    workspace="ws",
    action="apply",
    max_attempts=3,
    owner="user:alice",
    files={"main.tf": "ab" * 32},
    variables={"region": "kr"},
    secret_names=["token"],
)


def requested(max_attempts: int = 3) -> Requested:
    return Requested(
        workspace="ws",
        action="apply",
        max_attempts=max_attempts,
        owner="user:alice",
        files={"main.tf": "ab" * 32},
        variables={"region": "kr"},
        secret_names=["token"],
    )


def failed(attempt: int, final: bool, reason: str = "apply_failed") -> Failed:
    return Failed(attempt=attempt, reason=reason, message="boom", exit_code=1, final=final)


def retried(attempt: int, max_attempts: int = 3, delay: float = 0.0, by: str = "worker") -> Retried:
    return Retried(attempt=attempt, max_attempts=max_attempts, by=by, delay_seconds=delay)  # type: ignore[arg-type]


def then(given_events: list[Event], when: Command) -> list[Event]:
    """Given a stream, when a command: the events decided."""
    return decide(when, fold(given_events))


def refused(given_events: list[Event], when: Command) -> IllegalTransition:
    with pytest.raises(IllegalTransition) as info:
        decide(when, fold(given_events))
    return info.value


# ---------------------------------------------------------------- canonical streams (phases)

R = requested()
NEW: list[Event] = []
QUEUED: list[Event] = [R]
DEPLOYING: list[Event] = [R, Started(attempt=1, runner="docker", worker="w1")]
DEPLOYING_CANCEL: list[Event] = [*DEPLOYING, CancelRequested(by="user:alice")]
RETRY_WAIT: list[Event] = [*DEPLOYING, failed(1, final=False), retried(2, delay=10.0)]
RETRY_RUNNING: list[Event] = [*RETRY_WAIT, Started(attempt=2)]
RETRY_RUNNING_CANCEL: list[Event] = [*RETRY_RUNNING, CancelRequested(by="admin:root")]
LAST_ATTEMPT: list[Event] = [
    *RETRY_RUNNING,
    failed(2, final=False),
    retried(3, delay=20.0),
    Started(attempt=3),
]
SUCCEEDED: list[Event] = [*DEPLOYING, state_persisted(1), Succeeded(attempt=1)]
FAILED: list[Event] = [*LAST_ATTEMPT, failed(3, final=True)]
FAILED_SNP: list[Event] = [
    *DEPLOYING,
    Destroyed(attempt=1, message="destroyed"),
    Failed(attempt=1, reason="state_not_persisted", message="s3 down", final=True),
]
CANCELLED_QUEUED: list[Event] = [R, Cancelled(by="user:alice", attempt=None)]
CANCELLED_RUNNING: list[Event] = [*DEPLOYING_CANCEL, Cancelled(by="user:alice", attempt=1)]
REPLAYED: list[Event] = [*FAILED, retried(4, max_attempts=6, by="admin")]
REPLAYED_RUNNING: list[Event] = [*REPLAYED, Started(attempt=4)]

PHASES: dict[str, list[Event]] = {
    "new": NEW,
    "queued": QUEUED,
    "deploying": DEPLOYING,
    "deploying+cancel": DEPLOYING_CANCEL,
    "retry-wait": RETRY_WAIT,
    "retry-running": RETRY_RUNNING,
    "retry-running+cancel": RETRY_RUNNING_CANCEL,
    "last-attempt": LAST_ATTEMPT,
    "succeeded": SUCCEEDED,
    "failed": FAILED,
    "failed-snp": FAILED_SNP,
    "cancelled-queued": CANCELLED_QUEUED,
    "cancelled-running": CANCELLED_RUNNING,
    "replayed": REPLAYED,
    "replayed-running": REPLAYED_RUNNING,
}

EXPECTED_STATUS: dict[str, str | None] = {
    "new": None,
    "queued": "queued",
    "deploying": "deploying",
    "deploying+cancel": "deploying",
    "retry-wait": "retrying",
    "retry-running": "retrying",
    "retry-running+cancel": "retrying",
    "last-attempt": "retrying",
    "succeeded": "succeeded",
    "failed": "failed",
    "failed-snp": "failed",
    "cancelled-queued": "cancelled",
    "cancelled-running": "cancelled",
    "replayed": "retrying",
    "replayed-running": "retrying",
}

COMMANDS: dict[str, Command] = {
    "RequestDeploy": REQUEST,
    "StartAttempt": StartAttempt(runner="docker", worker="w9"),
    "AttemptSucceeded": AttemptSucceeded(state=persisted(7)),
    "AttemptFailed": AttemptFailed(reason="apply_failed", message="x", exit_code=1),
    "StateNotPersisted": StateNotPersisted(message="no store", destroyed=True),
    "AttemptInterrupted": AttemptInterrupted(state=None),
    "Cancel": Cancel(by="user:alice"),
    "Replay": Replay(by="admin:root", budget=3),
}

RUNNING = {
    "deploying",
    "deploying+cancel",
    "retry-running",
    "retry-running+cancel",
    "last-attempt",
    "replayed-running",
}
WAITING = {"queued", "retry-wait", "replayed"}
LEGAL: dict[str, set[str]] = {
    "RequestDeploy": {"new"},
    "StartAttempt": WAITING,
    "AttemptSucceeded": RUNNING,
    "AttemptFailed": RUNNING,
    "StateNotPersisted": RUNNING,
    "AttemptInterrupted": {"deploying+cancel", "retry-running+cancel"},
    "Cancel": WAITING | RUNNING,
    "Replay": {"failed", "failed-snp"},
}


# ====================================================================== the phase x command matrix


@pytest.mark.parametrize("phase", list(PHASES))
def test_canonical_streams_have_their_status(phase: str) -> None:
    state = fold(PHASES[phase])
    if EXPECTED_STATUS[phase] is None:
        assert state == INITIAL
        with pytest.raises(ValueError):
            status_of(state)
    else:
        assert status_of(state) == EXPECTED_STATUS[phase]
        assert_legal_stream(PHASES[phase])


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_in_every_phase(name: str, phase: str) -> None:
    stream, command = PHASES[phase], COMMANDS[name]
    state = fold(stream)
    if phase in LEGAL[name]:
        events = decide(command, state)
        assert isinstance(events, list)
        new_stream = [*stream, *events]
        assert_legal_stream(new_stream)
        assert status_of(fold(new_stream)) == oracle_status(new_stream)
    else:
        with pytest.raises(IllegalTransition) as info:
            decide(command, state)
        exc = info.value
        if phase == "new":
            assert exc.status is None
            assert "does not exist" in str(exc)
        else:
            status = status_of(state)
            assert exc.status == status
            assert status in str(exc), str(exc)
            assert str(exc).startswith("cannot ")


# ====================================================================== RequestDeploy


def test_request_deploy_records_the_request() -> None:
    assert then(NEW, REQUEST) == [requested()]
    state = fold([requested()])
    assert state.phase == "queued"
    assert (state.workspace, state.action, state.owner, state.max_attempts) == (
        "ws",
        "apply",
        "user:alice",
        3,
    )
    assert state.attempt == 0 and state.next_attempt == 1
    assert status_of(state) == "queued" and shown_attempt(state) == 1


def test_request_deploy_destroy_action() -> None:
    cmd = msgspec.structs.replace(REQUEST, action="destroy", max_attempts=1)
    [event] = then(NEW, cmd)
    assert isinstance(event, Requested) and event.action == "destroy" and event.max_attempts == 1


@pytest.mark.parametrize("bad", [0, -1])
def test_request_deploy_needs_at_least_one_attempt(bad: int) -> None:
    exc = refused(NEW, msgspec.structs.replace(REQUEST, max_attempts=bad))
    assert "max_attempts" in str(exc)


@pytest.mark.parametrize(
    "phase", ["queued", "deploying", "succeeded", "failed", "cancelled-queued"]
)
def test_request_deploy_twice_is_illegal(phase: str) -> None:
    exc = refused(PHASES[phase], REQUEST)
    assert exc.status == EXPECTED_STATUS[phase]
    assert f"a deploy that is {exc.status}" in str(exc)


# ====================================================================== StartAttempt


def test_start_first_attempt() -> None:
    assert then(QUEUED, StartAttempt(runner="docker", worker="w1")) == [
        Started(attempt=1, runner="docker", worker="w1")
    ]
    state = fold(DEPLOYING)
    assert state.phase == "running" and state.attempt == 1 and state.next_attempt == 2
    assert status_of(state) == "deploying" and shown_attempt(state) == 1


def test_start_after_retry_runs_the_next_attempt() -> None:
    assert then(RETRY_WAIT, StartAttempt()) == [Started(attempt=2)]
    state = fold(RETRY_RUNNING)
    assert status_of(state) == "retrying" and shown_attempt(state) == 2


def test_start_after_replay_runs_the_next_attempt_number() -> None:
    assert then(REPLAYED, StartAttempt()) == [Started(attempt=4)]


@pytest.mark.parametrize(
    "phase", ["deploying", "retry-running", "succeeded", "failed", "cancelled-running"]
)
def test_start_is_illegal_unless_waiting(phase: str) -> None:
    exc = refused(PHASES[phase], StartAttempt())
    assert f"cannot start a deploy that is {EXPECTED_STATUS[phase]}" == str(exc)


# ====================================================================== AttemptSucceeded


def test_success_persists_the_state_before_succeeding() -> None:
    events = then(DEPLOYING, AttemptSucceeded(state=persisted(4)))
    assert events == [state_persisted(1, 4), Succeeded(attempt=1)]
    state = fold([*DEPLOYING, *events])
    assert status_of(state) == "succeeded"
    assert state.state_version == 4
    assert state.error is None


def test_success_of_a_retry_clears_the_error() -> None:
    events = then(RETRY_RUNNING, AttemptSucceeded(state=persisted(2)))
    assert events == [state_persisted(2, 2), Succeeded(attempt=2)]
    assert fold(RETRY_RUNNING).error == ErrorInfo("apply_failed", "boom")
    final = fold([*RETRY_RUNNING, *events])
    assert final.error is None and status_of(final) == "succeeded" and shown_attempt(final) == 2


def test_success_while_a_cancel_is_pending_still_succeeds() -> None:
    events = then(DEPLOYING_CANCEL, AttemptSucceeded(state=persisted()))
    assert [type(e) for e in events] == [StatePersisted, Succeeded]


@pytest.mark.parametrize(
    "phase", ["queued", "retry-wait", "succeeded", "failed", "cancelled-running"]
)
def test_success_is_illegal_unless_running(phase: str) -> None:
    exc = refused(PHASES[phase], AttemptSucceeded(state=persisted()))
    assert str(exc) == f"cannot record a success for a deploy that is {EXPECTED_STATUS[phase]}"


# ====================================================================== AttemptFailed


def test_first_attempt_fails_and_is_retried() -> None:
    events = then(
        DEPLOYING, AttemptFailed(reason="apply_failed", message="boom", exit_code=1, retry_delay=10)
    )
    assert events == [failed(1, final=False), retried(2, max_attempts=3, delay=10.0)]
    state = fold([*DEPLOYING, *events])
    assert state.phase == "queued" and state.next_attempt == 2
    assert status_of(state) == "retrying" and shown_attempt(state) == 2
    assert state.error == ErrorInfo("apply_failed", "boom")


def test_failure_with_a_persisted_state_keeps_it_for_the_retry() -> None:
    # A retry starts from the state the failed attempt left.
    events = then(
        DEPLOYING, AttemptFailed(reason="apply_failed", state=persisted(3), retry_delay=5)
    )
    assert events == [
        state_persisted(1, 3),
        Failed(attempt=1, reason="apply_failed", final=False),
        retried(2, delay=5.0),
    ]
    assert fold([*DEPLOYING, *events]).state_version == 3


def test_failure_without_a_persisted_state_persists_nothing() -> None:
    events = then(RETRY_RUNNING, AttemptFailed(reason="timeout", retry_delay=10))
    assert not any(isinstance(e, StatePersisted) for e in events)
    assert events == [
        Failed(attempt=2, reason="timeout", final=False),
        retried(3, delay=20.0),
    ]


def test_last_attempt_failing_is_final() -> None:
    events = then(LAST_ATTEMPT, AttemptFailed(reason="apply_failed", message="boom", exit_code=1))
    assert events == [failed(3, final=True)]
    state = fold([*LAST_ATTEMPT, *events])
    assert status_of(state) == "failed" and shown_attempt(state) == 3
    assert state.error == ErrorInfo("apply_failed", "boom")


def test_last_attempt_failing_with_a_state_persists_it_then_fails() -> None:
    events = then(LAST_ATTEMPT, AttemptFailed(reason="apply_failed", state=persisted(9)))
    assert events == [state_persisted(3, 9), Failed(attempt=3, reason="apply_failed", final=True)]


def test_failure_while_cancel_requested_is_a_cancel() -> None:
    events = then(DEPLOYING_CANCEL, AttemptFailed(reason="apply_failed", state=persisted(2)))
    assert events == [state_persisted(1, 2), Cancelled(by="user:alice", attempt=1)]
    assert status_of(fold([*DEPLOYING_CANCEL, *events])) == "cancelled"


STOPPED = AttemptFailed(reason="worker_stopped", message="handed over", counted=False)


def test_a_stopping_workers_attempt_on_the_last_try_is_not_final_and_grants_one_more() -> None:
    """A worker shutting down interrupts the attempt (state kept) and hands it over: the
    attempt does not spend the budget, so even attempt 3 of 3 goes on, as attempt 4 of 4."""
    events = then(LAST_ATTEMPT, msgspec.structs.replace(STOPPED, state=persisted(7)))
    assert events == [
        state_persisted(3, 7),
        Failed(attempt=3, reason="worker_stopped", message="handed over", final=False, counted=False),
        retried(4, max_attempts=4, delay=0.0),
    ]
    state = fold([*LAST_ATTEMPT, *events])
    assert status_of(state) == "retrying" and shown_attempt(state) == 4
    assert state.max_attempts - state.attempt == 1  # still one attempt left, as before


def test_a_stopping_workers_attempt_while_cancel_requested_is_a_cancel() -> None:
    events = then(DEPLOYING_CANCEL, STOPPED)
    assert events == [Cancelled(by="user:alice", attempt=1)]


@given(
    max_attempts=st.integers(1, 6),
    outcomes=st.lists(st.booleans(), min_size=1, max_size=30),
)
@settings(max_examples=100, deadline=None)
def test_uncounted_attempts_never_spend_the_budget(max_attempts: int, outcomes: list[bool]) -> None:
    """Any mix of counted failures and hand-overs: the deploy fails exactly when the counted
    failures reach max_attempts, whatever the hand-overs in between."""
    stream: list[Event] = decide(msgspec.structs.replace(REQUEST, max_attempts=max_attempts), INITIAL)
    counted = 0
    for counts_it in outcomes:
        state = fold(stream)
        if status_of(state) == "failed":
            break
        stream += decide(StartAttempt(), state)
        stream += decide(AttemptFailed(reason="x", counted=counts_it, retry_delay=1), fold(stream))
        counted += counts_it
        assert (status_of(fold(stream)) == "failed") == (counted >= max_attempts)
    assert_legal_stream(stream)
    state = fold(stream)
    assert state.max_attempts == max_attempts + sum(
        1 for e in stream if isinstance(e, Failed) and not e.counted
    )


@pytest.mark.parametrize(
    "phase", ["queued", "retry-wait", "succeeded", "failed", "cancelled-queued"]
)
def test_failure_is_illegal_unless_running(phase: str) -> None:
    exc = refused(PHASES[phase], AttemptFailed(reason="apply_failed"))
    assert str(exc) == f"cannot record a failure for a deploy that is {EXPECTED_STATUS[phase]}"


# ====================================================================== StateNotPersisted


def test_state_not_persisted_and_destroyed() -> None:
    events = then(
        DEPLOYING, StateNotPersisted(message="s3 down", destroyed=True, destroy_message="ok")
    )
    assert events == [
        Destroyed(attempt=1, reason="state_not_persisted", message="ok"),
        Failed(attempt=1, reason="state_not_persisted", message="s3 down", final=True),
    ]
    state = fold([*DEPLOYING, *events])
    assert status_of(state) == "failed"
    assert state.error == ErrorInfo("state_not_persisted", "s3 down")


def test_state_not_persisted_is_final_even_with_attempts_left() -> None:
    events = then(DEPLOYING, StateNotPersisted(message="m", destroyed=True))
    assert not any(isinstance(e, Retried) for e in events)
    assert fold([*DEPLOYING, *events]).max_attempts == 3  # budget left, still failed
    assert status_of(fold([*DEPLOYING, *events])) == "failed"


def test_state_not_persisted_rescued() -> None:
    cmd = StateNotPersisted(
        message="s3 down",
        destroyed=False,
        destroy_message="destroy failed",
        rescue_location="/var/rescue/x.tfstate",
        rescue_sha256="ff" * 32,
    )
    events = then(RETRY_RUNNING, cmd)
    assert events == [
        StateRescued(
            attempt=2, location="/var/rescue/x.tfstate", sha256="ff" * 32, message="destroy failed"
        ),
        Failed(attempt=2, reason="state_not_persisted", message="s3 down", final=True),
    ]


def test_state_not_persisted_neither_destroyed_nor_rescued() -> None:
    events = then(DEPLOYING, StateNotPersisted(message="everything down", destroyed=False))
    assert events == [
        Failed(attempt=1, reason="state_not_persisted", message="everything down", final=True)
    ]


def test_state_not_persisted_destroyed_wins_over_rescue() -> None:
    cmd = StateNotPersisted(message="m", destroyed=True, rescue_location="/x")
    assert [type(e) for e in then(DEPLOYING, cmd)] == [Destroyed, Failed]


@pytest.mark.parametrize("phase", ["queued", "succeeded", "failed-snp", "cancelled-running"])
def test_state_not_persisted_is_illegal_unless_running(phase: str) -> None:
    exc = refused(PHASES[phase], StateNotPersisted(message="m", destroyed=True))
    assert (
        str(exc) == f"cannot record a state failure for a deploy that is {EXPECTED_STATUS[phase]}"
    )


# ====================================================================== AttemptInterrupted


def test_interrupted_after_cancel_request() -> None:
    assert then(DEPLOYING_CANCEL, AttemptInterrupted()) == [Cancelled(by="user:alice", attempt=1)]


def test_interrupted_keeps_the_state() -> None:
    events = then(RETRY_RUNNING_CANCEL, AttemptInterrupted(state=persisted(5)))
    assert events == [state_persisted(2, 5), Cancelled(by="admin:root", attempt=2)]
    state = fold([*RETRY_RUNNING_CANCEL, *events])
    assert status_of(state) == "cancelled"
    assert state.state_version == 5
    assert state.error == ErrorInfo("cancelled", "cancelled by admin:root")


@pytest.mark.parametrize(
    "phase", ["deploying", "retry-running", "queued", "cancelled-running", "failed"]
)
def test_interrupted_without_cancel_request_is_illegal(phase: str) -> None:
    exc = refused(PHASES[phase], AttemptInterrupted())
    assert str(exc) == f"cannot interrupt a deploy that is {EXPECTED_STATUS[phase]}"


# ====================================================================== Cancel


def test_cancel_queued() -> None:
    assert then(QUEUED, Cancel(by="user:alice")) == [Cancelled(by="user:alice", attempt=None)]
    state = fold(CANCELLED_QUEUED)
    assert status_of(state) == "cancelled"
    assert state.cancel_requested and state.cancel_by == "user:alice"


def test_cancel_while_waiting_for_a_retry_cancels_at_once() -> None:
    assert then(RETRY_WAIT, Cancel(by="user:alice")) == [Cancelled(by="user:alice", attempt=None)]


def test_cancel_running_requests_a_stop() -> None:
    assert then(DEPLOYING, Cancel(by="user:alice")) == [CancelRequested(by="user:alice")]
    state = fold(DEPLOYING_CANCEL)
    assert state.cancel_requested and state.cancel_by == "user:alice"
    assert status_of(state) == "deploying"  # still running until the runner stops


def test_cancel_running_twice_adds_nothing() -> None:
    assert then(DEPLOYING_CANCEL, Cancel(by="admin:root")) == []
    assert then(RETRY_RUNNING_CANCEL, Cancel(by="user:alice")) == []


@pytest.mark.parametrize(
    "phase", ["succeeded", "failed", "failed-snp", "cancelled-queued", "cancelled-running"]
)
def test_cancel_terminal_is_illegal(phase: str) -> None:
    exc = refused(PHASES[phase], Cancel(by="user:alice"))
    assert str(exc) == f"cannot cancel a deploy that is {EXPECTED_STATUS[phase]}"
    assert exc.status == EXPECTED_STATUS[phase]


def test_cancel_unknown_deploy_is_illegal() -> None:
    exc = refused(NEW, Cancel(by="user:alice"))
    assert exc.status is None and str(exc) == "cannot cancel a deploy that does not exist"


# ====================================================================== Replay


def test_replay_failed_requeues_with_a_fresh_budget() -> None:
    events = then(FAILED, Replay(by="admin:root", budget=3))
    assert events == [retried(4, max_attempts=6, by="admin")]
    state = fold([*FAILED, *events])
    assert state.phase == "queued"
    assert status_of(state) == "retrying"
    assert shown_attempt(state) == 4 and state.max_attempts == 6
    assert then([*FAILED, *events], StartAttempt()) == [Started(attempt=4)]


def test_replay_budget_extends_max_attempts_by_the_budget() -> None:
    events = then(FAILED_SNP, Replay(by="admin:root", budget=1))
    assert events == [retried(2, max_attempts=2, by="admin")]
    stream = [*FAILED_SNP, *events, Started(attempt=2)]
    # the one granted attempt is the last one: failing it is final
    assert then(stream, AttemptFailed(reason="apply_failed")) == [
        Failed(attempt=2, reason="apply_failed", final=True)
    ]


def test_replayed_deploy_can_fail_and_be_replayed_again() -> None:
    stream = [*REPLAYED_RUNNING]
    for attempt in (4, 5, 6):
        if attempt > 4:
            stream += then(stream, StartAttempt())
        stream += then(stream, AttemptFailed(reason="apply_failed"))
    assert status_of(fold(stream)) == "failed"
    assert sum(isinstance(e, Started) for e in stream) == 6
    assert then(stream, Replay(by="admin:root", budget=2)) == [
        retried(7, max_attempts=8, by="admin")
    ]


@pytest.mark.parametrize("bad", [0, -3])
def test_replay_needs_a_positive_budget(bad: int) -> None:
    exc = refused(FAILED, Replay(by="admin:root", budget=bad))
    assert "budget" in str(exc)


@pytest.mark.parametrize(
    "phase", ["queued", "deploying", "retry-wait", "succeeded", "cancelled-queued", "replayed"]
)
def test_replay_only_from_failed(phase: str) -> None:
    exc = refused(PHASES[phase], Replay(by="admin:root", budget=3))
    assert str(exc) == f"cannot replay a deploy that is {EXPECTED_STATUS[phase]}"
    assert exc.status == EXPECTED_STATUS[phase]


def test_replay_after_an_unhonoured_cancel_request_starts_clean() -> None:
    """Regression: a cancel request during an attempt that then ended state_not_persisted must not
    leak into the replay (the next failure would become Cancelled, and a new Cancel would be
    swallowed as "already requested")."""
    stream: list[Event] = [*DEPLOYING_CANCEL]
    stream += then(stream, StateNotPersisted(message="m", destroyed=True))
    assert status_of(fold(stream)) == "failed"
    stream += then(stream, Replay(by="admin:root", budget=3))
    assert not fold(stream).cancel_requested
    stream += then(stream, StartAttempt())
    assert then(stream, Cancel(by="user:bob")) == [CancelRequested(by="user:bob")]
    events = then(stream, AttemptFailed(reason="apply_failed"))
    assert [type(e) for e in events] == [Failed, Retried]
    with pytest.raises(IllegalTransition):
        then(stream, AttemptInterrupted())


# ====================================================================== the attempts rule


def run_always_failing(max_attempts: int, base_delay: float = 10.0) -> list[Event]:
    req = msgspec.structs.replace(REQUEST, max_attempts=max_attempts)
    stream: list[Event] = decide(req, INITIAL)
    for _ in range(1000):
        state = fold(stream)
        if status_of(state) == "failed":
            return stream
        stream += decide(StartAttempt(), state)
        stream += decide(AttemptFailed(reason="apply_failed", retry_delay=base_delay), fold(stream))
    raise AssertionError("never ended")


def counts(stream: list[Event]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in stream:
        out[type_name(e)] = out.get(type_name(e), 0) + 1
    return out


def test_three_attempts_means_three_starts_three_failures_two_retries() -> None:
    stream = run_always_failing(3)
    c = counts(stream)
    assert (c["Started"], c["Failed"], c["Retried"]) == (3, 3, 2)
    assert status_of(fold(stream)) == "failed"
    assert [e.final for e in stream if isinstance(e, Failed)] == [False, False, True]
    assert [e.attempt for e in stream if isinstance(e, Started)] == [1, 2, 3]
    assert_legal_stream(stream)


def test_one_attempt_means_no_retry() -> None:
    stream = run_always_failing(1)
    c = counts(stream)
    assert (c["Started"], c["Failed"], c.get("Retried", 0)) == (1, 1, 0)
    assert status_of(fold(stream)) == "failed"


@given(max_attempts=st.integers(1, 12), base=st.floats(0, 100, allow_nan=False))
@settings(max_examples=60, deadline=None)
def test_n_attempts_for_any_budget(max_attempts: int, base: float) -> None:
    stream = run_always_failing(max_attempts, base)
    c = counts(stream)
    assert c["Started"] == max_attempts
    assert c["Failed"] == max_attempts
    assert c.get("Retried", 0) == max_attempts - 1
    delays = [e.delay_seconds for e in stream if isinstance(e, Retried)]
    assert delays == [retry_delay(base, k) for k in range(1, max_attempts)]
    assert all(a <= b for a, b in zip(delays, delays[1:], strict=False))
    assert_legal_stream(stream)


def test_retry_delays_grow_per_attempt() -> None:
    assert [retry_delay(10, k) for k in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert retry_delay(10, 0) == 10  # never shrinks below the base
    assert retry_delay(0, 5) == 0
    assert retry_delay(10, 30) == MAX_RETRY_DELAY
    stream = run_always_failing(4, 10.0)
    assert [e.delay_seconds for e in stream if isinstance(e, Retried)] == [10.0, 20.0, 40.0]


@given(base=st.floats(0, 1000, allow_nan=False), k=st.integers(1, 40))
@settings(max_examples=80, deadline=None)
def test_retry_delay_monotonic_and_capped(base: float, k: int) -> None:
    d, d_next = retry_delay(base, k), retry_delay(base, k + 1)
    assert 0 <= d <= d_next <= MAX_RETRY_DELAY
    assert d >= min(base, MAX_RETRY_DELAY)


# ====================================================================== status projection


def test_status_walk_of_a_deploy_that_fails_then_succeeds() -> None:
    stream: list[Event] = []
    seen: list[tuple[str, int]] = []

    def step(cmd: Command) -> None:
        for e in decide(cmd, fold(stream)):
            stream.append(e)
            state = fold(stream)
            seen.append((status_of(state), shown_attempt(state)))

    step(REQUEST)
    step(StartAttempt())
    step(AttemptFailed(reason="apply_failed", retry_delay=1))
    step(StartAttempt())
    step(AttemptSucceeded(state=persisted()))
    assert seen == [
        ("queued", 1),
        ("deploying", 1),
        ("retrying", 2),  # Failed(final=False): no flicker to "failed"
        ("retrying", 2),  # Retried: waiting for attempt 2 of 3
        ("retrying", 2),  # Started(2)
        ("retrying", 2),  # StatePersisted: still running until Succeeded
        ("succeeded", 2),
    ]


@pytest.mark.parametrize("phase", [p for p in PHASES if p != "new"])
def test_every_prefix_has_a_sensible_status(phase: str) -> None:
    stream = PHASES[phase]
    for n in range(1, len(stream) + 1):
        prefix = stream[:n]
        state = fold(prefix)
        assert status_of(state) == oracle_status(prefix), prefix
        assert status_of(state) in STATUSES
        last = prefix[-1]
        if isinstance(last, Failed) and not last.final:
            assert status_of(state) == "retrying"


def test_status_of_new_raises() -> None:
    with pytest.raises(ValueError):
        status_of(INITIAL)


# ====================================================================== projection.view_of

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def records(stream: list[Event], deploy_id: str = "d-1", start: int = 100) -> list[StoredEvent]:
    return [
        StoredEvent(
            position=start + i,
            deploy_id=deploy_id,
            version=i + 1,
            type=type_name(e),
            data=to_data(e),
            recorded_at=T0 + timedelta(seconds=7 * i),
            actor="worker:w1" if i else "user:alice",
            event=e,
        )
        for i, e in enumerate(stream)
    ]


def test_view_of_a_queued_deploy() -> None:
    view = view_of(records(QUEUED))
    assert view == DeployView(
        id="d-1",
        owner="user:alice",
        workspace="ws",
        action="apply",
        status="queued",
        attempt=1,
        max_attempts=3,
        created_at=T0,
        updated_at=T0,
        version=1,
        cancel_requested=False,
        state_version=None,
        error=None,
    )


def test_view_of_a_retried_then_succeeded_deploy() -> None:
    stream = [*RETRY_RUNNING, state_persisted(2, 8), Succeeded(attempt=2)]
    recs = records(stream)
    view = view_of(recs)
    assert view.status == "succeeded"
    assert view.attempt == 2 and view.max_attempts == 3
    assert view.created_at == T0
    assert view.updated_at == T0 + timedelta(seconds=7 * (len(stream) - 1))
    assert view.updated_at == recs[-1].recorded_at
    assert view.version == len(stream) == recs[-1].version
    assert view.state_version == 8
    assert view.error is None


def test_view_of_a_failed_deploy_has_the_error() -> None:
    view = view_of(records(FAILED_SNP))
    assert view.status == "failed"
    assert view.error == ErrorInfo("state_not_persisted", "s3 down")


def test_view_of_a_running_deploy_with_cancel_requested() -> None:
    view = view_of(records(DEPLOYING_CANCEL))
    assert view.status == "deploying" and view.cancel_requested


def test_view_of_uses_the_records_not_positions() -> None:
    recs = records(REPLAYED, deploy_id="abc", start=5000)
    view = view_of(recs)
    assert view.id == "abc" and view.version == len(REPLAYED)
    assert view.status == "retrying" and view.attempt == 4 and view.max_attempts == 6


@pytest.mark.parametrize("phase", [p for p in PHASES if p != "new"])
def test_view_of_every_prefix(phase: str) -> None:
    recs = records(PHASES[phase])
    for n in range(1, len(recs) + 1):
        view = view_of(recs[:n])
        state = fold(r.event for r in recs[:n])
        assert view.status == status_of(state)
        assert view.attempt == shown_attempt(state)
        assert view.created_at == T0
        assert view.updated_at == recs[n - 1].recorded_at
        assert view.version == n


def test_view_of_nothing_raises() -> None:
    with pytest.raises(ValueError):
        view_of([])


# ====================================================================== events round-trip


@pytest.mark.parametrize("phase", list(PHASES))
def test_canonical_events_round_trip(phase: str) -> None:
    for e in PHASES[phase]:
        assert_round_trips(e)


def test_unknown_event_type_is_rejected() -> None:
    with pytest.raises(KeyError):
        from_data("Exploded", {})


# ====================================================================== oracles


def oracle_status(stream: list[Event]) -> str | None:
    """The status a client should see, read straight off the events (independent of evolve)."""
    status: str | None = None
    for e in stream:
        match e:
            case Requested():
                status = "queued"
            case Started():
                status = "deploying" if e.attempt == 1 else "retrying"
            case Failed():
                status = "failed" if e.final else "retrying"
            case Retried():
                status = "retrying"
            case Succeeded():
                status = "succeeded"
            case Cancelled():
                status = "cancelled"
            case Planned():
                if e.awaits_approval:
                    status = "planned"
            case Approved():
                status = "queued" if e.attempt == 1 else "retrying"
            case Discarded():
                status = "discarded"
    return status


NOTHING_TO_DO = {("no-op",), ("read",), ()}


def oracle_within(changes: list[PlanChange], approved: list[PlanChange]) -> bool:
    """The re-plan rule read straight off CONTRACT, written apart from the lifecycle's: every
    change of the new plan must be an approved action (or part of one) on an approved address,
    or the re-creation (replace) of a tainted resource that was approved to be created."""
    for c in changes:
        if tuple(c.actions) in NOTHING_TO_DO:
            continue
        matches = [a for a in approved if a.address == c.address]
        if not matches:
            return False
        approved_actions = set(matches[-1].actions)
        if all(x in approved_actions for x in c.actions):
            continue
        if c.tainted and sorted(c.actions) == ["create", "delete"] and approved_actions == {"create"}:
            continue
        return False
    return True


@dataclass
class Model:
    """An independent reading of a stream, used to check both the stream and ``evolve``."""

    phase: str = "new"
    attempt: int = 0
    budget: int = 0
    cancel_requested: bool = False
    retry_pending: bool = False
    grant: int = 0  # attempts the pending Retried adds (1 after an uncounted failure)
    auto_approve: bool = True
    speculative: bool = False
    step: str = "run"  # the step of the run that started last
    apply_next: bool = False  # queued to apply an approved plan
    plan: Planned | None = None  # the latest plan
    approved: list[PlanChange] | None = None  # the changes of the plan a PERSON approved last
    after_plan: str = ""  # what must follow a Planned that does not wait: "" | "end" | "approve"


def assert_legal_stream(stream: list[Event]) -> Model:
    """Every rule a produced stream must obey; returns the model at its end."""
    assert stream, "empty stream"
    assert isinstance(stream[0], Requested), stream[0]
    assert sum(isinstance(e, Requested) for e in stream) == 1
    m = Model(
        phase="queued",
        budget=stream[0].max_attempts,
        auto_approve=stream[0].auto_approve,
        speculative=stream[0].action == "plan",
    )
    assert m.budget >= 1
    prev: Event = stream[0]
    for e in stream[1:]:
        assert m.phase not in ("succeeded", "cancelled", "discarded"), f"{e!r} after terminal {prev!r}"
        if isinstance(prev, Destroyed | StateRescued):
            assert isinstance(e, Failed) and e.reason in ("state_not_persisted", "state_invalid")
            assert e.final
        if m.after_plan:
            # a plan that does not wait is followed at once by what it stands for
            if m.after_plan == "end":
                assert isinstance(e, Succeeded) and e.attempt == m.attempt, e
            else:
                assert isinstance(e, Approved) and e.rule and e.by == "system", e
                assert m.approved is not None and m.plan is not None
                # nothing outside the changes a person approved is applied without asking
                assert oracle_within(m.plan.changes, m.approved), (m.plan.changes, m.approved)
            m.after_plan = ""
        if m.phase == "failed":
            # the only thing after a final Failed is an admin replay
            assert isinstance(e, Retried) and e.by == "admin", f"{e!r} after final Failed"
            assert e.attempt == m.attempt + 1 and e.max_attempts >= e.attempt
            m.budget, m.phase, m.cancel_requested = e.max_attempts, "queued", False
            m.apply_next = False
            prev = e
            continue
        if m.retry_pending:
            assert isinstance(e, Retried) and e.by == "worker", f"{e!r} instead of Retried"
            assert e.attempt == m.attempt + 1 and e.max_attempts == m.budget + m.grant
            assert e.delay_seconds >= 0
            m.retry_pending, m.phase, m.cancel_requested = False, "queued", False
            m.budget, m.grant = e.max_attempts, 0
            prev = e
            continue
        match e:
            case Started():
                assert m.phase == "queued"
                if m.apply_next:
                    # the apply of an approved plan runs in the attempt that made the plan
                    assert e.step == "apply" and e.attempt == m.attempt, e
                    assert isinstance(prev, Approved), "an apply starts only after Approved"
                else:
                    assert e.attempt == m.attempt + 1, "Started attempts increase by exactly 1"
                    first = "plan" if not m.auto_approve and not m.speculative else "run"
                    assert e.step == first, (e.step, first)
                assert e.attempt <= m.budget, "more attempts than max_attempts"
                m.attempt, m.phase, m.step, m.apply_next = e.attempt, "running", e.step, False
            case StatePersisted() | Destroyed() | StateRescued():
                assert m.phase == "running" and e.attempt == m.attempt
            case Succeeded():
                assert m.phase == "running" and e.attempt == m.attempt
                if isinstance(prev, Planned):
                    # a plan is the whole result: speculative, or nothing to apply
                    assert m.speculative or m.step == "plan"
                else:
                    assert m.step != "plan" and not m.speculative
                    assert isinstance(prev, StatePersisted), "state persisted before succeeded"
                m.phase = "succeeded"
            case Planned():
                assert m.phase == "running" and e.attempt == m.attempt
                assert m.step == "plan" or m.speculative, "only a plan run makes a plan"
                assert not m.cancel_requested, "a plan after a cancel request is a cancel"
                m.plan = e
                if e.awaits_approval:
                    assert not m.speculative and e.plan_id
                    m.phase = "planned"
                elif m.speculative or not e.changed:
                    m.after_plan = "end"
                else:
                    m.after_plan = "approve"
            case Approved():
                assert m.plan is not None and e.attempt == m.plan.attempt == m.attempt
                if e.rule:
                    assert m.phase == "running" and isinstance(prev, Planned)
                else:
                    assert m.phase == "planned", "a person approves only a waiting plan"
                    m.approved = list(m.plan.changes)
                m.phase, m.apply_next = "queued", True
            case Discarded():
                assert m.phase == "planned"
                m.phase = "discarded"
            case Failed():
                assert m.phase == "running" and e.attempt == m.attempt
                if e.reason in ("state_not_persisted", "state_invalid"):
                    assert e.final
                else:
                    assert not m.cancel_requested, "a failure after a cancel request is a cancel"
                    # an uncounted attempt (a stopping worker's) never ends the deploy; a
                    # failure no retry can fix ends it at once
                    assert e.final == (
                        e.counted and (e.reason in FINAL_REASONS or m.attempt >= m.budget)
                    )
                    m.grant = 0 if e.counted else 1
                if e.final:
                    m.phase = "failed"
                else:
                    m.retry_pending = True
            case CancelRequested():
                assert m.phase == "running" and not m.cancel_requested
                m.cancel_requested = True
            case Cancelled():
                if m.phase in ("queued", "planned"):
                    assert e.attempt is None
                else:
                    assert m.phase == "running" and m.cancel_requested and e.attempt == m.attempt
                m.phase = "cancelled"
            case Retried():
                raise AssertionError(f"Retried without a failure before it: {e!r}")
            case Requested():
                raise AssertionError("second Requested")
        prev = e
    return m


def expected_legal(cmd: Command, m: Model) -> bool:
    """Whether the contract allows ``cmd`` now, judged from the independent model."""
    match cmd:
        case RequestDeploy():
            return m.phase == "new" and cmd.max_attempts >= 1
        case StartAttempt():
            return m.phase == "queued"
        case AttemptSucceeded():
            return m.phase == "running" and m.step != "plan" and not m.speculative
        case AttemptFailed() | StateNotPersisted():
            return m.phase == "running"
        case PlanMade():
            plan_run = m.phase == "running" and (m.step == "plan" or m.speculative)
            kept = bool(cmd.plan_id) or not cmd.changed or m.speculative or m.cancel_requested
            return plan_run and kept
        case Approve():
            return (
                m.phase == "planned"
                and m.plan is not None
                and m.plan.base_state_version == cmd.state_version
            )
        case Discard():
            return m.phase == "planned"
        case AttemptInterrupted():
            return m.phase == "running" and m.cancel_requested
        case Cancel():
            return m.phase in ("queued", "planned", "running")
        case Replay():
            return m.phase == "failed" and cmd.budget >= 1
    raise AssertionError(cmd)


def assert_round_trips(e: Event) -> None:
    name = type_name(e)
    assert EVENT_TYPES[name] is type(e)
    data = to_data(e)
    assert "type" not in data
    assert from_data(name, data) == e
    assert from_data(name, msgspec.json.decode(encode_data(e))) == e


# ====================================================================== hypothesis: random commands

texts = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_:", min_size=1, max_size=8)
persisted_states = st.builds(
    PersistedState,
    workspace=texts,
    store=st.sampled_from(["postgres", "s3", "postgres-emergency"]),
    location=texts,
    serial=st.integers(0, 1000),
    lineage=texts,
    sha256=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    size=st.integers(0, 10**7),
    state_version=st.integers(1, 1000),
)
addresses = st.sampled_from(["a.x", "a.y", "b.z", "m.a.x[0]"])
plan_changes = st.builds(
    PlanChange,
    address=addresses,
    type=st.just("terraform_data"),
    actions=st.sampled_from(
        [["create"], ["update"], ["delete"], ["delete", "create"], ["create", "delete"],
         ["no-op"], ["read"]]
    ),
    tainted=st.booleans(),
)
plan_made = st.builds(
    PlanMade,
    summary=st.builds(PlanSummary, add=st.integers(0, 3), change=st.integers(0, 3)),
    changes=st.lists(plan_changes, max_size=4, unique_by=lambda c: c.address),
    changed=st.booleans(),
    plan_sha256=st.sampled_from(["", "ab" * 32]),
    plan_id=st.sampled_from(["", "plan:1", "plan:2"]),
    base_state_version=st.none() | st.integers(1, 3),
)
request_commands = st.builds(
    RequestDeploy,
    workspace=texts,
    action=st.sampled_from(["apply", "destroy", "plan"]),
    auto_approve=st.booleans(),
    max_attempts=st.integers(-1, 5),
    owner=texts.map(lambda s: f"user:{s}"),
    files=st.dictionaries(texts.map(lambda s: f"{s}.tf"), st.just("ab" * 32), max_size=3),
    variables=st.dictionaries(texts, st.text(max_size=10), max_size=3),
    secret_names=st.lists(texts, max_size=3),
)
commands: st.SearchStrategy[Command] = st.one_of(
    request_commands,
    st.builds(StartAttempt, runner=st.sampled_from(["docker", "local", ""]), worker=texts),
    st.builds(AttemptSucceeded, state=persisted_states),
    st.builds(
        AttemptFailed,
        reason=st.sampled_from(
            ["apply_failed", "timeout", "runner_error", "worker_lost", "output_limit"]
        ),
        message=st.text(max_size=20),
        exit_code=st.none() | st.integers(0, 255),
        state=st.none() | persisted_states,
        retry_delay=st.floats(0, 120, allow_nan=False, allow_infinity=False),
        step=st.none() | st.sampled_from(["init", "validate", "plan", "apply", "apply_plan"]),
        kind=st.none() | st.sampled_from(["config", "network", "other"]),
    ),
    plan_made,
    st.builds(Approve, by=texts, state_version=st.none() | st.integers(1, 3)),
    st.builds(Discard, by=texts, reason=st.sampled_from(["discarded", "expired"])),
    st.builds(
        AttemptFailed,
        reason=st.just("worker_stopped"),
        state=st.none() | persisted_states,
        counted=st.just(False),
    ),
    st.builds(
        StateNotPersisted,
        message=st.text(max_size=20),
        reason=st.sampled_from(["state_not_persisted", "state_invalid"]),
        destroyed=st.booleans(),
        destroy_message=st.text(max_size=10),
        rescue_location=st.none() | texts,
        rescue_sha256=st.text(alphabet="0123456789abcdef", max_size=64),
    ),
    st.builds(AttemptInterrupted, state=st.none() | persisted_states),
    st.builds(Cancel, by=texts),
    st.builds(Replay, by=texts.map(lambda s: f"admin:{s}"), budget=st.integers(-1, 4)),
)


class Harness:
    """Feeds commands through decide/evolve and checks every invariant after each one."""

    def __init__(self) -> None:
        self.state: DeployState = INITIAL
        self.stream: list[Event] = []
        self.model = Model()

    def apply(self, cmd: Command) -> list[Event] | None:
        before = self.state
        before_status = status_of(before) if before.phase != "new" else None
        legal = expected_legal(cmd, self.model)
        try:
            events = decide(cmd, before)
        except IllegalTransition as exc:
            assert not legal, f"{cmd!r} refused in {self.model}: {exc}"
            assert str(exc)
            if (
                before_status is not None
                and "budget" not in str(exc)
                and "max_attempts" not in str(exc)
            ):
                assert exc.status == before_status
                assert before_status in str(exc)
            assert self.state is before  # nothing changed
            return None
        # anything other than IllegalTransition propagates and fails the test
        assert legal, f"{cmd!r} accepted in {self.model}: {events!r}"
        assert isinstance(events, list)
        assert all(isinstance(e, tuple(EVENT_TYPES.values())) for e in events)
        assert decide(cmd, before) == events, "decide is deterministic"
        if before_status in ("succeeded", "failed", "cancelled", "discarded") and events:
            assert isinstance(cmd, Replay) and before_status == "failed", "terminal stays terminal"
        if (
            isinstance(cmd, Cancel)
            and self.model.phase == "running"
            and self.model.cancel_requested
        ):
            assert events == []

        for e in events:
            assert_round_trips(e)
            self.state = evolve(self.state, e)
            self.stream.append(e)
            # every prefix folds to a sensible status
            assert status_of(self.state) == oracle_status(self.stream)
        self.model = assert_legal_stream(self.stream) if self.stream else Model()
        return events

    def check(self) -> None:
        if not self.stream:
            assert self.state == INITIAL
            return
        assert fold(self.stream) == self.state, "fold(all) == incremental evolve"
        # folding in two halves is the same as folding at once
        mid = len(self.stream) // 2
        assert fold(self.stream[mid:], fold(self.stream[:mid])) == self.state
        m = self.model
        assert self.state.phase == m.phase
        assert self.state.attempt == m.attempt
        assert self.state.max_attempts == m.budget
        assert self.state.cancel_requested == m.cancel_requested or m.phase == "cancelled"
        # an attempt starts once, with its first run; the apply of an approved plan is a second
        # run of the same attempt
        started = sum(isinstance(e, Started) and e.step != "apply" for e in self.stream)
        assert started == m.attempt <= self.state.max_attempts
        status = status_of(self.state)
        assert status in STATUSES and status == oracle_status(self.stream)
        shown = shown_attempt(self.state)
        assert shown <= self.state.max_attempts
        # attempt k of n: at least 1, except a deploy cancelled before any attempt ran (0)
        assert shown >= 1 or (status == "cancelled" and started == 0)
        if status == "succeeded" and not isinstance(self.stream[-2], Planned):
            assert self.state.error is None and self.state.state_version is not None
        if status in ("failed", "cancelled", "discarded"):
            assert self.state.error is not None
        if status == "planned":
            assert self.state.plan is not None and self.state.plan.awaits_approval
        view = view_of(records(self.stream))
        assert view.status == status
        assert view.version == len(self.stream)
        assert view.max_attempts == self.state.max_attempts


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness()

    @initialize(cmd=request_commands.filter(lambda c: c.max_attempts >= 1))
    def start(self, cmd: RequestDeploy) -> None:
        self.h.apply(cmd)

    @rule(cmd=request_commands)
    def request(self, cmd: Command) -> None:
        self.h.apply(cmd)

    @rule(cmd=st.builds(StartAttempt, worker=texts))
    def start_attempt(self, cmd: Command) -> None:
        self.h.apply(cmd)

    @rule(cmd=commands)
    def any_command(self, cmd: Command) -> None:
        self.h.apply(cmd)

    @rule(state=st.none() | persisted_states, base=st.sampled_from([0.0, 1.0, 10.0]))
    def attempt_failed(self, state: PersistedState | None, base: float) -> None:
        self.h.apply(AttemptFailed(reason="apply_failed", state=state, retry_delay=base))

    @rule(state=persisted_states)
    def attempt_succeeded(self, state: PersistedState) -> None:
        self.h.apply(AttemptSucceeded(state=state))

    @rule(destroyed=st.booleans(), rescue=st.none() | texts)
    def state_not_persisted(self, destroyed: bool, rescue: str | None) -> None:
        self.h.apply(StateNotPersisted(message="m", destroyed=destroyed, rescue_location=rescue))

    @rule(state=st.none() | persisted_states)
    def interrupted(self, state: PersistedState | None) -> None:
        self.h.apply(AttemptInterrupted(state=state))

    @rule(by=texts)
    def cancel(self, by: str) -> None:
        self.h.apply(Cancel(by=by))

    @rule(budget=st.integers(0, 3))
    def replay(self, budget: int) -> None:
        self.h.apply(Replay(by="admin:root", budget=budget))

    @rule(cmd=plan_made)
    def plan(self, cmd: PlanMade) -> None:
        self.h.apply(cmd)

    @rule()
    def approve_current(self) -> None:
        plan = self.h.state.plan
        self.h.apply(
            Approve(by="user:ann", state_version=plan.base_state_version if plan else None)
        )

    @rule()
    def discard(self) -> None:
        self.h.apply(Discard(by="user:ann"))

    @invariant()
    def consistent(self) -> None:
        self.h.check()


TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@given(cmds=st.lists(commands, max_size=40), first=request_commands)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_command_sequences(first: RequestDeploy, cmds: list[Command]) -> None:
    h = Harness()
    for cmd in [first, *cmds]:
        h.apply(cmd)
        h.check()


@given(
    max_attempts=st.integers(1, 5),
    budgets=st.lists(st.integers(1, 4), max_size=3),
    outcomes=st.lists(st.sampled_from(["fail", "snp", "cancel", "cancel-snp"]), max_size=20),
)
@settings(max_examples=80, deadline=None)
def test_started_never_exceeds_budget_with_replays(
    max_attempts: int, budgets: list[int], outcomes: list[str]
) -> None:
    """Drive a deploy to failure repeatedly, replaying with admin budgets; count the attempts."""
    h = Harness()
    h.apply(msgspec.structs.replace(REQUEST, max_attempts=max_attempts))
    granted = max_attempts
    budgets = list(budgets)
    it = iter(outcomes)
    for _ in range(200):
        status = status_of(h.state)
        if status in ("succeeded", "cancelled"):
            break
        if status == "failed":
            if not budgets:
                break
            b = budgets.pop(0)
            h.apply(Replay(by="admin:root", budget=b))
            granted = h.state.attempt + b
            assert h.state.max_attempts == granted
            continue
        h.apply(StartAttempt())
        outcome = next(it, "fail")
        if outcome == "snp":
            h.apply(StateNotPersisted(message="m", destroyed=True))
        elif outcome == "cancel-snp":
            # a cancel request the attempt never honoured: it ended state_not_persisted
            h.apply(Cancel(by="user:alice"))
            h.apply(StateNotPersisted(message="m", destroyed=False))
        elif outcome == "cancel":
            h.apply(Cancel(by="user:alice"))
            h.apply(AttemptFailed(reason="apply_failed"))
        else:
            h.apply(AttemptFailed(reason="apply_failed", retry_delay=1))
        h.check()
    h.check()
    assert sum(isinstance(e, Started) for e in h.stream) <= granted
