"""The Docker runner: one labelled, locked-down container per attempt.

Files go in with ``put_archive`` and the state comes out with ``get_archive`` (no host mounts,
so a remote engine works). The container runs ``/bin/sh -c SCRIPT``: it loads the secrets from
a file that it deletes at once, then runs ``terraform init`` and ``terraform apply|destroy``;
SIGINT/SIGTERM sent to the container are passed on as one SIGINT to every process in it (as a
terminal's Ctrl-C would), so terraform stops gracefully and writes its state.

A run outlives its engine going away: the runner waits for the engine (``engine_wait``), then
decides by the container's fate (reattached if it still runs, its exit code and state if it
ended, ``runner_lost`` if it vanished). A container stopped from outside (the engine's own
shutdown sends SIGTERM, then SIGKILL) is ``runner_lost`` too: the state it wrote is collected and
the attempt retried from it.

The concurrency cap is counted from the Docker API: labelled containers in any state but
exited/dead, leftovers of a crashed worker included. ``run()`` keeps the exited container until
the deployer has persisted its state and recorded the outcome (``slot.release()``); being
exited, it no longer counts toward the cap meanwhile. Counting and creating happen under a
lock shared by every runner on the host (an fcntl lock file by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import logging
import os
import re
import secrets as _secrets
import shlex
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import msgspec
import requests
from docker.types import Mount

from service.runners._common import (
    DEFAULT_GRACE,
    SHELL_NAME,
    LineSplitter,
    OutputTail,
    cancelled_before_start,
    emit,
    in_thread,
    safe_relative_path,
    stop_on_cancel_or_timeout,
    tf_var_env,
    validate_request,
)
from service.runners.base import LineSink, RunnerError, RunRequest, RunResult
from service.settings import Settings
from service.statestores.index import state_meta

log = logging.getLogger("tfdeploy.runner.docker")

SERVICE_LABEL = "tfdeploy.service"
SERVICE_VALUE = "tfdeploy"
SERVICE_FILTER = f"{SERVICE_LABEL}={SERVICE_VALUE}"
STOPPED_STATES = ("exited", "dead")

# Inside the container. /workspace is an anonymous volume (writable, removed with the
# container); the root filesystem is read-only; /tmp is a tmpfs.
WORKSPACE = "/workspace"
JOB_DIR = f"{WORKSPACE}/tfdeploy"  # owned by RUN_AS, mode 700
TF_DIR = f"{JOB_DIR}/config"  # terraform's working directory: the deploy's files
SECRETS_FILE = f"{JOB_DIR}/secrets.env"  # sourced, then deleted before terraform starts
STATE_PATH = f"{TF_DIR}/terraform.tfstate"
RUN_AS_UID = 65534  # nobody
RUN_AS = f"{RUN_AS_UID}:{RUN_AS_UID}"

# The runner itself only ever sends SIGINT (cancel, timeout) and SIGKILL after the grace; SIGTERM
# comes from outside (the engine shutting down, ``docker stop``). A run that failed after one
# exits with this code, so the attempt is recorded ``runner_lost``, not as terraform's failure.
EXIT_STOPPED_OUTSIDE = 143

# $1 = apply | destroy. Exit code = terraform's (init's if init fails), or EXIT_STOPPED_OUTSIDE.
ENTRYPOINT_SCRIPT = f"""\
cd {TF_DIR} || exit 70
if [ -f {SECRETS_FILE} ]; then . {SECRETS_FILE}; fi
rm -f {SECRETS_FILE}
stopping=0
terminated=0
child=0
trap 'stopping=1; kill -s INT -1 2>/dev/null' INT
trap 'stopping=1; terminated=1; kill -s INT -1 2>/dev/null' TERM
run() {{
  "$@" &
  child=$!
  while :; do
    wait "$child"; rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  child=0
  return "$rc"
}}
finish() {{
  [ "$terminated" = 0 ] || [ "$1" = 0 ] || exit {EXIT_STOPPED_OUTSIDE}
  exit "$1"
}}
run terraform init -input=false -no-color || finish $?
[ "$stopping" = 0 ] || finish 130
run terraform "$1" -auto-approve -input=false -no-color
finish $?
"""

ENGINE_POLL_MAX = 2.0  # the longest pause between checks for an engine that went away
REMOVE_WAIT = 30.0  # the longest a slot's release waits for the engine to remove its container
EXIT_KILLED = -137  # internal: SIGKILLed, not by the OOM killer (see _settle_sync)

ENGINE_ERRORS: tuple[type[BaseException], ...] = (
    docker.errors.DockerException,
    requests.RequestException,
    OSError,
)


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


@dataclass(eq=False)
class DockerSlot:
    """A place under the cap: the created (not started) container holding the files."""

    runner: DockerRunner
    request: RunRequest
    container_id: str
    notes: list[str] = field(default_factory=list)  # said in the run's log when it starts
    _released: bool = field(default=False, repr=False)

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        await self.runner._remove(self.container_id)


@dataclass
class _Stop:
    timed_out: bool = False
    interrupted: bool = False


class DockerRunner:
    name = "docker"

    #: After the cap was found full, wait at most this long for a Docker event before counting
    #: again (the fallback if an event is missed).
    wait_timeout = 5.0

    #: How long a run waits for an engine that went away before it gives the attempt up as
    #: ``runner_lost`` (the deploy is then retried or failed, never left ``deploying``).
    engine_wait = 120.0

    def __init__(
        self,
        settings: Settings,
        *,
        client: docker.DockerClient | None = None,
        cap_lock: Callable[[], AbstractAsyncContextManager[Any]] | None = None,
        grace: float = DEFAULT_GRACE,
        service_name: str = SERVICE_VALUE,
    ) -> None:
        """``service_name`` is the value of the ``tfdeploy.service`` label that marks (and
        counts) this service's containers; keep the default outside tests — a different value
        is a separate cap (tests use one of their own on a shared engine)."""
        self.settings = settings
        self.grace = grace
        self.service_name = service_name
        self.label_filter = f"{SERVICE_LABEL}={service_name}"
        self._client = client
        self._owns_client = client is None
        self._client_lock = threading.Lock()
        self._cap_lock = cap_lock or FileLock(settings.data_path / "docker-cap.lock")
        self._image_ok = False
        self._held: set[str] = set()  # container ids of this runner's slots

    # -- the client ---------------------------------------------------------------------

    def _get_client(self) -> docker.DockerClient:
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = docker.from_env()
                except ENGINE_ERRORS as exc:
                    raise RunnerError(f"no Docker engine: {exc}") from exc
            return self._client

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A short blocking SDK call in a worker thread; engine errors become RunnerError."""

        def call() -> Any:
            self._get_client()
            return fn(*args)

        try:
            return await asyncio.to_thread(call)
        except RunnerError:
            raise
        except ENGINE_ERRORS as exc:
            raise RunnerError(f"Docker engine error: {exc}") from exc

    @property
    def _api(self) -> docker.APIClient:
        return self._get_client().api

    # -- the cap ------------------------------------------------------------------------

    def _count_sync(self) -> int:
        return count_active(self._api, self.label_filter)

    async def running(self) -> int:
        return int(await self._call(self._count_sync))

    async def acquire_slot(self, request: RunRequest) -> DockerSlot:
        validate_request(request)
        bad = [k for k in request.secrets if not SHELL_NAME.match(k)]
        if bad:
            raise RunnerError(
                f"secret names must be shell identifiers for the docker runner: {bad}"
            )
        cap = self.settings.max_concurrency
        down_since: float | None = None
        pause = 0.5
        adopted: list[str] | None = None
        notes: list[str] = []
        while True:
            # Subscribe to events BEFORE counting, so nothing that frees a place between the
            # count and the wait is missed.
            try:
                await self._ensure_image()
                if adopted is None:
                    request, adopted, notes = await self._call(self._adopt_leftovers_sync, request)
                events = await self._call(
                    lambda: self._api.events(
                        decode=True,
                        filters={
                            "type": "container",
                            "label": self.label_filter,
                            "event": ["die", "destroy", "stop"],
                        },
                    )
                )
            except RunnerError as exc:
                # An engine restarting is waited for (the deploy stays queued); one that stays
                # away past engine_wait fails the attempt (runner_error).
                if not engine_unreachable(exc):
                    raise
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                if now - down_since >= self.engine_wait:
                    raise RunnerError(
                        f"Docker engine unreachable for {self.engine_wait:g}s: {exc}"
                    ) from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, ENGINE_POLL_MAX)
                continue
            down_since, pause = None, 0.5
            slot: DockerSlot | None = None
            try:
                async with self._cap_lock():
                    if await self.running() < cap:
                        container_id = await self._create(request)
                        self._held.add(container_id)
                        slot = DockerSlot(self, request, container_id, notes)
                if slot is None:
                    await self._wait_event(events, self.wait_timeout)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(events.close)
            if slot is not None:
                # Their state now lives in the new container's volume too. Removed outside
                # the cap lock: other workers' slots need not wait for it.
                for leftover in adopted:
                    await self._remove(leftover)
                return slot

    @staticmethod
    async def _wait_event(events: Any, limit: float) -> None:
        def first() -> Any:
            try:
                return next(iter(events), None)
            except Exception:  # closed under us
                return None

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(in_thread(first), limit)

    async def _ensure_image(self) -> None:
        if self._image_ok:
            return
        image = self.settings.runner_image
        try:
            await self._call(lambda: self._get_client().images.get(image))
        except RunnerError as exc:
            if not isinstance(exc.__cause__, docker.errors.ImageNotFound):
                raise
            repo, tag = docker.utils.parse_repository_tag(image)
            log.info("runner image %s not present; pulling it", image)
            try:
                await self._call(lambda: self._get_client().images.pull(repo, tag=tag or "latest"))
            except RunnerError as pull_exc:
                raise RunnerError(
                    f"runner image {image} is missing and could not be pulled: {pull_exc}"
                ) from pull_exc
        self._image_ok = True

    # -- the container ------------------------------------------------------------------

    def container_config(self, request: RunRequest) -> dict[str, Any]:
        """The keyword arguments for ``containers.create`` (no secrets in them)."""
        s = self.settings
        env = {"HOME": "/tmp", "TMPDIR": "/tmp", "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
        env.update(tf_var_env(request, secrets=False))
        safe_id = re.sub(r"[^a-zA-Z0-9_.-]", "-", request.deploy_id)[:40]
        config: dict[str, Any] = dict(
            image=s.runner_image,
            entrypoint=["/bin/sh", "-c", ENTRYPOINT_SCRIPT, "tfdeploy-run"],
            command=[request.action],
            name=f"tfdeploy-{safe_id}-a{request.attempt}-{_secrets.token_hex(3)}",
            labels={
                SERVICE_LABEL: self.service_name,
                "tfdeploy.deploy": request.deploy_id,
                "tfdeploy.attempt": str(request.attempt),
                "tfdeploy.workspace": request.workspace,
            },
            environment=env,
            user=RUN_AS,
            working_dir=WORKSPACE,
            mem_limit=s.runner_memory,
            memswap_limit=s.runner_memory,
            nano_cpus=int(s.runner_cpus * 1e9),
            pids_limit=s.runner_pids,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=True,
            tmpfs={"/tmp": "rw,nosuid,nodev,size=64m,mode=1777"},
            mounts=[Mount(target=WORKSPACE, source=None, type="volume")],
            stdin_open=False,
            tty=False,
        )
        if s.runner_network is not None:
            config["network_mode"] = s.runner_network
        return config

    async def _create(self, request: RunRequest) -> str:
        """Create the container and put the files in. Cancelled half-way, it removes what it
        made once the thread is done."""
        config = self.container_config(request)
        archive = build_archive(request)

        def create() -> str:
            client = self._get_client()
            container = client.containers.create(**config)
            try:
                if not client.api.put_archive(container.id, WORKSPACE, archive):
                    raise RunnerError("put_archive refused the workspace files")
            except BaseException:
                with contextlib.suppress(Exception):
                    client.api.remove_container(container.id, v=True, force=True)
                raise
            return str(container.id)

        def orphan(container_id: str) -> None:
            threading.Thread(target=self._remove_sync, args=(container_id,), daemon=True).start()

        try:
            return await in_thread(create, orphan=orphan)
        except RunnerError:
            raise
        except docker.errors.ImageNotFound as exc:
            self._image_ok = False
            raise RunnerError(f"runner image {self.settings.runner_image} not found") from exc
        except ENGINE_ERRORS as exc:
            raise RunnerError(f"could not create the runner container: {exc}") from exc

    def _remove_sync(self, container_id: str) -> None:
        try:
            self._api.remove_container(container_id, v=True, force=True)
        except docker.errors.NotFound:
            pass
        except Exception:
            log.warning("could not remove container %s", container_id, exc_info=True)
        self._held.discard(container_id)

    async def _remove(self, container_id: str) -> None:
        # An engine in the middle of shutting down may hold the request: the deploy's job must
        # not wait on it (the outcome is recorded; an exited leftover holds no place).
        try:
            await asyncio.wait_for(
                asyncio.shield(in_thread(self._remove_sync, container_id)), REMOVE_WAIT
            )
        except TimeoutError:
            log.warning("removing container %s is taking long; leaving it", container_id)

    async def _signal(self, container_id: str, signal: str) -> None:
        try:
            await self._call(lambda: self._api.kill(container_id, signal=signal))
        except RunnerError as exc:  # already gone or stopped: nothing to signal
            log.debug("kill %s %s: %s", signal, container_id, exc)

    def _read_state_sync(self, container_id: str) -> bytes | None:
        try:
            chunks, _stat = self._api.get_archive(container_id, STATE_PATH)
        except docker.errors.NotFound:
            return None
        data = b"".join(chunks)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                if member.isfile():
                    extracted = tar.extractfile(member)
                    return extracted.read() if extracted else None
        return None

    # -- the run ------------------------------------------------------------------------

    async def run(self, slot: Any, on_line: LineSink, cancel: asyncio.Event) -> RunResult:
        """Run the slot's container to its end. The container is kept (exited: it no longer
        counts toward the cap) until ``slot.release()``, so a dead worker's recovery can still
        read its state. An engine that goes away mid-run is waited for (``engine_wait``); then
        the container's fate decides: still running -> reattached; ended -> its exit code and
        state; vanished, or the engine never came back -> ``runner_lost``."""
        if not isinstance(slot, DockerSlot):
            raise TypeError("DockerRunner.run needs a DockerSlot from its acquire_slot")
        request = slot.request
        cid = slot.container_id
        started = time.monotonic()
        tail = OutputTail()
        stop = _Stop()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        watchdog: asyncio.Task[None] | None = None

        async def say(stream: str, line: str) -> None:
            tail.add(stream, line)
            await emit(on_line, stream, line)

        def post(item: tuple[str, str] | None) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            for note in slot.notes:
                await say("system", note)
            if cancel.is_set():
                await emit(on_line, "system", "cancelled before terraform started")
                return cancelled_before_start(request, started)
            # Attach before starting, so not a byte of output is missed; demux keeps
            # stdout and stderr apart.
            stream = await self._call(
                lambda: self._api.attach(
                    cid, stdout=True, stderr=True, stream=True, logs=True, demux=True
                )
            )
            await self._call(lambda: self._api.start(cid))
            watchdog = asyncio.create_task(
                self._watchdog(cid, request.timeout, cancel, stop, queue)
            )
            engine_lost = False
            while True:
                in_thread(_pump, stream, post)
                while (item := await queue.get()) is not None:
                    await say(*item)
                fate, exit_code, lost = await self._settle(cid, say)
                engine_lost = engine_lost or lost
                if fate != "running":
                    break
                # The engine came back with the container still running (live-restore), or
                # the stream broke alone: follow it again (output of the gap is not replayed).
                await say("system", "output stream lost; reattaching to the running container")
                try:
                    stream = await self._call(
                        lambda: self._api.attach(
                            cid, stdout=True, stderr=True, stream=True, logs=False, demux=True
                        )
                    )
                except RunnerError as exc:
                    log.debug("reattach to %s failed: %s", cid, exc)
                    stream = iter(())
                    await asyncio.sleep(1)  # then settle again: no tight loop
            watchdog.cancel()
            state = None
            if fate == "ended":
                # The volume outlives an engine restart: ride out one that is going away now.
                try:
                    state = await self._riding_out(say, self._read_state_sync, cid)
                except RunnerError as exc:
                    if not engine_unreachable(exc):
                        raise
                    # Away past engine_wait: the state stays in the container's volume, and
                    # the next attempt adopts it (_adopt_leftovers_sync).
                    fate, engine_lost = "down", True
            ours = stop.interrupted or stop.timed_out  # we sent SIGINT / SIGKILL ourselves
            outside = exit_code in (EXIT_STOPPED_OUTSIDE, EXIT_KILLED) and not ours
            if exit_code == EXIT_KILLED:
                exit_code = 137
            runner_lost = fate != "ended" or (exit_code != 0 and (engine_lost or outside))
            error = tail.error() if exit_code != 0 else ""
            if runner_lost:
                why = {
                    "gone": "the container vanished (Docker engine restarted?)",
                    "down": f"the Docker engine did not answer for {self.engine_wait:g}s",
                }.get(
                    fate,
                    f"the container was stopped from outside (engine restart, docker stop); "
                    f"exit {exit_code}",
                )
                state_note = (
                    "its state was collected" if state is not None
                    else "its state stays in the container, for the next attempt" if fate == "down"
                    else "no state left"
                )
                await say("system", f"runner lost: {why}; {state_note}")
                error = f"runner lost: {why}\n{error}".strip()
            return RunResult(
                exit_code=exit_code if fate == "ended" else -1,
                state=state,
                timed_out=stop.timed_out,
                interrupted=stop.interrupted,
                error=error,
                duration=time.monotonic() - started,
                runner_lost=runner_lost,
            )
        except RunnerError:
            raise
        except ENGINE_ERRORS as exc:
            raise RunnerError(f"Docker engine error: {exc}") from exc
        finally:
            if watchdog is not None:
                watchdog.cancel()
            # The place under the cap is free once the container stopped; the container itself
            # stays until the caller's release() (after the outcome is recorded).

    def _settle_sync(self, cid: str) -> tuple[str, int]:
        """The container's fate now: ("ended", exit code) | ("running", -1) | ("gone", -1) |
        ("down", -1) when the engine does not answer. Killed without our asking (not by the
        OOM killer: that is the run's own failure) counts as stopped from outside."""
        try:
            st = self._api.inspect_container(cid)["State"]
        except docker.errors.NotFound:
            return "gone", -1
        except RunnerError:
            return "down", -1
        except ENGINE_ERRORS:
            return "down", -1
        if st.get("Running") or st.get("Restarting"):
            return "running", -1
        code = int(st.get("ExitCode", -1))
        if code == 137 and not st.get("OOMKilled"):
            code = EXIT_KILLED
        return "ended", code

    async def _riding_out(self, say: LineSink, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a thread, tried again while the engine does not answer, for at
        most ``engine_wait`` seconds (noted in the run's output)."""
        down_since: float | None = None
        pause = 0.5
        while True:
            try:
                return await self._call(fn, *args)
            except RunnerError as exc:
                if not engine_unreachable(exc):
                    raise
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    await say("system", "Docker engine unreachable; waiting for it to come back")
                if now - down_since >= self.engine_wait:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, ENGINE_POLL_MAX)

    def _wait_briefly_sync(self, cid: str, limit: float) -> None:
        with contextlib.suppress(*ENGINE_ERRORS):
            self._api.wait(cid, timeout=limit)

    async def _settle(self, cid: str, say: LineSink) -> tuple[str, int, bool]:
        """After the output stream ended: wait until the container's fate is known, riding out
        an engine outage for at most ``engine_wait`` seconds. Returns (fate, exit code, whether
        the engine was seen down)."""
        lost_since: float | None = None
        pause = 0.5
        while True:
            fate, code = await asyncio.to_thread(self._settle_sync, cid)
            if fate == "down":
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    await say("system", "Docker engine unreachable; waiting for it to come back")
                if now - lost_since >= self.engine_wait:
                    return "down", -1, True
                await asyncio.sleep(pause)
                pause = min(pause * 2, ENGINE_POLL_MAX)
                continue
            if lost_since is not None:
                await say("system", f"Docker engine back after {time.monotonic() - lost_since:.1f}s")
            if fate == "running" and lost_since is None:
                # The stream ends just before the container is seen exited: give it a moment.
                await asyncio.to_thread(self._wait_briefly_sync, cid, 5.0)
                fate, code = await asyncio.to_thread(self._settle_sync, cid)
                if fate == "down":
                    continue
            return fate, code, lost_since is not None

    async def _watchdog(
        self,
        cid: str,
        limit: float,
        cancel: asyncio.Event,
        stop: _Stop,
        queue: asyncio.Queue[tuple[str, str] | None],
    ) -> None:
        async def note(stream: str, line: str) -> None:
            queue.put_nowait((stream, line))  # in order with the output being pumped

        await stop_on_cancel_or_timeout(
            limit,
            cancel,
            stop,
            note,
            interrupt=lambda: self._signal(cid, "SIGINT"),
            kill=lambda: self._signal(cid, "SIGKILL"),
            grace=self.grace,
        )
        await asyncio.sleep(30)
        queue.put_nowait(None)  # the output stream never ended: stop waiting for it

    # -- housekeeping -------------------------------------------------------------------

    async def find_orphans(self, *, include_own: bool = False) -> list[dict[str, Any]]:
        """Labelled containers on the engine, in any state, except (by default) the ones this
        runner holds right now: after a crash, what a dead worker left behind."""
        rows = await self._call(
            lambda: self._api.containers(all=True, filters={"label": self.label_filter})
        )
        found = []
        for row in rows:
            if not include_own and row["Id"] in self._held:
                continue
            labels = row.get("Labels") or {}
            found.append(
                {
                    "id": row["Id"],
                    "name": (row.get("Names") or ["?"])[0].lstrip("/"),
                    "state": row.get("State"),
                    "status": row.get("Status"),
                    "created": row.get("Created"),
                    "deploy_id": labels.get("tfdeploy.deploy"),
                    "attempt": labels.get("tfdeploy.attempt"),
                    "workspace": labels.get("tfdeploy.workspace"),
                }
            )
        return found

    async def collect_orphan(self, container_id: str) -> RunResult | None:
        """Take over a container a dead worker left behind (recovery, ``service/recovery.py``).

        Still running: SIGINT (terraform stops gracefully and writes its state), then SIGKILL
        after the grace period. Then the exit code and the state it left are read. Returns None
        when it never started (nothing ran). The container is not removed here."""
        result: RunResult | None = await self._call(self._collect_sync, container_id)
        return result

    def _adopt_leftovers_sync(self, request: RunRequest) -> tuple[RunRequest, list[str], list[str]]:
        """Containers of this deploy's earlier attempts still on the engine: an attempt given up
        as ``runner_lost`` while the engine was away leaves its container, and in its volume the
        state terraform wrote, which was never persisted. Starting from the older persisted
        state would make what that attempt made a second time, so the newest such state (same
        lineage, higher serial) becomes this attempt's start state; it is persisted with this
        attempt's outcome. Returns (the request to run, the leftovers to remove once the new
        container holds the state, notes for the log)."""
        if request.attempt <= 1:  # nothing earlier: no Docker API call on the usual path
            return request, [], []
        rows = self._api.containers(
            all=True,
            filters={"label": [self.label_filter, f"tfdeploy.deploy={request.deploy_id}"]},
        )
        leftovers: list[tuple[int, str]] = []
        for row in rows:
            attempt = (row.get("Labels") or {}).get("tfdeploy.attempt", "")
            if attempt.isdigit() and int(attempt) < request.attempt and row["Id"] not in self._held:
                leftovers.append((int(attempt), row["Id"]))
        if not leftovers:
            return request, [], []
        best, best_attempt = request.state, 0
        for attempt, cid in sorted(leftovers):
            try:
                result = self._collect_sync(cid)  # a running one is stopped gracefully first
            except docker.errors.NotFound:  # removed meanwhile (its release went through)
                continue
            if result is not None and result.state is not None and _newer_state(result.state, best):
                best, best_attempt = result.state, attempt
        notes = []
        if best_attempt:
            request = msgspec.structs.replace(request, state=best)
            notes.append(
                f"adopted the state left by attempt {best_attempt}'s container (newer than the "
                "last persisted state): this attempt starts from it"
            )
        return request, [cid for _, cid in leftovers], notes

    def _collect_sync(self, container_id: str) -> RunResult | None:
        """``collect_orphan`` in the calling thread."""
        api = self._api
        st = api.inspect_container(container_id)["State"]
        if st.get("Status") == "created":
            return None
        was_running = bool(st.get("Running"))
        if was_running:
            with contextlib.suppress(docker.errors.APIError):
                api.kill(container_id, signal="SIGINT")
            try:
                api.wait(container_id, timeout=self.grace)
            except requests.RequestException:
                with contextlib.suppress(docker.errors.APIError):
                    api.kill(container_id, signal="SIGKILL")
                api.wait(container_id, timeout=60)
        exit_code = int(api.inspect_container(container_id)["State"].get("ExitCode", -1))
        state = self._read_state_sync(container_id)
        tail = OutputTail()
        with contextlib.suppress(Exception):
            out = api.logs(container_id, stdout=True, stderr=True, tail=40)
            for line in out.decode(errors="replace").splitlines():
                tail.add("stderr", line)
        prefix = "worker lost while terraform ran; interrupted" if was_running else (
            "worker lost after terraform ended"
        )
        return RunResult(
            exit_code=exit_code,
            state=state,
            error=f"{prefix} (exit {exit_code})\n{tail.error()}" if exit_code != 0 else "",
        )

    async def remove_container(self, container_id: str) -> None:
        """Remove a (leftover) container and its workspace volume, whatever its state."""
        await self._call(self._remove_sync, container_id)

    async def close(self) -> None:
        """Close the client if this runner created it (an injected client is the caller's)."""
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await asyncio.to_thread(client.close)


def _newer_state(candidate: bytes, than: bytes | None) -> bool:
    """Whether tfstate ``candidate`` goes further than ``than``: same lineage, higher serial
    (anything readable beats no state at all)."""
    try:
        serial, lineage, _, _ = state_meta(candidate)
    except ValueError:
        return False
    if than is None:
        return True
    try:
        old_serial, old_lineage, _, _ = state_meta(than)
    except ValueError:
        return True
    return lineage == old_lineage and serial > old_serial


def engine_unreachable(exc: BaseException) -> bool:
    """Whether a RunnerError means the engine is away (connection refused, socket gone, the
    engine failing while it shuts down) rather than refusing the request itself."""
    cause = exc.__cause__
    if cause is None:
        return False
    if isinstance(cause, docker.errors.APIError):
        return bool(cause.is_server_error()) and not isinstance(cause, docker.errors.NotFound)
    return isinstance(cause, ENGINE_ERRORS)


def count_active(api: docker.APIClient, label_filter: str = SERVICE_FILTER) -> int:
    """Labelled containers that hold a place under the cap: any state but exited/dead.

    Docker lists a container being removed as "removing" whatever it was before; such a one
    counts only while it still runs (after a normal run it had exited already)."""
    active = 0
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
        active += 1
    return active


def _pump(stream: Any, post: Callable[[tuple[str, str] | None], None]) -> None:
    """Read the demultiplexed attach stream in a thread and post complete lines."""
    splitters = {"stdout": LineSplitter(), "stderr": LineSplitter()}
    try:
        for out, err in stream:
            for name, chunk in (("stdout", out), ("stderr", err)):
                if chunk:
                    for line in splitters[name].feed(chunk):
                        post((name, line))
    except Exception as exc:  # the stream broke (container removed, engine gone)
        log.debug("output stream ended: %s", exc)
    finally:
        for name, splitter in splitters.items():
            for line in splitter.flush():
                post((name, line))
        post(None)


def build_archive(request: RunRequest) -> bytes:
    """The tar put into /workspace: the job dir (owned by the container user), the deploy's
    files and state under config/, and the secrets as a shell file the entrypoint deletes."""
    buf = io.BytesIO()
    now = time.time()

    def add(name: str, data: bytes | None, mode: int) -> None:
        info = tarfile.TarInfo(name)
        info.uid = info.gid = RUN_AS_UID
        info.mtime = now
        info.mode = mode
        if data is None:
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    job = JOB_DIR.removeprefix(WORKSPACE + "/")
    config = TF_DIR.removeprefix(WORKSPACE + "/")
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add(job, None, 0o700)
        add(config, None, 0o700)
        made: set[str] = set()
        for name, content in sorted(request.files.items()):
            path = safe_relative_path(name)
            for parent in reversed(path.parents[:-1]):
                if str(parent) not in made:
                    made.add(str(parent))
                    add(f"{config}/{parent}", None, 0o700)
            add(f"{config}/{path}", content.encode(), 0o600)
        if request.state is not None:
            add(f"{config}/terraform.tfstate", request.state, 0o600)
        if request.secrets:
            lines = [
                f"export TF_VAR_{k}={shlex.quote(v)}" for k, v in sorted(request.secrets.items())
            ]
            add(
                SECRETS_FILE.removeprefix(WORKSPACE + "/"),
                ("\n".join(lines) + "\n").encode(),
                0o600,
            )
    return buf.getvalue()
