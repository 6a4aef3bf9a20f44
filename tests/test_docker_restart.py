"""Scenario 3 of issue 6 (docs/reliability.md): the Docker engine restarted mid-run.

These tests start a Docker engine of their own (``dockerd`` with its own socket, data root and
exec root under /tmp, no bridge, no iptables) and point the worker at it through DOCKER_HOST;
the machine's default engine is never touched. The runner image is loaded into it from the
default engine (``docker save | docker load``). The engine is then really stopped (SIGTERM: it
stops its containers; SIGKILL: its containers are killed when it starts again, live-restore being
off) and started again while a deploy runs. Nothing asserts on speed; the measured times are
printed (run with -s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_reliability import A_THEN_SLOW_B, TERMINAL, Env, _made_a, environment

pytestmark = pytest.mark.docker


class Engine:
    """A dockerd of the test's own; start/stop it at will."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.sock = directory / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, limit: float = 90) -> None:
        log = open(self.dir / "dockerd.log", "ab")  # noqa: SIM115 - closed right after Popen
        self.proc = subprocess.Popen(
            [
                "dockerd",
                "--host", self.host,
                "--data-root", str(self.dir / "root"),
                "--exec-root", str(self.dir / "exec"),
                "--pidfile", str(self.dir / "docker.pid"),
                "--bridge=none", "--iptables=false", "--ip-masq=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + limit
        while not self.answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not answer: {self.log_tail()}")
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, limit: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def answers(self) -> bool:
        r = subprocess.run(
            ["docker", "-H", self.host, "version", "--format", "{{.Server.Version}}"],
            capture_output=True, timeout=20, check=False,
        )
        return r.returncode == 0

    def docker(self, *args: str) -> str:
        return subprocess.run(
            ["docker", "-H", self.host, *args], capture_output=True, text=True, timeout=60,
            check=True,
        ).stdout

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "dockerd.log").read_text(errors="replace")[-3000:]
        return ""

    def cleanup(self) -> None:
        """Stop it, end what it left (its containerd and shims: children it started), unmount
        and remove its directories."""
        self.stop(signal.SIGTERM)
        mine = str(self.dir)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                if mine.encode() in cmdline:
                    os.kill(int(entry), signal.SIGKILL)
        time.sleep(0.5)
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f if mine in line.split()[1]]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def engine(runner_image: str) -> Iterator[Engine]:
    if not shutil.which("dockerd") or os.geteuid() != 0:
        pytest.skip("needs dockerd and root to start an engine of its own")
    from service.runners import docker_available

    if not docker_available():
        pytest.skip("no default Docker engine to take the runner image from")
    eng = Engine(Path(tempfile.mkdtemp(prefix="tfd-dk-", dir="/tmp")))
    try:
        eng.start()
        save = subprocess.Popen(["docker", "save", runner_image], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "-H", eng.host, "load"], stdin=save.stdout, check=True,
            capture_output=True, timeout=300,
        )
        assert save.wait(60) == 0
        yield eng
    finally:
        eng.cleanup()


def _spawn_worker(env: Env, engine: Engine, name: str) -> subprocess.Popen[bytes]:
    return env.spawn_worker(name, extra_env={"DOCKER_HOST": engine.host})


async def _sample_running(engine: Engine, deploy_id: str, stop: asyncio.Event) -> int:
    """The most containers of one deploy seen running at once on the engine (0.2 s samples;
    samples while the engine is down are skipped)."""
    import docker

    seen = 0
    client = None
    while not stop.is_set():
        try:
            if client is None:
                client = docker.DockerClient(base_url=engine.host, version="1.41", timeout=5)
            rows = await asyncio.to_thread(
                client.api.containers,
                filters={"label": f"tfdeploy.deploy={deploy_id}", "status": "running"},
            )
            seen = max(seen, len(rows))
        except Exception:  # the engine is down: nothing can run a new container either
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    if client is not None:
        client.close()
    return seen


def _at(event: dict) -> datetime:
    return datetime.fromisoformat(event["recorded_at"])


