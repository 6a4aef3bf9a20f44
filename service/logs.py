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

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

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


# Where a page of the log ends: the seq of the ``limit``-th line after ``after`` (NULL: every
# line), or ``after`` itself when there is none. An index-only walk of at most ``limit`` keys.
PAGE_END = """
SELECT greatest(%(after)s, coalesce(max(seq), 0)) FROM (
    SELECT seq FROM deploy_logs
    WHERE deploy_id = %(deploy_id)s::uuid AND seq > %(after)s
    ORDER BY seq
    LIMIT %(limit)s
) page
"""

# The text of a deploy's lines in (after, upto], in order, a batch at a time.
READ_TEXT = """
SELECT seq, line FROM deploy_logs
WHERE deploy_id = %(deploy_id)s::uuid AND seq > %(after)s AND seq <= %(upto)s
ORDER BY seq
LIMIT %(batch)s
"""

# Lines per read when a log is served as text: a line is at most 16 KiB (the runners cut longer
# ones), so a read holds a few MiB at worst and some 50 KiB for typical terraform output.
TEXT_BATCH = 500


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


async def page_end(conn: Conn, deploy_id: str | UUID, after: int, limit: int | None) -> int:
    """The seq where a page of up to ``limit`` lines after ``after`` ends (every line so far
    when ``limit`` is None): the page is exactly the lines in ``(after, page_end]``, whatever
    is written meanwhile; ``after`` when there are none."""
    cur = await conn.execute(
        PAGE_END, {"deploy_id": str(deploy_id), "after": after, "limit": limit}
    )
    row = await cur.fetchone()
    return int(row[0]) if row else after


async def text_between(
    pool: AsyncConnectionPool[Any],
    deploy_id: str | UUID,
    after: int,
    upto: int,
    batch: int = TEXT_BATCH,
) -> AsyncIterator[bytes]:
    """The lines with ``after < seq <= upto`` as text (one line after another, a newline
    between two, none after the last), read ``batch`` lines at a time, each read on a pool connection of its own that
    is given back before the text is sent: whatever the log's size, a request holds one batch
    and no connection while its client reads."""
    first = True
    while after < upto:
        async with pool.connection() as conn:
            cur = await conn.execute(
                READ_TEXT,
                {"deploy_id": str(deploy_id), "after": after, "upto": upto, "batch": batch},
            )
            rows = await cur.fetchall()
        if not rows:
            return
        text = "\n".join(line for _, line in rows)
        yield (text if first else "\n" + text).encode()
        first = False
        after = rows[-1][0]
