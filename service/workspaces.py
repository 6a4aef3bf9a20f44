"""Workspaces: per-user names, the refs that name them, and their members.

A workspace belongs to the user whose deploy claimed its name; alice's ``prod`` is not bob's.
A request names one by a REF: ``name`` (the caller's own) or ``owner:name`` (someone else's, for
its members and admins). Inside, a workspace is its id (a uuid, as text): the key of its state
rows and state-store objects, its job lock and its runs. Workspaces are never renamed or
deleted, so (owner, name) -> id may be cached for good.

Who may do what with a workspace is decided in ``service.api.access``; this module only reads and
writes. Every membership change is written with its event (``MemberSet``, ``MemberRemoved``) in
the workspace's stream, in one transaction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from service import store
from service.events import (
    Event,
    MemberRemoved,
    MemberSet,
    Requested,
    StateDownloaded,
    StateForceUnlocked,
    WorkspaceCreated,
    WorkspaceEvent,
)
from service.projection import StoredEvent
from service.queries import q

Conn = AsyncConnection[Any]
Role = Literal["read", "deploy"]
ROLES: tuple[Role, ...] = ("read", "deploy")
CACHE_SIZE = 10_000
CONFLICT_RETRIES = 8


class WorkspaceNotFound(LookupError):
    """No such workspace, or not one the caller may know of: both are the same 404."""

    def __init__(self, message: str = "workspace not found") -> None:
        super().__init__(message)


class Workspace(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    owner: str
    name: str
    created_at: datetime | None = None

    @property
    def ref(self) -> str:
        """How anyone names it: ``owner:name``."""
        return f"{self.owner}:{self.name}"


def parse_ref(ref: str, caller: str) -> tuple[str, str]:
    """(owner, name) of a ref as ``caller`` wrote it. User names and workspace names hold no
    ':' (service.validation), so the split is unambiguous."""
    owner, sep, name = ref.rpartition(":")
    return (owner if sep else caller), name


def _workspace(row: dict[str, Any]) -> Workspace:
    return Workspace(
        id=str(row["id"]), owner=row["owner"], name=row["name"], created_at=row["created_at"]
    )


async def _rows(conn: Conn, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(q(name), params)
        return await cur.fetchall()


async def find(conn: Conn, owner: str, name: str) -> Workspace | None:
    rows = await _rows(conn, "find_workspace", {"owner": owner, "name": name})
    return _workspace(rows[0]) if rows else None


async def find_with_role(
    conn: Conn, owner: str, name: str, user: str
) -> tuple[Workspace, str | None] | None:
    """The workspace and the member role ``user`` holds in it (None: not a member)."""
    rows = await _rows(conn, "workspace_access", {"owner": owner, "name": name, "user": user})
    return (_workspace(rows[0]), rows[0]["role"]) if rows else None


async def role_in(conn: Conn, workspace_id: str, user: str) -> tuple[str, str | None] | None:
    """(owner, member role of ``user``) of the workspace with this id; None if there is none."""
    rows = await _rows(conn, "workspace_role", {"id": workspace_id, "user": user})
    return (rows[0]["owner"], rows[0]["role"]) if rows else None


def requester_lost_access(
    user: str, owner: str, admin: bool, disabled: bool, role: str | None
) -> str | None:
    """Why the requester of a queued deploy may no longer have it run (None: they still may):
    the rule of ``service.api.access.may_deploy``, applied again when an attempt starts, since
    the owner may have removed the member (or an admin disabled the user) while it waited."""
    if disabled:
        return f"the user {user!r} who requested this deploy is disabled"
    if user == owner or admin or role == "deploy":
        return None
    return f"{user!r}, who requested this deploy, may no longer deploy to {owner}'s workspace"


async def requester_standing(conn: Conn, workspace_id: str, user: str) -> str | None:
    """``requester_lost_access`` for the requester of a deploy to the workspace ``workspace_id``.
    An unknown user (a deploy older than users) or workspace is not refused here."""
    rows = await _rows(conn, "requester_standing", {"id": workspace_id, "user": user})
    if not rows:
        return None
    row = rows[0]
    return requester_lost_access(
        user, row["owner"], row["admin"], row["disabled_at"] is not None, row["role"]
    )


class Names:
    """(owner, name) -> Workspace, cached: a workspace never changes its id, owner or name, so a
    cached entry is never stale, and a deploy to a known workspace costs no extra round trip."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._known: OrderedDict[tuple[str, str], Workspace] = OrderedDict()

    def get(self, owner: str, name: str) -> Workspace | None:
        found = self._known.get((owner, name))
        if found is not None:
            self._known.move_to_end((owner, name))
        return found

    def remember(self, workspace: Workspace) -> None:
        self._known[(workspace.owner, workspace.name)] = workspace
        self._known.move_to_end((workspace.owner, workspace.name))
        while len(self._known) > self.size:
            self._known.popitem(last=False)

    async def find(self, conn: Conn, owner: str, name: str) -> Workspace | None:
        found = self.get(owner, name)
        if found is None:
            found = await find(conn, owner, name)
            if found is not None:
                self.remember(found)
        return found


def claim(workspace: Workspace, deploy_id: str, actor: str) -> list[tuple[str, dict[str, Any]]]:
    """The writes that claim a new workspace, for the transaction of the deploy that claims it:
    the row (a UniqueViolation if the owner has the name already: a racing request of the same
    owner won; the caller retries and finds it) and ``WorkspaceCreated`` in its new stream."""
    return [
        (
            "insert_workspace",
            {"id": workspace.id, "owner": workspace.owner, "name": workspace.name},
        ),
        store.workspace_append(
            workspace.id,
            0,
            [WorkspaceCreated(name=workspace.name, owner=workspace.owner, deploy_id=deploy_id)],
            actor,
        ),
    ]


