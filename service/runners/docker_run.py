"""One run's container, from its configuration to what it left.

The container runs ``/bin/sh -c SCRIPT`` (service/runners/script.py): it sources and deletes the
secrets file, then runs the steps. SIGINT/SIGTERM sent to the container are passed on as one
SIGINT to every process in it (as a terminal's Ctrl-C would), so terraform stops gracefully and
writes its state. Its output is read from the attach stream in a thread and handed over a
bounded queue (backpressure: the thread waits while the log writer catches up); the engine's
own copy goes to a bounded log driver, so a flood cannot fill the engine's disk (and
``docker logs`` still serves a dead worker's recovery).

A run outlives its engine going away: it waits for the engine (``engine_wait``), then decides
by the container's fate (reattached if it still runs, its exit code and what it left if it
ended, ``runner_lost`` if it vanished). A container stopped from outside (the engine's own
shutdown sends SIGTERM, then SIGKILL) is ``runner_lost`` too: the state it wrote is collected and
the attempt retried from it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import secrets as _secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import docker.errors
import msgspec
from docker.types import LogConfig, Mount

from service.runners._common import (
    Artifacts,
    finish_result,
    in_thread,
    stop_on_cancel_or_timeout,
    tf_var_env,
)
from service.runners.base import RunnerError, RunRequest, RunResult
from service.runners.docker_archive import LAYOUT, RUN_AS, WORKSPACE, read_artifacts
from service.runners.docker_cap import PLACE_LABEL
from service.runners.docker_engine import ENGINE_ERRORS, ENGINE_POLL_MAX, Engine, engine_unreachable
from service.runners.output import RunOutput
from service.runners.script import (
    EXIT_STOPPED_OUTSIDE,
    FORWARD_IN_NAMESPACE,
    build_script,
)
from service.settings import Settings

log = logging.getLogger("tfdeploy.runner.docker")

SERVICE_LABEL = "tfdeploy.service"
SERVICE_VALUE = "tfdeploy"
EXIT_KILLED = -137  # internal: SIGKILLed, not by the OOM killer (see settle_sync)
# The engine's copy of a container's output: at most LOG_MAX_SIZE x LOG_MAX_FILES on its disk.
LOG_DRIVER = "local"
LOG_MAX_SIZE = "4m"
LOG_MAX_FILES = "2"
QUEUE_CHUNKS = 64  # attach frames (at most 32 KiB each) in flight to the log writer


def container_config(
    settings: Settings, request: RunRequest, service_name: str, marker: str, place: str = ""
) -> dict[str, Any]:
    """The keyword arguments for ``containers.create`` (no secrets in them)."""
    s = settings
    env = {"HOME": "/tmp", "TMPDIR": "/tmp", "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
    mounts = [Mount(target=WORKSPACE, source=None, type="volume")]
    if request.providers is not None:
        env.update(request.providers.env)
        env["TF_CLI_CONFIG_FILE"] = LAYOUT.cli_config
        for in_run, host in sorted(request.providers.mounts.items()):
            mounts.append(Mount(target=in_run, source=host, type="bind", read_only=True))
    env.update(tf_var_env(request, secrets=False))
    safe_id = re.sub(r"[^a-zA-Z0-9_.-]", "-", request.deploy_id)[:40]
    script = build_script(
        request.steps, LAYOUT, marker=marker, forward=FORWARD_IN_NAMESPACE, secrets_file=True
    )
    config: dict[str, Any] = dict(
        image=s.runner_image,
        entrypoint=["/bin/sh", "-c", script, "tfdeploy-run"],
        command=[],
        name=f"tfdeploy-{safe_id}-a{request.attempt}-r{request.run}-{_secrets.token_hex(3)}",
        labels={
            SERVICE_LABEL: service_name,
            "tfdeploy.deploy": request.deploy_id,
            "tfdeploy.attempt": str(request.attempt),
            "tfdeploy.run": str(request.run),
            "tfdeploy.workspace": request.workspace,
            # What a dead worker's recovery needs to read the run's end (service/recovery.py).
            "tfdeploy.steps": steps_label(request),
            PLACE_LABEL: place,
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
        mounts=mounts,
        log_config=LogConfig(
            type=LOG_DRIVER, config={"max-size": LOG_MAX_SIZE, "max-file": LOG_MAX_FILES}
        ),
        stdin_open=False,
        tty=False,
    )
    if s.runner_network is not None:
        config["network_mode"] = s.runner_network
    return config


def steps_label(request: RunRequest) -> str:
    return json.dumps({
        "steps": [msgspec.structs.asdict(s) for s in request.steps],
        "start_state": request.state is not None,
        "max_state_bytes": request.max_state_bytes,
    }, separators=(",", ":"))


@dataclass
class _Stop:
    timed_out: bool = False
    interrupted: bool = False
    output_limited: bool = False


class ChunkQueue:
    """Chunks from the attach thread to the event loop, bounded: the thread waits for room."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int = QUEUE_CHUNKS) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(size)
        self.closed = threading.Event()

    def put(self, item: tuple[str, bytes] | None) -> None:
        """From the thread: wait for room, unless the reader is gone."""
        while not self.closed.is_set():
            try:
                fut = asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop)
            except RuntimeError:  # the loop is closed
                return
            try:
                fut.result(timeout=1.0)
                return
            except concurrent.futures.TimeoutError:
                if not fut.cancel():  # it went in just now
                    return
            except concurrent.futures.CancelledError:
                return


