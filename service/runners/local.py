"""The local runner: terraform on this host, in a private temporary directory per attempt.

The cap is ``max_concurrency`` lock files ``slot-<i>.lock`` under ``<data dir>/local-slots``:
holding an exclusive ``flock`` on one is holding a slot. The kernel drops the locks of a process
that dies, so a crash leaks nothing, and every runner on the host (any process) shares the cap.

Orphans: terraform runs in its own process group and writes its output to files in the run's
temp dir (tailed into the log), not to pipes, so it survives the death of the worker that
started it (a pipe would kill it with SIGPIPE at its next line). Before it starts, a record
``<data dir>/local-runs/<deploy>-a<attempt>.json`` names the process group and the temp dir
(and, once terraform ended, its exit code). ``run()`` gives the place under the cap back when
terraform ends; the temp dir and the record stay until ``release()``, which the deployer calls
once the state is persisted and the outcome recorded. After a crash, ``collect_orphan`` (called
by the recovery of another worker on the same host, ``service/recovery.py``) interrupts the
group if it still runs (SIGINT, grace, SIGKILL) and reads the state terraform left.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.runners._common import (
    DEFAULT_GRACE,
    LineSplitter,
    OutputTail,
    cancelled_before_start,
    emit,
    exit_code_of,
    safe_relative_path,
    stop_on_cancel_or_timeout,
    tf_var_env,
    validate_request,
)
from service.runners.base import LineSink, RunnerError, RunRequest, RunResult
from service.settings import Settings

log = logging.getLogger("tfdeploy.runner.local")

# In-process wake-ups: slots dir -> events of the waiters there. Other processes' releases are
# noticed by polling (a short, growing backoff).
_waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
POLL_MIN, POLL_MAX = 0.05, 0.5

# The only variables of the service's own environment that terraform gets (besides PATH):
# where terraform's CLI config, provider cache and CA certificates are, and the HTTP proxy
# (provider downloads). Everything else, the service's secrets included, stays out.
PASS_THROUGH = (
    "TF_CLI_CONFIG_FILE",
    "TF_PLUGIN_CACHE_DIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)
PATH_VALUED = {"TF_CLI_CONFIG_FILE", "TF_PLUGIN_CACHE_DIR", "SSL_CERT_FILE", "SSL_CERT_DIR"}


def _notify(slots_dir: str) -> None:
    for loop, event in list(_waiters.get(slots_dir, ())):
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(event.set)


@dataclass(eq=False)
class LocalSlot:
    runner: LocalRunner
    request: RunRequest
    index: int
    lock_fd: int
    root: Path  # private temp dir (mode 700): config/ (terraform's cwd) and home/
    _released: bool = field(default=False, repr=False)

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def home_dir(self) -> Path:
        return self.root / "home"

    async def release(self) -> None:
        """Remove the temp dir and run record, then give the place under the cap back (called
        once the outcome is recorded; idempotent)."""
        if self._released:
            return
        self._released = True
        try:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, self.root, True))
            with contextlib.suppress(OSError):
                self.runner.run_record(self.request.deploy_id, self.request.attempt).unlink()
        finally:
            os.close(self.lock_fd)
            _notify(self.runner.slots_dir_key)


@dataclass
class _Current:
    proc: asyncio.subprocess.Process | None = None
    stopping: bool = False
    timed_out: bool = False
    interrupted: bool = False

    def signal(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


class LocalRunner:
    name = "local"

    def __init__(
        self, settings: Settings, *, terraform: str | None = None, grace: float = DEFAULT_GRACE
    ) -> None:
        self.settings = settings
        self.grace = grace
        self.terraform = (
            terraform or os.environ.get("TFDEPLOY_TERRAFORM") or shutil.which("terraform")
        )
        self.slots_dir = settings.data_path / "local-slots"
        self.slots_dir_key = str(self.slots_dir)
        self.runs_dir = settings.data_path / "local-runs"

    # -- orphans --------------------------------------------------------------------------

    def run_record(self, deploy_id: str, attempt: int) -> Path:
        safe = re.sub(r"[^a-zA-Z0-9_.-]", "-", deploy_id)[:80]
        return self.runs_dir / f"{safe}-a{attempt}.json"

    def _write_record(self, slot: LocalSlot, pgid: int, exit_code: int | None = None) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.run_record(slot.request.deploy_id, slot.request.attempt)
        tmp = path.with_suffix(".tmp")
        record: dict[str, Any] = {
            "deploy_id": slot.request.deploy_id,
            "attempt": slot.request.attempt,
            "pgid": pgid,
            "root": str(slot.root),
            "worker_pid": os.getpid(),
        }
        if exit_code is not None:  # terraform ended: a recoverer reports its real outcome
            record["exit_code"] = exit_code
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    async def collect_orphan(self, deploy_id: str, attempt: int) -> RunResult | None:
        """Take over the terraform run a dead worker left on this host: interrupt its process
        group if it still runs (SIGINT, grace, SIGKILL) and read the state it left. None when
        there is no record (another host, or it never started). The temp dir is kept: call
        ``discard_orphan`` once the outcome is recorded. The exit code of a process
        that is not our child is unknown: reported as 130 (a failed attempt; the next one
        starts from the state read here)."""
        path = self.run_record(deploy_id, attempt)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        pgid, root = int(record["pgid"]), Path(record["root"])
        recorded = record.get("exit_code")
        # Ended on record: its group id may belong to someone else by now, never signal it.
        was_running = not isinstance(recorded, int) and _group_alive(pgid)
        if was_running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGINT)
            deadline = time.monotonic() + self.grace
            while _group_alive(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110 - not our child: poll
                await asyncio.sleep(0.2)
            if _group_alive(pgid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                deadline = time.monotonic() + 30
                while _group_alive(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
        state = await asyncio.to_thread(_read_or_none, root / "config" / "terraform.tfstate")
        tail = await asyncio.to_thread(_tail_text, root)
        if isinstance(recorded, int):
            # Terraform had ended and its exit code was recorded: the dead worker only missed
            # persisting the state and recording the outcome.
            return RunResult(
                exit_code=recorded,
                state=state,
                error="" if recorded == 0 else f"worker lost after terraform ended\n{tail}".strip(),
            )
        # The temp dir stays until the caller (recovery) recorded the outcome and calls
        # discard_orphan: a recoverer that dies here leaves it for the next one.
        what = "interrupted" if was_running else "it had ended"
        return RunResult(
            exit_code=130,
            state=state,
            error=f"worker lost while terraform ran ({what})\n{tail}".strip(),
        )

    async def discard_orphan(self, deploy_id: str, attempt: int) -> None:
        """Remove a dead worker's temp dir and record for (deploy, attempt), if any."""
        path = self.run_record(deploy_id, attempt)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        root = Path(record.get("root", ""))
        if root.name.startswith("tfdeploy-run-"):
            await asyncio.to_thread(shutil.rmtree, root, True)
        with contextlib.suppress(OSError):
            path.unlink()

    # -- slots ----------------------------------------------------------------------------

    def _slot_path(self, i: int) -> Path:
        return self.slots_dir / f"slot-{i}.lock"

    def _try_lock(self) -> tuple[int, int] | None:
        self.slots_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for i in range(self.settings.max_concurrency):
            fd = os.open(self._slot_path(i), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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

    async def running(self) -> int:
        """Slots held on this host, by any process (probed with a shared non-blocking lock)."""

        def count() -> int:
            held = 0
            for i in range(self.settings.max_concurrency):
                path = self._slot_path(i)
                if not path.exists():
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    held += 1
                finally:
                    os.close(fd)
            return held

        return await asyncio.to_thread(count)

    async def acquire_slot(self, request: RunRequest) -> LocalSlot:
        validate_request(request)
        if not self.terraform or not os.access(self.terraform, os.X_OK):
            raise RunnerError("terraform not found (put it on PATH or set TFDEPLOY_TERRAFORM)")
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waiter = (loop, event)
        waiters = _waiters.setdefault(self.slots_dir_key, set())
        waiters.add(waiter)
        delay = POLL_MIN
        try:
            while True:
                event.clear()
                try:
                    got = self._try_lock()
                except OSError as exc:
                    raise RunnerError(
                        f"cannot use the slot locks in {self.slots_dir}: {exc}"
                    ) from exc
                if got is not None:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), delay)
                delay = min(delay * 2, POLL_MAX)
        finally:
            waiters.discard(waiter)
        index, fd = got
        try:
            root = await asyncio.to_thread(_prepare, request)
        except BaseException:
            os.close(fd)
            _notify(self.slots_dir_key)
            raise
        return LocalSlot(self, request, index, fd, root)

    # -- the run --------------------------------------------------------------------------

    def _env(self, slot: LocalSlot) -> dict[str, str]:
        """A minimal environment: nothing of the service's own (its secrets) is inherited."""
        env = {
            "PATH": os.environ.get("PATH") or os.defpath,
            "HOME": str(slot.home_dir),
            "TMPDIR": str(slot.home_dir),
            "LANG": "C.UTF-8",
            "CHECKPOINT_DISABLE": "1",
            "TF_IN_AUTOMATION": "1",
        }
        for name in PASS_THROUGH:
            value = os.environ.get(name)
            if value and (name not in PATH_VALUED or os.path.exists(value)):
                env[name] = value
        env.update(tf_var_env(slot.request))
        return env

    async def run(self, slot: Any, on_line: LineSink, cancel: asyncio.Event) -> RunResult:
        if not isinstance(slot, LocalSlot):
            raise TypeError("LocalRunner.run needs a LocalSlot from its acquire_slot")
        request = slot.request
        started = time.monotonic()
        tail = OutputTail()
        current = _Current()
        emit_lock = asyncio.Lock()

        async def say(stream: str, line: str) -> None:
            async with emit_lock:
                tail.add(stream, line)
                await emit(on_line, stream, line)

        watchdog: asyncio.Task[None] | None = None
        try:
            if cancel.is_set():
                await say("system", "cancelled before terraform started")
                return cancelled_before_start(request, started)
            env = self._env(slot)
            watchdog = asyncio.create_task(self._watchdog(current, request.timeout, cancel, say))
            exit_code = 0
            for args in (
                ["init", "-input=false", "-no-color"],
                [request.action, "-auto-approve", "-input=false", "-no-color"],
            ):
                if current.stopping:
                    exit_code = 130
                    break
                exit_code = await self._run_one(args, slot, env, say, current)
                if exit_code != 0:
                    break
            watchdog.cancel()
            state_path = slot.config_dir / "terraform.tfstate"
            state = await asyncio.to_thread(_read_or_none, state_path)
            if current.proc is not None:
                try:
                    await asyncio.to_thread(self._write_record, slot, current.proc.pid, exit_code)
                except OSError as exc:
                    log.warning("could not record the end of %s: %s", request.deploy_id, exc)
            return RunResult(
                exit_code=exit_code,
                state=state,
                timed_out=current.timed_out,
                interrupted=current.interrupted,
                error=tail.error() if exit_code != 0 else "",
                duration=time.monotonic() - started,
            )
        except OSError as exc:
            raise RunnerError(f"could not run terraform: {exc}") from exc
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if current.proc is not None and current.proc.returncode is None:
                current.signal(signal.SIGKILL)  # cancelled from outside: leave nothing behind
            # The place under the cap, the temp dir (the state) and the run record are all kept
            # until the caller's release(), after the outcome is recorded: a slot spans the whole
            # attempt, so the cap can be checked exactly from the events (Started .. outcome).

    async def _run_one(
        self, args: list[str], slot: LocalSlot, env: dict[str, str], say: Any, current: _Current
    ) -> int:
        assert self.terraform
        # Output goes to files (tailed below), not pipes: terraform must outlive a dead worker.
        paths = {name: slot.root / f"{args[0]}.{name}" for name in ("stdout", "stderr")}
        fds = {
            name: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            for name, path in paths.items()
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                self.terraform,
                *args,
                cwd=slot.config_dir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fds["stdout"],
                stderr=fds["stderr"],
                start_new_session=True,  # its own process group, for SIGINT to it and its children
            )
        finally:
            for fd in fds.values():
                os.close(fd)
        current.proc = proc
        try:
            await asyncio.to_thread(self._write_record, slot, proc.pid)
        except OSError as exc:
            log.warning("could not record the run of %s: %s", slot.request.deploy_id, exc)
        if current.stopping:  # stopped while it was being started
            current.signal(signal.SIGINT)
        ended = asyncio.Event()
        pumps = asyncio.gather(*(_tail(path, name, say, ended) for name, path in paths.items()))
        try:
            returncode = await proc.wait()
        finally:
            # Whatever terraform left in its group (a provisioner's stray child) goes too.
            current.signal(signal.SIGKILL)
            ended.set()
            try:
                await asyncio.wait_for(asyncio.shield(pumps), 5)
            except TimeoutError:
                pumps.cancel()
        return exit_code_of(returncode)

    async def _watchdog(
        self, current: _Current, limit: float, cancel: asyncio.Event, say: Any
    ) -> None:
        async def interrupt() -> None:
            current.stopping = True  # no next command (apply after init) starts
            current.signal(signal.SIGINT)

        async def kill() -> None:
            current.signal(signal.SIGKILL)

        await stop_on_cancel_or_timeout(
            limit, cancel, current, say, interrupt=interrupt, kill=kill, grace=self.grace
        )

    async def close(self) -> None:
        return None