async def key_of(conn: Conn, deploy_id: str, stream: Sequence[StoredEvent] | None = None) -> str:
    """The workspace key of a deploy: its Requested event's workspace_id, else (a deploy
    recorded before workspaces had owners) what the read model resolved it to."""
    first: Event | None = stream[0].event if stream else None
    if isinstance(first, Requested) and first.workspace_id:
        return first.workspace_id
    cur = await conn.execute(q("deploy_workspace_key"), {"deploy_id": deploy_id})
    row = await cur.fetchone()
    if row is None:
        raise WorkspaceNotFound(f"deploy {deploy_id} has no workspace")
    return str(row[0])


# ---------------------------------------------------------------- members


class Member(msgspec.Struct, frozen=True, kw_only=True):
    user: str
    role: str
    updated_at: datetime


async def members(conn: Conn, workspace_id: str) -> list[Member]:
    rows = await _rows(conn, "list_members", {"workspace_id": workspace_id})
    return [Member(user=r["user_name"], role=r["role"], updated_at=r["updated_at"]) for r in rows]


async def _change_members(
    pool: Any, workspace: Workspace, user: str, actor: str, role: Role | None
) -> tuple[str | None, bool]:
    """Set (``role``) or remove (None) ``user``'s membership: the row and its event in one
    transaction, on the workspace stream's version (a concurrent change makes this one read
    again). Returns (the previous role, whether anything changed)."""
    for _ in range(CONFLICT_RETRIES):
        try:
            # One transaction: the reads, then the row, the event and COMMIT in one round trip
            # (rolled back by the pool's connection context on any error).
            async with pool.connection() as conn:
                version = await store.workspace_stream_version(conn, workspace.id)
                current = {m.user: m.role for m in await members(conn, workspace.id)}.get(user)
                if current == role:
                    return current, False
                event: MemberSet | MemberRemoved
                if role is None:
                    assert current is not None
                    write = ("remove_member", {"workspace_id": workspace.id, "user": user})
                    event = MemberRemoved(user=user, role=current)
                else:
                    write = (
                        "set_member",
                        {"workspace_id": workspace.id, "user": user, "role": role},
                    )
                    event = MemberSet(user=user, role=role, previous=current or "")
                writes = [write]
                events: list[WorkspaceEvent] = [event]
                if role != "deploy":
                    # A member who may no longer deploy may no longer hold the workspace either:
                    # their terraform's lock goes with the right (they could not unlock it any
                    # more, and only an admin could force it): recorded as forced, in this
                    # transaction, and queued deploys wake.
                    released = await _held_by(conn, workspace.id, user)
                    if released is not None:
                        writes += [
                            (
                                "tfstate_delete_lock",
                                {"workspace_id": workspace.id, "lock_id": released[0]},
                            ),
                            ("tfstate_notify_dispatch", {}),
                        ]
                        events.append(
                            StateForceUnlocked(
                                lock_id=released[0],
                                holder=user,
                                held_since=released[1],
                                via="membership",
                            )
                        )
                append = store.workspace_append(workspace.id, version, events, actor)
                try:
                    await store.commit_writes(conn, [*writes, append])
                except psycopg.Error as exc:
                    raise store.version_conflict(exc, workspace.id, version) or exc from None
                return current, True
        except store.VersionConflict:
            continue
    raise store.VersionConflict(workspace.id, -1, -1)


async def _held_by(conn: Conn, workspace_id: str, user: str) -> tuple[str, str] | None:
    """(lock id, held since) of the terraform CLI's lock on the workspace if ``user`` holds it,
    read under the claim's lock (service.cli_backend: the claim lock, then the append lock)."""
    await conn.execute(q("tfstate_claim_lock"))
    rows = await _rows(conn, "tfstate_cli_lock", {"workspace_id": workspace_id})
    if not rows or rows[0]["holder"] != user:
        return None
    since = rows[0]["created_at"].astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(rows[0]["lock_id"]), since


async def set_member(
    pool: Any, workspace: Workspace, user: str, role: Role, actor: str
) -> tuple[str | None, bool]:
    return await _change_members(pool, workspace, user, actor, role)


async def remove_member(
    pool: Any, workspace: Workspace, user: str, actor: str
) -> tuple[str | None, bool]:
    return await _change_members(pool, workspace, user, actor, None)


async def record_download(
    conn: Conn, workspace_id: str, state_version: int, sha256: str, latest: bool, actor: str
) -> None:
    """``StateDownloaded`` in the workspace's stream (appended after whatever it holds: a
    download depends on nothing before it, so concurrent ones never conflict)."""
    event = StateDownloaded(state_version=state_version, sha256=sha256, latest=latest)
    await store.append_workspace(conn, workspace_id, None, [event], actor)


async def list_visible(
    conn: Conn,
    viewer: str,
    *,
    admin: bool,
    owner: str | None = None,
    after: tuple[str, str] | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The workspaces ``viewer`` may see (all for an admin), ordered by (owner, name) after
    ``after``, each with the viewer's role and its latest deploy and state version."""
    return await _rows(
        conn,
        "list_workspaces",
        {
            "viewer": viewer,
            "all": admin,
            "owner": owner,
            "after_owner": after[0] if after else None,
            "after_name": after[1] if after else None,
            "limit": limit,
        },
    )


async def contested(conn: Conn) -> list[dict[str, Any]]:
    """Names several users deployed to before workspaces had owners (migration 0007)."""
    return await _rows(conn, "list_contested", {})
