"""Per-user limits of the HTTP API (CONTRACT "Limits"; docs/security.md, "Limits"):

- ``RequestLimit``: requests per user (``TFDEPLOY_RATE_LIMIT``), counted in PostgreSQL by the
  statement that authenticates the request, so the limit is per user across every API process
  and host on the database, at no extra round trip. Past it: 429 with ``Retry-After``.
- ``StreamSlots``: open event streams per user (``TFDEPLOY_MAX_STREAMS_PER_USER``), counted in
  PostgreSQL across processes; a process that dies stops counting within a lease.
- ``ValidationGate``: ``POST /deploys`` bodies are validated (CPU-bound) on a few threads of
  their own, one body per user at a time, so big bodies in parallel cannot starve the event
  loop (other requests, stream keep-alives).
- ``connection_limit``: uvicorn's ``limit_concurrency``, from the process's file-descriptor
  limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import resource
import socket
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal, TypeVar
from uuid import uuid4

from litestar.datastructures import MutableScopeHeaders
from litestar.middleware.rate_limit import RateLimitConfig, RateLimitMiddleware
from litestar.types import Message, Receive, Scope, Send

from service.api.auth import PRINCIPAL_SCOPE_KEY, TOKEN_REFUSED, token_of
from service.api.errors import TooManyRequests
from service.auth import Principal, hash_token
from service.db import autocommit
from service.queries import q
from service.settings import RATE_WINDOW_SECONDS as WINDOW_SECONDS
from service.settings import Settings

log = logging.getLogger("tfdeploy.api.limits")
T = TypeVar("T")

# service.auth.authenticate refuses longer tokens without a query; so does the limiter.
TOKEN_MAX = 200


# ---------------------------------------------------------------- requests per user


class RequestLimit(RateLimitMiddleware):
    """Litestar's rate-limit middleware, counting in PostgreSQL instead of its store.

    Litestar's own keeps a history per key in a ``Store`` and checks it under a lock of the
    process: each process would count on its own (N processes, N times the limit), and a store
    shared between processes would lose counts between its read and its write. Here the count
    is one atomic statement of the database every process shares, and it is the statement that
    authenticates the request anyway (``authenticate_and_count`` in service/sql/limits.sql): it
    finds the token's user and counts the request against them, so ``principal`` (service.api.
    auth) needs no query of its own. Its configuration, exclusions and ``RateLimit-*`` headers
    are Litestar's.

    What counts: every request that carries a token (``Authorization: Bearer``, or
    ``?access_token=`` on the stream routes), once, when it arrives -- opening an event stream
    is one request, the messages it then receives are none. A token that names no live user
    counts against the client's address instead (guessing tokens is limited too). Requests
    without a token reach no user and no database work beyond what they are for: the health
    check, the OpenAPI document, the status page and its files, and the 401 of a route that
    needs a token are not counted. Fixed windows of the rule's unit by the database's clock: a
    burst of up to twice the limit is possible across a window's edge.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["litestar_app"]
        request: Any = app.request_class(scope)
        token = token_of(request)
        if not token or len(token) > TOKEN_MAX:
            # Answered without the database: 401 where a token is needed, else open routes.
            await self.app(scope, receive, send)
            return
        services = app.state["services"]
        client = scope.get("client")
        address = client[0] if client else ""
        window = WINDOW_SECONDS[self.unit]
        async with autocommit(services.pool) as conn:
            cur = await conn.execute(
                q("authenticate_and_count"),
                {"token_hash": hash_token(token), "address": address, "window": window},
            )
            row = await cur.fetchone()
        assert row is not None  # the counter's row is always returned
        token_id, user_id, name, admin, hits, reset = row
        # For the ``principal`` dependency: who the token names (or that it names nobody).
        scope[PRINCIPAL_SCOPE_KEY] = (  # type: ignore[literal-required]
            Principal(name, admin, token_id, user_id) if token_id is not None else TOKEN_REFUSED
        )
        reset_in = max(1, math.ceil(reset))
        headers = self.headers(hits, reset_in)
        if hits > self.max_requests:
            raise TooManyRequests(
                f"rate limit exceeded: {self.max_requests} requests per {self.unit} per user "
                f"(TFDEPLOY_RATE_LIMIT); retry in {reset_in} s",
                headers={**headers, "Retry-After": str(reset_in)},
            )
        await self.app(scope, receive, self.with_headers(send, headers))

    def headers(self, hits: int, reset_in: int) -> dict[str, str]:
        if not self.config.set_rate_limit_headers:
            return {}
        return {
            self.config.rate_limit_policy_header_key: f"{self.max_requests}; w={WINDOW_SECONDS[self.unit]}",
            self.config.rate_limit_limit_header_key: str(self.max_requests),
            self.config.rate_limit_remaining_header_key: str(max(0, self.max_requests - hits)),
            self.config.rate_limit_reset_header_key: str(reset_in),
        }

    @staticmethod
    def with_headers(send: Send, headers: dict[str, str]) -> Send:
        if not headers:
            return send

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                out = MutableScopeHeaders(message)
                for key, value in headers.items():
                    out[key] = value
            await send(message)

        return send_with_headers


