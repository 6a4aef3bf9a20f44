"""The event store on PostgreSQL: the only module that runs the event and read-model queries.

Every function takes an open async connection; the caller owns the transaction, so an append,
its read model and whatever else must commit with it (a queued job, a deploy's inputs) commit
together or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from psycopg import AsyncConnection
from psycopg.errors import UniqueViolation
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from service.events import Event, from_data, to_data, type_name
from service.lifecycle import ErrorInfo
from service.projection import DeployView, StoredEvent, view_of
from service.queries import q

Conn = AsyncConnection[Any]


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
    ``expected_version``.
    """
    if not events:
        return []
    deploy_id = str(deploy_id)
    # Serialise appends: positions then commit in the order they were taken, so a reader of
    # the global feed that saw position N never later finds a smaller one committing.
    await conn.execute(q("lock_appends"))
    await conn.execute(q("lock_deploy"), {"deploy_id": deploy_id})
    rows = await _rows(conn, "stream_version", {"deploy_id": deploy_id})
    actual = rows[0]["version"]
    if actual != expected_version:
        raise VersionConflict(deploy_id, expected_version, actual)
    # Reuse ``prior`` only if it is the whole stream 1..expected_version (n distinct versions
    # ending at n): an empty or partial prior would fold a read model from a fragment.
    if (
        prior is None
        or len(prior) != expected_version
        or (prior and prior[-1].version != expected_version)
    ):
        prior = await read_stream(conn, deploy_id)
    new: list[StoredEvent] = []
    try:
        for i, event in enumerate(events, start=1):
            params = {
                "deploy_id": deploy_id,
                "version": expected_version + i,
                "type": type_name(event),
                "data": Jsonb(to_data(event)),
                "actor": actor,
            }
            new.extend(_stored(r) for r in await _rows(conn, "insert_event", params))
    except UniqueViolation:  # pragma: no cover - the lock above makes this a backstop
        raise VersionConflict(deploy_id, expected_version, -1) from None
    await write_view(conn, view_of([*prior, *new]))
    return new


async def write_view(conn: Conn, view: DeployView) -> None:
    params = msgspec.structs.asdict(view)
    error = params.pop("error")
    params["error_reason"] = error.reason if error else None
    params["error_message"] = error.message if error else None
    await conn.execute(q("upsert_deploy"), params)


def _view(row: dict[str, Any]) -> DeployView:
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
    )


async def get_deploy(conn: Conn, deploy_id: str | UUID) -> DeployView | None:
    rows = await _rows(conn, "get_deploy", {"id": deploy_id})
    return _view(rows[0]) if rows else None


async def list_deploys(
    conn: Conn,
    *,
    owner: str | None = None,
    status: str | None = None,
    workspace: str | None = None,
    cursor: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> list[DeployView]:
    params = {
        "owner": owner,
        "status": status,
        "workspace": workspace,
        "cursor_at": cursor[0] if cursor else None,
        "cursor_id": cursor[1] if cursor else None,
        "limit": limit,
    }
    return [_view(r) for r in await _rows(conn, "list_deploys", params)]


async def audit_page(
    conn: Conn,
    *,
    after: int = 0,
    limit: int = 100,
    deploy_id: str | None = None,
    workspace: str | None = None,
    type: str | None = None,
    actor: str | None = None,
    owner: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[StoredEvent]:
    params = {
        "after": after,
        "limit": limit,
        "deploy_id": deploy_id,
        "workspace": workspace,
        "type": type,
        "actor": actor,
        "owner": owner,
        "since": since,
        "until": until,
    }
    return [_stored(r) for r in await _rows(conn, "audit_page", params)]


async def rebuild_projections(conn: Conn) -> int:
    """Recompute every deploy's read model from its events, in the caller's transaction."""
    await conn.execute(q("lock_appends"))  # no append slips in between the read and the write
    await conn.execute(q("clear_deploys"))
    ids = [r["deploy_id"] for r in await _rows(conn, "all_deploy_ids", {})]
    for deploy_id in ids:
        await write_view(conn, view_of(await read_stream(conn, deploy_id)))
    return len(ids)
