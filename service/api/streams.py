"""Live status over Server-Sent Events (sse-starlette, served from Litestar).

- ``GET /deploys/{id}/stream`` (owner or admin): the deploy's events, each with the deploy's
  status after it, and terraform's output as ``event: log``, merged in one order;
- ``GET /events/stream`` (admin): every event of every deploy in global ``position`` order.

Both replay what the client has not seen yet (``Last-Event-ID`` header, or ``?last_event_id=`` for
clients that cannot set headers; the header wins, since a browser's EventSource keeps the URL it
was opened with and sends the newer id in the header on reconnect), then follow new rows as they
commit. docs/streams.md is the frontend authors' description of the format.

Ids and order of the deploy stream:

- an event has ``id: <version>``; a log line ``id: <after_version>.<seq>``;
- a log line with ``after_version = v`` comes after event ``v`` and before event ``v + 1``, lines
  by ``seq``. Log writes and event appends of one deploy take the same lock (service.logs), so
  commit order is this order, and one REPEATABLE READ snapshot of both tables always holds a
  prefix of it: each read takes events and log lines from one snapshot, never from two;
- resume from ``v``: events with a version above ``v``, log lines with ``after_version >= v``;
  from ``v.s``: events above ``v``, log lines with a ``seq`` above ``s``; anything else, or a
  ``v`` above the deploy's last version, is 400.

When the deploy is terminal (succeeded, failed, cancelled) and everything up to its last event
has been sent, the stream sends ``event: end`` (no id, so the client's last id stays the last
real one) and closes. A failed deploy can still be replayed by an admin: reconnecting with the
last id then delivers ``Retried`` and what follows, or ``end`` again at once if nothing did.

Each stream reads the tables itself, holding a pool connection only for the read, never while
sending; the hub (service.notify) only wakes it. Sends time out (``send_timeout``), so a frozen
client is dropped instead of holding anything, and a disconnect ends the generator, which
releases its hub subscription.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import msgspec
from litestar import Request, get
from litestar.params import Parameter
from litestar.types import ASGIApp
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError

from service import store
from service.api.auth import SECURITY, require_admin, token_of, visible_deploy
from service.api.errors import Malformed
from service.api.schemas import DeployOut, EventOut, error_responses
from service.auth import Principal, authenticate
from service.logs import LogLine, read_logs
from service.notify import Hub, hub_of
from service.projection import StoredEvent, view_of
from service.services import Services

log = logging.getLogger("tfdeploy.api.streams")
T = TypeVar("T")

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})

# The last seq written before event ``version`` existed: where a resume from id "v" starts.
LOG_SEQ_BEFORE_VERSION = """
SELECT coalesce(max(seq), 0) FROM deploy_logs
WHERE deploy_id = %(deploy_id)s::uuid AND after_version < %(version)s
"""

SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"

_DEPLOY_ID_RE = re.compile(r"^(\d{1,18})(?:\.(\d{1,18}))?$")
_POSITION_RE = re.compile(r"^\d{1,18}$")


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Tunables of the SSE streams (``create_app(stream_options=...)``)."""

    ping: float = 15.0  # seconds between keep-alive comments (": ping"); CONTRACT: at most 15
    auth_recheck: float = 2.0  # an open stream re-checks its token this often: revoked -> ends
    send_timeout: float = 30.0  # a client that takes longer to accept one message is dropped
    log_batch: int = 1000  # log lines per read
    event_batch: int = 500  # events per read of the global feed


