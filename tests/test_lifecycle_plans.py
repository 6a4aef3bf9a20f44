"""Plans, approval and the re-plan rule in the pure lifecycle (CONTRACT "Plans and approval"),
and which failures are retried (#13: no pointless retries). Given events, when a command, then
events (or a refusal). The random-command machine of tests/test_lifecycle.py drives the same
commands with an independent model; these are the named cases."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.events import (
    Approved,
    Cancelled,
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
)
from service.lifecycle import (
    Approve,
    AttemptFailed,
    AttemptSucceeded,
    Cancel,
    Discard,
    IllegalTransition,
    PersistedState,
    PlanMade,
    RequestDeploy,
    StartAttempt,
    StateNotPersisted,
    decide,
    fold,
    shown_attempt,
    status_of,
)
from service.lifecycle_rules import failure_reason, within_approved


def change(address: str, *actions: str, tainted: bool = False) -> PlanChange:
    return PlanChange(address=address, type=address.split(".")[0], actions=list(actions), tainted=tainted)


def request(*, auto_approve: bool = False, action: str = "apply", max_attempts: int = 3) -> Requested:
    return Requested(
        workspace="prod",
        action=action,  # type: ignore[arg-type]
        max_attempts=max_attempts,
        owner="ann",
        files={"main.tf": "ab" * 32},
        auto_approve=auto_approve,
    )


def persisted(version: int) -> PersistedState:
    return PersistedState(
        workspace="w", store="postgres", location=f"postgres:w/{version}", serial=version,
        lineage="l", sha256="0" * 64, size=2, state_version=version,
    )


def plan_made(*changes: PlanChange, base: int | None = 1, plan_id: str = "plan:1") -> PlanMade:
    adds = sum("create" in c.actions for c in changes)
    return PlanMade(
        summary=PlanSummary(add=adds),
        changes=list(changes),
        plan_sha256="ab" * 32,
        plan_id=plan_id,
        base_state_version=base,
    )


class Deploy:
    """A deploy's stream driven command by command."""

    def __init__(self, first: Requested) -> None:
        self.stream: list[Event] = [first]

    @property
    def state(self):  # type: ignore[no-untyped-def]
        return fold(self.stream)

    def do(self, command) -> list[Event]:  # type: ignore[no-untyped-def]
        events = decide(command, self.state)
        self.stream += events
        return events

    @property
    def status(self) -> str:
        return status_of(self.state)


CREATE_A = change("terraform_data.a", "create")
CREATE_B = change("terraform_data.b", "create")


def planned_deploy(*changes: PlanChange, base: int | None = 1) -> Deploy:
    d = Deploy(request())
    assert d.do(StartAttempt()) == [Started(attempt=1, step="plan")]
    d.do(plan_made(*changes, base=base))
    return d


# ---------------------------------------------------------------- plan, approve, apply


def test_a_deploy_that_is_not_auto_approved_plans_first_and_waits() -> None:
    d = planned_deploy(CREATE_A, CREATE_B)
    planned = d.stream[-1]
    assert isinstance(planned, Planned)
    assert planned.awaits_approval and planned.attempt == 1 and planned.changes == [CREATE_A, CREATE_B]
    assert d.status == "planned"
    assert shown_attempt(d.state) == 1


def test_approving_queues_the_apply_of_the_same_attempt() -> None:
    d = planned_deploy(CREATE_A)
    assert d.do(Approve(by="user:ann", state_version=1)) == [Approved(attempt=1, by="user:ann")]
    assert d.status == "queued"
    assert d.do(StartAttempt(worker="w")) == [Started(attempt=1, worker="w", step="apply")]
    assert d.status == "deploying"
    events = d.do(AttemptSucceeded(state=persisted(2)))
    assert [type(e) for e in events] == [StatePersisted, Succeeded]
    assert d.status == "succeeded"


def test_approving_twice_or_what_is_not_planned_is_refused() -> None:
    d = planned_deploy(CREATE_A)
    d.do(Approve(by="user:ann", state_version=1))
    with pytest.raises(IllegalTransition) as info:
        d.do(Approve(by="user:bob", state_version=1))
    assert info.value.status == "queued"
    with pytest.raises(IllegalTransition):
        decide(Approve(by="user:ann", state_version=None), Deploy(request()).state)


