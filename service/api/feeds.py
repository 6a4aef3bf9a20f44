"""What an SSE stream reads: the shared feeds of the hub (service.notify) and a stream's own
catch-up reads, as encoded Server-Sent Event messages (service.api.streams writes them out).

Ids and order of the deploy stream:

- an event has ``id: <version>``; a log line ``id: <after_version>.<seq>``;
- a log line with ``after_version = v`` comes after event ``v`` and before event ``v + 1``, lines
  by ``seq``. Log writes and event appends of one deploy take the same lock (service.logs), so
  commit order is this order, and one REPEATABLE READ snapshot of both tables always holds a
  prefix of it: each read takes events and log lines from one snapshot, never from two;
- resume from ``v``: events with a version above ``v``, log lines with ``after_version >= v``;
  from ``v.s``: events above ``v``, log lines with a ``seq`` above ``s``.

When the deploy is terminal (succeeded, failed, cancelled) and everything up to its last event
has been sent, the stream sends ``event: end`` (no id, so the client's last id stays the last
real one) and closes. A failed deploy can still be replayed by an admin: reconnecting with the
last id then delivers ``Retried`` and what follows, or ``end`` again at once if nothing did.

Fan-out: the streams of one deploy (and the global streams) share a feed of the hub
(service.notify). The feed reads new rows once per wake-up with the sources below
(``DeploySource``, ``AllEventsSource``), encodes each message once, and keeps the latest ones in
a bounded window; a caught-up stream takes its messages from there. A stream reads the tables
itself only to catch up: when it starts (from its resume id), or when it fell behind the window.
Either way it holds a pool connection only for the read, never while sending. While the database
is away, streams stay open and carry on from their cursor once it is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import msgspec
import psycopg
from psycopg_pool import PoolTimeout
from sse_starlette import ServerSentEvent

from service import store
from service.api.schemas import DeployOut, EventOut
from service.lifecycle import TERMINAL_STATUSES
from service.notify import Batch, Hub, Subscription
from service.projection import DeployView, StoredEvent, view_of
from service.services import Services

log = logging.getLogger("tfdeploy.api.streams")
T = TypeVar("T")


# The last seq written before event ``version`` existed: where a resume from id "v" starts.
LOG_SEQ_BEFORE_VERSION = """
SELECT coalesce(max(seq), 0) FROM deploy_logs
WHERE deploy_id = %(deploy_id)s::uuid AND after_version < %(version)s
"""

SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"

# A deploy's lines after a seq, as the stream sends them (LogOut's fields, in its order).
FEED_LINES = """
SELECT seq, attempt, stream, line, after_version FROM deploy_logs
WHERE deploy_id = %(deploy_id)s::uuid AND seq > %(after_seq)s
ORDER BY seq
LIMIT %(limit)s
"""

# A deploy's last log seq (with its events, from one snapshot: where its feed starts).
LAST_LOG_SEQ = "SELECT coalesce(max(seq), 0) FROM deploy_logs WHERE deploy_id = %(deploy_id)s::uuid"

# Where the global feed starts. Every position below the largest committed one has committed
# (or never will): appends are serialised (service.store.append).
LAST_POSITION = "SELECT coalesce(max(position), 0) FROM events"

# A read that failed because the database is away (the API answers 503 for these): the stream
# stays open and tries again.
DATABASE_AWAY = (psycopg.OperationalError, PoolTimeout)

CHUNK_BYTES = 256 * 1024  # messages are sent together up to about this much


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Tunables of the SSE streams (``create_app(stream_options=...)``)."""

    ping: float = 15.0  # seconds between keep-alive comments (": ping"); CONTRACT: at most 15
    auth_recheck: float = 2.0  # an open stream re-checks its token this often: revoked -> ends
    send_timeout: float = 30.0  # a client that takes longer to accept one message is dropped
    log_batch: int = 1000  # log lines per read
    event_batch: int = 500  # events per read of the global feed
    # Messages each shared feed keeps for its caught-up streams (per deploy followed, and one
    # for the global stream); a stream further behind reads the database itself.
    window: int = 2000
    # Open streams per user are counted across processes (service.api.limits.StreamSlots): a
    # process refreshes its streams this often, and those of one not heard from for
    # ``slot_lease`` seconds (it died) stop counting.
    slot_refresh: float = 5.0
    slot_lease: float = 20.0
    # A deploy's shared feed reads at most this often (a flood of output wakes it for every
    # commit); its first read after a quiet spell is immediate.
    min_read_interval: float = 0.05


