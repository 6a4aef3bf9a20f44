"""The local runner: terraform on this host, one sandbox (service/runners/sandbox.py) and one
private temporary directory per run.

The cap: a place is an ``flock`` (service/runners/local_places.py). The locked descriptor is
the stdin of a small holder process that starts the sandbox and waits for it; the worker keeps
its own copy. So the place is held while terraform runs -- also after the worker died (the
holder and the sandbox live on in their own session) -- and until the worker has recorded the
outcome; code in the sandbox never holds the descriptor.

Orphans: terraform's output goes to files in the run's temp dir (tailed into the log), not to
pipes, so a dead worker's pipes do not kill it with SIGPIPE. Before the run starts, a record
``<data dir>/local-runs/<deploy>-a<attempt>-r<run>.json`` names the process group, the
sandbox's pid 1 and the temp dir (and, once terraform ended, its exit code). ``run()`` keeps the
temp dir and the record until ``release()``, which the deployer calls once the state is
persisted and the outcome recorded. After a crash, ``collect_orphan`` (called by the recovery
of another worker on the same host, ``service/recovery.py``) interrupts the run if it still
goes (SIGINT, grace, SIGKILL) and reads what it left.

Without a working bubblewrap the runner refuses to start, unless
``TFDEPLOY_LOCAL_UNSANDBOXED=true``: then terraform runs as the service's user in the temp dir
with a minimal environment, and every run's log says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.runners import sandbox
from service.runners._common import (
    DEFAULT_GRACE,
    cancelled_before_start,
    exit_code_of,
    finish_result,
    in_thread,
    stop_on_cancel_or_timeout,
    tf_var_env,
    validate_request,
)
from service.runners.base import (
    LineSink,
    Reservation,
    RunnerError,
    RunRequest,
    RunResult,
    Slot,
)
from service.runners.local_files import prepare_dir, read_artifacts, read_child_pid, tail_file
from service.runners.local_orphans import RunRecords, collect, find_sandbox_pid
from service.runners.local_places import LocalPlace, LocalPlaces
from service.runners.output import RunOutput
from service.runners.script import (
    FORWARD_IN_NAMESPACE,
    Layout,
    build_script,
    new_marker,
)
from service.settings import Settings

log = logging.getLogger("tfdeploy.runner.local")

# Variables of the service's own environment that terraform may get (besides what the runner
# sets): certificates and proxies (provider downloads), and the operator's CLI config when the
# run has no ProviderSetup. Everything else, the service's secrets included, stays out.
PASS_THROUGH = ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                "http_proxy", "https_proxy", "no_proxy")
PATH_VALUED = {"TF_CLI_CONFIG_FILE", "SSL_CERT_FILE", "SSL_CERT_DIR"}
UNSANDBOXED_NOTE = (
    "WARNING: this run is NOT sandboxed (TFDEPLOY_LOCAL_UNSANDBOXED=true): terraform runs as "
    "the service's user and can read what that user can"
)


@dataclass(eq=False)
class LocalSlot:
    runner: LocalRunner
    request: RunRequest
    place: LocalPlace
    root: Path  # private temp dir: sandbox/ (the run's own dir), stdout, stderr
    _released: bool = field(default=False, repr=False)

    @property
    def run_dir(self) -> Path:
        return self.root / "sandbox"

    @property
    def host_layout(self) -> Layout:
        return Layout(str(self.run_dir))

    @property
    def config_dir(self) -> Path:
        return self.run_dir / "config"

    async def release(self) -> None:
        """Remove the temp dir and run record, then give the place under the cap back (called
        once the outcome is recorded; idempotent)."""
        if self._released:
            return
        self._released = True
        try:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, self.root, True))
            with contextlib.suppress(OSError):
                self.runner.run_record(self.request).unlink()
        finally:
            await self.place.release()


@dataclass
class _Current:
    proc: asyncio.subprocess.Process | None = None
    sandbox_pid: int | None = None
    timed_out: bool = False
    interrupted: bool = False
    output_limited: bool = False


class LocalRunner:
    name = "local"

    def __init__(
        self,
        settings: Settings,
        *,
        terraform: str | None = None,
        grace: float = DEFAULT_GRACE,
        use_sandbox: bool = True,
    ) -> None:
        """Refuses (RunnerError) without a working sandbox unless the settings allow an
        unsandboxed runner; ``use_sandbox=False`` asks for one (tests, benchmarks) and needs
        the same setting."""
        self.settings = settings
        self.grace = grace
        found = terraform or os.environ.get("TFDEPLOY_TERRAFORM") or shutil.which("terraform")
        self.terraform = os.path.realpath(found) if found else None
        self.places = LocalPlaces(settings.data_path / "local-slots", settings.max_concurrency)
        self.records = RunRecords(settings.data_path / "local-runs")
        self.network_none = settings.runner_network == "none"
        self.bwrap = sandbox.bwrap_path()
        problem = "sandbox not wanted" if not use_sandbox else (
            "bubblewrap (bwrap) is not installed" if self.bwrap is None
            else sandbox.probe(self.bwrap, self.network_none)
        )
        self.sandboxed = problem is None
        self.sandbox_problem = problem
        if not self.sandboxed:
            if not settings.local_unsandboxed:
                raise RunnerError(
                    "the local runner needs a working bubblewrap sandbox and has none "
                    f"({problem}); install bubblewrap, or set TFDEPLOY_LOCAL_UNSANDBOXED=true "
                    "to run terraform unsandboxed as the service's user"
                )
            log.warning("local runner: %s", UNSANDBOXED_NOTE)

    # -- the cap --------------------------------------------------------------------------

    async def running(self) -> int:
        """Places held on this host, by any process (orphaned terraform runs included)."""
        return await asyncio.to_thread(self.places.count)

    async def reserve(self, *, within: Slot | None = None) -> LocalPlace:
        if isinstance(within, LocalSlot) and not within._released:
            return within.place.share()  # the attempt's place, still held
        return await self.places.reserve()

    async def prepare(self, reservation: Reservation, request: RunRequest) -> LocalSlot:
        if not isinstance(reservation, LocalPlace):
            raise TypeError("LocalRunner.prepare needs a LocalPlace from its reserve")
        try:
            validate_request(request)
            if not self.terraform or not os.access(self.terraform, os.X_OK):
                raise RunnerError("terraform not found (put it on PATH or set TFDEPLOY_TERRAFORM)")
            try:
                # Cancelled meanwhile, the directory made is removed when the thread is done.
                root = await in_thread(self._prepare_dir, request,
                                       orphan=lambda made: shutil.rmtree(made, True))
            except OSError as exc:
                raise RunnerError(f"could not prepare the run's directory: {exc}") from exc
        except BaseException:
            await reservation.release()
            raise
        return LocalSlot(self, request, reservation, root)

    async def acquire_slot(self, request: RunRequest) -> LocalSlot:
        return await self.prepare(await self.reserve(), request)

    def _prepare_dir(self, request: RunRequest) -> Path:
        return prepare_dir(request, sandboxed=self.sandboxed)

    # -- run records (orphans) -------------------------------------------------------------

    def run_record(self, request: RunRequest) -> Path:
        return self.records.path(request.deploy_id, request.attempt, request.run)

    def _write_record(self, slot: LocalSlot, current: _Current, exit_code: int | None = None) -> None:
        if current.proc is None:
            return
        request = slot.request
        record: dict[str, Any] = {
            "deploy_id": request.deploy_id,
            "attempt": request.attempt,
            "run": request.run,
            "pgid": current.proc.pid,
            "sandbox_pid": current.sandbox_pid,
            "sandboxed": self.sandboxed,
            "root": str(slot.root),
            "worker_pid": os.getpid(),
            "steps": [{"name": s.name, "destroy": s.destroy,
                       "detailed_exitcode": s.detailed_exitcode} for s in request.steps],
            "start_state": request.state is not None,
            "max_state_bytes": request.max_state_bytes,
        }
        if exit_code is not None:  # terraform ended: a recoverer reports its real outcome
            record["exit_code"] = exit_code
        self.records.write(request, record)

    # -- the run --------------------------------------------------------------------------

    def _hidden(self) -> list[str]:
        """Host paths a sandbox must not see even where they lie under a bound root."""
        hidden = [str(self.settings.data_path), *sandbox.DEFAULT_SOCKET_DIRS, sys.prefix,
                  str(Path(__file__).resolve().parents[2]), tempfile.gettempdir()]
        url = self.settings.database_url or ""
        hidden += re.findall(r"host=(/[^&\s]+)", url)
        return hidden

    def _env(self, slot: LocalSlot) -> tuple[dict[str, str], list[str]]:
        """A minimal environment (nothing of the service's own), and the host files the
        sandbox must bind for it."""
        request = slot.request
        inside = Layout(sandbox.RUN_ROOT) if self.sandboxed else slot.host_layout
        env = {
            "PATH": sandbox.PATH if self.sandboxed else (os.environ.get("PATH") or os.defpath),
            "HOME": inside.home,
            "TMPDIR": "/tmp" if self.sandboxed else inside.home,
            "LANG": "C.UTF-8",
            "CHECKPOINT_DISABLE": "1",
            "TF_IN_AUTOMATION": "1",
        }
        binds: list[str] = []
        names = PASS_THROUGH if request.providers else (*PASS_THROUGH, "TF_CLI_CONFIG_FILE")
        for name in names:
            value = os.environ.get(name)
            if not value or (name in PATH_VALUED and not os.path.exists(value)):
                continue
            env[name] = value
            if name in PATH_VALUED:
                binds.append(value)
        setup = request.providers
        if setup is not None:
            if not self.sandboxed:
                setup = setup.with_host_paths()
            env.update(setup.env)
            env["TF_CLI_CONFIG_FILE"] = inside.cli_config
        env.update(tf_var_env(request))
        return env, binds

    async def run(self, slot: Any, on_line: LineSink, cancel: asyncio.Event) -> RunResult:
        if not isinstance(slot, LocalSlot):
            raise TypeError("LocalRunner.run needs a LocalSlot from its prepare")
        request = slot.request
        started = time.monotonic()
        current = _Current()
        limit_hit = asyncio.Event()
        marker = new_marker()
        out = RunOutput(on_line, request.steps, max_bytes=request.max_output_bytes,
                        marker=marker + " ", on_limit=limit_hit.set)
        if not self.sandboxed:
            await out.say("system", UNSANDBOXED_NOTE)
        if cancel.is_set():
            await out.say("system", "cancelled before terraform started")
            return cancelled_before_start(request, started)
        watchdog: asyncio.Task[None] | None = None
        try:
            exit_code = await self._start(slot, out, current, marker)
            watchdog = asyncio.create_task(
                stop_on_cancel_or_timeout(
                    request.timeout, cancel, current, out.say,
                    interrupt=lambda: self._signal(current, signal.SIGINT),
                    kill=lambda: self._signal(current, signal.SIGKILL),
                    grace=self.grace, output_limit=limit_hit,
                )
            )
            exit_code = await self._follow(slot, out, current)
            watchdog.cancel()
            await out.finish()
            if not out.record.began and exit_code != 0 and not (
                current.interrupted or current.timed_out or current.output_limited
            ):
                raise RunnerError(f"the run did not start (exit {exit_code}): {out.tail.error()}")
            artifacts = await asyncio.to_thread(read_artifacts, slot.host_layout, request,
                                                out.record)
            for note in artifacts.notes:
                await out.say("system", note)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._write_record, slot, current, exit_code)
            return finish_result(
                request, exit_code=exit_code, record=out.record, artifacts=artifacts,
                diagnostics=out.diagnostics, error=out.tail.error(), started=started,
                timed_out=current.timed_out, interrupted=current.interrupted,
                output_limited=current.output_limited, output_bytes=out.total,
            )
        except OSError as exc:
            raise RunnerError(f"could not run terraform: {exc}") from exc
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if current.proc is not None and current.proc.returncode is None:
                # Cancelled from outside (the job task): leave nothing running.
                await self._signal(current, signal.SIGKILL)
            # The place, the temp dir (the state) and the run record are all kept until the
            # caller's release(), after the outcome is recorded: a slot spans the whole
            # attempt, so the cap can be checked exactly from the events (Started .. outcome).

    async def _start(self, slot: LocalSlot, out: RunOutput, current: _Current, marker: str) -> int:
        """Start the run's process tree; returns 0 (the exit code comes from ``_follow``)."""
        request = slot.request
        env, binds = self._env(slot)
        inside = Layout(sandbox.RUN_ROOT) if self.sandboxed else slot.host_layout
        # Sandboxed, only its pid 1 gets SIGINT and passes it on; unsandboxed, the whole
        # process group gets it (terraform included), so the script need not.
        forward = FORWARD_IN_NAMESPACE if self.sandboxed else ":"
        script = build_script(request.steps, inside, marker=marker, forward=forward,
                              secrets_file=False)
        paths = {name: slot.root / name for name in ("stdout", "stderr")}
        fds = {name: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
               for name, p in paths.items()}
        info_r = info_w = -1
        try:
            if self.sandboxed:
                assert self.bwrap is not None and self.terraform is not None
                info_r, info_w = os.pipe()
                mounts = dict(request.providers.mounts) if request.providers else {}
                args = sandbox.HOLDER + sandbox.command(
                    bwrap=self.bwrap, run_dir=str(slot.run_dir), terraform=self.terraform,
                    script=script, info_fd=info_w, network_none=self.network_none,
                    mounts=mounts, extra_files=binds, hidden=self._hidden(),
                    drop_to=sandbox.sandbox_user(),
                    max_processes=self.settings.runner_pids * self.settings.max_concurrency,
                )
                current.proc = await asyncio.create_subprocess_exec(
                    *args, stdin=slot.place.fd, stdout=fds["stdout"], stderr=fds["stderr"],
                    env=env, pass_fds=(info_w,), start_new_session=True,
                )
            else:
                env["PATH"] = f"{os.path.dirname(self.terraform or '')}:{env['PATH']}"
                current.proc = await asyncio.create_subprocess_exec(
                    "/bin/sh", "-c", script, "tfdeploy-run",
                    stdin=asyncio.subprocess.DEVNULL, stdout=fds["stdout"],
                    stderr=fds["stderr"], env=env, pass_fds=(slot.place.fd,),
                    cwd=slot.run_dir, start_new_session=True,
                )
        finally:
            for fd in fds.values():
                os.close(fd)
            if info_w >= 0:
                os.close(info_w)
        try:
            await asyncio.to_thread(self._write_record, slot, current)
            if info_r >= 0:
                current.sandbox_pid = await read_child_pid(info_r)
                info_r = -1
                await asyncio.to_thread(self._write_record, slot, current)
        except OSError as exc:
            log.warning("could not record the run of %s: %s", request.deploy_id, exc)
        finally:
            if info_r >= 0:
                os.close(info_r)
        return 0

    async def _follow(self, slot: LocalSlot, out: RunOutput, current: _Current) -> int:
        assert current.proc is not None
        ended = asyncio.Event()
        tails = asyncio.gather(
            *(tail_file(slot.root / name, name, out, ended) for name in ("stdout", "stderr"))
        )
        try:
            returncode = await current.proc.wait()
        finally:
            ended.set()
            try:
                await asyncio.wait_for(asyncio.shield(tails), 30)
            except TimeoutError:
                tails.cancel()
        return exit_code_of(returncode)

    async def _signal(self, current: _Current, sig: int) -> None:
        proc = current.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if sig == signal.SIGINT and self.sandboxed:
                # pid 1 of the sandbox passes it on to everything in it. (Never the group: bwrap
                # itself would die of it, and the run look ended while terraform still writes.)
                if current.sandbox_pid is None:
                    current.sandbox_pid = find_sandbox_pid(proc.pid)
                if current.sandbox_pid is not None:
                    os.kill(current.sandbox_pid, sig)
            else:
                os.killpg(proc.pid, sig)

    # -- a dead worker's run --------------------------------------------------------------

    async def collect_orphan(self, deploy_id: str, attempt: int) -> RunResult | None:
        """Take over the latest run of (deploy, attempt) a dead worker left on this host
        (``local_orphans.collect``). Its temp dir stays until ``discard_orphan``."""
        return await collect(self.records, deploy_id, attempt, self.grace)

    async def discard_orphan(self, deploy_id: str, attempt: int) -> None:
        """Remove a dead worker's temp dirs and records for (deploy, attempt), if any."""
        await self.records.discard(deploy_id, attempt)

    async def close(self) -> None:
        return None


