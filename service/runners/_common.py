"""Pieces shared by the runners: request validation, the watchdog, a thread helper, and how
a run's end becomes a RunResult (``finish_result``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import PurePosixPath
from typing import Any, Protocol, TypeVar

from service.runners.base import STATE_STEPS, RunnerError, RunRequest, RunResult
from service.runners.diagnostics import classify
from service.runners.output import RunOutput, StepRecord
from service.runners.script import Layout
from service.runners.statecheck import ArtifactProblem, state_shape_problem

log = logging.getLogger("tfdeploy.runner")

T = TypeVar("T")

# Terraform variable names: letters, digits, underscores and hyphens, not starting with a digit.
VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# What a POSIX shell can ``export``.
SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

DEFAULT_GRACE = 10.0  # seconds between SIGINT and SIGKILL
LOCK_FILE_LIMIT = 1024 * 1024  # .terraform.lock.hcl taken back from a run
PLAN_FACTOR = 4  # a plan file / plan JSON may be this many times max_state_bytes


def validate_request(request: RunRequest) -> None:
    """Reject what could escape the working directory, break the environment, or make no
    sense as a run."""
    if not request.steps:
        raise RunnerError("a run needs at least one step")
    names = [s.name for s in request.steps]
    for i, step in enumerate(request.steps):
        if (step.destroy or step.detailed_exitcode) and step.name != "plan":
            raise RunnerError(f"step {step.name}: destroy/detailed_exitcode are plan options")
        planned = "plan" in names[:i] or request.saved_plan is not None
        if step.name in ("show_plan", "apply_plan") and not planned:
            raise RunnerError(f"step {step.name} needs a plan step before it or a saved plan")
    if request.timeout <= 0:
        raise RunnerError("timeout must be positive")
    if request.max_output_bytes <= 0 or request.max_state_bytes <= 0:
        raise RunnerError("output and state limits must be positive")
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


class StopFlags(Protocol):
    """Why a run was stopped, as the watchdog found it."""

    timed_out: bool
    interrupted: bool
    output_limited: bool


async def stop_on_cancel_or_timeout(
    limit: float,
    cancel: asyncio.Event,
    flags: StopFlags,
    say: Callable[[str, str], Awaitable[None]],
    interrupt: Callable[[], Awaitable[None]],
    kill: Callable[[], Awaitable[None]],
    grace: float = DEFAULT_GRACE,
    output_limit: asyncio.Event | None = None,
) -> None:
    """The runners' watchdog: when ``cancel`` is set, ``limit`` seconds passed or the output
    limit was hit, note why, ``interrupt()`` (SIGINT: terraform stops gracefully and writes its
    state), and if the run is still going ``grace`` seconds later (the caller cancels this
    task when it ends), ``kill()``. Run it as a task; it returns after the kill."""
    waits = [asyncio.ensure_future(cancel.wait())]
    if output_limit is not None:
        waits.append(asyncio.ensure_future(output_limit.wait()))
    try:
        done, _ = await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    if cancel.is_set():
        flags.interrupted = True
        why = "cancel requested"
    elif output_limit is not None and output_limit.is_set():
        flags.output_limited = True
        why = "output limit reached"  # RunOutput said so already, with the figure
    else:
        flags.timed_out = True
        why = f"timed out after {limit:g}s"
    if why != "output limit reached":
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
        failed_step=request.steps[0].name,
        failure_kind="other",
        error="cancelled before start",
        duration=time.monotonic() - started,
    )


def exit_code_of(returncode: int) -> int:
    """A subprocess return code as a shell would report it (killed by signal N -> 128+N)."""
    return 128 - returncode if returncode < 0 else returncode


class Artifacts:
    """What a run left, read with the file checks (statecheck): the raw state or why it was
    refused, and the other artifacts (None where absent or refused, with notes)."""

    def __init__(self) -> None:
        self.state: bytes | None = None
        self.state_refused: str | None = None
        self.plan: bytes | None = None
        self.plan_json: bytes | None = None
        self.lock_file: bytes | None = None
        self.notes: list[str] = []


def read_artifacts_with(
    read: Callable[[str, int], bytes | None], layout: Layout, request: RunRequest, record: StepRecord
) -> Artifacts:
    """What a run left, through a runner's ``read(path, limit)`` (None: not there;
    ArtifactProblem: refused by the file checks): the state always, the lock file, and the plan
    file and plan JSON of the steps that made them."""
    found = Artifacts()
    try:
        found.state = read(layout.state, request.max_state_bytes)
    except ArtifactProblem as exc:
        found.state_refused = str(exc)
    big = request.max_state_bytes * PLAN_FACTOR
    wanted = [("lock_file", layout.lock_file, LOCK_FILE_LIMIT)]
    if "plan" in record.done:
        wanted.append(("plan", layout.plan, big))
    if "show_plan" in record.done:
        wanted.append(("plan_json", layout.plan_json, big))
    for name, path, limit in wanted:
        try:
            setattr(found, name, read(path, limit))
        except ArtifactProblem as exc:
            found.notes.append(f"{PurePosixPath(path).name} not taken: {exc}")
    return found


def check_state(
    request: RunRequest, record: StepRecord, artifacts: Artifacts
) -> tuple[bytes | None, str | None, bytes | None]:
    """(state, state_problem, rejected_state) for a run's end: the state must be there once a
    state-writing step completed, or once one began from a start state (terraform never
    removes a state it started from); if there, a regular file within the cap with a tfstate's
    shape."""
    if artifacts.state_refused is not None:
        return None, f"terraform.tfstate refused: {artifacts.state_refused}", None
    content = artifacts.state
    if content is None:
        completed = any(s in STATE_STEPS for s in record.done)
        began = record.current in STATE_STEPS or record.failed in STATE_STEPS
        if completed or (began and request.state is not None):
            return None, "terraform left no terraform.tfstate", None
        return None, None, None
    shape = state_shape_problem(content)
    if shape is not None:
        return None, f"terraform.tfstate refused: {shape}", content
    return content, None, None


def finish_result(
    request: RunRequest,
    *,
    exit_code: int,
    record: StepRecord,
    artifacts: Artifacts,
    diagnostics: dict[str, str],
    error: str,
    started: float,
    timed_out: bool = False,
    interrupted: bool = False,
    output_limited: bool = False,
    runner_lost: bool = False,
    output_bytes: int = 0,
) -> RunResult:
    """The RunResult of a run that ended (or was given up), from its step record and what it
    left. A state that fails the checks is a ``state_problem``, whatever the exit code."""
    state, problem, rejected = check_state(request, record, artifacts)
    failed = record.failed_step(exit_code)
    if runner_lost and failed is None:
        failed = record.current or request.steps[-1].name
    diag = diagnostics.get(failed, "") if failed else ""
    kind = classify(failed, diag or error) if failed else None
    return RunResult(
        exit_code=exit_code,
        state=state,
        state_problem=problem,
        rejected_state=rejected,
        failed_step=failed,
        failure_kind=kind,
        diagnostics=diag,
        plan=artifacts.plan,
        plan_json=artifacts.plan_json,
        plan_changes=record.plan_changes,
        lock_file=artifacts.lock_file,
        steps_done=list(record.done),
        timed_out=timed_out,
        interrupted=interrupted,
        runner_lost=runner_lost,
        output_limited=output_limited,
        output_bytes=output_bytes,
        error=error if exit_code != 0 or failed or problem else "",
        duration=time.monotonic() - started,
    )


__all__ = [
    "DEFAULT_GRACE",
    "LOCK_FILE_LIMIT",
    "PLAN_FACTOR",
    "SHELL_NAME",
    "Artifacts",
    "RunOutput",
    "StepRecord",
    "StopFlags",
    "cancelled_before_start",
    "check_state",
    "read_artifacts_with",
    "exit_code_of",
    "finish_result",
    "in_thread",
    "safe_relative_path",
    "stop_on_cancel_or_timeout",
    "tf_var_env",
    "validate_request",
]


class Wakeups:
    """In-process wake-ups by key (a places directory): a place given back wakes at once every
    waiter for it, from any thread or event loop; other processes' releases are noticed by the
    waiters' own polls."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def notify(self, key: str) -> None:
        for loop, event in list(self._waiters.get(key, ())):
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(event.set)

    @contextlib.contextmanager
    def waiting(self, key: str) -> Iterator[asyncio.Event]:
        """The event ``notify(key)`` sets, for as long as the block runs."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        waiters = self._waiters.setdefault(key, set())
        waiters.add(waiter)
        try:
            yield waiter[1]
        finally:
            waiters.discard(waiter)