def test_a_plan_made_against_another_state_version_is_stale() -> None:
    d = planned_deploy(CREATE_A, base=1)
    with pytest.raises(IllegalTransition) as info:
        d.do(Approve(by="user:ann", state_version=2))
    assert "stale" in str(info.value) and info.value.status == "planned"
    assert d.status == "planned"  # nothing changed: it can still be discarded


def test_discard_ends_the_deploy_and_approve_after_it_is_refused() -> None:
    d = planned_deploy(CREATE_A)
    assert d.do(Discard(by="user:ann")) == [Discarded(by="user:ann", reason="discarded")]
    assert d.status == "discarded"
    for cmd in (Approve(by="user:ann", state_version=1), Discard(by="x"), Cancel(by="x")):
        with pytest.raises(IllegalTransition):
            d.do(cmd)


def test_an_expired_plan_is_discarded_by_the_system() -> None:
    d = planned_deploy(CREATE_A)
    d.do(Discard(by="system:ttl", reason="expired"))
    assert d.status == "discarded" and d.state.error is not None
    assert d.state.error.reason == "expired"


def test_cancelling_a_planned_deploy() -> None:
    d = planned_deploy(CREATE_A)
    assert d.do(Cancel(by="user:ann")) == [Cancelled(by="user:ann", attempt=None)]
    assert d.status == "cancelled"


def test_a_plan_with_nothing_to_do_succeeds_without_an_apply() -> None:
    d = Deploy(request())
    d.do(StartAttempt())
    events = d.do(
        PlanMade(summary=PlanSummary(), changes=[change("a.x", "no-op")], changed=False, plan_id="p")
    )
    assert [type(e) for e in events] == [Planned, Succeeded]
    assert not events[0].awaits_approval  # type: ignore[union-attr]
    assert d.status == "succeeded"


def test_a_speculative_plan_succeeds_and_never_waits() -> None:
    d = Deploy(request(action="plan", auto_approve=True))
    assert d.do(StartAttempt()) == [Started(attempt=1, step="run")]
    events = d.do(plan_made(CREATE_A, plan_id=""))
    assert [type(e) for e in events] == [Planned, Succeeded]
    assert d.status == "succeeded"
    assert not any(fold(d.stream[:i]).phase == "planned" for i in range(1, len(d.stream) + 1))


def test_a_speculative_plan_ignores_auto_approve_false() -> None:
    d = Deploy(request(action="plan", auto_approve=False))
    assert d.do(StartAttempt()) == [Started(attempt=1, step="run")]


def test_a_plan_run_cannot_succeed_without_its_plan() -> None:
    d = Deploy(request())
    d.do(StartAttempt())
    with pytest.raises(IllegalTransition):
        d.do(AttemptSucceeded(state=persisted(1)))


def test_a_plan_that_may_be_applied_must_have_been_kept() -> None:
    d = Deploy(request())
    d.do(StartAttempt())
    with pytest.raises(IllegalTransition):
        d.do(plan_made(CREATE_A, plan_id=""))


def test_a_cancel_requested_while_planning_ends_the_deploy_when_the_plan_comes() -> None:
    d = Deploy(request())
    d.do(StartAttempt())
    d.do(Cancel(by="user:ann"))
    assert d.do(plan_made(CREATE_A)) == [Cancelled(by="user:ann", attempt=1)]


# ---------------------------------------------------------------- the re-plan rule


def approved_then_failed(*approved: PlanChange) -> Deploy:
    d = planned_deploy(*approved)
    d.do(Approve(by="user:ann", state_version=1))
    d.do(StartAttempt())
    events = d.do(AttemptFailed(reason="apply_failed", step="apply_plan", kind="other", state=persisted(2)))
    assert [type(e) for e in events] == [StatePersisted, Failed, Retried]
    assert d.status == "retrying"
    # the next attempt plans again from the state the failed one left
    assert d.do(StartAttempt()) == [Started(attempt=2, step="plan")]
    return d


def test_a_new_plan_within_the_approved_changes_is_applied_without_asking() -> None:
    d = approved_then_failed(CREATE_A, CREATE_B)
    # A was made before the failure; only B is left
    events = d.do(plan_made(change("terraform_data.a", "no-op"), CREATE_B, base=2, plan_id="plan:2"))
    assert [type(e) for e in events] == [Planned, Approved]
    assert events[1] == Approved(attempt=2, by="system", rule="within_approved")
    assert d.status == "retrying"
    assert d.do(StartAttempt()) == [Started(attempt=2, step="apply")]


