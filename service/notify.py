"""The fan-out: one LISTEN connection per process wakes every live stream of that process.

PostgreSQL notifies on two channels (migration 0003), with ids only in the payload:

- ``tfdeploy_events``: ``"<position> <deploy_id> <version>"`` for every appended event;
- ``tfdeploy_logs``: ``"<deploy_id> <seq>"`` for every log line.

The ``Hub`` holds ONE dedicated connection (autocommit, outside the pool) listening on both, and
wakes the subscribers that care: a subscriber of one deploy on both channels for that deploy, an
"all events" subscriber on every event. A wake-up is only a flag (``Subscription.wait``): the
subscriber then reads the rows itself, from where it left off, so it never depends on what a
notification said, only on being told to look. Waking is level-triggered and coalescing: a
thousand notifications while a subscriber is busy cost it one more read, and the hub never waits
for a subscriber (a slow client cannot hold up the others).

Nothing is missed:

- a subscriber reads once as soon as it subscribes (a fresh subscription starts awake);
- whenever the listening connection is (re)established, every subscriber is woken once, since
  events may have committed while nobody was listening;
- while the connection is down (or not yet up), every subscriber is woken every
  ``poll_interval`` seconds, so streams keep flowing by polling while the hub reconnects with
  backoff;
- an idle connection is checked every ``heartbeat`` seconds (``SELECT 1``) so a silently dead
  one is noticed too, not only one that PostgreSQL closes (``pg_terminate_backend``).

The hub starts lazily on the first subscription (``start`` may also be awaited up front) and is
stopped with ``close`` (the app does it on shutdown; ``Services.close`` too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import psycopg

log = logging.getLogger("tfdeploy.notify")

EVENTS_CHANNEL = "tfdeploy_events"
LOGS_CHANNEL = "tfdeploy_logs"


class Subscription:
    """One subscriber's interest (a deploy id, or every event) and its wake-up flag.

    Use as a context manager (``with hub.subscribe(...) as sub``) or call ``close``; closing is
    idempotent and is what releases the subscriber from the hub.
    """

    def __init__(self, hub: Hub, deploy_id: str | None) -> None:
        self.hub = hub
        self.deploy_id = deploy_id  # None: every event
        self._flag = asyncio.Event()
        self._flag.set()  # read once at the start
        self.closed = False

    def wake(self) -> None:
        self._flag.set()

    async def wait(self, within: float | None = None) -> bool:
        """Until woken (True) or ``within`` seconds passed (False); clears the flag, so call
        this before reading: whatever commits after the read wakes the next ``wait``."""
        if not self._flag.is_set():
            if within is None:
                await self._flag.wait()
            else:
                try:
                    await asyncio.wait_for(self._flag.wait(), within)
                except TimeoutError:
                    return False
        self._flag.clear()
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        self._task: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.connected = asyncio.Event()  # set while LISTEN is in effect
        # Observability (and tests): how often the connection was (re)established, and the
        # backend pid of the current one.
        self.connects = 0
        self.backend_pid: int | None = None
        self.notifications = 0

    # ------------------------------------------------------------ subscribers

    def subscribe(self, deploy_id: str | None = None) -> Subscription:
        """Register interest in one deploy (its events and log lines) or, with None, in every
        event. Starts the hub if it is not running (needs a running event loop)."""
        sub = Subscription(self, str(deploy_id) if deploy_id is not None else None)
        if sub.deploy_id is None:
            self._all.add(sub)
        else:
            self._by_deploy.setdefault(sub.deploy_id, set()).add(sub)
        self._ensure_started()
        return sub

    def _remove(self, sub: Subscription) -> None:
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
        return len(self._all) + sum(len(s) for s in self._by_deploy.values())

    def _everyone(self) -> Iterator[Subscription]:
        yield from list(self._all)
        for subs in list(self._by_deploy.values()):
            yield from list(subs)

    def wake_all(self) -> None:
        for sub in self._everyone():
            sub.wake()

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
        for sub in list(self._by_deploy.get(deploy_id, ())):
            sub.wake()
        if everyone:
            for sub in list(self._all):
                sub.wake()

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

    async def close(self) -> None:
        """Stop listening and close the connection. Subscribers are woken (they find nothing
        new, and keep their registration); a later ``subscribe`` or ``start`` starts again."""
        tasks = [t for t in (self._task, self._poller) if t is not None]
        self._task = self._poller = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._drop_connection()
        self.wake_all()

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
        # one read per subscriber.
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
