"""Terraform output, line by line: the ``deploy_logs`` table.

``seq`` numbers a deploy's lines 1, 2, 3, ... without gaps between committed lines. Appends take
a per-deploy transaction-scoped advisory lock, then read ``max(seq)`` in a second statement (under
READ COMMITTED that statement's snapshot is taken after the lock is held), so concurrent writers
of one deploy never compute the same ``seq``. Event appends take the same per-deploy lock
(service.store.append), so ``after_version`` (the deploy's last event version when a line was
written) places every line exactly among the events, and commit order agrees with it. Every insert fires ``deploy_logs_notify`` (migration
0003), which wakes the SSE streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import dict_row

Conn = AsyncConnection[Any]

# Class id of the two-key advisory lock (the other key is hashtext(deploy id)); distinct from the
# event store's (7310002) and the state index's (7310003).
LOG_LOCK_CLASS = 7310004

LOCK_DEPLOY_LOG = "SELECT pg_advisory_xact_lock(%(lock_class)s, hashtext(%(deploy_id)s::text))"

# Append lines after the deploy's last seq, in the given order.
APPEND_LINES = """
INSERT INTO deploy_logs (deploy_id, seq, attempt, stream, line, after_version)
SELECT %(deploy_id)s::uuid,
       (SELECT coalesce(max(seq), 0) FROM deploy_logs WHERE deploy_id = %(deploy_id)s::uuid) + l.n,
       %(attempt)s, %(stream)s, l.line,
       (SELECT coalesce(max(version), 0) FROM events WHERE deploy_id = %(deploy_id)s::uuid)
FROM unnest(%(lines)s::text[]) WITH ORDINALITY AS l(line, n)
ORDER BY l.n
RETURNING seq
"""

# A deploy's lines after a seq, in order.
READ_LINES = """
SELECT deploy_id, seq, attempt, stream, line, recorded_at, after_version
FROM deploy_logs
WHERE deploy_id = %(deploy_id)s::uuid AND seq > %(after_seq)s
ORDER BY seq
LIMIT %(limit)s
"""


class LogLine(msgspec.Struct, frozen=True, kw_only=True):
    deploy_id: str
    seq: int
    attempt: int
    stream: str
    line: str
    recorded_at: datetime
    after_version: int = 0  # the deploy's last event version when the line was written


async def append_lines(
    conn: Conn,
    deploy_id: str | UUID,
    attempt: int,
    stream: str,
    lines: Sequence[str],
) -> int:
    """Append ``lines`` to a deploy's log; returns the last seq written (0 if ``lines`` is empty).

    Runs in its own transaction, or a savepoint of the caller's (then the lock is held until the
    caller's transaction ends: keep it short)."""
    if not lines:
        return 0
    # PostgreSQL text cannot hold NUL.
    clean = [line.replace("\x00", "\ufffd") for line in lines]
    params = {
        "lock_class": LOG_LOCK_CLASS,
        "deploy_id": str(deploy_id),
        "attempt": attempt,
        "stream": stream,
        "lines": clean,
    }
    async with conn.transaction():
        await conn.execute(LOCK_DEPLOY_LOG, params)
        cur = await conn.execute(APPEND_LINES, params)
        seqs: list[int] = [row[0] for row in await cur.fetchall()]
    return max(seqs)


async def append_log(
    conn: Conn, deploy_id: str | UUID, attempt: int, stream: str, line: str
) -> int:
    """Append one line; returns its seq."""
    return await append_lines(conn, deploy_id, attempt, stream, [line])


async def read_logs(
    conn: Conn, deploy_id: str | UUID, after_seq: int = 0, limit: int | None = None
) -> list[LogLine]:
    """A deploy's lines with ``seq > after_seq``, in order (at most ``limit`` when given)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            READ_LINES,
            {"deploy_id": str(deploy_id), "after_seq": after_seq, "limit": limit},
        )
        rows = await cur.fetchall()
    return [LogLine(**{**row, "deploy_id": str(row["deploy_id"])}) for row in rows]
