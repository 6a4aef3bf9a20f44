"""The event store on PostgreSQL: the only module that runs the event and read-model queries.

Every function takes an open async connection; the caller owns the transaction, so an append,
its read model and whatever else must commit with it (a queued job, a deploy's inputs) commit
together or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg.errors import UniqueViolation
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from service.events import (
    EVENT_TYPES,
    Event,
    Requested,
    WorkspaceEvent,
    from_data,
    to_data,
    type_name,
)
from service.lifecycle import ErrorInfo
from service.projection import DeployView, Legacy, StoredEvent, view_from
from service.queries import q

Conn = AsyncConnection[Any]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class VersionConflict(Exception):
    """The stream moved on since the writer read it: reload and decide again."""

    def __init__(self, deploy_id: str, expected: int, actual: int) -> None:
        super().__init__(f"deploy {deploy_id}: expected version {expected}, found {actual}")
        self.deploy_id, self.expected, self.actual = deploy_id, expected, actual


def _stored(row: dict[str, Any]) -> StoredEvent:
    return StoredEvent(
        position=row["position"],
        deploy_id=str(row["deploy_id"]),
        version=row["version"],
        type=row["type"],
        data=row["data"],
        recorded_at=row["recorded_at"],
        actor=row["actor"],
        event=from_data(row["type"], row["data"]),
        stream=row.get("stream_kind") or "deploy",
        workspace_id=str(row["workspace_id"]) if row.get("workspace_id") else "",
    )


async def _rows(conn: Conn, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(q(name), params)
        return await cur.fetchall()


async def read_stream(conn: Conn, deploy_id: str | UUID, after_version: int = 0) -> list[StoredEvent]:
    rows = await _rows(conn, "read_stream", {"deploy_id": deploy_id, "after_version": after_version})
    return [_stored(r) for r in rows]


async def read_all_after(conn: Conn, after: int, limit: int = 500) -> list[StoredEvent]:
    rows = await _rows(conn, "read_all_after", {"after": after, "limit": limit})
    return [_stored(r) for r in rows]


async def legacy_for(conn: Conn, events: Sequence[Event]) -> Legacy:
    """How to read the workspace of a stream whose Requested event was recorded before
    workspaces had owners (no workspace_id): the migrated mapping's entry for its name, looked
    up here (one query, for such streams only)."""
    first = events[0] if events else None
    if not isinstance(first, Requested) or first.workspace_id:
        return _nothing
    rows = await _rows(conn, "legacy_workspace", {"name": first.workspace})
    found = (str(rows[0]["workspace_id"]), rows[0]["owner"]) if rows else None
    return lambda name: found if name == first.workspace else None


def _nothing(name: str) -> tuple[str, str] | None:
    return None


async def legacy_names(conn: Conn) -> dict[str, tuple[str, str]]:
    """The whole migrated mapping: name -> (workspace id, owner)."""
    rows = await _rows(conn, "legacy_workspaces", {})
    return {r["name"]: (str(r["workspace_id"]), r["owner"]) for r in rows}


# SQLSTATE of the version check in tfdeploy_append (migration 0006).
VERSION_CONFLICT_SQLSTATE = "TD409"


def version_conflict(exc: BaseException, deploy_id: str, expected: int) -> VersionConflict | None:
    """The VersionConflict an append refused in the database raised as ``exc``, if it is one."""
    if isinstance(exc, UniqueViolation) and getattr(exc.diag, "table_name", None) == "events":
        return VersionConflict(deploy_id, expected, -1)  # the unique (deploy_id, version)
    if isinstance(exc, psycopg.Error) and exc.sqlstate == VERSION_CONFLICT_SQLSTATE:
        detail = exc.diag.message_detail or ""
        return VersionConflict(deploy_id, expected, int(detail) if detail.isdigit() else -1)
    return None


async def _append_params(
    conn: Conn,
    deploy_id: str,
    expected_version: int,
    events: Sequence[Event],
    actor: str,
    prior: Sequence[StoredEvent] | None,
) -> dict[str, Any]:
    """The parameters of the ``append`` query: the events, and the read model they lead to,
    folded here by the same code as ``view_of`` (only recorded_at and the version of the new
    events are left to the database)."""
    # Reuse ``prior`` only if it is the whole stream 1..expected_version (n distinct versions
    # ending at n): an empty or partial prior would fold a read model from a fragment. A
    # stream read here, before the lock, is exact if the version check under the lock passes
    # (events never change), and unused if it fails.
    if (
        prior is None
        or len(prior) != expected_version
        or (prior and prior[-1].version != expected_version)
    ):
        prior = (await read_stream(conn, deploy_id))[:expected_version]
    placeholder = prior[0].recorded_at if prior else _EPOCH  # timestamps: the database's
    stream = [*(e.event for e in prior), *events]
    view = view_from(
        deploy_id,
        stream,
        created_at=placeholder,
        updated_at=placeholder,
        version=expected_version + len(events),
        legacy=await legacy_for(conn, stream),
    )
    error = view.error
    return {
        "deploy_id": deploy_id,
        "expected": expected_version,
        "types": [type_name(e) for e in events],
        "data": [Jsonb(to_data(e)) for e in events],
        "actor": actor,
        "owner": view.owner,
        "workspace": view.workspace,
        "action": view.action,
        "status": view.status,
        "attempt": view.attempt,
        "max_attempts": view.max_attempts,
        "cancel_requested": view.cancel_requested,
        "state_version": view.state_version,
        "error_reason": error.reason if error else None,
        "error_message": error.message if error else None,
        "created_at": prior[0].recorded_at if prior else None,
        "workspace_id": view.workspace_id or None,
        "workspace_owner": view.workspace_owner,
    }


async def append(
    conn: Conn,
    deploy_id: str | UUID,
    expected_version: int,
    events: Sequence[Event],
    actor: str,
    prior: Sequence[StoredEvent] | None = None,
) -> list[StoredEvent]:
    """Append ``events`` after ``expected_version`` and update the read model, in the caller's
    transaction. Raises VersionConflict if the stream is not at ``expected_version``.

    ``prior`` is the stream as the caller read it (saves a read); it must end at
    ``expected_version``. ``append_and_commit`` is the form that also commits, in the same
    round trip.
    """
    if not events:
        return []
    deploy_id = str(deploy_id)
    params = await _append_params(conn, deploy_id, expected_version, events, actor, prior)
    try:
        rows = await _rows(conn, "append", params)
    except psycopg.Error as exc:
        raise version_conflict(exc, deploy_id, expected_version) or exc from None
    return [_stored(r) for r in rows]


async def append_and_commit(
    conn: Conn,
    deploy_id: str | UUID,
    expected_version: int,
    events: Sequence[Event],
    actor: str,
    prior: Sequence[StoredEvent] | None = None,
    *,
    before: Sequence[tuple[str, dict[str, Any]]] = (),
) -> list[StoredEvent]:
    """``append``, then COMMIT the connection's transaction, in one round trip.

    ``before`` are the caller's own writes for the same transaction (named queries and their
    parameters), run just before the append. They, the append and ``COMMIT`` go to PostgreSQL
    as one query (simple protocol, parameters bound here), so the append lock is taken and
    released by PostgreSQL alone: it is never held while the answer travels back to this
    process and waits for its event loop.

    Without autocommit, the COMMIT ends the transaction psycopg began (the caller's earlier
    statements commit with it); the connection must not be in a ``conn.transaction()`` block.
    In autocommit mode the one query is itself the transaction (PostgreSQL runs the statements
    of one simple query as one transaction), with no COMMIT sent. If any statement fails
    nothing commits: the error is raised (VersionConflict for a stale ``expected_version``)
    and, without autocommit, the caller rolls back (a pool's connection context does).
    """
    deploy_id = str(deploy_id)
    if not events:
        async with conn.cursor() as cur:
            for name, p in before:
                await cur.execute(q(name), p)
        await conn.commit()
        return []
    params = await _append_params(conn, deploy_id, expected_version, events, actor, prior)
    async with psycopg.AsyncClientCursor(conn, row_factory=dict_row) as cur:
        parts = [cur.mogrify(q(name), p) for name, p in before]
        parts.append(cur.mogrify(q("append"), params))
        if not conn.autocommit:
            parts.append("COMMIT")
        try:
            await cur.execute(";\n".join(parts).encode())
        except psycopg.Error as exc:
            raise version_conflict(exc, deploy_id, expected_version) or exc from None
        for _ in before:
            cur.nextset()
        rows = await cur.fetchall()
    return [_stored(r) for r in rows]


def workspace_append(
    workspace_id: str, expected_version: int | None, events: Sequence[WorkspaceEvent], actor: str
) -> tuple[str, dict[str, Any]]:
    """The named query and parameters that append ``events`` to a workspace's stream after
    ``expected_version`` (None: after whatever it holds, for facts that depend on nothing
    before them): for ``append_and_commit(before=...)`` (one transaction with the caller's
    other writes) or ``append_workspace``."""
    data = []
    for event in events:
        fields: dict[str, Any] = msgspec.to_builtins(event)
        fields.pop("type", None)
        data.append(Jsonb(fields))
    return (
        "append_workspace",
        {
            "workspace_id": workspace_id,
            "expected": expected_version,
            "types": [type(e).__struct_config__.tag for e in events],
            "data": data,
            "actor": actor,
        },
    )


async def append_workspace(
    conn: Conn,
    workspace_id: str,
    expected_version: int | None,
    events: Sequence[WorkspaceEvent],
    actor: str,
) -> list[StoredEvent]:
    """Append ``events`` to a workspace's stream, in the caller's transaction; VersionConflict
    if the stream is not at ``expected_version``."""
    name, params = workspace_append(workspace_id, expected_version, events, actor)
    try:
        rows = await _rows(conn, name, params)
    except psycopg.Error as exc:
        raise version_conflict(exc, workspace_id, expected_version or 0) or exc from None
    return [_stored(r) for r in rows]


async def workspace_stream_version(conn: Conn, workspace_id: str) -> int:
    rows = await _rows(conn, "workspace_stream_version", {"workspace_id": workspace_id})
    return int(rows[0]["version"]) if rows else 0


async def commit_writes(conn: Conn, writes: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Run the named statements and COMMIT, as one query: one round trip, one transaction (an
    append among them holds the append lock only while PostgreSQL runs it and commits). On an
    error nothing commits and the error is raised; the caller rolls back (a pool's connection
    context does). The connection must not be in autocommit mode or a ``transaction()`` block."""
    async with psycopg.AsyncClientCursor(conn) as cur:
        parts = [cur.mogrify(q(name), p) for name, p in writes]
        parts.append("COMMIT")
        await cur.execute(";\n".join(parts).encode())


async def write_view(conn: Conn, view: DeployView) -> None:
    params = msgspec.structs.asdict(view)
    error = params.pop("error")
    params["error_reason"] = error.reason if error else None
    params["error_message"] = error.message if error else None
    params["workspace_id"] = view.workspace_id or None
    await conn.execute(q("upsert_deploy"), params)


def view_of_row(row: dict[str, Any]) -> DeployView:
    """A deploy's read model from a row of ``deploys``."""
    error = ErrorInfo(row["error_reason"], row["error_message"] or "") if row["error_reason"] else None
    return DeployView(
        id=str(row["id"]),
        owner=row["owner"],
        workspace=row["workspace"],
        action=row["action"],
        status=row["status"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        version=row["version"],
        cancel_requested=row["cancel_requested"],
        state_version=row["state_version"],
        error=error,
        workspace_id=str(row["workspace_id"]) if row.get("workspace_id") else "",
        workspace_owner=row.get("workspace_owner") or "",
    )


async def get_deploy(conn: Conn, deploy_id: str | UUID) -> DeployView | None:
    rows = await _rows(conn, "get_deploy", {"id": deploy_id})
    return view_of_row(rows[0]) if rows else None


async def list_deploys(
    conn: Conn,
    *,
    owner: str | None = None,
    status: str | None = None,
    workspace_id: str | None = None,
    viewer: str | None = None,
    cursor: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> list[DeployView]:
    """Newest first. ``owner``: requested by this user; ``viewer``: only what this user may see
    (their own deploys and those of the workspaces they own or are a member of); None: all."""
    params = {
        "owner": owner,
        "status": status,
        "workspace_id": workspace_id,
        "viewer": viewer,
        "cursor_at": cursor[0] if cursor else None,
        "cursor_id": cursor[1] if cursor else None,
        "limit": limit,
    }
    return [view_of_row(r) for r in await _rows(conn, "list_deploys", params)]


async def audit_page(
    conn: Conn,
    *,
    after: int = 0,
    limit: int = 100,
    deploy_id: str | None = None,
    workspace_id: str | None = None,
    workspace_stream: bool = False,
    type: str | None = None,
    actor: str | None = None,
    viewer: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[StoredEvent]:
    """A page of events in position order after ``after``. ``workspace_id``: its deploys' events
    (and its own stream's with ``workspace_stream``); ``viewer``: only what this user may see
    (their own deploys, the deploys of the workspaces they may read, the streams of the
    workspaces they own); None: everything."""
    params = {
        "after": after,
        "limit": limit,
        "deploy_id": deploy_id,
        "workspace_id": workspace_id,
        "workspace_stream": workspace_stream,
        "type": type,
        "actor": actor,
        "viewer": viewer,
        "since": since,
        "until": until,
    }
    return [_stored(r) for r in await _rows(conn, "audit_page", params)]


# The rebuild decodes each event's ``data`` straight from its JSON text into its type (what
# ``from_data`` does from a dict, without building the dict first).
_DECODERS = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}
REBUILD_FETCH = 20_000  # events per FETCH of the rebuild's scan
REBUILD_WRITE = 5_000  # read-model rows per COPY


def _view_row(view: DeployView) -> tuple[Any, ...]:
    """A read-model row in the column order of ``copy_deploys``."""
    error = view.error
    return (
        view.id, view.owner, view.workspace, view.action, view.status, view.attempt,
        view.max_attempts, view.cancel_requested, view.state_version,
        error.reason if error else None, error.message if error else None,
        view.version, view.created_at, view.updated_at,
        view.workspace_id or None, view.workspace_owner,
    )


async def _copy_views(conn: Conn, rows: list[tuple[Any, ...]]) -> None:
    async with conn.cursor() as cur, cur.copy(q("copy_deploys")) as copy:
        for row in rows:
            await copy.write_row(row)


async def rebuild_projections(conn: Conn) -> int:
    """Recompute every deploy's read model from its events; returns the number of deploys.

    One pass over the deploy events in (deploy_id, version) order through a server-side cursor,
    each stream folded by ``projection.view_from`` (the fold ``view_of`` and the appends use) as
    soon as it ends, the rows written by ``COPY`` in batches. Workspace streams are skipped;
    Requested events recorded before workspaces had owners are read through the migrated
    mapping, as the appends read them. All in one transaction (a savepoint if
    the caller has one open): readers see the old read model until it commits, and the append
    lock keeps every append out until then.
    """
    async with conn.transaction():
        await conn.execute(q("lock_appends"))  # no append slips in between the read and the write
        await conn.execute(q("clear_deploys"))
        legacy = (await legacy_names(conn)).get
        decoders = _DECODERS
        out: list[tuple[Any, ...]] = []
        deploys = 0
        current: str | None = None
        events: list[Event] = []
        created_at: Any = None  # the current stream's first and last recorded_at
        updated_at: Any = None
        version = 0
        async with conn.cursor("tfdeploy_rebuild") as scan:
            await scan.execute(q("rebuild_scan"))
            while rows := await scan.fetchmany(REBUILD_FETCH):
                for deploy_id, v, type_, data, recorded_at in rows:
                    if deploy_id != current:
                        if current is not None:
                            out.append(_view_row(view_from(
                                current, events, created_at=created_at,
                                updated_at=updated_at, version=version, legacy=legacy,
                            )))
                        current, events, created_at = deploy_id, [], recorded_at
                    events.append(decoders[type_].decode(data))
                    updated_at, version = recorded_at, v
                if len(out) >= REBUILD_WRITE:
                    deploys += len(out)
                    await _copy_views(conn, out)
                    out = []
        if current is not None:
            out.append(_view_row(view_from(
                current, events, created_at=created_at, updated_at=updated_at, version=version,
                legacy=legacy,
            )))
        if out:
            deploys += len(out)
            await _copy_views(conn, out)
    return deploys
