"""The PostgreSQL index of state versions, and the emergency copy of last resort (sealed with the
key ring, like every state at rest).

Plain async functions over an open connection; the caller owns the transaction, so
``next_version`` .. ``record_version`` and the ``StatePersisted`` event commit together.

``next_version`` takes a transaction-scoped advisory lock on the workspace, so it must run inside
a transaction (``async with conn.transaction()``, or a non-autocommit connection) at the default
READ COMMITTED level; the lock is held until that transaction ends, so keep it short.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from service.secrets import KeyRing
from service.statestores.base import StoredState

Conn = AsyncConnection[Any]

# Class id of the two-key advisory lock (the other key is hashtext(workspace)), so it never
# collides with the single-key locks taken elsewhere (event positions, migrations).
STATE_LOCK_CLASS = 7310003

LOCK_WORKSPACE = "SELECT pg_advisory_xact_lock(%(lock_class)s, hashtext(%(workspace)s))"
# Blobs count too: a blob written by a transaction whose index row never committed keeps its
# number, so the PostgreSQL store never sees a different content for a used version.
NEXT_VERSION = """
SELECT greatest(
    (SELECT coalesce(max(version), 0) FROM state_versions WHERE workspace = %(workspace)s),
    (SELECT coalesce(max(version), 0) FROM state_blobs WHERE workspace = %(workspace)s)
) + 1 AS next
"""
INSERT_VERSION = """
INSERT INTO state_versions
    (workspace, version, deploy_id, attempt, store, location, serial, lineage, sha256, size,
     source, written_by)
VALUES (%(workspace)s, %(version)s, %(deploy_id)s, %(attempt)s, %(store)s, %(location)s,
        %(serial)s, %(lineage)s, %(sha256)s, %(size)s, %(source)s, %(written_by)s)
RETURNING workspace, version, deploy_id, attempt, store, location, serial, lineage, sha256, size, source,
       written_by, created_at
"""
SELECT_LATEST = """
SELECT workspace, version, deploy_id, attempt, store, location, serial, lineage, sha256, size, source,
       written_by, created_at
FROM state_versions
WHERE workspace = %(workspace)s ORDER BY version DESC LIMIT 1
"""
SELECT_VERSIONS = """
SELECT workspace, version, deploy_id, attempt, store, location, serial, lineage, sha256, size, source,
       written_by, created_at
FROM state_versions
WHERE workspace = %(workspace)s AND (%(before)s::integer IS NULL OR version < %(before)s::integer)
ORDER BY version DESC LIMIT %(limit)s
"""
SELECT_VERSION = """
SELECT workspace, version, deploy_id, attempt, store, location, serial, lineage, sha256, size, source,
       written_by, created_at
