"""Connection pools for PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

# After a reconnection window ends without a connection, the next window starts this much later.
RECONNECT_PAUSE = 1.0
_retries: set[asyncio.Task[None]] = set()  # keeps the pending retries referenced


async def _reconnect_again(pool: AsyncConnectionPool[Any]) -> None:
    await asyncio.sleep(RECONNECT_PAUSE)
    if not pool.closed:
        with contextlib.suppress(Exception):
            await pool.check()  # grows the pool again: a fresh reconnection window


def _reconnect_failed(pool: AsyncConnectionPool[Any]) -> None:
    """psycopg_pool gives up after ``reconnect_timeout`` and tries again only when a new
    request comes: a request already waiting (a worker recording an outcome while PostgreSQL
    restarts) would then wait out its whole timeout after PostgreSQL is back (16 s seen). So
    start the next window ourselves, for as long as PostgreSQL is away."""
    task = asyncio.get_running_loop().create_task(_reconnect_again(pool))
    _retries.add(task)
    task.add_done_callback(_retries.discard)


async def open_pool(
    url: str, *, min_size: int = 1, max_size: int = 20, name: str = "tfdeploy", wait: float = 30.0
) -> AsyncConnectionPool[Any]:
    """An open pool whose connections are checked before use, so a restarted PostgreSQL costs
    one failed request at most, not a pool of dead connections. ``wait``: how long a request
    waits for a connection (then PoolTimeout; the API maps it to 503)."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        open=False,
        check=AsyncConnectionPool.check_connection,
        kwargs={"application_name": name},
        timeout=wait,
        # psycopg_pool doubles its pause between reconnection tries until this window ends, so
        # a long window means a long wait after PostgreSQL is back (6 s+ seen after an 8 s
        # outage). A short one ends the try, and _reconnect_failed starts the next.
        reconnect_timeout=3.0,
        reconnect_failed=_reconnect_failed,
    )
    await pool.open(wait=False)
    return pool


@contextlib.asynccontextmanager
async def autocommit(pool: AsyncConnectionPool[Any]) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pool connection in autocommit mode: each statement (or multi-statement simple query)
    is its own transaction, so no BEGIN/COMMIT round trips around it. Given back to the pool in
    its usual mode."""
    async with pool.connection() as conn:
        await conn.set_autocommit(True)  # client-side only: no round trip on an idle connection
        try:
            yield conn
        finally:
            with contextlib.suppress(psycopg.Error):  # a broken connection: the pool drops it
                await conn.set_autocommit(False)