def request_limit(settings: Settings) -> RateLimitConfig:
    """The ``TFDEPLOY_RATE_LIMIT`` rule as Litestar's rate-limit configuration."""
    unit, requests = settings.rate_limit_rule
    duration: Literal["second", "minute", "hour"] = unit
    return RateLimitConfig(rate_limit=(duration, requests), middleware_class=RequestLimit)


# ---------------------------------------------------------------- open event streams per user


class TooManyStreams(TooManyRequests):
    pass


STREAM_RETRY_AFTER = 5  # seconds: a client's other streams end, or ours notices a dead process


class StreamSlots:
    """The open event streams of this API process, counted per user in PostgreSQL with every
    other process's (``open_streams``, migration 0011).

    ``acquire`` opens one (429 past ``TFDEPLOY_MAX_STREAMS_PER_USER``, serialised per user in
    the database), ``release`` ends it. Every ``refresh`` seconds while it holds streams, the
    process tells the database it is alive and which streams it holds (one statement); the
    streams of a process not heard from for ``lease`` seconds no longer count -- so the streams
    of a process that died (SIGKILL, OOM, host lost) stop counting within ``lease``, and a
    release that could not be written (the database away) is set right by the next refresh.
    """

    def __init__(self, services: Any, *, lease: float = 20.0, refresh: float = 5.0) -> None:
        self.services = services
        self.max_per_user = services.settings.max_streams_per_user
        self.lease = lease
        self.refresh = refresh
        self.process = str(uuid4())
        self.host = socket.gethostname()[:200]
        self.pid = os.getpid()
        self.held: dict[str, str] = {}  # stream id -> user
        self._refresher: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self.closed = False

    def _params(self) -> dict[str, Any]:
        return {"process": self.process, "host": self.host, "pid": self.pid}

    async def acquire(self, user: str) -> str:
        """A new stream of ``user``'s; TooManyStreams when they hold the maximum already."""
        stream = str(uuid4())
        async with autocommit(self.services.pool) as conn:
            cur = await conn.execute(
                q("open_stream"),
                {
                    **self._params(),
                    "stream": stream,
                    "user": user,
                    "max": self.max_per_user,
                    "lease": self.lease,
                },
            )
            row = await cur.fetchone()
        assert row is not None
        if not row[0]:
            raise TooManyStreams(
                f"too many open event streams: at most {self.max_per_user} per user "
                f"(TFDEPLOY_MAX_STREAMS_PER_USER); close one, or retry later",
                headers={"Retry-After": str(STREAM_RETRY_AFTER)},
            )
        self.held[stream] = user
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh())
        return stream

    def release(self, stream: str) -> None:
        """The stream ended: it stops counting now (or, should the write fail, at the next
        refresh)."""
        if self.held.pop(stream, None) is None or self.closed:
            return
        task = asyncio.get_running_loop().create_task(self._write("close_stream", {"stream": stream}))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, query: str, params: dict[str, Any]) -> None:
        try:
            async with autocommit(self.services.pool) as conn:
                await conn.execute(q(query), params)
        except Exception as exc:  # the database away: the next refresh writes what is true
            log.debug("stream slots: %s failed (%s)", query, exc)

    async def sync(self) -> None:
        """Tell the database this process is alive and exactly which streams it holds."""
        held = dict(self.held)
        async with autocommit(self.services.pool) as conn:
            await conn.execute(
                q("sync_streams"),
                {**self._params(), "ids": list(held), "users": list(held.values())},
            )

    async def _refresh(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.refresh)
            try:
                await self.sync()
            except Exception as exc:
                log.debug("stream slots: refresh failed (%s); trying again", exc)
                continue
            if not self.held:
                return  # idle: nothing to keep alive (the next acquire starts again)

    async def close(self) -> None:
        """The process stops: its streams stop counting at once (best effort: otherwise
        within ``lease``)."""
        self.closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(BaseException):
                await self._refresher
        for task in list(self._writes):
            with contextlib.suppress(BaseException):
                await task
        await self._write("end_process", {"process": self.process})


