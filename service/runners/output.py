"""One run's output, bounded everywhere: bytes in, lines out, steps tracked.

- ``LineCutter`` splits bytes into lines, looking only at what arrived (no rescans) and never
  holding more than ``MAX_LINE_BYTES`` of a line: the rest of a longer line is counted, not
  kept, and the line ends with ``…[line cut: N bytes]``.
- ``RunOutput`` takes the raw chunks of a run's stdout/stderr, forwards lines to the sink
  (which may wait: backpressure), counts bytes against ``max_output_bytes`` (past it: no more
  lines are kept and ``on_limit`` fires, once), and reads the step markers the run script
  writes to stderr (``StepRecord``), which attribute stderr lines to the step they came from
  (``diagnostics``: the failed step's, bounded) and are not forwarded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from service.runners.base import LineSink, Step, StepName

log = logging.getLogger("tfdeploy.runner")

MAX_LINE_BYTES = 16 * 1024
DIAGNOSTICS_BYTES = 16 * 1024  # of the failed step's stderr
ERROR_LINES = 20  # how many trailing output lines make up RunResult.error


class LineCutter:
    """Bytes in, complete text lines out (UTF-8, undecodable bytes replaced, no line ends)."""

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._cut = 0  # bytes of the current line not kept

    def feed(self, data: bytes) -> list[str]:
        out: list[str] = []
        start, size = 0, len(data)
        while start < size:
            nl = data.find(b"\n", start)
            end = size if nl < 0 else nl
            self._take(data, start, end)
            if nl < 0:
                break
            out.append(self._line())
            start = nl + 1
        return out

    def _take(self, data: bytes, start: int, end: int) -> None:
        if self._cut:  # already over: count only
            self._cut += end - start
            return
        room = self.limit - len(self._buf)
        if end - start <= room:
            self._buf += data[start:end]
            return
        keep = start + room
        # Cut at a character boundary: never keep half of a UTF-8 sequence.
        while keep > start and (data[keep] & 0xC0) == 0x80:
            keep -= 1
        self._buf += data[start:keep]
        self._cut = end - keep

    def _line(self) -> str:
        raw = bytes(self._buf)
        if raw.endswith(b"\r") and not self._cut:
            raw = raw[:-1]
        text = raw.decode("utf-8", errors="replace")
        if self._cut:
            text += f"…[line cut: {self._cut} bytes]"
        self._buf.clear()
        self._cut = 0
        return text

    def flush(self) -> list[str]:
        if not self._buf and not self._cut:
            return []
        return [self._line()]




class OutputTail:
    """The last lines of output, for RunResult.error."""

    def __init__(self, size: int = ERROR_LINES) -> None:
        self.all: deque[str] = deque(maxlen=size)
        self.stderr: deque[str] = deque(maxlen=size)

    def add(self, stream: str, line: str) -> None:
        if stream == "system":
            return
        self.all.append(line)
        if stream == "stderr":
            self.stderr.append(line)

    def error(self) -> str:
        lines = self.stderr if any(x.strip() for x in self.stderr) else self.all
        return "\n".join(lines).strip()


class StepRecord:
    """Which steps of a run began and ended, with their exit codes, from the run script's
    ``begin NAME`` / ``end NAME RC`` records (markers on stderr, or its status file)."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.done: list[StepName] = []
        self.current: StepName | None = None
        self.failed: StepName | None = None
        self.failed_rc: int | None = None
        self.plan_changes: bool | None = None
        self.began = False  # any step at all

    def _step(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    def record(self, text: str) -> bool:
        """Take one ``begin NAME`` / ``end NAME RC`` record; False if it is not one."""
        parts = text.split()
        if len(parts) == 2 and parts[0] == "begin" and (step := self._step(parts[1])):
            self.current = step.name
            self.began = True
            return True
        if len(parts) == 3 and parts[0] == "end" and parts[2].isdigit():
            step = self._step(parts[1])
            if step is None:
                return False
            rc = int(parts[2])
            self.current = None
            if step.name == "plan" and step.detailed_exitcode and rc in (0, 2):
                self.plan_changes = rc == 2
                rc = 0
            if rc == 0:
                self.done.append(step.name)
            elif self.failed is None:
                self.failed, self.failed_rc = step.name, rc
            return True
        return False

    def failed_step(self, exit_code: int) -> StepName | None:
        """The step that failed: the one that ended non-zero, else (the run stopped or was
        stopped) the one running, else the first that never ran."""
        if self.failed is not None:
            return self.failed
        if exit_code == 0 and self.current is None:
            return None
        if self.current is not None:
            return self.current
        for step in self.steps:
            if step.name not in self.done:
                return step.name
        return None if exit_code == 0 else self.steps[-1].name


class RunOutput:
    """Raw output of one run in, bounded lines out (module docstring)."""

    def __init__(
        self,
        sink: LineSink,
        steps: list[Step],
        *,
        max_bytes: int,
        marker: str,
        on_limit: Callable[[], None],
    ) -> None:
        self.sink = sink
        self.max_bytes = max_bytes
        self.marker = marker  # "<prefix> " at the start of a marker line
        self.on_limit = on_limit
        self.cutters = {"stdout": LineCutter(), "stderr": LineCutter()}
        self.record = StepRecord(steps)
        self.tail = OutputTail()
        self.total = 0
        self.limited = False
        self._diag: list[str] = []
        self._diag_bytes = 0
        self.diagnostics: dict[str, str] = {}  # step -> its stderr (bounded), once it ended
        self._lock = asyncio.Lock()  # lines of both streams reach the sink one at a time

    async def feed(self, stream: str, data: bytes) -> None:
        self.total += len(data)
        lines = self.cutters[stream].feed(data)
        for line in lines:
            await self._line(stream, line)
        if not self.limited and self.total > self.max_bytes:
            self.limited = True
            await self.say(
                "system",
                f"output limit of {self.max_bytes} bytes reached: interrupting terraform "
                "(SIGINT); further output is not kept",
            )
            self.on_limit()

    async def finish(self) -> None:
        """The streams ended: what is left of their last lines goes out."""
        for stream, cutter in self.cutters.items():
            for line in cutter.flush():
                await self._line(stream, line)
        if self.record.current is not None:
            self._end_diagnostics(self.record.current)

    async def say(self, stream: str, line: str) -> None:
        async with self._lock:
            self.tail.add(stream, line)
            await emit(self.sink, stream, line)

    async def _line(self, stream: str, line: str) -> None:
        if stream == "stderr" and line.startswith(self.marker):
            text = line[len(self.marker):]
            ending = self.record.current
            if self.record.record(text):
                if text.startswith("begin"):
                    self._diag, self._diag_bytes = [], 0
                elif ending is not None:
                    self._end_diagnostics(ending)
                return
        if stream == "stderr" and self._diag_bytes < DIAGNOSTICS_BYTES:
            self._diag.append(line)
            self._diag_bytes += len(line) + 1
        if self.limited:
            return
        await self.say(stream, line)

    def _end_diagnostics(self, step: str) -> None:
        text = "\n".join(self._diag).strip()
        if self._diag_bytes >= DIAGNOSTICS_BYTES:
            text += "\n…"
        self.diagnostics[step] = text[: DIAGNOSTICS_BYTES + 2]
        self._diag, self._diag_bytes = [], 0


async def emit(on_line: LineSink, stream: str, line: str) -> None:
    """Forward a line; a failing sink must not break the run."""
    try:
        await on_line(stream, line)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("line sink failed")