class LogOut(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    attempt: int
    stream: str
    line: str
    after_version: int

    @classmethod
    def of(cls, line: LogLine) -> LogOut:
        return msgspec.convert(line, cls, from_attributes=True)


class DeployMessage(msgspec.Struct, frozen=True):
    event: EventOut
    deploy: DeployOut


class EndMessage(msgspec.Struct, frozen=True):
    deploy: DeployOut


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


SEP = "\n"  # lines end with LF (the spec allows CRLF, LF or CR)


def message(data: str, *, event: str, id: str | None = None) -> ServerSentEvent:
    """One SSE message; ``data`` is one line of JSON (msgspec escapes every line break)."""
    return ServerSentEvent(data, event=event, id=id, sep=SEP)


# ---------------------------------------------------------------- resume ids


class DeployCursor(msgspec.Struct, frozen=True):
    """Where a deploy stream resumes: after event ``version``, and after log line ``seq`` (None:
    every line with ``after_version >= version``)."""

    version: int = 0
    seq: int | None = None


def last_event_id(request: Request[Any, Any, Any], query_value: str | None) -> str | None:
    """The id to resume after: the ``Last-Event-ID`` header, else ``?last_event_id=``."""
    header = request.headers.get("last-event-id")
    for value in (header, query_value):
        if value is not None and value.strip():
            return value.strip()
    return None


def parse_deploy_cursor(raw: str | None) -> DeployCursor:
    if raw is None:
        return DeployCursor()
    match = _DEPLOY_ID_RE.match(raw)
    if not match:
        raise Malformed('Last-Event-ID must be "<version>" or "<version>.<seq>"')
    version, seq = match.groups()
    return DeployCursor(int(version), int(seq) if seq is not None else None)


def parse_position(raw: str | None) -> int:
    if raw is None:
        return 0
    if not _POSITION_RE.match(raw):
        raise Malformed("Last-Event-ID must be an event position (an integer)")
    return int(raw)


# ---------------------------------------------------------------- the deploy stream


def merge(events: Sequence[StoredEvent], logs: Sequence[LogLine]) -> list[StoredEvent | LogLine]:
    """Events and log lines in stream order: event v, then the lines with after_version v by
    seq, then event v + 1."""

    def key(item: StoredEvent | LogLine) -> tuple[int, int, int]:
        if isinstance(item, LogLine):
            return (item.after_version, 1, item.seq)
        return (item.version, 0, 0)

    return sorted([*events, *logs], key=key)


class DeployRead(msgspec.Struct):
    events: list[StoredEvent]
    logs: list[LogLine]
    after_seq: int  # the log cursor the lines were read after


async def read_deploy(
    services: Services,
    deploy_id: str,
    after_version: int,
    after_seq: int | None,
    sent_version: int,
    limit: int,
) -> DeployRead:
    """Events after ``after_version`` and up to ``limit`` log lines after ``after_seq`` (None:
    the lines from ``after_version = sent_version`` on), from ONE snapshot."""
    async with services.pool.connection() as conn, conn.transaction():
        await conn.execute(SNAPSHOT)
        events = await store.read_stream(conn, deploy_id, after_version)
        if after_seq is None:
            cur = await conn.execute(
                LOG_SEQ_BEFORE_VERSION, {"deploy_id": deploy_id, "version": sent_version}
            )
            row = await cur.fetchone()
            after_seq = int(row[0]) if row else 0
        logs = await read_logs(conn, deploy_id, after_seq=after_seq, limit=limit)
    return DeployRead(events, logs, after_seq)


_reads: set[asyncio.Task[Any]] = set()


async def shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Await a database read that a disconnect must not interrupt: cancelling psycopg in the
    middle of a query closes the connection (the pool loses it). The read finishes in the
    background (milliseconds) and hands its connection back; only the waiting is cancelled."""
    task = asyncio.ensure_future(coro)
    _reads.add(task)
    task.add_done_callback(_forget)
    return await asyncio.shield(task)


def _forget(task: asyncio.Task[Any]) -> None:
    _reads.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a read nobody waits for any more may fail quietly


async def _woken(sub: Any, valid: Callable[[], Awaitable[bool]], options: StreamOptions) -> bool:
    """Wait for the next wake-up; False once the stream's token is no longer valid (a revoked
    token is refused within ``auth_recheck`` seconds, open streams included). ``valid`` is
    rate-limited, so busy streams do not query the token table on every event."""
    while True:
        woke = await sub.wait(within=options.auth_recheck)
        if not await valid():
            return False
        if woke:
            return True


async def deploy_messages(
    services: Services,
    hub: Hub,
    deploy_id: str,
    cursor: DeployCursor,
    options: StreamOptions,
    valid: Callable[[], Awaitable[bool]],
) -> AsyncIterator[ServerSentEvent]:
    """The deploy stream after ``cursor``, following new rows until the deploy ends."""
    records: list[StoredEvent] = []  # the whole stream read so far (to fold statuses)
    sent_version = cursor.version  # events up to here are sent (or were before a reconnect)
    last_seq = cursor.seq
    with hub.subscribe(deploy_id) as sub:
        while True:
            if not await _woken(sub, valid, options):
                return
            while True:
                # Never hold a pool connection while sending: read, release, then yield.
                read = await shielded(
                    read_deploy(
                        services,
                        deploy_id,
                        records[-1].version if records else 0,
                        last_seq,
                        sent_version,
                        options.log_batch,
                    )
                )
                records.extend(read.events)
                last_seq, logs = read.after_seq, read.logs
                if not records:  # pragma: no cover - a visible deploy has its Requested event
                    return
                full = len(logs) >= options.log_batch
                # With a full page of lines, events beyond the last line read wait for the next
                # read (lines before them may not have been read yet).
                cutoff = logs[-1].after_version if full else records[-1].version
                pending = [r for r in records if sent_version < r.version <= cutoff]
                for item in merge(pending, logs):
                    if isinstance(item, LogLine):
                        last_seq = item.seq
                        yield message(
                            _json(LogOut.of(item)),
                            event="log",
                            id=f"{item.after_version}.{item.seq}",
                        )
                    else:
                        sent_version = item.version
                        # Versions are 1, 2, 3, ...: the stream up to this event is a prefix.
                        view = view_of(records[: item.version])
                        yield message(
                            _json(DeployMessage(EventOut.of(item), DeployOut.of(view))),
                            event=item.type,
                            id=str(item.version),
                        )
                if not full:
                    break
            latest = view_of(records)
            if latest.status in TERMINAL_STATUSES and sent_version >= latest.version:
                yield message(_json(EndMessage(DeployOut.of(latest))), event="end")
                return


# ---------------------------------------------------------------- the global feed


async def all_event_messages(
    services: Services,
    hub: Hub,
    after: int,
    options: StreamOptions,
    valid: Callable[[], Awaitable[bool]],
) -> AsyncIterator[ServerSentEvent]:
    """Every event after position ``after``, in position order, following new ones. Gap-free
    because appends are serialised (service.store.append): no smaller position can commit after
    a larger one was read."""
    with hub.subscribe(None) as sub:
        while True:
            if not await _woken(sub, valid, options):
                return
            while True:
                batch = await shielded(_read_all_after(services, after, options.event_batch))
                for event in batch:
                    after = event.position
                    yield message(
                        _json(EventOut.of(event)), event=event.type, id=str(event.position)
                    )
                if len(batch) < options.event_batch:
                    break


async def _read_all_after(services: Services, after: int, limit: int) -> list[StoredEvent]:
    async with services.pool.connection() as conn:
        return await store.read_all_after(conn, after, limit)


# ---------------------------------------------------------------- routes


class StreamResponse(EventSourceResponse):
    """An EventSourceResponse that takes a dropped slow client as the normal event it is (the
    stream ends, its subscription is released) rather than an application error."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info("dropped an SSE client that did not read for %s s", self.send_timeout)