class LogOut(msgspec.Struct, frozen=True):
    """A log line as the stream sends it; made straight from a row of FEED_LINES."""

    seq: int
    attempt: int
    stream: str
    line: str
    after_version: int


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


class DeployCursor(msgspec.Struct, frozen=True):
    """Where a deploy stream resumes: after event ``version``, and after log line ``seq`` (None:
    every line with ``after_version >= version``)."""

    version: int = 0
    seq: int | None = None



# ---------------------------------------------------------------- the deploy stream

# Where a message sits in a deploy stream: event v is (v, 0, 0), a log line (after_version, 1,
# seq). A stream that has sent everything up to event ``v`` and line ``s`` is at (v, 1, s):
# everything at or before that key was sent, everything after it was not.
Key = tuple[int, int, int]


def merge(events: Sequence[StoredEvent], logs: Sequence[LogOut]) -> list[StoredEvent | LogOut]:
    """Events and log lines in stream order: event v, then the lines with after_version v by
    seq, then event v + 1."""

    def key(item: StoredEvent | LogOut) -> tuple[int, int, int]:
        if isinstance(item, LogOut):
            return (item.after_version, 1, item.seq)
        return (item.version, 0, 0)

    return sorted([*events, *logs], key=key)


class DeployRead(msgspec.Struct):
    events: list[StoredEvent]
    logs: list[LogOut]
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
        cur = await conn.execute(
            FEED_LINES, {"deploy_id": deploy_id, "after_seq": after_seq, "limit": limit}
        )
        logs = [LogOut(*row) for row in await cur.fetchall()]
    return DeployRead(events, logs, after_seq)


def encode_event(records: Sequence[StoredEvent], event: StoredEvent) -> bytes:
    # Versions are 1, 2, 3, ...: the stream up to this event is a prefix.
    view = view_of(records[: event.version])
    data = _json(DeployMessage(EventOut.of(event), DeployOut.of(view)))
    return message(data, event=event.type, id=str(event.version)).encode()


def encode_line(line: LogOut) -> bytes:
    """What ``message(json, event="log", id="v.s").encode()`` gives, byte for byte (msgspec
    escapes every line break, so the data is one line), without sse_starlette's per-message
    buffer and regular expressions: a deploy flooding its output makes this most of a feed's
    work."""
    return b"id: %d.%d\nevent: log\ndata: %s\n\n" % (
        line.after_version,
        line.seq,
        msgspec.json.encode(line),
    )


def encode_end(latest: DeployView) -> bytes:
    return message(_json(EndMessage(DeployOut.of(latest))), event="end").encode()


# Messages encoded between two turns of the event loop: a full page of a flooding deploy's
# output is milliseconds of work, and other requests get in between (bench/flood.py).
ENCODE_SLICE = 100


async def deploy_page(
    records: list[StoredEvent], read: DeployRead, sent_version: int, limit: int
) -> tuple[list[tuple[Key, bytes]], int, bool]:
    """The messages of one read (``records``: the whole stream so far, ``read``'s events
    included) after event ``sent_version``, in stream order; the version sent once they are;
    and whether the page of lines was full (read again at once). Lets the event loop run every
    ENCODE_SLICE messages."""
    logs = read.logs
    full = len(logs) >= limit
    # With a full page of lines, events beyond the last line read wait for the next read
    # (lines before them may not have been read yet).
    cutoff = logs[-1].after_version if full else records[-1].version
    pending = records[sent_version:cutoff]  # versions sent_version + 1 .. cutoff
    out: list[tuple[Key, bytes]] = []
    for n, item in enumerate(merge(pending, logs), 1):
        if isinstance(item, LogOut):
            out.append(((item.after_version, 1, item.seq), encode_line(item)))
        else:
            out.append(((item.version, 0, 0), encode_event(records, item)))
        if n % ENCODE_SLICE == 0:
            await asyncio.sleep(0)
    return out, max(sent_version, cutoff), full


