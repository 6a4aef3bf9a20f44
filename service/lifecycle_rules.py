"""The rules the lifecycle applies to what an attempt reports: pure, no I/O.

- ``failure_reason``: the reason a failed attempt is recorded with, from the service's own
  reason or, when terraform itself failed, from where (``RunStep``) and how (``FailureKind``);
  ``FINAL_REASONS``: the reasons no retry can fix.
- ``within_approved``: the re-plan rule -- may a new plan be applied under an earlier approval
  (``Approved(rule=WITHIN_APPROVED)``)?

``service.lifecycle.decide`` applies them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from service.events import PlanChange

# Where a run failed (the runner reports it): terraform's own steps.
RunStep = Literal["init", "validate", "plan", "show_plan", "apply", "destroy", "apply_plan"]
# How it failed, from terraform's diagnostics: the configuration itself, the network or a
# registry, or anything else.
FailureKind = Literal["config", "network", "other"]
# Failures no retry can fix: the deploy fails at once whatever its budget.
FINAL_REASONS: frozenset[str] = frozenset({"invalid_config", "state_invalid", "access_revoked"})


def failure_reason(reason: str, step: RunStep | None, kind: FailureKind | None) -> str:
    """The reason recorded for a failed attempt. Terraform's own failure ("apply_failed") is
    named by the step it failed in; a configuration that init or validate refuses is
    ``invalid_config`` (final: no retry can fix it). A network or registry failure during init
    stays retryable. Reasons of the service's own (timeout, runner_lost, ...) are kept."""
    if reason != "apply_failed" or step is None:
        return reason
    if step in ("init", "validate") and kind == "config":
        return "invalid_config"
    if step == "init":
        return "init_failed"
    if step == "validate":
        return "invalid_config"  # validate fails only on the configuration
    if step in ("plan", "show_plan"):
        return "plan_failed"
    return "apply_failed"


WITHIN_APPROVED = "within_approved"
_REPLACE = frozenset({"delete", "create"})
_NOTHING = (("no-op",), ("read",), ())


def within_approved(changes: Iterable[PlanChange], approved: Iterable[PlanChange]) -> bool:
    """The re-plan rule: may a new plan be applied under an earlier approval?

    Yes when every change it makes was approved: the same address with the same actions, or a
    part of them (the create of an approved replace whose delete already happened, say). Also
    counted as approved: replacing a resource the approved plan was to create and that the
    failed attempt left tainted (terraform plans the re-creation as a replace). No-ops and
    reads change nothing. Anything else -- a new address, another action -- needs a new
    approval."""
    allowed = {c.address: frozenset(c.actions) for c in approved}
    for change in changes:
        if tuple(change.actions) in _NOTHING:
            continue
        acts = frozenset(change.actions)
        ok = allowed.get(change.address)
        if ok is None:
            return False
        if acts <= ok:
            continue
        if change.tainted and acts == _REPLACE and ok == frozenset({"create"}):
            continue
        return False
    return True