def stream_slots(services: Any, *, lease: float = 20.0, refresh: float = 5.0) -> StreamSlots:
    """The process's ``StreamSlots``, kept in ``services.extras`` (made on first use)."""
    slots = services.extras.get("stream_slots")
    if not isinstance(slots, StreamSlots) or slots.closed:
        slots = services.extras["stream_slots"] = StreamSlots(services, lease=lease, refresh=refresh)
    return slots


# ---------------------------------------------------------------- validation of request bodies


# Threads that validate POST /deploys bodies, per API process. Validation is pure Python (the
# GIL): more threads would not validate more bodies a second, they would only take more of the
# GIL from the event loop.
VALIDATION_THREADS = 1
# How long a thread holds the GIL while another waits for it (Python's default: 5 ms). The event
# loop gives the GIL up at every wait for I/O and then waits for it again: against a thread that
# validates a big body, each of a request's dozen turns would wait up to 5 ms (a small GET took
# 200 ms instead of 5; tests/test_limits.py); with this, the loop gets it back within 0.5 ms. It
# only matters while two threads want the GIL at once.
GIL_SWITCH_INTERVAL = 0.0005


class ValidationGate:
    """Runs CPU-bound validation on ``threads`` threads of its own, and at most one body per
    user at a time (a user's next body waits for their previous one; bodies of different users
    take turns), so one user's burst of big bodies neither starves the event loop nor makes
    other users' requests wait behind all of it. Makes the process's GIL switch interval
    GIL_SWITCH_INTERVAL, so the event loop is not held up by the validating thread. A body whose client went away while it waited
    is dropped; one already being validated finishes, and its thread stays taken until then."""

    def __init__(self, threads: int = VALIDATION_THREADS) -> None:
        self.threads = threads
        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="tfdeploy-validate")
        self._users: dict[str, asyncio.Lock] = {}
        self._uses: dict[str, int] = {}

    async def run(self, user: str, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        lock = self._users.get(user)
        if lock is None:
            lock = self._users[user] = asyncio.Lock()
        self._uses[user] = self._uses.get(user, 0) + 1
        try:
            await lock.acquire()
        except BaseException:
            self._forget(user)
            raise
        try:
            work: Future[T] = self._executor.submit(fn, *args)
        except BaseException:
            lock.release()
            self._forget(user)
            raise

        def done(_: Future[T]) -> None:
            # In the executor's thread (or ours, for a cancelled one): back to the loop.
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to release
                loop.call_soon_threadsafe(self._done, user, lock)

        work.add_done_callback(done)
        return await asyncio.wrap_future(work, loop=loop)

    def _done(self, user: str, lock: asyncio.Lock) -> None:
        lock.release()
        self._forget(user)

    def _forget(self, user: str) -> None:
        left = self._uses.get(user, 1) - 1
        if left <= 0:
            self._uses.pop(user, None)
            self._users.pop(user, None)
        else:
            self._uses[user] = left

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def validation_gate(services: Any) -> ValidationGate:
    """The process's ``ValidationGate``, kept in ``services.extras`` (made on first use)."""
    gate = services.extras.get("validation_gate")
    if not isinstance(gate, ValidationGate):
        gate = services.extras["validation_gate"] = ValidationGate()
    return gate


# ---------------------------------------------------------------- connections


MAX_CONNECTIONS = 4096  # memory: an open connection costs tens of KiB (docs/benchmarks.md)
FD_RESERVE = 256  # the pool, the LISTEN connection, logs, the runner's files


def connection_limit() -> int:
    """uvicorn's ``limit_concurrency`` for an API process: connections (an open event stream is
    one) and requests at once, past which uvicorn answers 503 to new requests. At most
    MAX_CONNECTIONS, and FD_RESERVE below the process's file-descriptor limit, so the process
    never fails to accept for want of descriptors, nor to open a database connection."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = MAX_CONNECTIONS + FD_RESERVE
    return max(64, min(MAX_CONNECTIONS, soft - FD_RESERVE))