async def _restart_mid_run(env: Env, engine: Engine, sig: int, workspace: str) -> None:
    worker = _spawn_worker(env, engine, f"worker-{workspace}")
    d = await env.submit({"main.tf": A_THEN_SLOW_B % {"sleep": 25}}, workspace=workspace)
    env.deploy_ids = [d["id"]]
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(_sample_running(engine, d["id"], stop_sampling))
    try:
        await env.wait_log(d["id"], "B-STARTS", limit=180)
        await asyncio.sleep(3)  # let terraform write A into its state file
        await asyncio.to_thread(engine.stop, sig)
        await asyncio.sleep(5)  # the engine stays away a while
        await asyncio.to_thread(engine.start)
        back_wall = datetime.now(UTC)
        done = await env.wait(d["id"], limit=300)
    finally:
        stop_sampling.set()
        most_running = await sampler
    events = await env.events(d["id"])
    types = [e["type"] for e in events]
    log = await env.logs(d["id"])
    name = signal.Signals(sig).name
    failed = [e for e in events if e["type"] == "Failed"]
    started = [e for e in events if e["type"] == "Started"]
    moved = (_at(failed[0]) - back_wall).total_seconds() if failed else float("nan")
    restarted = (_at(started[1]) - back_wall).total_seconds() if len(started) > 1 else float("nan")
    print(
        f"\nscenario 3 ({name} to dockerd): engine back -> attempt concluded in {moved:.1f}s, "
        f"-> next Started in {restarted:.1f}s; events {types}"
    )
    assert done["status"] in TERMINAL and done["status"] != "cancelled", done
    assert done["status"] == "succeeded", (done, types, log[-3000:])
    assert failed and failed[0]["data"]["reason"] == "runner_lost", failed
    assert types[:2] == ["Requested", "Started"] and types[-1] == "Succeeded", types
    assert types.count("Started") == 2, types
    assert most_running == 1  # never two containers of the deploy at once
    assert "B-DONE" in log
    assert worker.poll() is None, env.worker_log(f"worker-{workspace}")[-3000:]
    if sig == signal.SIGTERM:
        # The engine stopped the container with SIGTERM: terraform stopped gracefully and
        # wrote its state, which was collected once the engine was back: A is not made again.
        assert types[:3] == ["Requested", "Started", "StatePersisted"], types
        assert _made_a(log) == 1, log
    # After the kill and the retry the container is removed from the engine.
    left = engine.docker("ps", "-aq", "--filter", f"label=tfdeploy.deploy={d['id']}").split()
    assert left == [], left
    state = (await env.client.get(f"/workspaces/{workspace}/state")).json()
    assert {r["name"] for r in state["resources"]} == {"a", "b"}


async def test_engine_restarted_with_sigterm_mid_run(database_url, tmp_path, runner_image, engine):
    async with environment(database_url, tmp_path, runner_image) as env:
        await _restart_mid_run(env, engine, signal.SIGTERM, "restart-term")


async def test_engine_killed_and_restarted_mid_run(database_url, tmp_path, runner_image, engine):
    """SIGKILL: the container outlives dockerd (its shim) until dockerd starts again and
    kills it (live-restore off). Terraform gets no chance to write its state then: what it had
    written is collected, the rest (possibly A) is made again by the retry."""
    async with environment(database_url, tmp_path, runner_image) as env:
        await _restart_mid_run(env, engine, signal.SIGKILL, "restart-kill")


@contextlib.asynccontextmanager
async def _worker_on(env: Env, engine: Engine, name: str, engine_wait: float) -> AsyncIterator[None]:
    """A worker in this process whose Docker runner talks to ``engine`` and waits at most
    ``engine_wait`` seconds for it; stopped at the end, and the engine started again if the
    test left it down (for whatever runs next on it)."""
    import docker

    from service.runners.docker import DockerRunner
    from service.worker import Worker

    assert env.services is not None
    client = docker.DockerClient(base_url=engine.host, timeout=30)
    runner = DockerRunner(env.services.settings, client=client)
    runner.engine_wait = engine_wait
    worker = Worker(env.services, name=name, runner=runner)
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.stop()
        await asyncio.wait_for(task, 120)
        await worker.close()
        client.close()
        if not await asyncio.to_thread(engine.answers):
            await asyncio.to_thread(engine.start)


