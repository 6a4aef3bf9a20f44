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

The decisions are pure functions over what the transaction read (``service.cli_backend_rules``:
``decide_lock``, ``decide_unlock``, ``decide_write``, and the refusals they raise); the async
functions here read under the right locks, decide, and write.

Advisory locks, always taken in this order (never the reverse, so no deadlock): the
workspace's state lock (``index.next_version``, 7310003) -> the claim lock (7310005) -> the
append lock (7310002, inside every append).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Literal

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg.errors import UniqueViolation
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from service import store
from service.cli_backend_rules import (
    CliLock,
    DeployHolder,
    LockInfo,
    NothingHeld,
    Repeated,
    StateMeta,
    Unchanged,
    decide_lock,
    decide_unlock,
    decide_write,
    rfc3339,
)
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

CLAIM_RETRIES = 4  # a racing claim of the same new name: find the winner's and go on


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