TAIL_POLL = 0.05


async def _tail(path: Path, name: str, say: Any, ended: asyncio.Event) -> None:
    """Follow an output file until the process ended and the file is read to its end."""
    splitter = LineSplitter()
    with open(path, "rb") as f:  # noqa: ASYNC230 - small non-blocking reads of a local file
        while True:
            data = f.read(65536)
            if data:
                for line in splitter.feed(data):
                    await say(name, line)
                continue
            if ended.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), TAIL_POLL)
    for line in splitter.flush():
        await say(name, line)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader (its parent died and nobody reaped it yet) counts as gone.
    try:
        with open(f"/proc/{pgid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                return _other_members(pgid)
    except OSError:
        pass
    return True


def _other_members(pgid: int) -> bool:
    """Whether a live (non-zombie) process other than the leader is in group ``pgid``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pgid:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _tail_text(root: Path, lines: int = 20) -> str:
    out: list[str] = []
    for name in ("init.stderr", "apply.stderr", "destroy.stderr", "apply.stdout", "destroy.stdout"):
        with contextlib.suppress(OSError):
            out.extend((root / name).read_text(errors="replace").splitlines()[-lines:])
    return "\n".join(out[-lines:])


def _prepare(request: RunRequest) -> Path:
    root = Path(tempfile.mkdtemp(prefix="tfdeploy-run-"))  # mode 700
    try:
        config = root / "config"
        config.mkdir(mode=0o700)
        (root / "home").mkdir(mode=0o700)
        for name, content in request.files.items():
            path = config / safe_relative_path(name)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(content)
        if request.state is not None:
            fd = os.open(config / "terraform.tfstate", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(request.state)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
