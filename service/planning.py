"""Plans: what a run of a deploy does, what its plan says, where a plan that may be applied is
kept, and the commands a person gives about it (approve, discard), including the TTL.

- ``run_for(state, step)``: the terraform steps of a run and its number within the attempt (a
  plan run is run 1, the apply of its approved plan run 2).
- ``read_plan(plan_json)``: ``terraform show -json`` reduced to addresses, types and actions --
  no values, so nothing sensitive -- plus terraform's counts and whether anything changes.
- ``save_plan`` / ``load_plan``: the plan file sealed with the key ring (it holds variable values
  and the configuration), bound to the state version it was made against, with the lock file it
  was made with; ``base_version``: which persisted state version a run started from.
- ``command``: approve or discard once, idempotent under retries with an Idempotency-Key;
  ``approve_command`` reads the workspace's latest state version the approval is checked with.
- ``expire_plans`` / ``register_plan_expiry``: plans left unapproved past ``TFDEPLOY_PLAN_TTL``
  are discarded (``system:ttl``), by a periodic procrastinate task.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import msgspec
import procrastinate
from psycopg import AsyncConnection
from psycopg.errors import UniqueViolation

from service import workspaces
from service.deploys import Deploys, IdempotencyMismatch, NotFound
from service.events import PlanChange, Planned, PlanSummary
from service.events import Step as RunKind
from service.lifecycle import Approve, DeployState, Discard, IllegalTransition
from service.projection import DeployView, StoredEvent
from service.queries import q
from service.runners.base import Step, steps_for
from service.secrets import KeyRing
from service.statestores import index

log = logging.getLogger("tfdeploy.planning")

Conn = AsyncConnection[Any]

# Runs within an attempt: its plan, then (once approved) the apply of that saved plan. A whole
# run (no approval) and a speculative plan are run 1 too.
PLAN_RUN = 1
APPLY_RUN = 2

TTL_ACTOR = "system:ttl"
EXPIRY_TASK = "tfdeploy.expire_plans"

# A command's Idempotency-Key is kept in idempotency_keys beside the deploys' own, under this
# prefix: the API refuses keys with control characters, so no POST /deploys key can collide.
COMMAND_KEY_PREFIX = "\x1fcommand\x1f"

# An address or type longer than this is cut (terraform's are far shorter; a plan is the
# user's output, so it is held to sizes the event store is meant for).
MAX_ADDRESS = 1024


# ---------------------------------------------------------------- the steps of a run


def run_for(state: DeployState, kind: RunKind) -> tuple[list[Step], int]:
    """The steps of a run of ``kind`` ("run", "plan", "apply") of the deploy in ``state``, and
    the run's number within its attempt.

    - speculative (action "plan"): init, validate, plan, show_plan -- never kept, never applied;
    - "plan" (an attempt of a deploy that waits for approval): the same, ``-destroy`` for a
      destroy; the plan file is kept for the apply;
    - "apply": init (the providers of the saved plan's lock file), then apply the saved plan;
    - "run": init, validate, apply | destroy, as without approval."""
    if state.speculative:
        return steps_for("plan"), 1
    if kind == "plan":
        return [
            Step(name="init"),
            Step(name="validate"),
            Step(name="plan", destroy=state.action == "destroy", detailed_exitcode=True),
            Step(name="show_plan"),
        ], PLAN_RUN
    if kind == "apply":
        return [Step(name="init"), Step(name="apply_plan")], APPLY_RUN
    return steps_for(state.action), 1


def makes_plan(steps: Sequence[Step]) -> bool:
    """Whether a run's outcome is a plan (PlanMade) rather than an applied state."""
    return any(s.name == "plan" for s in steps)


# ---------------------------------------------------------------- reading a plan (pure)


class _Change(msgspec.Struct, frozen=True):
    # Only the actions: before/after values are skipped by the decoder, never built.
    actions: list[str] = []


class _ResourceChange(msgspec.Struct, frozen=True):
    address: str = ""
    type: str = ""
    deposed: str | None = None
    action_reason: str | None = None
    change: _Change = _Change()


class _PlanDocument(msgspec.Struct, frozen=True):
    format_version: str = ""
    resource_changes: list[_ResourceChange] = []
    output_changes: dict[str, _Change] = {}


class PlanReading(msgspec.Struct, frozen=True, kw_only=True):
    summary: PlanSummary
    changes: list[PlanChange]
    changed: bool  # anything to apply at all: a resource or an output


_NOTHING: tuple[list[str], ...] = ([], ["no-op"])
_plan_decoder = msgspec.json.Decoder(_PlanDocument)


class PlanUnreadable(ValueError):
    """The plan JSON is not terraform's (``terraform show -json`` of a plan file)."""


def read_plan(plan_json: bytes) -> PlanReading:
    """``terraform show -json PLANFILE`` reduced to what may be shown to anyone who may see the
    deploy: each resource change's address, type and actions (``tainted`` when terraform
    replaces it because an earlier apply left it tainted), terraform's counts (a replace is one
    to add and one to destroy; reads are not counted) and whether anything changes. No value is
    kept. Unchanged resources (no-op) are left out."""
    try:
        doc = _plan_decoder.decode(plan_json)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise PlanUnreadable(f"the plan JSON is not terraform's: {exc}") from None
    if not doc.format_version:
        raise PlanUnreadable("the plan JSON has no format_version: not terraform's plan")
    changes: list[PlanChange] = []
    add = change = destroy = 0
    for rc in doc.resource_changes:
        actions = [str(a)[:32] for a in rc.change.actions]
        if actions in _NOTHING:
            continue
        address = rc.address[:MAX_ADDRESS]
        if rc.deposed:
            address = f"{address} (deposed object {rc.deposed[:64]})"
        changes.append(
            PlanChange(
                address=address,
                type=rc.type[:MAX_ADDRESS],
                actions=actions,
                tainted=rc.action_reason == "replace_because_tainted",
            )
        )
        add += "create" in actions
        change += "update" in actions
        destroy += "delete" in actions
    outputs = any(c.actions not in _NOTHING for c in doc.output_changes.values())
    return PlanReading(
        summary=PlanSummary(add=add, change=change, destroy=destroy),
        changes=changes,
        changed=bool(changes) or outputs,
    )


def plan_of(stream: Sequence[StoredEvent]) -> Planned | None:
    """The latest plan of a deploy's stream, if it has one."""
    for record in reversed(stream):
        if isinstance(record.event, Planned):
            return record.event
    return None


# ---------------------------------------------------------------- saved plans


class SavedPlan(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    attempt: int
    sha256: str
    plan: bytes  # opened
    lock_file: bytes | None
    base_state_version: int | None


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _lock_text(content: bytes | None) -> str | None:
    if not content:
        return None
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


async def save_plan(
    conn: Conn,
    keyring: KeyRing,
    *,
    deploy_id: str,
    attempt: int,
    plan: bytes,
    lock_file: bytes | None,
    base_state_version: int | None,
) -> tuple[str, str]:
    """Keep a plan file, sealed, for the apply that follows its approval; returns (id, sha256
    of the plaintext). Kept BEFORE its Planned event is appended: a plan that may be approved
    always exists."""
    plan_id = str(uuid4())
    sha = _sha(plan)
    sealed = await asyncio.to_thread(keyring.seal, plan)  # up to 4x the state cap
    await conn.execute(
        q("insert_saved_plan"),
        {
            "id": plan_id,
            "deploy_id": deploy_id,
            "attempt": attempt,
            "sha256": sha,
            "size": len(plan),
            "content": sealed,
            "lock_file": _lock_text(lock_file),
            "base_state_version": base_state_version,
        },
    )
    return plan_id, sha


class PlanUnavailable(Exception):
    """The approved plan cannot be applied: it is gone, does not open, or is stale."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


async def load_plan(conn: Conn, keyring: KeyRing, deploy_id: str, plan_id: str) -> SavedPlan:
    """The saved plan ``plan_id`` of the deploy, opened and checked against its digest."""
    try:
        UUID(plan_id)
    except ValueError:
        raise PlanUnavailable("plan_missing", f"no saved plan {plan_id!r}") from None
    cur = await conn.execute(q("get_saved_plan"), {"id": plan_id, "deploy_id": deploy_id})
    row = await cur.fetchone()
    if row is None:
        raise PlanUnavailable("plan_missing", f"the saved plan {plan_id} is gone")
    _, _, attempt, sha, _, content, lock_file, base = row
    try:
        plan = await asyncio.to_thread(keyring.open, bytes(content))
    except Exception as exc:  # a key missing from the ring, a damaged row
        raise PlanUnavailable("plan_missing", f"the saved plan {plan_id} does not open: {exc}") from None
    if _sha(plan) != sha:
        raise PlanUnavailable("plan_missing", f"the saved plan {plan_id} does not match its digest")
    return SavedPlan(
        id=plan_id,
        attempt=int(attempt),
        sha256=sha,
        plan=plan,
        lock_file=lock_file.encode() if lock_file else None,
        base_state_version=base,
    )


async def base_version(conn: Conn, workspace: str, state: bytes | None) -> int | None:
    """The persisted state version of ``workspace`` whose content ``state`` is (the newest, if
    several are alike); None for no state. Raises ``LookupError`` for a state that is not a
    persisted version (one the Docker runner adopted from an earlier attempt's container)."""
    if state is None:
        return None
    cur = await conn.execute(q("state_version_by_sha"), {"workspace": workspace, "sha256": _sha(state)})
    row = await cur.fetchone()
    if row is None:
        raise LookupError("the run started from a state that is not a persisted version")
    return int(row[0])


# ---------------------------------------------------------------- approve and discard


async def approve_command(conn: Conn, deploy: DeployView, by: str) -> Approve:
    """Approve, with the workspace's latest state version now: a plan made against another one
    is stale (refused by the lifecycle, 409)."""
    key = deploy.workspace_id or await workspaces.key_of(conn, deploy.id)
    latest = await index.latest(conn, key)
    return Approve(by=by, state_version=latest.version if latest is not None else None)


def _command_digest(name: str, deploy_id: str) -> str:
    return _sha(f"{name}\x00{deploy_id}".encode())


async def _key_answer(deploys: Deploys, owner: str, key: str, digest: str) -> DeployView | None:
    """The deploy an earlier request with this key acted on, if there was one."""
    async with deploys.pool.connection() as conn:
        cur = await conn.execute(q("get_idempotency"), {"owner": owner, "key": COMMAND_KEY_PREFIX + key})
        row = await cur.fetchone()
        if row is None:
            return None
        if row[0] != digest:
            raise IdempotencyMismatch("this Idempotency-Key was used with a different request")
        from service import store

        view = await store.get_deploy(conn, row[1])
    if view is None:  # pragma: no cover - a key is written with its deploy's event
        raise NotFound(str(row[1]))
    return view


async def command(
    deploys: Deploys,
    deploy: DeployView,
    name: str,
    *,
    by: str,
    actor: str,
    owner: str,
    key: str | None = None,
) -> tuple[DeployView, bool]:
    """Approve (``name`` "approve") or discard ("discard") the plan of ``deploy`` once.

    With ``key`` (an Idempotency-Key of ``owner``'s), a retry of the same request answers as
    the first did -- the deploy it acted on, not a 409 -- and the same key with another request
    is refused (IdempotencyMismatch). The key is written in the transaction of the command's
    event, so it exists exactly when the command took effect. Of concurrent commands exactly
    one takes effect (the event store's version check); the others meet IllegalTransition (409),
    unless they carry its key. Returns (deploy, acted): ``acted`` is False for a replay."""
    digest = _command_digest(name, deploy.id)
    if key:
        earlier = await _key_answer(deploys, owner, key, digest)
        if earlier is not None:
            return earlier, False
    also: list[tuple[str, dict[str, Any]]] = []
    if key:
        also.append(
            (
                "insert_idempotency",
                {"owner": owner, "key": COMMAND_KEY_PREFIX + key, "request_sha256": digest, "deploy_id": deploy.id},
            )
        )
    try:
        if name == "approve":
            async with deploys.pool.connection() as conn:
                cmd: Approve | Discard = await approve_command(conn, deploy, by)
        elif name == "discard":
            cmd = Discard(by=by)
        else:  # pragma: no cover - the routes name them
            raise ValueError(name)
        _, view = await deploys.execute(deploy.id, cmd, actor, also=also)
        return view, True
    except (IllegalTransition, UniqueViolation):
        if key:
            # A twin with the same key took effect first: answer as it did.
            earlier = await _key_answer(deploys, owner, key, digest)
            if earlier is not None:
                return earlier, False
        raise


# ---------------------------------------------------------------- the TTL


def _unapproved_since(cutoff: datetime) -> Any:
    """A check for Deploys.execute: the deploy still waits on a plan made before ``cutoff``
    (not one made after an approval meanwhile)."""

    def check(prior: Sequence[StoredEvent], state: DeployState) -> None:
        last = next((r for r in reversed(prior) if isinstance(r.event, Planned)), None)
        if state.phase != "planned" or last is None or last.recorded_at >= cutoff:
            raise IllegalTransition("the deploy no longer waits on an expired plan")

    return check


async def expire_plans(deploys: Deploys, ttl: float) -> list[str]:
    """Discard every plan left unapproved for longer than ``ttl`` seconds (``Discarded`` by
    ``system:ttl``, reason ``expired``); returns the deploys discarded. Times are PostgreSQL's
    (the events' ``recorded_at``). A plan approved, discarded or made anew meanwhile is left
    alone: the check runs in the transaction of the append."""
    async with deploys.pool.connection() as conn:
        cur = await conn.execute(q("planned_before"), {"ttl": ttl})
        rows = await cur.fetchall()
    expired: list[str] = []
    for deploy_id, cutoff in rows:
        try:
            await deploys.execute(
                str(deploy_id),
                Discard(by=TTL_ACTOR, reason="expired"),
                TTL_ACTOR,
                check=_unapproved_since(cutoff),
            )
        except (IllegalTransition, NotFound):
            continue
        expired.append(str(deploy_id))
    if expired:
        log.info("discarded %d plan(s) left unapproved past the TTL (%.0fs)", len(expired), ttl)
    return expired


def register_plan_expiry(
    app: procrastinate.App,
    deploys: Deploys,
    ttl: float,
    *,
    queue: str,
    cron: str = "* * * * *",
) -> Any:
    """Register the periodic task that discards expired plans on ``app``: deferred by every
    worker's periodic deferrer at each ``cron`` tick (procrastinate makes one job per tick,
    however many workers there are) onto ``queue``, run by a worker that listens to it. A plan
    is discarded within ``ttl`` plus one tick. Returns the task."""

    @app.periodic(cron=cron, periodic_id="plan-ttl")
    @app.task(name=EXPIRY_TASK, queue=queue)
    async def expire_unapproved_plans(timestamp: int) -> None:
        await expire_plans(deploys, ttl)

    return expire_unapproved_plans
