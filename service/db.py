"""Connection pools for PostgreSQL.

Two behaviours while PostgreSQL is away, chosen per task by ``FAIL_FAST``:

- waiting (the default: workers, recovery, the SSE feeds' retries): a request for a connection
  waits for the pool, whose reconnection attempts go on for as long as PostgreSQL is away
  (``_reconnect_failed``), up to its timeout;
- failing fast (API requests: ``service.api.app`` sets ``FAIL_FAST`` for each HTTP request):
  once the pool knows PostgreSQL is unreachable -- a connection attempt failed, and none has
  succeeded since -- a request for a connection raises ``DatabaseAway`` at once (the API answers
  503 with ``Retry-After``), and requests already waiting for a connection are given up the
  moment it learns so. The pool's own attempts, a fraction of a second apart, are what tells
  it PostgreSQL is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

log = logging.getLogger("tfdeploy.db")

# After a reconnection window ends without a connection, the next window starts this much later.
RECONNECT_PAUSE = 0.25
# How long one reconnection window lasts: psycopg_pool's tries within it are a second apart
# (then doubling), so with this window and the pause above a try is made at least every second
# while PostgreSQL is away, and PostgreSQL is found back (and the API serving again) within a
# second of its return.
RECONNECT_WINDOW = 1.0
# A connection attempt to an address that does not answer at all (a host gone, a network
# black hole) is given up after this many seconds: that is when the pool learns it is away.
CONNECT_TIMEOUT = 5

# Whether a request for a connection made in this task fails fast while PostgreSQL is known
# to be away (service.api.app sets it for every HTTP request).
FAIL_FAST: ContextVar[bool] = ContextVar("tfdeploy_db_fail_fast", default=False)

_retries: set[asyncio.Task[None]] = set()  # keeps the pending retries referenced


class DatabaseAway(PoolTimeout):
    """PostgreSQL is known to be unreachable: raised at once to a fail-fast request (a
    PoolTimeout, so whatever already treats the database as away for a pool timeout -- the SSE
    streams, the health check -- does so for this too)."""


class DatabaseStatus:
    """Whether a pool can reach PostgreSQL, learnt from its own connection attempts."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.away_since: float | None = None  # monotonic; None while reachable
        self._waiting: set[asyncio.Task[Any]] = set()  # fail-fast requests waiting for the pool
        self._given_up: set[asyncio.Task[Any]] = set()

    @property
    def away(self) -> bool:
        return self.away_since is not None

    def failed(self, exc: BaseException) -> None:
        """A connection attempt failed: PostgreSQL is away. Fail-fast requests waiting for a
        connection are given up now (``DatabaseAway``) instead of at their timeout."""
        if self.away_since is None:
            self.away_since = time.monotonic()
            log.warning("pool %r: PostgreSQL unreachable (%s); failing requests fast", self.name, exc)
        for task in list(self._waiting):
            if task not in self._given_up:
                self._given_up.add(task)
                task.cancel()

    def connected(self) -> None:
        if self.away_since is not None:
            log.warning(
                "pool %r: PostgreSQL reachable again after %.1f s",
                self.name,
                time.monotonic() - self.away_since,
            )
            self.away_since = None


def _tracked_connection_class(status: DatabaseStatus) -> type[psycopg.AsyncConnection[Any]]:
    """The pool's connection class: ``connect`` as psycopg's, telling ``status`` how it went."""

    class TrackedConnection(psycopg.AsyncConnection[Any]):
        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            try:
                conn = await super().connect(conninfo, **kwargs)
            except psycopg.OperationalError as exc:
                status.failed(exc)
                raise
            status.connected()
            return conn

    return TrackedConnection


class Pool(AsyncConnectionPool[Any]):
    """psycopg_pool's pool, failing fast where ``FAIL_FAST`` says so (the module's docstring).

    ``status`` says whether PostgreSQL is reachable; ``reconnect_pause``: see
    ``_reconnect_failed``."""

    status: DatabaseStatus
    reconnect_pause: float = RECONNECT_PAUSE

    async def getconn(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109 (its signature)
        if not FAIL_FAST.get():
            return await super().getconn(timeout)
        status = self.status
        if status.away:
            raise DatabaseAway(f"pool {self.name!r}: PostgreSQL is unreachable")
        task = asyncio.current_task()
        assert task is not None
        status._waiting.add(task)
        try:
            return await super().getconn(timeout)
        except asyncio.CancelledError:
            if task not in status._given_up:
                raise  # a cancellation of someone else's (the client went away)
            # Ours (status.failed): undo it, so the task goes on to answer the request.
            status._given_up.discard(task)
            task.uncancel()
            raise DatabaseAway(f"pool {self.name!r}: PostgreSQL is unreachable") from None
        finally:
            status._waiting.discard(task)
            status._given_up.discard(task)


async def _reconnect_again(pool: AsyncConnectionPool[Any]) -> None:
    await asyncio.sleep(getattr(pool, "reconnect_pause", RECONNECT_PAUSE))
    if not pool.closed:
        with contextlib.suppress(Exception):
            await pool.check()  # grows the pool again: a fresh reconnection window


def _reconnect_failed(pool: AsyncConnectionPool[Any]) -> None:
    """psycopg_pool gives up after ``reconnect_timeout`` and tries again only when a new
    request comes: a request already waiting (a worker recording an outcome while PostgreSQL
    restarts) would then wait out its whole timeout after PostgreSQL is back (16 s seen). So
    start the next window ourselves, for as long as PostgreSQL is away. (Fail-fast requests do
    not reach the pool while it is away: these windows are also what finds it back.)"""
    task = asyncio.get_running_loop().create_task(_reconnect_again(pool))
    _retries.add(task)
    task.add_done_callback(_retries.discard)


async def open_pool(
    url: str, *, min_size: int = 1, max_size: int = 20, name: str = "tfdeploy", wait: float = 30.0
) -> Pool:
    """An open pool whose connections are checked before use, so a restarted PostgreSQL costs
    one failed request at most, not a pool of dead connections. ``wait``: how long a request
    waits for a connection (then PoolTimeout; the API maps it to 503)."""
    status = DatabaseStatus(name)
    pool = Pool(
        url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        open=False,
        check=AsyncConnectionPool.check_connection,
        connection_class=_tracked_connection_class(status),
        kwargs={"application_name": name, "connect_timeout": CONNECT_TIMEOUT},
        timeout=wait,
        # psycopg_pool doubles its pause between reconnection tries until this window ends, so
        # a long window means a long wait after PostgreSQL is back (6 s+ seen after an 8 s
        # outage). A short one ends the try, and _reconnect_failed starts the next.
        reconnect_timeout=RECONNECT_WINDOW,
        reconnect_failed=_reconnect_failed,
    )
    pool.status = status
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