def pump(stream: Any, chunks: ChunkQueue) -> None:
    """Read the demultiplexed attach stream in a thread and pass its frames on, then None."""
    try:
        for out, err in stream:
            if out:
                chunks.put(("stdout", out))
            if err:
                chunks.put(("stderr", err))
    except Exception as exc:  # the stream broke (container removed, engine gone)
        log.debug("output stream ended: %s", exc)
    finally:
        chunks.put(None)


def settle_sync(engine: Engine, cid: str) -> tuple[str, int]:
    """The container's fate now: ("ended", exit code) | ("running", -1) | ("gone", -1) |
    ("down", -1) when the engine does not answer. Killed without our asking (not by the
    OOM killer: that is the run's own failure) counts as stopped from outside."""
    try:
        st = engine.api.inspect_container(cid)["State"]
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


class ContainerRun:
    """Runs one slot's container to its end (``DockerRunner.run``)."""

    def __init__(self, engine: Engine, cid: str, request: RunRequest, out: RunOutput,
                 grace: float) -> None:
        self.engine, self.cid, self.request, self.out, self.grace = engine, cid, request, out, grace
        self.stop = _Stop()

    async def go(self, cancel: asyncio.Event, limit_hit: asyncio.Event) -> RunResult:
        started = time.monotonic()
        cid, out, engine = self.cid, self.out, self.engine
        chunks = ChunkQueue(asyncio.get_running_loop())
        watchdog: asyncio.Task[None] | None = None
        try:
            # Attach before starting, so not a byte of output is missed; demux keeps
            # stdout and stderr apart.
            stream = await engine.call(lambda: engine.api.attach(
                cid, stdout=True, stderr=True, stream=True, logs=True, demux=True))
            await engine.call(lambda: engine.api.start(cid))
            watchdog = asyncio.create_task(self._watchdog(cancel, limit_hit, chunks))
            engine_lost = False
            while True:
                in_thread(pump, stream, chunks)
                while (item := await chunks.queue.get()) is not None:
                    await out.feed(*item)
                fate, exit_code, lost = await self._settle()
                engine_lost = engine_lost or lost
                if fate != "running":
                    break
                # The engine came back with the container still running (live-restore), or
                # the stream broke alone: follow it again (output of the gap is not replayed).
                await out.say("system", "output stream lost; reattaching to the running container")
                try:
                    stream = await engine.call(lambda: engine.api.attach(
                        cid, stdout=True, stderr=True, stream=True, logs=False, demux=True))
                except RunnerError as exc:
                    log.debug("reattach to %s failed: %s", cid, exc)
                    stream = iter(())
                    await asyncio.sleep(1)  # then settle again: no tight loop
            watchdog.cancel()
            await out.finish()
            artifacts = Artifacts()
            if fate == "ended":
                # The volume outlives an engine restart: ride out one that is going away now.
                try:
                    artifacts = await engine.riding_out(
                        out.say, read_artifacts, engine.api, cid, self.request, out.record)
                except RunnerError as exc:
                    if not engine_unreachable(exc):
                        raise
                    # Away past engine_wait: the state stays in the container's volume, and
                    # the next attempt adopts it (DockerRunner._adopt_leftovers_sync).
                    fate, engine_lost = "down", True
            for note in artifacts.notes:
                await out.say("system", note)
            return await self._result(fate, exit_code, engine_lost, artifacts, started)
        except RunnerError:
            raise
        except ENGINE_ERRORS as exc:
            raise RunnerError(f"Docker engine error: {exc}") from exc
        finally:
            chunks.closed.set()
            if watchdog is not None:
                watchdog.cancel()
            # The place under the cap is free once the container stopped; the container itself
            # stays until the caller's release() (after the outcome is recorded).

    async def _result(self, fate: str, exit_code: int, engine_lost: bool,
                      artifacts: Artifacts, started: float) -> RunResult:
        stop, out = self.stop, self.out
        ours = stop.interrupted or stop.timed_out or stop.output_limited  # we signalled it
        outside = exit_code in (EXIT_STOPPED_OUTSIDE, EXIT_KILLED) and not ours
        if exit_code == EXIT_KILLED:
            exit_code = 137
        runner_lost = fate != "ended" or (exit_code != 0 and (engine_lost or outside))
        error = out.tail.error()
        if runner_lost:
            why = {
                "gone": "the container vanished (Docker engine restarted?)",
                "down": f"the Docker engine did not answer for {self.engine.engine_wait:g}s",
            }.get(
                fate,
                f"the container was stopped from outside (engine restart, docker stop); "
                f"exit {exit_code}",
            )
            state_note = (
                "its state was collected" if artifacts.state is not None
                else "its state stays in the container, for the next attempt" if fate == "down"
                else "no state left"
            )
            await out.say("system", f"runner lost: {why}; {state_note}")
            error = f"runner lost: {why}\n{error}".strip()
        return finish_result(
            self.request,
            exit_code=exit_code if fate == "ended" else -1,
            record=out.record,
            artifacts=artifacts,
            diagnostics=out.diagnostics,
            error=error,
            started=started,
            timed_out=stop.timed_out,
            interrupted=stop.interrupted,
            output_limited=stop.output_limited,
            runner_lost=runner_lost,
            output_bytes=out.total,
        )

    def _wait_briefly_sync(self, limit: float) -> None:
        with contextlib.suppress(*ENGINE_ERRORS):
            self.engine.api.wait(self.cid, timeout=limit)

    async def _settle(self) -> tuple[str, int, bool]:
        """After the output stream ended: wait until the container's fate is known, riding out
        an engine outage for at most ``engine_wait`` seconds. Returns (fate, exit code, whether
        the engine was seen down)."""
        lost_since: float | None = None
        pause = 0.5
        while True:
            fate, code = await asyncio.to_thread(settle_sync, self.engine, self.cid)
            if fate == "down":
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    await self.out.say(
                        "system", "Docker engine unreachable; waiting for it to come back")
                if now - lost_since >= self.engine.engine_wait:
                    return "down", -1, True
                await asyncio.sleep(pause)
                pause = min(pause * 2, ENGINE_POLL_MAX)
                continue
            if lost_since is not None:
                await self.out.say(
                    "system", f"Docker engine back after {time.monotonic() - lost_since:.1f}s")
            if fate == "running" and lost_since is None:
                # The stream ends just before the container is seen exited: give it a moment.
                await asyncio.to_thread(self._wait_briefly_sync, 5.0)
                fate, code = await asyncio.to_thread(settle_sync, self.engine, self.cid)
                if fate == "down":
                    continue
            return fate, code, lost_since is not None

    async def _watchdog(self, cancel: asyncio.Event, limit_hit: asyncio.Event,
                        chunks: ChunkQueue) -> None:
        await stop_on_cancel_or_timeout(
            self.request.timeout,
            cancel,
            self.stop,
            self.out.say,
            interrupt=lambda: self.engine.signal(self.cid, "SIGINT"),
            kill=lambda: self.engine.signal(self.cid, "SIGKILL"),
            grace=self.grace,
            output_limit=limit_hit,
        )
        await asyncio.sleep(30)
        await chunks.queue.put(None)  # the output stream never ended: stop waiting for it
