"""Pieces shared by the runners: request validation, line splitting, a thread helper."""

from __future__ import annotations

import asyncio
import codecs
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath
from typing import Any, Protocol, TypeVar

from service.runners.base import LineSink, RunnerError, RunRequest, RunResult

log = logging.getLogger("tfdeploy.runner")

T = TypeVar("T")

# Terraform variable names: letters, digits, underscores and hyphens, not starting with a digit.
VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# What a POSIX shell can ``export``.
SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

ERROR_LINES = 20  # how many trailing output lines make up RunResult.error
DEFAULT_GRACE = 10.0  # seconds between SIGINT and SIGKILL


def validate_request(request: RunRequest) -> None:
    """Reject what could escape the working directory or break the environment."""
    if request.action not in ("apply", "destroy"):
        raise RunnerError(f"unknown action {request.action!r}")
    if request.timeout <= 0:
        raise RunnerError("timeout must be positive")
    for name in request.files:
        safe_relative_path(name)
    for kind, mapping in (("variable", request.variables), ("secret", request.secrets)):
        for name, value in mapping.items():
            if not VAR_NAME.match(name):
                raise RunnerError(f"invalid {kind} name {name!r}")
            if not isinstance(value, str) or "\x00" in value:
                raise RunnerError(f"{kind} {name!r} must be a string without NUL characters")


def safe_relative_path(name: str) -> PurePosixPath:
    if not name or "\x00" in name or "\\" in name:
        raise RunnerError(f"invalid file name {name!r}")
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise RunnerError(f"invalid file name {name!r}")
    return path


def tf_var_env(request: RunRequest, *, secrets: bool = True) -> dict[str, str]:
    env = {f"TF_VAR_{k}": v for k, v in request.variables.items()}
    if secrets:
        env.update({f"TF_VAR_{k}": v for k, v in request.secrets.items()})
    return env


class LineSplitter:
    """Bytes in, complete text lines out (UTF-8, undecodable bytes replaced, no line ends)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""

    def feed(self, data: bytes) -> list[str]:
        self._buf += self._decoder.decode(data)
        if "\n" not in self._buf:
            return []
        *lines, self._buf = self._buf.split("\n")
        return [line.rstrip("\r") for line in lines]

    def flush(self) -> list[str]:
        rest = self._buf + self._decoder.decode(b"", final=True)
        self._buf = ""
        return [rest.rstrip("\r")] if rest else []


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


async def emit(on_line: LineSink, stream: str, line: str) -> None:
    """Forward a line; a failing sink must not break the run."""
    try:
        await on_line(stream, line)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("line sink failed")


class StopFlags(Protocol):
    """Why a run was stopped, as the watchdog found it."""

    timed_out: bool
    interrupted: bool


async def stop_on_cancel_or_timeout(
    limit: float,
    cancel: asyncio.Event,
    flags: StopFlags,
    say: Callable[[str, str], Awaitable[None]],
    interrupt: Callable[[], Awaitable[None]],
    kill: Callable[[], Awaitable[None]],
    grace: float = DEFAULT_GRACE,
) -> None:
    """The runners' watchdog: when ``cancel`` is set or ``limit`` seconds passed, note why,
    ``interrupt()`` (SIGINT: terraform stops gracefully and writes its state), and if the run
    is still going ``grace`` seconds later (the caller cancels this task when it ends),
    ``kill()``. Run it as a task; it returns after the kill."""
    try:
        await asyncio.wait_for(cancel.wait(), limit)
        flags.interrupted = True
        why = "cancel requested"
    except TimeoutError:
        flags.timed_out = True
        why = f"timed out after {limit:g}s"
    await say("system", f"{why}: interrupting terraform (SIGINT)")
    await interrupt()
    await asyncio.sleep(grace)
    await say("system", f"terraform still running {grace:g}s after SIGINT: killing it")
    await kill()


def in_thread(
    fn: Callable[..., T], *args: Any, orphan: Callable[[T], None] | None = None
) -> asyncio.Future[T]:
    """Run a long-blocking call in its own daemon thread (not the default executor, which
    must stay free for short calls), as an awaitable future. If the future was cancelled
    before the call returned, ``orphan(result)`` disposes of the result (e.g. a lock)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            if ok and orphan is not None:
                orphan(value)
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def target() -> None:
        ok: bool
        value: Any
        try:
            value = fn(*args)
            ok = True
        except BaseException as exc:  # handed to the awaiting side
            value, ok = exc, False
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is gone
            if ok and orphan is not None:
                orphan(value)

    threading.Thread(
        target=target, name=f"tfdeploy-{getattr(fn, '__name__', 'call')}", daemon=True
    ).start()
    return fut


def cancelled_before_start(request: RunRequest, started: float) -> RunResult:
    """The result of a run cancelled before terraform started: nothing ran, the state given
    is the state left."""
    return RunResult(
        exit_code=130,
        state=request.state,
        interrupted=True,
        error="cancelled before start",
        duration=time.monotonic() - started,
    )


def exit_code_of(returncode: int) -> int:
    """A subprocess return code as a shell would report it (killed by signal N -> 128+N)."""
    return 128 - returncode if returncode < 0 else returncode
