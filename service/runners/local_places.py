"""The local runner's cap: ``max_concurrency`` lock files per host, one ``flock`` per place.

A place is an exclusive ``flock`` on ``<data dir>/local-slots/slot-<i>.lock``. The run hands
the locked descriptor to the process tree that runs terraform (service/runners/local.py), so
the place is held as long as terraform runs -- also after the worker that started it died --
and as long as the worker keeps its own copy (until the outcome is recorded). The kernel drops
the lock when the last holder is gone: nothing leaks.

Waiting costs no busy loop: a release in this process wakes its waiters at once; releases by
other processes (another worker, an orphaned terraform ending) are noticed by a short poll
(50 ms growing to 0.5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from service.runners._common import Wakeups
from service.runners.base import RunnerError

_wakeups = Wakeups()  # in-process: slots dir -> its waiters
POLL_MIN, POLL_MAX = 0.05, 0.5


@dataclass(eq=False)
class LocalPlace:
    """A held place: the locked descriptor of slot file ``index``."""

    places: LocalPlaces
    index: int
    fd: int
    _released: bool = field(default=False, repr=False)

    def share(self) -> LocalPlace:
        """Another holder of the same lock (the same open file description): the place stays
        held until every holder released it."""
        return LocalPlace(self.places, self.index, os.dup(self.fd))

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        os.close(self.fd)
        _wakeups.notify(self.places.key)


class LocalPlaces:
    def __init__(self, directory: Path, cap: int) -> None:
        self.dir = directory
        self.key = str(directory)
        self.cap = cap

    def path(self, i: int) -> Path:
        return self.dir / f"slot-{i}.lock"

    def _try_lock(self) -> tuple[int, int] | None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for i in range(self.cap):
            fd = os.open(self.path(i), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            return i, fd
        return None

    def count(self) -> int:
        """Places held on this host, by any process (probed with a shared non-blocking lock)."""
        held = 0
        for i in range(self.cap):
            try:
                fd = os.open(self.path(i), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held += 1
            finally:
                os.close(fd)
        return held

    async def reserve(self) -> LocalPlace:
        delay = POLL_MIN
        with _wakeups.waiting(self.key) as event:
            while True:
                event.clear()
                try:
                    got = self._try_lock()
                except OSError as exc:
                    raise RunnerError(f"cannot use the slot locks in {self.dir}: {exc}") from exc
                if got is not None:
                    return LocalPlace(self, *got)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), delay)
                delay = min(delay * 2, POLL_MAX)
