"""The fan-out: one LISTEN connection per process, and one shared read per wake-up.

PostgreSQL notifies on two channels (migration 0003), with ids only in the payload:

- ``tfdeploy_events``: ``"<position> <deploy_id> <version>"`` for every appended event;
- ``tfdeploy_logs``: ``"<deploy_id>"``, once per transaction that writes log lines (migration 0011).

The ``Hub`` holds ONE dedicated connection (autocommit, outside the pool) listening on both. A
notification is only a hint to look: nothing depends on what it says.

Shared feeds. The streams (service.api.streams) subscribe with a ``FeedSource``; subscribers of
the same stream (one deploy, or every event) share one ``Feed``. When the hub is told that the
stream may have grown, the feed reads the new rows ONCE (its own task, so no subscriber ever
waits for another) and keeps them, already encoded, in a bounded window; then it wakes its
subscribers. A subscriber holds nothing but its cursor: on a wake-up it takes what follows its
cursor from the window. One that is behind the window (just subscribed, resuming from an old id,
or too slow to keep up while the window moved on) reads the database itself, from its cursor,
until it is inside the window again. So a thousand caught-up subscribers cost one read per
wake-up, and a frozen one costs nothing but its cursor (its client is dropped by the stream's
send timeout).

The window is exact: it holds every item with a key in ``(base, head]``, where ``head`` is where
the feed's last read ended and ``base`` where the oldest kept item starts. That needs each read
to return a gap-free continuation of the previous one, which the sources guarantee (the global
feed because appends are serialised, see service.store.append; a deploy because its events and
log lines share a lock and are read from one snapshot).

Subscribers without a source (``hub.subscribe(deploy_id)``) are woken directly, as a flag.
Waking is level-triggered and coalescing: a thousand notifications while a feed reads cost one
more read.

Nothing is missed:

- a subscriber reads once as soon as it subscribes (a fresh subscription starts awake);
- whenever the listening connection is (re)established, every feed reads and every direct
  subscriber is woken, since rows may have committed while nobody was listening;
- while the connection is down (or not yet up), the same happens every ``poll_interval``
  seconds, so streams keep flowing by polling while the hub reconnects with backoff;
- a feed whose read fails (the database is away) tries again every ``poll_interval`` seconds
  while it has subscribers;
- an idle connection is checked every ``heartbeat`` seconds (``SELECT 1``) so a silently dead
  one is noticed too, not only one that PostgreSQL closes (``pg_terminate_backend``).

The hub starts lazily on the first subscription (``start`` may also be awaited up front) and is
stopped with ``close`` (the app does it on shutdown; ``Services.close`` too).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import psycopg

log = logging.getLogger("tfdeploy.notify")

EVENTS_CHANNEL = "tfdeploy_events"
LOGS_CHANNEL = "tfdeploy_logs"

class _Ordered(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


K = TypeVar("K", bound=_Ordered)  # where an item sits in its stream: an int, a tuple of ints


@dataclass(slots=True)
class Batch(Generic[K]):
    """One read of a source: the items after the previous head, in order, and the new head."""

    items: list[tuple[K, bytes]]
    head: K
    more: bool = False  # a full page: read again at once


class FeedSource(Protocol[K]):
    """Reads one stream for a ``Feed``. ``start`` says where the stream ends now (the feed
    covers what follows); ``read(after)`` returns every item after ``after`` that has
    committed, in order and without gaps (``after`` is always the head the previous call
    returned). Calls never overlap."""

    async def start(self) -> K: ...

    async def read(self, after: K) -> Batch[K]: ...


class Feed(Generic[K]):
    """The shared, bounded window of one stream (see the module's docstring)."""

    def __init__(self, hub: Hub, key: str | None, source: FeedSource[K], capacity: int) -> None:
        self.hub = hub
        self.key = key
        self.source = source
        self.capacity = max(1, capacity)
        self.keys: list[K] = []
        self.payloads: list[bytes] = []
        self.base: K | None = None  # the window holds every item in (base, head]
        self.head: K | None = None  # None until the first read
        self.subs: set[Subscription] = set()
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        self.reads = 0

    @property
    def started(self) -> bool:
        return self.head is not None

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, cursor: K, max_bytes: int = 256 * 1024) -> tuple[list[bytes], K] | None:
        """What follows ``cursor`` in the window (at least one item if any, then up to about
        ``max_bytes``) and the key of the last one taken (``cursor`` if none); None when the
        window cannot say: not started, or ``cursor`` is before it (read the database)."""
        if self.base is None or cursor < self.base:
            return None
        start = bisect.bisect_right(self.keys, cursor)
        end, size = start, 0
        while end < len(self.keys) and (end == start or size < max_bytes):
            size += len(self.payloads[end])
            end += 1
        if end == start:
            return [], cursor
        return self.payloads[start:end], self.keys[end - 1]

    def poke(self) -> None:
        """The stream may have grown: read (once more, if a read is under way)."""
        self._dirty = True
        if (self._task is None or self._task.done()) and self.subs:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"tfdeploy-feed-{self.key or 'all'}"
            )

    def stop(self) -> asyncio.Task[None] | None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    async def _run(self) -> None:
        failures = 0
        while self._dirty and self.subs:
            self._dirty = False
            try:
                if self.head is None:
                    self.base = self.head = await self.source.start()
                    self.reads += 1
                    self.hub.shared_reads += 1
                    self._wake()
                    continue  # read again only if told to since
                while True:
                    batch = await self.source.read(self.head)
                    self.reads += 1
                    self.hub.shared_reads += 1
                    self._extend(batch)
                    self._wake()
                    if not batch.more:
                        break
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: try again while anyone listens
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "shared read of %s failed (%s: %s); retrying every %ss",
                    self.key or "the event feed",
                    type(exc).__name__,
                    exc,
                    self.hub.poll_interval,
                )
                await asyncio.sleep(self.hub.poll_interval)
                self._dirty = True

    def _extend(self, batch: Batch[K]) -> None:
        for key, payload in batch.items:
            self.keys.append(key)
            self.payloads.append(payload)
        self.head = batch.head
        excess = len(self.keys) - self.capacity
        if excess > 0:  # forget the oldest; a subscriber still before them reads the database
            self.base = self.keys[excess - 1]
            del self.keys[:excess]
            del self.payloads[:excess]

    def _wake(self) -> None:
        # Everyone, not only those with something new in the window: one behind it, or one
        # that read past the window's head by itself, looks again too.
        for sub in list(self.subs):
            sub.wake()