def test_recreating_a_tainted_resource_the_approved_plan_was_to_create_counts_as_approved() -> None:
    d = approved_then_failed(CREATE_A)
    replace_a = change("terraform_data.a", "delete", "create", tainted=True)
    events = d.do(plan_made(replace_a, base=2, plan_id="plan:2"))
    assert [type(e) for e in events] == [Planned, Approved]


def test_replacing_an_untainted_resource_needs_a_new_approval() -> None:
    d = approved_then_failed(CREATE_A)
    events = d.do(plan_made(change("terraform_data.a", "delete", "create"), base=2, plan_id="plan:2"))
    assert [type(e) for e in events] == [Planned]
    assert d.status == "planned"


def test_a_new_plan_beyond_the_approved_changes_waits_for_a_new_approval() -> None:
    d = approved_then_failed(CREATE_A)
    events = d.do(plan_made(CREATE_A, CREATE_B, base=2, plan_id="plan:2"))
    assert [type(e) for e in events] == [Planned]
    assert d.status == "planned"
    # once a person approves the wider plan, it is the new measure
    d.do(Approve(by="user:ann", state_version=2))
    assert d.state.approved == (CREATE_A, CREATE_B)


def test_an_automatic_approval_does_not_widen_what_was_approved() -> None:
    d = approved_then_failed(CREATE_A, CREATE_B)
    d.do(plan_made(CREATE_B, base=2, plan_id="plan:2"))
    assert d.state.approved == (CREATE_A, CREATE_B)


def test_the_apply_failing_on_the_last_attempt_fails_the_deploy() -> None:
    d = Deploy(request(max_attempts=1))
    d.do(StartAttempt())
    d.do(plan_made(CREATE_A))
    d.do(Approve(by="user:ann", state_version=1))
    d.do(StartAttempt())
    events = d.do(AttemptFailed(reason="apply_failed", step="apply_plan"))
    assert events == [Failed(attempt=1, reason="apply_failed", final=True)]
    assert d.status == "failed"


@pytest.mark.parametrize(
    ("new", "ok"),
    [
        ([], True),
        ([change("a.x", "no-op"), change("a.y", "read")], True),
        ([change("a.x", "create")], True),
        ([change("a.x", "update")], False),
        ([change("a.z", "create")], False),
        ([change("a.x", "delete", "create", tainted=True)], True),
        ([change("a.x", "create", "delete", tainted=True)], True),
        ([change("a.x", "delete", "create", tainted=False)], False),
        ([change("a.r", "create")], True),  # the create half of an approved replace
        ([change("a.r", "delete")], True),
        ([change("a.r", "update")], False),
        ([change("a.u", "update"), change("a.x", "create")], True),
        ([change("a.u", "delete")], False),
    ],
)
def test_within_approved_cases(new: list[PlanChange], ok: bool) -> None:
    approved = [change("a.x", "create"), change("a.r", "delete", "create"), change("a.u", "update")]
    assert within_approved(new, approved) is ok


actions = st.sampled_from(
    [["create"], ["update"], ["delete"], ["delete", "create"], ["no-op"], ["read"]]
)
changes = st.lists(
    st.builds(change, st.sampled_from(["a.x", "a.y", "b.z", "c.w"]), st.just("create")).flatmap(
        lambda c: st.builds(
            lambda acts, t: msgspec.structs.replace(c, actions=acts, tainted=t), actions, st.booleans()
        )
    ),
    max_size=4,
    unique_by=lambda c: c.address,
)


@given(approved=changes)
@settings(max_examples=200, deadline=None)
def test_a_plan_is_within_its_own_approval(approved: list[PlanChange]) -> None:
    assert within_approved(approved, approved)


@given(approved=changes, new=changes, extra=st.sampled_from(["n.new", "n.other"]))
@settings(max_examples=200, deadline=None)
def test_an_address_never_approved_is_never_within(
    approved: list[PlanChange], new: list[PlanChange], extra: str
) -> None:
    assert not within_approved([*new, change(extra, "create")], approved)


@given(approved=changes, new=changes)
@settings(max_examples=200, deadline=None)
def test_dropping_changes_keeps_a_plan_within(approved: list[PlanChange], new: list[PlanChange]) -> None:
    if within_approved(new, approved):
        for i in range(len(new)):
            assert within_approved(new[:i] + new[i + 1 :], approved)


