"""Connection pools for PostgreSQL."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool


async def open_pool(url: str, *, min_size: int = 1, max_size: int = 20, name: str = "tfdeploy") -> AsyncConnectionPool[Any]:
    """An open pool whose connections are checked before use, so a restarted PostgreSQL costs
    one failed request at most, not a pool of dead connections."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        open=False,
        check=AsyncConnectionPool.check_connection,
        kwargs={"application_name": name},
        reconnect_timeout=24 * 3600,
    )
    await pool.open(wait=False)
    return pool