FROM state_versions
WHERE workspace = %(workspace)s AND version = %(version)s
"""
INSERT_EMERGENCY = """
INSERT INTO state_emergency (workspace, deploy_id, attempt, sha256, content, reason)
VALUES (%(workspace)s, %(deploy_id)s, %(attempt)s, %(sha256)s, %(content)s, %(reason)s)
RETURNING id
"""
SELECT_EMERGENCY = """
SELECT id, workspace, deploy_id, attempt, sha256, content, reason, created_at
FROM state_emergency WHERE id = %(id)s
"""

EMERGENCY_PREFIX = "postgres-emergency:"


class StateVersion(msgspec.Struct, frozen=True, kw_only=True):
    """One row of ``state_versions``: persisted by a deploy's run (``source`` "deploy",
    ``deploy_id`` and ``attempt`` name it) or written by the terraform CLI (``source`` "cli",
    no deploy, ``written_by`` the user)."""

    workspace: str
    version: int
    deploy_id: str | None
    attempt: int | None
    store: str
    location: str
    serial: int
    lineage: str
    sha256: str
    size: int
    created_at: datetime
    source: str = "deploy"
    written_by: str | None = None


def _version(row: dict[str, Any]) -> StateVersion:
    deploy_id = row["deploy_id"]
    return StateVersion(**{**row, "deploy_id": str(deploy_id) if deploy_id is not None else None})


async def _fetch(conn: Conn, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return await cur.fetchall()


class _Meta(msgspec.Struct, gc=False):
    """A tfstate's serial and lineage; everything else is skipped, never built (a state of
    millions of tiny values would otherwise cost gigabytes here)."""

    serial: msgspec.Raw = msgspec.Raw(b"0")
    lineage: msgspec.Raw = msgspec.Raw(b'""')


_META = msgspec.json.Decoder(_Meta)


def state_meta(content: bytes) -> tuple[int, str, str, int]:
    """``(serial, lineage, sha256, size)`` of a tfstate; ValueError if it is not a JSON object."""
    try:
        meta = _META.decode(content)
    except msgspec.ValidationError:
        raise ValueError("state is not a JSON object") from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"state is not JSON: {exc}") from None
    try:
        serial = msgspec.json.decode(meta.serial) if len(meta.serial) <= 64 else None
        lineage = msgspec.json.decode(meta.lineage) if len(meta.lineage) <= 4096 else None
    except msgspec.DecodeError:  # pragma: no cover - a Raw of a decoded document is JSON
        serial = lineage = None
    if isinstance(serial, bool) or not isinstance(serial, int) or not isinstance(lineage, str):
        raise ValueError("state has an invalid serial or lineage")
    return serial, lineage, hashlib.sha256(content).hexdigest(), len(content)


async def next_version(conn: Conn, workspace: str) -> int:
    """The next version number of ``workspace``; holds the workspace's lock until the caller's
    transaction ends, so concurrent writers get distinct, consecutive numbers."""
    if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        raise RuntimeError("next_version must run inside a transaction")
    params = {"workspace": workspace, "lock_class": STATE_LOCK_CLASS}
    # Two statements: under READ COMMITTED the second takes its snapshot after the lock is held.
    await conn.execute(LOCK_WORKSPACE, params)
    rows = await _fetch(conn, NEXT_VERSION, params)
    return int(rows[0]["next"])


async def record_version(
    conn: Conn,
    workspace: str,
    version: int,
    deploy_id: str | UUID | None,
    attempt: int | None,
    stored: StoredState,
    serial: int,
    lineage: str,
    sha256: str,
    size: int,
    *,
    written_by: str | None = None,
) -> StateVersion:
    """Add one version to the index (in the caller's transaction); UniqueViolation if taken.
    A deploy's run names its deploy and attempt; the CLI backend passes None for both and
    ``written_by``, the user whose terraform wrote it."""
    rows = await _fetch(
        conn,
        INSERT_VERSION,
        {
            "workspace": workspace,
            "version": version,
            "deploy_id": deploy_id,
            "attempt": attempt,
            "store": stored.store,
            "location": stored.location,
            "serial": serial,
            "lineage": lineage,
            "sha256": sha256,
            "size": size,
            "source": "deploy" if deploy_id is not None else "cli",
            "written_by": written_by,
        },
    )
    return _version(rows[0])


async def latest(conn: Conn, workspace: str) -> StateVersion | None:
    rows = await _fetch(conn, SELECT_LATEST, {"workspace": workspace})
    return _version(rows[0]) if rows else None


async def list_versions(
    conn: Conn, workspace: str, limit: int = 100, before: int | None = None
) -> list[StateVersion]:
    """Newest first; ``before`` pages on (versions strictly below it)."""
    rows = await _fetch(
        conn, SELECT_VERSIONS, {"workspace": workspace, "limit": max(0, limit), "before": before}
    )
    return [_version(r) for r in rows]


async def get_version(conn: Conn, workspace: str, version: int) -> StateVersion | None:
    rows = await _fetch(conn, SELECT_VERSION, {"workspace": workspace, "version": version})
    return _version(rows[0]) if rows else None


async def save_emergency(
    conn: Conn,
    workspace: str,
    deploy_id: str | UUID,
    attempt: int,
    content: bytes,
    sha256: str,
    reason: str,
    *,
    keyring: KeyRing,
) -> str:
    """Keep a state that could be neither stored nor destroyed, sealed; returns its location.
    ``sha256`` is the plaintext's."""
    rows = await _fetch(
        conn,
        INSERT_EMERGENCY,
        {
            "workspace": workspace,
            "deploy_id": deploy_id,
            "attempt": attempt,
            "sha256": sha256,
            "content": keyring.seal(content),
            "reason": reason,
        },
    )
    return f"{EMERGENCY_PREFIX}{rows[0]['id']}"


async def get_emergency(conn: Conn, location: str, keyring: KeyRing) -> dict[str, Any] | None:
    """The emergency row at ``location`` (``postgres-emergency:<id>``), content opened (one
    kept in plain text before encryption at rest reads as it is); SecretsError if no key of
    the ring opens it."""
    if not location.startswith(EMERGENCY_PREFIX):
        raise ValueError(f"not an emergency location: {location!r}")
    rows = await _fetch(conn, SELECT_EMERGENCY, {"id": int(location[len(EMERGENCY_PREFIX) :])})
    if not rows:
        return None
    row = rows[0]
    content = keyring.open(row["content"], legacy_plaintext=True)
    return {**row, "deploy_id": str(row["deploy_id"]), "content": content}