# ---------------------------------------------------------------- which failures are retried


@pytest.mark.parametrize(
    ("reason", "step", "kind", "recorded", "final"),
    [
        ("apply_failed", "init", "config", "invalid_config", True),
        ("apply_failed", "validate", "config", "invalid_config", True),
        ("apply_failed", "validate", "other", "invalid_config", True),
        ("apply_failed", "init", "network", "init_failed", False),
        ("apply_failed", "init", "other", "init_failed", False),
        ("apply_failed", "plan", "other", "plan_failed", False),
        ("apply_failed", "show_plan", "other", "plan_failed", False),
        ("apply_failed", "apply", "other", "apply_failed", False),
        ("apply_failed", "apply", "config", "apply_failed", False),
        ("apply_failed", None, None, "apply_failed", False),
        ("timeout", "init", "config", "timeout", False),
        ("output_limit", "apply", None, "output_limit", False),
        ("runner_lost", None, None, "runner_lost", False),
    ],
)
def test_failure_reasons_and_retries(
    reason: str, step: str | None, kind: str | None, recorded: str, final: bool
) -> None:
    d = Deploy(request(auto_approve=True, max_attempts=3))
    d.do(StartAttempt())
    events = d.do(AttemptFailed(reason=reason, step=step, kind=kind))  # type: ignore[arg-type]
    failed = events[0]
    assert isinstance(failed, Failed) and failed.reason == recorded and failed.final is final
    assert d.status == ("failed" if final else "retrying")
    assert failure_reason(reason, step, kind) == recorded  # type: ignore[arg-type]


def test_an_invalid_configuration_is_not_retried_even_with_attempts_left() -> None:
    d = Deploy(request(auto_approve=True, max_attempts=5))
    d.do(StartAttempt())
    events = d.do(AttemptFailed(reason="apply_failed", step="init", kind="config", message="Error: x"))
    assert events == [Failed(attempt=1, reason="invalid_config", message="Error: x", final=True)]


def test_a_stopping_worker_never_ends_a_deploy_even_on_an_invalid_config_step() -> None:
    d = Deploy(request(auto_approve=True, max_attempts=1))
    d.do(StartAttempt())
    events = d.do(AttemptFailed(reason="worker_stopped", step="init", kind="config", counted=False))
    assert isinstance(events[0], Failed) and not events[0].final


def test_an_unusable_state_fails_the_deploy_at_once() -> None:
    d = Deploy(request(auto_approve=True, max_attempts=3))
    d.do(StartAttempt())
    events = d.do(
        StateNotPersisted(
            reason="state_invalid", message="not a tfstate", destroyed=False,
            rescue_location="postgres-emergency:1", rescue_sha256="ab",
        )
    )
    assert [type(e) for e in events] == [StateRescued, Failed]
    assert events[1] == Failed(attempt=1, reason="state_invalid", message="not a tfstate", final=True)
    assert d.status == "failed"


# ---------------------------------------------------------------- random plan flows

from test_lifecycle import Harness  # noqa: E402  (the independent model)

# Weighted towards the flow that matters (plan, approve, apply fails, plan again) so that
# automatic approvals and applies are reached often; every other command still appears.
small_plans = st.lists(
    st.builds(
        change,
        st.sampled_from(["a.x", "a.y", "b.z"]),
        st.sampled_from(["create", "create", "update", "no-op"]),
    ).flatmap(lambda c: st.sampled_from([c, msgspec.structs.replace(c, tainted=True),
                                          msgspec.structs.replace(c, actions=["delete", "create"], tainted=True)])),
    max_size=3,
    unique_by=lambda c: c.address,
)
moves = st.lists(
    st.one_of(
        st.sampled_from([("start",)] * 4 + [("approve",)] * 3 + [("succeed",), ("discard",),
                         ("cancel",), ("replay",), ("approve-stale",)]),
        st.tuples(st.just("plan"), small_plans, st.sampled_from([True, True, True, False])),
        st.tuples(st.just("plan"), small_plans, st.just(True)),
        st.tuples(
            st.just("fail"),
            st.sampled_from(["apply_plan", "apply_plan", "plan", "init"]),
            st.sampled_from(["other", "other", "config", "network"]),
        ),
    ),
    max_size=40,
)