class DeploySource:
    """The shared feed of one deploy's stream (service.notify.FeedSource): each read takes the
    new events and log lines from one snapshot and encodes their messages once."""

    def __init__(self, services: Services, deploy_id: str, options: StreamOptions) -> None:
        self.services = services
        self.deploy_id = deploy_id
        self.options = options
        self.records: list[StoredEvent] = []
        self.last_seq = 0
        self.sent_version = 0  # messages up to this event are in the feed
        # When the deploy is finished: its end message, and its last version.
        self.end: bytes | None = None
        self.end_version = 0
        self._last_read = float("-inf")  # loop time of the last read

    async def start(self) -> Key:
        async with self.services.pool.connection() as conn, conn.transaction():
            await conn.execute(SNAPSHOT)
            records = await store.read_stream(conn, self.deploy_id)
            cur = await conn.execute(LAST_LOG_SEQ, {"deploy_id": self.deploy_id})
            row = await cur.fetchone()
        self.records = records
        self.last_seq = int(row[0]) if row else 0
        self.sent_version = records[-1].version if records else 0
        self._ended()
        return (self.sent_version, 1, self.last_seq)

    async def read(self, after: Key) -> Batch[Key]:
        # A deploy whose terraform floods its output commits lines hundreds of times a second,
        # and each commit wakes the feed: reading at most every ``min_read_interval`` bounds
        # what one deploy's flood costs this process (other users' requests keep their pace;
        # bench/flood.py), whatever its rate. The first read after a quiet spell is at once.
        loop = asyncio.get_running_loop()
        wait = self._last_read + self.options.min_read_interval - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_read = loop.time()
        read = await read_deploy(
            self.services,
            self.deploy_id,
            self.records[-1].version if self.records else 0,
            self.last_seq,
            self.sent_version,
            self.options.log_batch,
        )
        records = [*self.records, *read.events]
        if not records:  # pragma: no cover - a deploy has its Requested event
            return Batch([], after)
        items, sent_version, full = await deploy_page(
            records, read, self.sent_version, self.options.log_batch
        )
        # From here on nothing awaits: the state and the window change together.
        self.records, self.sent_version = records, sent_version
        if read.logs:
            self.last_seq = read.logs[-1].seq
        self._ended()
        return Batch(items, (self.sent_version, 1, self.last_seq), more=full)

    def _ended(self) -> None:
        latest = view_of(self.records) if self.records else None
        if latest is not None and latest.status in TERMINAL_STATUSES:
            if self.end_version != latest.version:
                self.end, self.end_version = encode_end(latest), latest.version
        else:
            self.end, self.end_version = None, 0


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


async def _woken(
    sub: Subscription, valid: Callable[[], Awaitable[bool]], options: StreamOptions
) -> bool:
    """Wait for the next wake-up; False once the stream's token is no longer valid (a revoked
    token is refused within ``auth_recheck`` seconds, open streams included) or the process is
    shutting down (``Hub.shutdown``). ``valid`` is
    rate-limited, so busy streams do not query the token table on every event."""
    while True:
        woke = await sub.wait(within=options.auth_recheck)
        if sub.hub.closing or not await valid():
            return False
        if woke:
            return True


def _away(sub: Subscription, exc: Exception) -> None:
    """A catch-up read failed because the database is away: keep the stream (the client
    keeps its place, keep-alive comments go on) and try again shortly."""
    log.debug("stream read failed (%s: %s); retrying", type(exc).__name__, exc)
    sub.wake_later(sub.hub.poll_interval)