def _token_check(
    services: Services, request: Request[Any, Any, Any], options: StreamOptions
) -> Callable[[], Awaitable[bool]]:
    token = token_of(request) or ""
    loop = asyncio.get_running_loop()
    checked_at = loop.time()  # the request was just authenticated

    async def query() -> bool:
        try:
            async with services.pool.connection() as conn:
                return await authenticate(conn, token) is not None
        except Exception:  # the database is away: keep the stream; the check runs again
            return True

    async def valid() -> bool:
        nonlocal checked_at
        if loop.time() - checked_at < options.auth_recheck:
            return True
        checked_at = loop.time()
        return await shielded(query())

    return valid


def _options(request: Request[Any, Any, Any]) -> StreamOptions:
    options = request.app.state.get("stream_options")
    return options if isinstance(options, StreamOptions) else StreamOptions()


def _response(messages: AsyncIterator[ServerSentEvent], options: StreamOptions) -> ASGIApp:
    return StreamResponse(
        messages,
        ping=options.ping,
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep=SEP),
        sep=SEP,
        send_timeout=options.send_timeout,
        headers={"Cache-Control": "no-store"},
    )


LAST_EVENT_ID_HEADER = Parameter(
    header="Last-Event-ID",
    required=False,
    description="Resume after this id (sent by EventSource itself when it reconnects).",
)