@given(max_attempts=st.integers(1, 4), steps=moves)
@settings(max_examples=400, deadline=None)
def test_nothing_outside_the_approved_changes_is_applied_without_a_new_approval(
    max_attempts: int, steps: list[tuple[object, ...]]
) -> None:
    """Random plan / approve / fail / re-plan sequences through decide and the independent
    model of tests/test_lifecycle.py, which checks at every event that an apply starts only
    after an Approved, and that every automatic approval's plan is within the changes a person
    approved (its own reading of the rule). Here: every apply run's plan, measured against the
    approval before it."""
    h = Harness()
    h.apply(
        RequestDeploy(
            workspace="w", action="apply", max_attempts=max_attempts, owner="ann", files={},
            auto_approve=False,
        )
    )
    version = 1
    for move in steps:
        kind = move[0]
        state = h.state
        if kind == "start":
            h.apply(StartAttempt())
        elif kind == "plan":
            version_now = version
            h.apply(plan_made(*move[1], base=version_now, plan_id="plan") if move[2] else
                    PlanMade(summary=PlanSummary(), changes=list(move[1]), changed=False, plan_id="plan"))
        elif kind == "approve":
            h.apply(Approve(by="user:ann", state_version=state.plan.base_state_version if state.plan else None))
        elif kind == "approve-stale":
            h.apply(Approve(by="user:ann", state_version=version + 1))
        elif kind == "fail":
            version += 1
            h.apply(AttemptFailed(reason="apply_failed", step=move[1], kind=move[2], state=persisted(version)))  # type: ignore[arg-type]
        elif kind == "succeed":
            version += 1
            h.apply(AttemptSucceeded(state=persisted(version)))
        elif kind == "discard":
            h.apply(Discard(by="user:ann"))
        elif kind == "cancel":
            h.apply(Cancel(by="user:ann"))
        elif kind == "replay":
            from service.lifecycle import Replay

            h.apply(Replay(by="admin:root", budget=2))
        h.check()
    # every apply run applied a plan that a person approved, or one within it
    approved: list[PlanChange] | None = None
    latest: Planned | None = None
    for e in h.stream:
        if isinstance(e, Planned):
            latest = e
        elif isinstance(e, Approved):
            assert latest is not None
            if not e.rule:
                approved = list(latest.changes)
            else:
                assert approved is not None and within_approved(latest.changes, approved)
        elif isinstance(e, Started) and e.step == "apply":
            assert latest is not None and approved is not None
            assert within_approved(latest.changes, approved)


@given(max_attempts=st.integers(1, 4), data=st.data())
@settings(max_examples=300, deadline=None)
def test_approved_deploys_walked_to_the_end(max_attempts: int, data: st.DataObject) -> None:
    """The same property on walks that always take a step the deploy can take (start, plan,
    approve or discard, apply that fails or succeeds), so that re-plans after failed applies --
    and their automatic approvals -- happen in most examples."""
    h = Harness()
    h.apply(
        RequestDeploy(
            workspace="w", action="apply", max_attempts=max_attempts, owner="ann", files={},
            auto_approve=False,
        )
    )
    version = 1
    for _ in range(40):
        state = h.state
        if state.phase in ("succeeded", "failed", "cancelled", "discarded"):
            break
        if state.phase == "queued":
            h.apply(StartAttempt())
        elif state.phase == "planned":
            what = data.draw(st.sampled_from(["approve"] * 6 + ["discard", "cancel"]))
            if what == "approve":
                assert state.plan is not None
                h.apply(Approve(by="user:ann", state_version=state.plan.base_state_version))
            elif what == "discard":
                h.apply(Discard(by="user:ann"))
            else:
                h.apply(Cancel(by="user:ann"))
        elif state.step == "plan":
            if data.draw(st.booleans()) and data.draw(st.booleans()):
                version += 1  # the plan itself failed (the provider's API, say)
                h.apply(AttemptFailed(reason="apply_failed", step="plan", kind="other"))
            else:
                h.apply(plan_made(*data.draw(small_plans.filter(bool)), base=version, plan_id="plan"))
        else:
            if data.draw(st.sampled_from([True, True, False])):
                version += 1
                h.apply(AttemptFailed(reason="apply_failed", step="apply_plan", kind="other", state=persisted(version)))
            else:
                version += 1
                h.apply(AttemptSucceeded(state=persisted(version)))
        h.check()