async def test_engine_down_for_good_the_deploy_fails_with_a_reason(
    database_url, tmp_path, runner_image, engine
):
    """The engine goes away mid-run and stays away: the run gives up after ``engine_wait``
    (runner_lost), the next attempts cannot get a container (runner_error), the deploy ends
    failed — not deploying. A deploy submitted meanwhile fails the same way."""
    async with environment(database_url, tmp_path, runner_image) as env, _worker_on(
        env, engine, "down-worker", engine_wait=8.0
    ):
        d = await env.submit({"main.tf": A_THEN_SLOW_B % {"sleep": 60}}, workspace="down")
        env.deploy_ids = [d["id"]]
        await env.wait_log(d["id"], "B-STARTS", limit=180)
        await asyncio.to_thread(engine.stop, signal.SIGKILL)
        down_at = time.monotonic()
        done = await env.wait(d["id"], limit=180)
        ended_after = time.monotonic() - down_at
        later = await env.submit({"main.tf": A_THEN_SLOW_B % {"sleep": 0}}, workspace="later")
        env.deploy_ids.append(later["id"])
        later_done = await env.wait(later["id"], limit=120)
        print(f"\nscenario 3 (engine down for good): engine stopped -> deploy failed in {ended_after:.1f}s")
        events = await env.events(d["id"])
        reasons = [e["data"]["reason"] for e in events if e["type"] == "Failed"]
        assert done["status"] == "failed", done
        assert reasons[0] == "runner_lost", reasons
        assert set(reasons[1:]) <= {"runner_error"}, reasons
        assert events[-1]["type"] == "Failed" and events[-1]["data"]["final"] is True
        assert "Docker engine unreachable" in await env.logs(d["id"])
        assert later_done["status"] == "failed", later_done
        later_reasons = {
            e["data"]["reason"] for e in await env.events(later["id"]) if e["type"] == "Failed"
        }
        assert later_reasons == {"runner_error"}, later_reasons


async def test_engine_away_past_engine_wait_the_next_attempt_adopts_the_state_left(
    database_url, tmp_path, runner_image, engine
):
    """The engine stops (SIGTERM: terraform stops gracefully and writes its state into the
    container's volume) and stays away past ``engine_wait``: the attempt is given up as
    runner_lost with no state, and its container cannot be removed. When the engine is back,
    the next attempt finds that container, starts from the state it left (newer than anything
    persisted) and removes it: A is not made a second time."""
    async with environment(database_url, tmp_path, runner_image) as env:
        async with _worker_on(env, engine, "adopting-worker", engine_wait=8.0):
            d = await env.submit({"main.tf": A_THEN_SLOW_B % {"sleep": 25}}, workspace="adopt")
            env.deploy_ids = [d["id"]]
            await env.wait_log(d["id"], "B-STARTS", limit=180)
            await asyncio.sleep(2)  # terraform records A in its state file
            await asyncio.to_thread(engine.stop, signal.SIGTERM)
            deadline = time.monotonic() + 120
            while "Failed" not in [e["type"] for e in await env.events(d["id"])]:
                assert time.monotonic() < deadline, "the run never gave up on the engine"
                await asyncio.sleep(0.2)
            # The next attempt now waits for the engine (engine_wait) in acquire_slot.
            await asyncio.to_thread(engine.start)
            done = await env.wait(d["id"], limit=300)
        events = await env.events(d["id"])
        types = [e["type"] for e in events]
        log = await env.logs(d["id"])
        assert done["status"] == "succeeded", (done, types, log[-3000:])
        assert types == [
            "Requested", "Started", "Failed", "Retried", "Started", "StatePersisted", "Succeeded"
        ], types
        assert events[2]["data"]["reason"] == "runner_lost"
        assert "adopted the state left by attempt 1's container" in log
        assert _made_a(log) == 1, log  # A made by attempt 1 only
        left = engine.docker("ps", "-aq", "--filter", f"label=tfdeploy.deploy={d['id']}").split()
        assert left == [], left
        state = (await env.client.get("/workspaces/adopt/state")).json()
        assert {r["name"] for r in state["resources"]} == {"a", "b"}
