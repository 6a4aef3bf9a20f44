"""The Docker runner's cap: places counted from the Docker API plus reservations.

A place is held by a labelled container in any state but exited/dead (leftovers of a crashed
worker included: they still run), or by a reservation -- an ``flock`` on one of ``cap`` files
under ``<data dir>/docker-places/<label>/`` -- taken by ``reserve()`` before the caller knows
which deploy it will run, and given up once that run's container exists (for a moment both
count: the cap errs on the safe side). A reservation dies with its process; a container does
not, so a dead worker's running containers keep their places until recovery stops them.

Counting and reserving happen under a lock shared by every runner on the host (an fcntl lock
file), so two workers on one engine together never exceed the cap. Waiting costs no busy loop:
the engine's event stream (``die``, ``stop``, ``destroy`` of labelled containers) and releases
in this process wake a waiter at once; another process's released reservation is noticed by a
short poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors

from service.runners._common import Wakeups, in_thread
from service.runners.base import RunnerError
from service.runners.docker_engine import ENGINE_POLL_MAX, Engine, engine_unreachable

STOPPED_STATES = ("exited", "dead")
POLL_MIN, POLL_MAX = 0.1, 1.0

_wakeups = Wakeups()  # in-process: places directory -> its waiters


class FileLock:
    """An exclusive fcntl lock on a file, usable across processes: ``async with lock(): ...``.

    Each acquisition opens its own file description, so two holders in one process exclude
    each other too. The blocking ``flock`` runs in its own thread; a cancelled wait never
    leaves the lock taken."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self) -> AbstractAsyncContextManager[None]:
        return self._hold()

    @asynccontextmanager
    async def _hold(self) -> AsyncIterator[None]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        await in_thread(_flock_or_close, fd, orphan=os.close)
        try:
            yield
        finally:
            os.close(fd)  # releases the lock


def _flock_or_close(fd: int) -> int:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


PLACE_LABEL = "tfdeploy.place"  # the reservation a container was made from


def active_containers(api: docker.APIClient, label_filter: str) -> list[dict[str, Any]]:
    """Labelled containers that hold a place under the cap: any state but exited/dead.

    Docker lists a container being removed as "removing" whatever it was before; such a one
    counts only while it still runs (after a normal run it had exited already)."""
    active = []
    for row in api.containers(all=True, filters={"label": label_filter}):
        state = row.get("State")
        if state in STOPPED_STATES:
            continue
        if state == "removing":
            try:
                if not api.inspect_container(row["Id"])["State"].get("Running"):
                    continue
            except docker.errors.NotFound:
                continue
        active.append(row)
    return active


def count_active(api: docker.APIClient, label_filter: str) -> int:
    return len(active_containers(api, label_filter))


@dataclass(eq=False)
class DockerReservation:
    """A place held before its container exists."""

    places: DockerPlaces
    index: int
    fd: int
    token: str  # this holding of the file (a file is held again and again)
    _released: bool = field(default=False, repr=False)

    @property
    def tag(self) -> str:
        """Written on the container made from it (PLACE_LABEL), so that the place is not
        counted twice while both exist."""
        return f"{self.places.tag}:{self.index}:{self.token}"

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        os.close(self.fd)
        _wakeups.notify(self.places.key)


class DockerPlaces:
    def __init__(
        self,
        engine: Engine,
        directory: Path,
        cap: int,
        label_filter: str,
        cap_lock: Callable[[], AbstractAsyncContextManager[Any]],
    ) -> None:
        self.engine = engine
        self.dir = directory
        self.key = str(directory)
        self.cap = cap
        self.label_filter = label_filter
        self.cap_lock = cap_lock
        digest = hashlib.sha256(f"{socket.gethostname()}:{directory}".encode()).hexdigest()
        self.tag = digest[:16]

    def _path(self, i: int) -> Path:
        return self.dir / f"place-{i}.lock"

    def held_reservations(self) -> set[str]:
        """The tags of the reservations held on this host, by any process."""
        held = set()
        for i in range(self.cap):
            try:
                fd = os.open(self._path(i), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                # Its holder wrote its token before it made any container with it.
                token = os.pread(fd, 64, 0).decode(errors="replace").strip()
                held.add(f"{self.tag}:{i}:{token}")
            finally:
                os.close(fd)
        return held

    def _take(self) -> DockerReservation | None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for i in range(self.cap):
            fd = os.open(self._path(i), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            token = secrets.token_hex(6)
            os.ftruncate(fd, 0)
            os.pwrite(fd, token.encode(), 0)
            return DockerReservation(self, i, fd, token)
        return None

    def count_sync(self) -> int:
        # Reservations first: one released after this read had made its container already,
        # so the container list that follows shows it -- no place is missed.
        held = self.held_reservations()
        active = active_containers(self.engine.api, self.label_filter)
        made = {(row.get("Labels") or {}).get(PLACE_LABEL) for row in active}
        return len(active) + len(held - made)

    async def count(self) -> int:
        return int(await self.engine.call(self.count_sync))

    async def reserve(self, before: Callable[[], Awaitable[None]]) -> DockerReservation:
        """Wait for a place and hold it. ``before()`` runs first on every round (the image
        check: an engine that went away may have come back without it). An engine that does
        not answer is waited for up to ``engine_wait`` (the deploy stays queued), then
        RunnerError."""
        loop = asyncio.get_running_loop()
        down_since: float | None = None
        pause, delay = 0.5, POLL_MIN
        events: Any = None
        with _wakeups.waiting(self.key) as wake:
            try:
                while True:
                    wake.clear()
                    try:
                        await before()
                        if events is None:
                            # Subscribed BEFORE counting, so nothing that frees a place between
                            # the count and the wait is missed.
                            events = await self.engine.call(self._subscribe)
                            threading.Thread(
                                target=_forward_events, args=(events, loop, wake), daemon=True
                            ).start()
                        async with self.cap_lock():
                            got = self._take() if await self.count() < self.cap else None
                    except RunnerError as exc:
                        if not engine_unreachable(exc):
                            raise
                        now = time.monotonic()
                        down_since = now if down_since is None else down_since
                        if now - down_since >= self.engine.engine_wait:
                            raise RunnerError(
                                f"Docker engine unreachable for {self.engine.engine_wait:g}s: {exc}"
                            ) from exc
                        _close(events)
                        events = None
                        await asyncio.sleep(pause)
                        pause = min(pause * 2, ENGINE_POLL_MAX)
                        continue
                    down_since, pause = None, 0.5
                    if got is not None:
                        return got
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), delay)
                    delay = POLL_MIN if wake.is_set() else min(delay * 2, POLL_MAX)
            finally:
                _close(events)

    def _subscribe(self) -> Any:
        return self.engine.api.events(
            decode=True,
            filters={
                "type": "container",
                "label": self.label_filter,
                "event": ["die", "destroy", "stop"],
            },
        )


def _forward_events(events: Any, loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
    """Wake the waiter at each engine event, until the stream is closed (or breaks)."""
    try:
        for _ in events:
            loop.call_soon_threadsafe(wake.set)
    except Exception:  # closed under us, or the engine went away
        pass
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(wake.set)


def _close(events: Any) -> None:
    if events is not None:
        threading.Thread(target=_close_quietly, args=(events,), daemon=True).start()


def _close_quietly(events: Any) -> None:
    with contextlib.suppress(Exception):
        events.close()