@get(
    "/deploys/{deploy_id:str}/stream",
    summary="Follow a deploy live (SSE)",
    tags=["deploys"],
    security=SECURITY,
    media_type="text/event-stream",
    responses=error_responses(400, 404),
    description=(
        "Server-Sent Events: one message per event (`id:` its version, `event:` its type, "
        '`data:` `{"event", "deploy"}` with the status after it) and terraform output as '
        "`event: log` (`id:` `<after_version>.<seq>`), in one order; `event: end` after the "
        "last event of a finished deploy, then the stream closes. Resumes after `Last-Event-ID` "
        "or `?last_event_id=`. See docs/streams.md."
    ),
)
async def deploy_stream(
    request: Request[Any, Any, Any],
    services: Services,
    principal: Principal,
    deploy_id: str = Parameter(description="The deploy's id (a UUID)."),
    last_event_id_header: str | None = LAST_EVENT_ID_HEADER,
    last_event_id_query: str | None = Parameter(
        query="last_event_id", required=False, description="Like Last-Event-ID; the header wins."
    ),
) -> ASGIApp:
    cursor = parse_deploy_cursor(last_event_id(request, last_event_id_query))
    deploy = await visible_deploy(services, principal, deploy_id)
    if cursor.version > deploy.version:
        # Not an id this stream sent (versions only grow): another stream's, or made up.
        raise Malformed(f"Last-Event-ID is beyond this deploy's last event ({deploy.version})")
    options = _options(request)
    valid = _token_check(services, request, options)
    return _response(
        deploy_messages(services, hub_of(services), deploy.id, cursor, options, valid), options
    )


@get(
    "/events/stream",
    summary="Every event live, in position order (SSE, admin)",
    tags=["events"],
    security=SECURITY,
    media_type="text/event-stream",
    responses=error_responses(400, 403),
    description=(
        "Server-Sent Events: every event of every deploy, `id:` its global position, `event:` "
        "its type, `data:` the event. Gap-free and ordered; resumes after `Last-Event-ID` or "
        "`?last_event_id=` (a position)."
    ),
)
async def events_stream(
    request: Request[Any, Any, Any],
    services: Services,
    principal: Principal,
    last_event_id_header: str | None = LAST_EVENT_ID_HEADER,
    last_event_id_query: str | None = Parameter(
        query="last_event_id", required=False, description="Like Last-Event-ID; the header wins."
    ),
) -> ASGIApp:
    require_admin(principal, "the event stream")
    after = parse_position(last_event_id(request, last_event_id_query))
    options = _options(request)
    valid = _token_check(services, request, options)
    return _response(
        all_event_messages(services, hub_of(services), after, options, valid), options
    )


STREAM_ROUTES = [deploy_stream, events_stream]
