"""An attempt's terraform output on its way to the log table (``service.logs``): buffered,
masked, written in small batches in order, the buffer bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

from service.logs import append_lines
from service.secrets import Masker

log = logging.getLogger("tfdeploy.deployer")

LOG_FLUSH_SECONDS = 0.1
# Output waiting for the log table, at most: past it, ``LogWriter.line`` waits for a flush, and
# with it the runner's reading of terraform's output (backpressure, not memory).
LOG_BUFFER_BYTES = 1024 * 1024


class LogWriter:
    """Buffers terraform's output and writes it in small batches, masked, in order. The buffer
    is bounded (``LOG_BUFFER_BYTES``): a producer faster than the log table waits."""

    def __init__(self, pool: Any, deploy_id: str, attempt: int, masker: Masker) -> None:
        self.pool, self.deploy_id, self.attempt, self.masker = pool, deploy_id, attempt, masker
        self._buffer: list[tuple[str, str]] = []
        self._bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._wake = asyncio.Event()
        self._closed = False
        self._lock = asyncio.Lock()  # one flush at a time keeps lines in order
        self._task = asyncio.create_task(self._flusher())

    async def line(self, stream: str, text: str) -> None:
        while self._bytes >= LOG_BUFFER_BYTES and not self._closed:
            self._room.clear()
            self._wake.set()
            await self._room.wait()
        masked = self.masker.mask(text.rstrip("\n"))
        self._buffer.append((stream, masked))
        self._bytes += len(masked) + 16
        self._wake.set()

    async def flush(self) -> None:
        """Write every buffered line now: called before an outcome event is appended, so a
        deploy's output precedes the event that ends its attempt."""
        await self._flush()

    async def _flush(self) -> None:
        async with self._lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        while self._buffer:
            batch, self._buffer = self._buffer, []
            size, self._bytes = self._bytes, 0
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    # Consecutive lines of one stream go in one call.
                    for stream, group in itertools.groupby(batch, key=lambda x: x[0]):
                        lines = [text for _, text in group]
                        await append_lines(conn, self.deploy_id, self.attempt, stream, lines)
            except Exception:  # a log outage must not fail the deploy; keep the lines
                self._buffer[:0] = batch
                self._bytes += size
                log.exception("log write failed for %s; will retry", self.deploy_id)
                await asyncio.sleep(1)
                if self._closed:
                    return
            else:
                self._room.set()

    async def _flusher(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()
            await asyncio.sleep(LOG_FLUSH_SECONDS)

    async def close(self) -> None:
        self._closed = True
        self._room.set()
        self._wake.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._flush()