class Subscription:
    """One subscriber's interest (a deploy id, or every event), its wake-up flag and, when it
    subscribed with a source, the shared ``feed`` of its stream.

    Use as a context manager (``with hub.subscribe(...) as sub``) or call ``close``; closing is
    idempotent and is what releases the subscriber from the hub.
    """

    def __init__(self, hub: Hub, deploy_id: str | None, feed: Feed[Any] | None = None) -> None:
        self.hub = hub
        self.deploy_id = deploy_id  # None: every event
        self.feed = feed
        # A flag and at most one waiting future, not an asyncio.Event with wait_for: that makes
        # a task per wait, which a thousand streams woken at once pay a thousand times.
        self._flag = True  # read once at the start
        self._waiter: asyncio.Future[bool] | None = None
        self.closed = False
        self.own_reads = 0  # reads of its own (catching up), not from the shared window
        self._timer: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def wake_later(self, delay: float) -> None:
        """Wake after ``delay`` seconds (after a failed read: try again)."""
        if self._timer is None or self._timer.cancelled():
            self._timer = asyncio.get_running_loop().call_later(delay, self._wake_timer)

    def _wake_timer(self) -> None:
        self._timer = None
        self.wake()

    def counted_own_read(self) -> None:
        self.own_reads += 1
        self.hub.own_reads += 1

    async def wait(self, within: float | None = None) -> bool:
        """Until woken (True) or ``within`` seconds passed (False); clears the flag, so call
        this before reading: whatever commits after the read wakes the next ``wait``."""
        if not self._flag:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = None if within is None else loop.call_later(within, _time_up, waiter)
            try:
                if not await waiter:
                    return False
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        self._flag = False
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
            self.hub._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _time_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Hub:
    """The process's LISTEN connection and its subscribers."""

    def __init__(
        self,
        database_url: str,
        *,
        poll_interval: float = 0.5,
        heartbeat: float = 30.0,
        max_backoff: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.database_url = database_url
        self.poll_interval = poll_interval
        self.heartbeat = heartbeat
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self._by_deploy: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._feeds: dict[str | None, Feed[Any]] = {}  # by deploy id; None: every event
        self._task: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.connected = asyncio.Event()  # set while LISTEN is in effect
        # Observability (and tests): how often the connection was (re)established, and the
        # backend pid of the current one.
        self.connects = 0
        self.backend_pid: int | None = None
        self.notifications = 0
        self.shared_reads = 0  # reads by feeds, for all their subscribers at once
        self.own_reads = 0  # reads by subscribers catching up on their own
        self.closing = False  # the process is shutting down: streams end (``shutdown``)

    # ------------------------------------------------------------ subscribers

    def subscribe(
        self,
        deploy_id: str | None = None,
        source: Callable[[], FeedSource[Any]] | None = None,
        capacity: int = 2000,
    ) -> Subscription:
        """Register interest in one deploy (its events and log lines) or, with None, in every
        event. With ``source`` (called only if this stream has no feed yet), the subscriber
        shares the stream's ``Feed`` (``sub.feed``, a window of at most ``capacity`` items) and
        is woken after each of its reads; without, it is woken by each notification. Starts the
        hub if it is not running (needs a running event loop)."""
        key = str(deploy_id) if deploy_id is not None else None
        feed = None
        if source is not None:
            feed = self._feeds.get(key)
            if feed is None:
                feed = self._feeds[key] = Feed(self, key, source(), capacity)
        sub = Subscription(self, key, feed)
        if feed is not None:
            feed.subs.add(sub)
            feed.poke()
        elif key is None:
            self._all.add(sub)
        else:
            self._by_deploy.setdefault(key, set()).add(sub)
        self._ensure_started()
        return sub

    def _remove(self, sub: Subscription) -> None:
        feed = sub.feed
        if feed is not None:
            feed.subs.discard(sub)
            if not feed.subs and self._feeds.get(feed.key) is feed:
                # Its window goes with it; a read under way finishes and ends its task.
                del self._feeds[feed.key]
            return
        if sub.deploy_id is None:
            self._all.discard(sub)
            return
        subs = self._by_deploy.get(sub.deploy_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_deploy[sub.deploy_id]

    @property
    def subscriber_count(self) -> int:
        direct = len(self._all) + sum(len(s) for s in self._by_deploy.values())
        return direct + sum(len(f.subs) for f in self._feeds.values())

    @property
    def feeds(self) -> dict[str | None, Feed[Any]]:
        """The live feeds by deploy id (None: every event); for observability and tests."""
        return dict(self._feeds)

    def _everyone(self) -> Iterator[Subscription]:
        yield from list(self._all)
        for subs in list(self._by_deploy.values()):
            yield from list(subs)

    def wake_all(self) -> None:
        """Every stream may have grown: each feed reads, each direct subscriber is woken."""
        for sub in self._everyone():
            sub.wake()
        for feed in list(self._feeds.values()):
            feed.poke()

    def _changed(self, deploy_id: str | None) -> None:
        subs = self._all if deploy_id is None else self._by_deploy.get(deploy_id, set())
        for sub in list(subs):
            sub.wake()
        feed = self._feeds.get(deploy_id)
        if feed is not None:
            feed.poke()

    def _dispatch(self, channel: str, payload: str) -> None:
        self.notifications += 1
        parts = payload.split()
        if channel == EVENTS_CHANNEL and len(parts) >= 2:
            deploy_id, everyone = parts[1], True
        elif channel == LOGS_CHANNEL and parts:
            deploy_id, everyone = parts[0], False
        else:  # not ours: wake everyone rather than guess
            self.wake_all()
            return
        self._changed(deploy_id)
        if everyone:
            self._changed(None)

    # ------------------------------------------------------------ lifecycle

    def _ensure_started(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tfdeploy-notify")
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name="tfdeploy-poll")

    async def start(self, within: float | None = None) -> bool:
        """Start listening (if not yet); with ``within``, wait that long for LISTEN to be in
        effect. Says whether it is."""
        self._ensure_started()
        if within is None:
            return self.connected.is_set()
        try:
            await asyncio.wait_for(self.connected.wait(), within)
        except TimeoutError:
            return False
        return True

    def shutdown(self) -> None:
        """The process is stopping: wake every subscriber so that its stream sees ``closing``
        and ends now (its client reconnects, to another process if there is one)."""
        self.closing = True
        for sub in self._everyone():
            sub.wake()
        for feed in list(self._feeds.values()):
            feed._wake()

    async def close(self) -> None:
        """Stop listening and close the connection. Subscribers are woken (they find nothing
        new, and keep their registration); a later ``subscribe`` or ``start`` starts again."""
        tasks = [t for t in (self._task, self._poller) if t is not None]
        self._task = self._poller = None
        for feed in list(self._feeds.values()):
            if (task := feed.stop()) is not None:
                tasks.append(task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._drop_connection()
        for sub in self._everyone():
            sub.wake()
        for feed in list(self._feeds.values()):
            feed._wake()

    async def _drop_connection(self) -> None:
        self.connected.clear()
        self.backend_pid = None
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _poll(self) -> None:
        """While LISTEN is not in effect, wake everyone every ``poll_interval`` seconds."""
        while True:
            await asyncio.sleep(self.poll_interval)
            if not self.connected.is_set():
                self.wake_all()

    async def _run(self) -> None:
        backoff, failures = 0.05, 0
        while True:
            connects = self.connects
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure means: poll, and reconnect
                if self.connects > connects:  # it was up: start over with a short wait
                    backoff, failures = 0.05, 0
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "LISTEN connection %s (%s: %s); streams poll every %ss until it is back",
                    "lost" if self.connects > connects else "failed",
                    type(exc).__name__,
                    exc,
                    self.poll_interval,
                )
            finally:
                await self._drop_connection()
            await asyncio.sleep(backoff * (1 + random.random() / 2))
            backoff = min(backoff * 2, self.max_backoff)

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self.database_url,
            autocommit=True,
            application_name="tfdeploy-listen",
            connect_timeout=max(1, int(self.connect_timeout)),
            # A half-open TCP connection (a vanished host) is noticed by the heartbeat below;
            # keepalives make the kernel notice sooner still.
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
        self._conn = conn
        await conn.execute(f"LISTEN {EVENTS_CHANNEL}")
        await conn.execute(f"LISTEN {LOGS_CHANNEL}")
        self.backend_pid = conn.info.backend_pid
        self.connects += 1
        self.connected.set()
        if self.connects > 1:
            log.info("LISTEN connection re-established (backend %s)", self.backend_pid)
        # Whatever committed while nobody listened (or before the first LISTEN) is found by
        # one read per feed (and per direct subscriber).
        self.wake_all()
        while True:
            async for notify in conn.notifies(timeout=self.heartbeat):
                self._dispatch(notify.channel, notify.payload)
            # No notification for ``heartbeat`` seconds: is the connection still there?
            await asyncio.wait_for(conn.execute("SELECT 1"), self.connect_timeout)


def hub_of(services: Any) -> Hub:
    """The process's hub, kept in ``services.extras["hub"]`` (created on first use)."""
    hub = services.extras.get("hub")
    if hub is None:
        hub = services.extras["hub"] = Hub(services.database_url)
    return hub  # type: ignore[no-any-return]