async def deploy_messages(
    services: Services,
    hub: Hub,
    deploy_id: str,
    cursor: DeployCursor,
    options: StreamOptions,
    valid: Callable[[], Awaitable[bool]],
) -> AsyncIterator[bytes]:
    """The deploy stream after ``cursor``, following new rows until the deploy ends."""
    records: list[StoredEvent] = []  # the stream as this subscriber read it itself
    sent_version = cursor.version  # events up to here are sent (or were before a reconnect)
    last_seq = cursor.seq  # None until the first read finds where the lines resume
    with hub.subscribe(
        deploy_id,
        source=lambda: DeploySource(services, deploy_id, options),
        capacity=options.window,
    ) as sub:
        feed = sub.feed
        assert feed is not None
        source = feed.source
        assert isinstance(source, DeploySource)
        while True:
            if not await _woken(sub, valid, options):
                return
            while True:
                # Caught up: the next messages come from the shared window.
                taken = feed.take((sent_version, 1, last_seq)) if last_seq is not None else None
                if taken is not None:
                    chunk, (version, kind, seq) = taken
                    if chunk:
                        sent_version = version
                        if kind:
                            last_seq = seq
                        yield b"".join(chunk)
                        continue
                    # All the window holds is sent. Equal, not at least: a stream that read
                    # beyond the feed by itself waits for the feed to get there.
                    if source.end is not None and sent_version == source.end_version:
                        yield source.end
                        return
                    break
                if last_seq is not None and not feed.started:
                    break  # the feed wakes everyone once it has started
                # Behind the window (or just subscribed): read from the database.
                try:
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
                except DATABASE_AWAY as exc:
                    _away(sub, exc)
                    break
                sub.counted_own_read()
                records.extend(read.events)
                if not records:  # pragma: no cover - a visible deploy has its Requested event
                    return
                items, sent_version, full = await deploy_page(
                    records, read, sent_version, options.log_batch
                )
                last_seq = read.logs[-1].seq if read.logs else read.after_seq
                if items:
                    yield b"".join(payload for _, payload in items)
                if full:
                    continue
                latest = view_of(records)
                if latest.status in TERMINAL_STATUSES and sent_version >= latest.version:
                    yield encode_end(latest)
                    return
                if not items:
                    break  # nothing new: wait (never spin on the database)


# ---------------------------------------------------------------- the global feed


def encode_feed_event(event: StoredEvent) -> bytes:
    return message(_json(EventOut.of(event)), event=event.type, id=str(event.position)).encode()


class AllEventsSource:
    """The shared feed of the global stream (service.notify.FeedSource): every event after the
    last position read, in position order. Gap-free because appends are serialised
    (service.store.append): once position ``p`` is visible, every smaller position that will
    ever commit already has, so "position > last read" never skips a late commit."""

    def __init__(self, services: Services, options: StreamOptions) -> None:
        self.services = services
        self.options = options

    async def start(self) -> int:
        async with self.services.pool.connection() as conn:
            cur = await conn.execute(LAST_POSITION)
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def read(self, after: int) -> Batch[int]:
        batch = await _read_all_after(self.services, after, self.options.event_batch)
        items = [(e.position, encode_feed_event(e)) for e in batch]
        head = batch[-1].position if batch else after
        return Batch(items, head, more=len(batch) >= self.options.event_batch)


async def all_event_messages(
    services: Services,
    hub: Hub,
    after: int,
    options: StreamOptions,
    valid: Callable[[], Awaitable[bool]],
) -> AsyncIterator[bytes]:
    """Every event after position ``after``, in position order, following new ones."""
    with hub.subscribe(
        None, source=lambda: AllEventsSource(services, options), capacity=options.window
    ) as sub:
        feed = sub.feed
        assert feed is not None
        fresh = True  # a new stream reads once itself, from its resume id
        while True:
            if not await _woken(sub, valid, options):
                return
            while True:
                taken = None if fresh else feed.take(after)
                if taken is not None:
                    chunk, after = taken
                    if not chunk:
                        break
                    yield b"".join(chunk)
                    continue
                if not fresh and not feed.started:
                    break  # the feed wakes everyone once it has started
                fresh = False
                try:
                    batch = await shielded(_read_all_after(services, after, options.event_batch))
                except DATABASE_AWAY as exc:
                    _away(sub, exc)
                    break
                sub.counted_own_read()
                if not batch:
                    break  # nothing new: wait (never spin on the database)
                after = batch[-1].position
                yield b"".join(encode_feed_event(e) for e in batch)


async def _read_all_after(services: Services, after: int, limit: int) -> list[StoredEvent]:
    async with services.pool.connection() as conn:
        return await store.read_all_after(conn, after, limit)
