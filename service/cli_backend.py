"""The terraform CLI on tfdeploy: the rules of terraform's ``http`` state backend, and the
transactions that apply them (the routes are ``service/api/tfstate.py``; docs/terraform-cli.md).

One lock. A workspace is held by a CLI (a row of ``workspace_locks``, taken by LOCK with
terraform's LockInfo) or by a deploy (its job is being run, or its plan waits for approval). The
deploy queue's claim (``tfdeploy_claim``, migration 0010) skips a workspace with a CLI lock, and
a LOCK refuses a workspace a deploy holds; both decide under the same transaction-scoped
advisory lock (7310005), so a LOCK and a claim never interleave. Releasing the CLI's lock
notifies the dispatchers (``tfdeploy_dispatch``) in its transaction: queued deploys start.

Safe writes. A state written by the CLI is a state version like a deploy's (sealed by the state
store, indexed), refused while someone else holds the workspace, and refused when it is not the
next state of the workspace's lineage. Every lock, unlock and write is an event in the
workspace's stream, in the transaction that does it (actor ``cli:<user>``).

The decisions are pure functions (``decide_lock``, ``decide_unlock``, ``decide_write``) over
what the transaction read; the async functions read under the right locks, decide, and write.

Advisory locks, always taken in this order (never the reverse, so no deadlock): the
workspace's state lock (``index.next_version``, 7310003) -> the claim lock (7310005) -> the
append lock (7310002, inside every append).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg.errors import UniqueViolation
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from service import store
from service.db import autocommit
from service.events import (
    StateDownloaded,
    StateForceUnlocked,
    StateLocked,
    StateUnlocked,
    StateWritten,
    WorkspaceCreated,
    WorkspaceEvent,
)
from service.queries import q
from service.statestores import index, put_with_retries
from service.workspaces import Workspace, find

Conn = AsyncConnection[Any]

LOCK_BODY_MAX = 64 * 1024  # a LockInfo is a few hundred bytes
LOCK_ID_MAX = 256
CLAIM_RETRIES = 4  # a racing claim of the same new name: find the winner's and go on
# RFC 3339, what Go's time.Time reads back (terraform parses the holder's LockInfo).
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
_LOCK_FIELDS = ("ID", "Operation", "Info", "Who", "Version", "Created", "Path")


# ---------------------------------------------------------------- what a request may be refused


class BackendError(Exception):
    """A refusal, with the status the http backend answers and, where terraform reads one, the
    holder's LockInfo for the body."""

    status_code = 409

    def __init__(self, detail: str, lock_info: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.lock_info = lock_info


class BadLockInfo(BackendError):
    """A LOCK or UNLOCK body that is not terraform's LockInfo."""

    status_code = 400


class Locked(BackendError):
    """Someone else holds the workspace (423, the holder's LockInfo: terraform's -lock-timeout
    waits and asks again)."""

    status_code = 423


class LockConflict(BackendError):
    """An UNLOCK of a lock one does not hold, or a write under a lock that is not held (409)."""


class StateRefused(BackendError):
    """A state that is not the next of the workspace's (another lineage, an older or repeated
    serial with other content): 409."""


class ForceUnlockDenied(BackendError):
    """A force-unlock (UNLOCK with no LockInfo) by someone who is not an admin: 403."""

    status_code = 403


# ---------------------------------------------------------------- terraform's LockInfo (pure)


class LockInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """terraform's statemgr.LockInfo, as its http client sends it with LOCK and UNLOCK."""

    ID: str
    Operation: str = ""
    Info: str = ""
    Who: str = ""
    Version: str = ""
    Created: str = ""
    Path: str = ""

    def to_json(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in _LOCK_FIELDS}


_lock_decoder = msgspec.json.Decoder(LockInfo)


def parse_lock_info(body: bytes, now: datetime | None = None) -> LockInfo | None:
    """The LockInfo of a LOCK or UNLOCK body; None for an empty body (``terraform force-unlock``
    sends none). BadLockInfo for anything else that is not one: not a JSON object of strings,
    no ID, an ID that is too long or not printable, a ``Created`` Go could not read back. A
    missing ``Created`` is set to ``now``, so the info given back to other clients always
    parses."""
    if not body.strip():
        return None
    try:
        info = _lock_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadLockInfo(f"the body is not terraform's LockInfo: {exc}") from None
    lock_id = info.ID.strip()
    if not lock_id:
        raise BadLockInfo("the LockInfo has no ID")
    if len(lock_id) > LOCK_ID_MAX or not lock_id.isprintable():
        raise BadLockInfo(f"a lock ID is 1-{LOCK_ID_MAX} printable characters")
    if any("\x00" in getattr(info, name) for name in _LOCK_FIELDS):
        raise BadLockInfo("the LockInfo holds a NUL character")
    created = info.Created
    if not created:
        created = rfc3339(now or datetime.now(UTC))
    elif _RFC3339.match(created) is None:
        raise BadLockInfo("the LockInfo's Created is not an RFC 3339 time")
    return msgspec.structs.replace(info, ID=lock_id, Created=created)


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------- who holds a workspace


class DeployHolder(msgspec.Struct, frozen=True, kw_only=True):
    """A deploy that holds its workspace: running (its job taken) or planned."""

    id: str
    owner: str
    action: str
    status: str
    created_at: datetime

    @property
    def lock_id(self) -> str:
        return f"deploy:{self.id}"


class CliLock(msgspec.Struct, frozen=True, kw_only=True):
    """The CLI's lock on a workspace: the LockInfo it was taken with, and by whom."""

    lock_id: str
    info: dict[str, Any]
    holder: str  # a user name
    created_at: datetime


def deploy_lock_info(holder: DeployHolder, ref: str) -> dict[str, str]:
    """A deploy's hold as terraform's LockInfo: its ID names the deploy (terraform shows it:
    "already locked: ID=deploy:<id>"), the rest says what it is and how to end it."""
    if holder.status == "planned":
        operation = f"tfdeploy {holder.action}: plan waiting for approval"
        info = (
            f"deploy {holder.id} of {ref} waits for approval: approve or discard it "
            f"(POST /deploys/{holder.id}/approve or /discard) to release the workspace"
        )
    else:
        operation = f"tfdeploy {holder.action}"
        info = (
            f"deploy {holder.id} of {ref} is running; the workspace is free when it ends "
            f"(POST /deploys/{holder.id}/cancel stops it)"
        )
    return {
        "ID": holder.lock_id,
        "Operation": operation,
        "Info": info,
        "Who": f"{holder.owner} (tfdeploy deploy)",
        "Version": "",
        "Created": rfc3339(holder.created_at),
        "Path": ref,
    }


def cli_lock_info(lock: CliLock) -> dict[str, str]:
    """A CLI's lock as terraform reads it back: the LockInfo it sent (always with its ID)."""
    info = {name: str(lock.info.get(name) or "") for name in _LOCK_FIELDS}
    info["ID"] = lock.lock_id
    if not info["Created"]:
        info["Created"] = rfc3339(lock.created_at)
    return info


# ---------------------------------------------------------------- the decisions (pure)


class Granted(msgspec.Struct, frozen=True):
    """Take the lock (write the row and StateLocked)."""


class Repeated(msgspec.Struct, frozen=True):
    """The holder asked again with its own ID (a retried LOCK whose answer was lost): 200, nothing
    written."""


def decide_lock(
    cli: CliLock | None, deploy: DeployHolder | None, lock_id: str, user: str, ref: str
) -> Granted | Repeated:
    """LOCK ``lock_id`` by ``user``; raises Locked (423 with the holder's info) if another holds
    the workspace."""
    if cli is not None:
        if cli.lock_id == lock_id and cli.holder == user:
            return Repeated()
        raise Locked(f"the workspace is locked by {cli.holder}'s terraform", cli_lock_info(cli))
    if deploy is not None:
        raise Locked(
            f"deploy {deploy.id} holds the workspace ({deploy.status})", deploy_lock_info(deploy, ref)
        )
    return Granted()


class Release(msgspec.Struct, frozen=True):
    """Delete the CLI's lock and record the unlock (``force``: an admin's, without its ID)."""

    lock: CliLock
    force: bool = False


class NothingHeld(msgspec.Struct, frozen=True):
    """No CLI lock to release: 200 and nothing written (an UNLOCK retried after its answer was
    lost finds nothing left)."""


def decide_unlock(
    cli: CliLock | None,
    deploy: DeployHolder | None,
    lock_id: str | None,
    user: str,
    admin: bool,
    ref: str,
) -> Release | NothingHeld:
    """UNLOCK by ``user`` with ``lock_id`` (None: a force-unlock, terraform's empty body).

    - force-unlock: admins only (ForceUnlockDenied); it removes the CLI's lock, whoever holds it;
      a deploy's hold is not the CLI's to remove (LockConflict: cancel or discard the deploy);
    - with an ID: the holder's own lock (same ID, same user) is released; anyone else's is a
      LockConflict (409) with the holder's info."""
    if lock_id is None:
        if not admin:
            raise ForceUnlockDenied(
                "only an admin may force-unlock; the holder unlocks with its lock's ID"
            )
        if cli is not None:
            return Release(cli, force=True)
        if deploy is not None:
            raise LockConflict(
                f"deploy {deploy.id} holds the workspace, not a CLI: cancel the deploy "
                "(or discard its plan) to release it",
                deploy_lock_info(deploy, ref),
            )
        return NothingHeld()
    if cli is not None:
        if cli.lock_id == lock_id and cli.holder == user:
            return Release(cli)
        raise LockConflict(
            f"the lock is held under another ID, by {cli.holder}'s terraform", cli_lock_info(cli)
        )
    if deploy is not None and lock_id == deploy.lock_id:
        raise LockConflict(
            f"deploy {deploy.id} holds the workspace: cancel the deploy (or discard its plan) "
            "to release it",
            deploy_lock_info(deploy, ref),
        )
    return NothingHeld()


class StateMeta(msgspec.Struct, frozen=True):
    serial: int
    lineage: str
    sha256: str


class Accept(msgspec.Struct, frozen=True):
    """A new state version."""


class Unchanged(msgspec.Struct, frozen=True):
    """The latest version already is this content (a write retried after its answer was
    lost): 200, nothing written."""


def decide_write(
    cli: CliLock | None,
    deploy: DeployHolder | None,
    lock_id: str,
    user: str,
    latest: StateMeta | None,
    new: StateMeta,
    ref: str,
) -> Accept | Unchanged:
    """A state write by ``user`` under ``lock_id`` ("" when its terraform holds no lock):

    - while a deploy holds the workspace: Locked (423), whatever the write says;
    - while a CLI lock is held: only under that lock (its ID, its user), else Locked (423);
    - naming a lock that is not held (force-unlocked since?): LockConflict (409) -- the writer's
      view of the state may be stale;
    - the workspace's latest state decides the content: another lineage, an older serial, or
      the same serial with other content is StateRefused (409); the very same content is
      Unchanged."""
    if deploy is not None:
        raise Locked(
            f"deploy {deploy.id} holds the workspace ({deploy.status}): the state cannot be "
            "written until it ends",
            deploy_lock_info(deploy, ref),
        )
    if cli is not None:
        if cli.lock_id != lock_id or cli.holder != user:
            raise Locked(
                f"the workspace is locked by {cli.holder}'s terraform: a write needs its lock "
                "(?ID=)",
                cli_lock_info(cli),
            )
    elif lock_id:
        raise LockConflict(
            f"the lock {lock_id} this write names is not held (released or force-unlocked): "
            "run terraform again"
        )
    if latest is None:
        return Accept()
    if new.lineage != latest.lineage:
        raise StateRefused(
            f"the state's lineage {new.lineage!r} is not the workspace's ({latest.lineage!r}): "
            "it is another state; write it to a new workspace"
        )
    if new.serial < latest.serial:
        raise StateRefused(
            f"the state's serial {new.serial} is older than the workspace's latest "
            f"({latest.serial}): refresh (terraform plan/apply reads the latest) and try again"
        )
    if new.serial == latest.serial:
        if new.sha256 == latest.sha256:
            return Unchanged()
        raise StateRefused(
            f"the workspace already has serial {new.serial} with other content: a changed "
            "state needs a higher serial"
        )
    return Accept()


# ---------------------------------------------------------------- reading under the locks


def _deploy_holder(row: dict[str, Any] | None) -> DeployHolder | None:
    if row is None:
        return None
    return DeployHolder(
        id=str(row["id"]),
        owner=row["owner"],
        action=row["action"],
        status=row["status"],
        created_at=row["created_at"],
    )


def _cli_lock(row: dict[str, Any] | None) -> CliLock | None:
    if row is None:
        return None
    return CliLock(
        lock_id=row["lock_id"], info=row["info"], holder=row["holder"], created_at=row["created_at"]
    )


async def holders(
    conn: Conn, workspace_id: str, *, claim_lock: bool = False
) -> tuple[CliLock | None, DeployHolder | None]:
    """Who holds the workspace now: its CLI lock, the deploy that holds it. One round trip;
    with ``claim_lock``, the claim's lock is taken first in the same query and held until the
    caller's transaction ends (so the claim lock spans one client round trip, not three)."""
    params = {"workspace_id": workspace_id}
    async with psycopg.AsyncClientCursor(conn, row_factory=dict_row) as cur:
        parts = [cur.mogrify(q(name), params) for name in ("tfstate_cli_lock", "tfstate_deploy_holder")]
        if claim_lock:
            parts.insert(0, q("tfstate_claim_lock").decode())
        await cur.execute(";\n".join(parts).encode())
        if claim_lock:
            cur.nextset()
        cli = _cli_lock(await cur.fetchone())
        cur.nextset()
        deploy = _deploy_holder(await cur.fetchone())
    return cli, deploy


# ---------------------------------------------------------------- the transactions


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """The workspace a LOCK or write is for. ``new``: the caller's own name, not claimed yet --
    claimed in the transaction of the LOCK or the write (``WorkspaceCreated`` by ``cli:<user>``), as a
    deploy claims one in the transaction of its ``Requested``."""

    workspace: Workspace
    new: bool = False


def new_target(owner: str, name: str) -> Target:
    return Target(workspace=Workspace(id=str(uuid.uuid4()), owner=owner, name=name), new=True)


def _claim_writes(target: Target, actor: str) -> list[tuple[str, dict[str, Any]]]:
    if not target.new:
        return []
    ws = target.workspace
    return [
        ("insert_workspace", {"id": ws.id, "owner": ws.owner, "name": ws.name}),
        store.workspace_append(
            ws.id, 0, [WorkspaceCreated(name=ws.name, owner=ws.owner)], actor
        ),
    ]


def _is_claim_race(exc: BaseException) -> bool:
    return isinstance(exc, UniqueViolation) and getattr(exc.diag, "table_name", None) == "workspaces"


async def _existing(pool: Any, target: Target) -> Target:
    """After losing a race for a new name: the winner's workspace (the same owner's)."""
    async with pool.connection() as conn:
        found = await find(conn, target.workspace.owner, target.workspace.name)
    if found is None:  # cannot be: the row that collided is committed
        raise RuntimeError(f"workspace {target.workspace.ref} vanished")
    return Target(workspace=found)


class LockResult(msgspec.Struct, frozen=True):
    workspace: Workspace
    info: dict[str, str]
    taken: bool  # False: the holder's repeated LOCK


async def lock(pool: Any, target: Target, info: LockInfo, user: str, actor: str) -> LockResult:
    """LOCK: take the workspace's CLI lock for ``user`` (Locked if held), in one transaction
    under the claim lock: the row and ``StateLocked`` (and, for a new name, the claim)."""
    for _ in range(CLAIM_RETRIES):
        ws = target.workspace
        try:
            async with pool.connection() as conn:
                if not target.new:
                    # Held (a CLI's -lock-timeout asking again and again while a deploy runs):
                    # answered without the claim's lock, so it never delays a claim.
                    decide_lock(*await holders(conn, ws.id), info.ID, user, ws.ref)
                cli, deploy = await holders(conn, ws.id, claim_lock=True)
                decision = decide_lock(cli, deploy, info.ID, user, ws.ref)
                if isinstance(decision, Repeated):
                    return LockResult(workspace=ws, info=info.to_json(), taken=False)
                event = StateLocked(
                    lock_id=info.ID,
                    operation=info.Operation,
                    who=info.Who,
                    info=info.Info,
                    terraform_version=info.Version,
                )
                await store.commit_writes(
                    conn,
                    [
                        *_claim_writes(target, actor),
                        (
                            "tfstate_insert_lock",
                            {
                                "workspace_id": ws.id,
                                "lock_id": info.ID,
                                "info": Jsonb(info.to_json()),
                                "holder": user,
                            },
                        ),
                        store.workspace_append(ws.id, None, [event], actor),
                    ],
                )
                return LockResult(workspace=ws, info=info.to_json(), taken=True)
        except UniqueViolation as exc:
            if not _is_claim_race(exc):
                raise
            target = await _existing(pool, target)
    raise RuntimeError("could not claim the workspace")  # pragma: no cover


class UnlockResult(msgspec.Struct, frozen=True):
    released: CliLock | None  # None: nothing was held


async def unlock(
    pool: Any,
    workspace: Workspace,
    lock_id: str | None,
    *,
    user: str,
    admin: bool,
    actor: str,
    via: Literal["cli", "shell"] = "cli",
) -> UnlockResult:
    """UNLOCK (``lock_id`` None: force-unlock): delete the lock row, record ``StateUnlocked`` or
    ``StateForceUnlocked`` and wake the dispatchers, in one transaction."""
    async with pool.connection() as conn:
        cli, deploy = await holders(conn, workspace.id, claim_lock=True)
        decision = decide_unlock(cli, deploy, lock_id, user, admin, workspace.ref)
        if isinstance(decision, NothingHeld):
            return UnlockResult(released=None)
        held = decision.lock
        event: WorkspaceEvent
        if decision.force:
            event = StateForceUnlocked(
                lock_id=held.lock_id,
                holder=held.holder,
                held_since=rfc3339(held.created_at),
                via=via,
            )
        else:
            event = StateUnlocked(lock_id=held.lock_id)
        await store.commit_writes(
            conn,
            [
                ("tfstate_delete_lock", {"workspace_id": workspace.id, "lock_id": held.lock_id}),
                ("tfstate_notify_dispatch", {}),
                store.workspace_append(workspace.id, None, [event], actor),
            ],
        )
        return UnlockResult(released=held)


class WriteResult(msgspec.Struct, frozen=True):
    workspace: Workspace
    version: index.StateVersion | None  # None: the content was the latest already
    created: bool


async def write(
    pool: Any,
    state_store: Any,
    target: Target,
    content: bytes,
    meta: tuple[int, str, str, int],
    *,
    lock_id: str,
    user: str,
    actor: str,
) -> WriteResult:
    """A state written by the CLI (``meta``: serial, lineage, sha256, size of ``content``, a
    checked tfstate). One transaction: the workspace's state lock (the version number, and no
    other write of this workspace in between), the rules against its latest state and holders,
    the content put in the state store (sealed), then -- under the claim lock, so no deploy
    starts between the last check and the commit -- the checks again, the version's index row
    and ``StateWritten``. A content put whose transaction then fails is harmless: its number is
    never handed out again (``index.next_version``)."""
    serial, lineage, sha256, size = meta
    new = StateMeta(serial, lineage, sha256)
    for _ in range(CLAIM_RETRIES):
        ws = target.workspace
        try:
            async with pool.connection() as conn:
                version = await index.next_version(conn, ws.id)
                latest_row = await index.latest(conn, ws.id)
                latest = (
                    StateMeta(latest_row.serial, latest_row.lineage, latest_row.sha256)
                    if latest_row is not None
                    else None
                )
                cli, deploy = (None, None) if target.new else await holders(conn, ws.id)
                # Before the content goes anywhere: most refusals are decided here.
                if isinstance(decide_write(cli, deploy, lock_id, user, latest, new, ws.ref), Unchanged):
                    return WriteResult(workspace=ws, version=latest_row, created=False)
                stored = await put_with_retries(state_store, ws.id, version, content, sha256)
                recorded = await index.record_version(
                    conn, ws.id, version, None, None, stored, serial, lineage, sha256, size,
                    written_by=user,
                )
                cli, deploy = await holders(conn, ws.id, claim_lock=True)
                if not target.new:
                    decide_write(cli, deploy, lock_id, user, latest, new, ws.ref)
                event = StateWritten(
                    state_version=version,
                    serial=serial,
                    lineage=lineage,
                    sha256=sha256,
                    size=size,
                    lock_id=lock_id,
                )
                await store.commit_writes(
                    conn,
                    [*_claim_writes(target, actor), store.workspace_append(ws.id, None, [event], actor)],
                )
                return WriteResult(workspace=ws, version=recorded, created=True)
        except UniqueViolation as exc:
            if not _is_claim_race(exc):
                raise
            target = await _existing(pool, target)
    raise RuntimeError("could not claim the workspace")  # pragma: no cover


async def read_latest(
    pool: Any, state_store: Any, workspace: Workspace, actor: str
) -> tuple[index.StateVersion, bytes] | None:
    """The latest state (None when there is none), recorded as ``StateDownloaded`` via "cli"."""
    async with pool.connection() as conn:
        latest = await index.latest(conn, workspace.id)
    if latest is None:
        return None
    content = await state_store.get(workspace.id, latest.version, latest.location)
    event = StateDownloaded(state_version=latest.version, sha256=latest.sha256, latest=True, via="cli")
    async with autocommit(pool) as conn:
        await store.append_workspace(conn, workspace.id, None, [event], actor)
    return latest, content


async def force_unlock_from_shell(pool: Any, workspace: Workspace, operator: str) -> CliLock | None:
    """``tfdeploy workspace unlock``: an operator's force-unlock (actor ``admin:<operator>``)."""
    result = await unlock(
        pool, workspace, None, user=operator, admin=True, actor=f"admin:{operator}", via="shell"
    )
    return result.released


def cli_actor(user: str) -> str:
    return f"cli:{user}"


async def state_meta(content: bytes) -> tuple[int, str, str, int]:
    """``index.state_meta`` off the event loop (a tfstate may be tens of MiB)."""
    return await asyncio.to_thread(index.state_meta, content)
