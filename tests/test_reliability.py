"""Reliability with real processes and real kills (issue 6, docs/reliability.md).

Workers run as subprocesses (`python -m service.cli worker`) so they can be SIGKILLed or sent
SIGTERM; the API is served in this process on the same database. Waits are generous and nothing
is asserted on speed: the measured recovery times are printed (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from service.api.app import create_app
from service.auth import create_token
from service.runners import docker_available
from service.services import open_services
from service.settings import from_env
from service.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"succeeded", "failed", "cancelled"}

# A is made at once; then B. With sleep 60, B runs long enough that the dead worker's recovery
# (about 15-25 s) finds it still running.
A_THEN_SLOW_B = """
resource "terraform_data" "a" {
  provisioner "local-exec" { command = "echo MADE-A" }
}
resource "terraform_data" "b" {
  depends_on = [terraform_data.a]
  provisioner "local-exec" { command = "echo B-STARTS; sleep %(sleep)d; echo B-DONE" }
}
"""

# The same, but B runs until a wall-clock deadline (seconds since the epoch): long enough for a
# dead worker's recovery to find it running, while the retry that replaces it only waits out
# the rest instead of the whole sleep again.
A_THEN_B_UNTIL = """
resource "terraform_data" "a" {
  provisioner "local-exec" { command = "echo MADE-A" }
}
resource "terraform_data" "b" {
  depends_on = [terraform_data.a]
  provisioner "local-exec" {
    command = "echo B-STARTS; while test $(date +%%s) -lt %(until)d; do sleep 1; done; echo B-DONE"
  }
}
"""


# A worker whose Docker runner labels its containers with a value of the test's own.
LABELLED_WORKER = """
import sys
import service.worker as worker
from service.runners import make_runner as make_any
from service.runners.docker import DockerRunner

LABEL = sys.argv[1]

def make_runner(settings, **kwargs):
    if settings.runner == "docker":
        return DockerRunner(settings, service_name=LABEL)
    return make_any(settings, **kwargs)

worker.make_runner = make_runner
from service.cli import main
sys.exit(main(["worker"]))
"""


def _made_a(log: str) -> int:
    return len([ln for ln in log.splitlines() if ln.rstrip().endswith("(local-exec): MADE-A")])


class Env:
    """The API in this process; workers as subprocesses (or in this process) on one database."""

    def __init__(self, database_url: str, tmp_path: Path, runner_image: str, runner: str = "docker") -> None:
        self.database_url = database_url
        self.tmp_path = tmp_path
        self.data_dir = tmp_path / "data"
        self.runner_image = runner_image
        self.runner = runner
        self.values = dict(
            data_dir=str(self.data_dir),
            runner=runner,
            runner_image=runner_image,
            runner_network="none",
            retry_delay=0.05,
            max_concurrency=4,
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.client: httpx.AsyncClient
        self.services = None

    def spawn_worker(
        self,
        name: str,
        *,
        argv: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
        docker_label: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """``python -m service.cli worker`` (or ``argv``) on this test's database and data dir,
        its output in ``<tmp>/<name>.log``. ``docker_label``: the Docker runner's containers
        carry (and its cap counts) this ``tfdeploy.service`` label, not the service's own: a
        cap of the test's own on an engine others use too."""
        if docker_label is not None:
            script = self.tmp_path / "labelled_worker.py"
            script.write_text(LABELLED_WORKER)
            argv = [sys.executable, str(script), docker_label]
            extra_env = {**(extra_env or {}), "PYTHONPATH": str(ROOT)}
        env = {k: v for k, v in os.environ.items() if not k.startswith("TFDEPLOY_")}
        env.update(
            TFDEPLOY_DATABASE_URL=self.database_url,
            TFDEPLOY_DATA_DIR=str(self.data_dir),
            TFDEPLOY_RUNNER=self.runner,
            TFDEPLOY_RUNNER_IMAGE=self.runner_image,
            TFDEPLOY_RUNNER_NETWORK="none",
            TFDEPLOY_RETRY_DELAY="0.05",
            TFDEPLOY_MAX_CONCURRENCY="4",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra_env or {})
        out = open(self.tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            argv or [sys.executable, "-m", "service.cli", "worker"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.procs.append(proc)
        return proc

    def worker_log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    async def submit(self, files: dict[str, str], **body: object) -> dict:
        r = await self.client.post("/deploys", json={"files": files, **body})
        assert r.status_code == 202, r.text
        return r.json()

    async def get(self, deploy_id: str) -> dict:
        return (await self.client.get(f"/deploys/{deploy_id}")).json()

    async def wait(self, deploy_id: str, limit: float = 240) -> dict:
        deadline = time.monotonic() + limit
        d: dict = {}
        while time.monotonic() < deadline:
            d = await self.get(deploy_id)
            if d["status"] in TERMINAL:
                return d
            await asyncio.sleep(0.2)
        raise AssertionError(f"deploy {deploy_id} still {d.get('status')} after {limit}s")

    async def events(self, deploy_id: str) -> list[dict]:
        return (await self.client.get(f"/deploys/{deploy_id}/events")).json()["items"]

    async def logs(self, deploy_id: str) -> str:
        return (await self.client.get(f"/deploys/{deploy_id}/logs")).text

    async def wait_log(self, deploy_id: str, text: str, limit: float = 120) -> None:
        deadline = time.monotonic() + limit
        while text not in await self.logs(deploy_id):
            assert time.monotonic() < deadline, f"{text!r} never appeared in the log"
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def environment(
    database_url: str, tmp_path: Path, runner_image: str, runner: str = "docker"
) -> AsyncIterator[Env]:
    if runner == "docker" and not docker_available():
        pytest.skip("no Docker engine")
    env = Env(database_url, tmp_path, runner_image, runner)
    # The tests poll the API much faster than a user may (TFDEPLOY_RATE_LIMIT, 50/s).
    settings = from_env({}, **{**env.values, "rate_limit": "100000/s"})
    services = await open_services(settings, database_url)
    env.services = services
    async with services.pool.connection() as conn:
        token = await create_token(conn, "ann")
    transport = httpx.ASGITransport(app=create_app(services))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers={"Authorization": f"Bearer {token}"}
        ) as client:
            env.client = client
            yield env
    finally:
        for proc in env.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
        await services.close()
        _remove_containers_of_test(env)


def _remove_containers_of_test(env: Env) -> None:
    """Whatever a failed run left behind (containers of this test's deploys only)."""
    import docker

    ids = getattr(env, "deploy_ids", [])
    if not ids or env.runner != "docker":
        return
    client = docker.from_env()
    try:
        for deploy_id in ids:
            for row in client.api.containers(all=True, filters={"label": f"tfdeploy.deploy={deploy_id}"}):
                with contextlib.suppress(Exception):
                    client.api.remove_container(row["Id"], v=True, force=True)
    finally:
        client.close()


async def _sample_running(deploy_id: str, stop: asyncio.Event) -> int:
    """The most containers of one deploy seen running at once, sampled from the Docker API."""
    import docker

    client = docker.from_env()
    seen = 0
    try:
        while not stop.is_set():
            rows = await asyncio.to_thread(
                client.api.containers, filters={"label": f"tfdeploy.deploy={deploy_id}", "status": "running"}
            )
            seen = max(seen, len(rows))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
    finally:
        client.close()
    return seen


async def _in_process_worker(env: Env) -> tuple[Worker, asyncio.Task[None]]:
    assert env.services is not None
    worker = Worker(env.services, name="second-worker")
    return worker, asyncio.create_task(worker.run())


@pytest.mark.docker
async def test_worker_killed_mid_apply_the_next_attempt_goes_on_from_the_kept_state(
    database_url, tmp_path, runner_image
):
    """Scenario 1: SIGKILL while terraform runs B; the orphaned container is interrupted, its
    state kept, Failed(worker_lost) + Retried, attempt 2 starts from that state: A once."""
    async with environment(database_url, tmp_path, runner_image) as env:
        first = env.spawn_worker("first")
        until = int(time.time()) + 45
        d = await env.submit({"main.tf": A_THEN_B_UNTIL % {"until": until}}, workspace="killed")
        env.deploy_ids = [d["id"]]
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(_sample_running(d["id"], stop_sampling))
        second = None
        try:
            await env.wait_log(d["id"], "B-STARTS")
            assert "MADE-A" in await env.logs(d["id"])
            os.kill(first.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            first.wait(30)
            worker, task = await _in_process_worker(env)
            second = (worker, task)
            restarted_after = None
            deadline = time.monotonic() + 240
            while restarted_after is None:
                assert time.monotonic() < deadline, "no second attempt started"
                types = [e["type"] for e in await env.events(d["id"])]
                if types.count("Started") >= 2:
                    restarted_after = time.monotonic() - killed_at
                await asyncio.sleep(0.2)
            done = await env.wait(d["id"], limit=300)
        finally:
            stop_sampling.set()
            most_running = await sampler
            if second is not None:
                second[0].stop()
                await asyncio.wait_for(second[1], 120)
                await second[0].close()
        print(f"\nscenario 1 (worker SIGKILLed mid-apply): kill -> next Started in {restarted_after:.1f}s")
        assert done["status"] == "succeeded", done
        events = await env.events(d["id"])
        types = [e["type"] for e in events]
        assert types == [
            "Requested", "Started", "StatePersisted", "Failed", "Retried",
            "Started", "StatePersisted", "Succeeded",
        ], types
        failed = next(e for e in events if e["type"] == "Failed")
        assert failed["data"]["reason"] == "worker_lost"
        assert failed["data"]["final"] is False
        log = await env.logs(d["id"])
        assert _made_a(log) == 1, log  # attempt 2 started from the state attempt 1 left
        assert "B-DONE" in log
        assert most_running == 1  # never two containers of the deploy at once
        state = (await env.client.get("/workspaces/killed/state")).json()
        assert {r["name"] for r in state["resources"]} == {"a", "b"}
        import docker

        client = docker.from_env()
        try:
            left = client.api.containers(all=True, filters={"label": f"tfdeploy.deploy={d['id']}"})
        finally:
            client.close()
        assert left == []  # the orphan was removed once collected
        async with env.services.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT status, count(*) FROM procrastinate_jobs GROUP BY status ORDER BY status"
            )
            statuses = dict(await cur.fetchall())
        assert "doing" not in statuses and "todo" not in statuses, statuses


@pytest.mark.docker
async def test_worker_killed_after_terraform_ended_its_result_is_collected(
    database_url, tmp_path, runner_image
):
    """Scenario 1, the other branch: the container finished after the worker died; recovery
    collects its exit code and state and concludes it like a normal outcome (no retry)."""
    async with environment(database_url, tmp_path, runner_image) as env:
        first = env.spawn_worker("first")
        d = await env.submit({"main.tf": A_THEN_SLOW_B % {"sleep": 2}}, workspace="ended")
        env.deploy_ids = [d["id"]]
        await env.wait_log(d["id"], "B-STARTS")
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        first.wait(30)
        await _wait_container_exited(d["id"])  # the orphan ends on its own before recovery
        worker, task = await _in_process_worker(env)
        try:
            done = await env.wait(d["id"], limit=240)
            concluded_after = time.monotonic() - killed_at
        finally:
            worker.stop()
            await asyncio.wait_for(task, 120)
            await worker.close()
        print(f"\nscenario 1 (container ended after the kill): kill -> Succeeded in {concluded_after:.1f}s")
        assert done["status"] == "succeeded", done
        types = [e["type"] for e in await env.events(d["id"])]
        assert types == ["Requested", "Started", "StatePersisted", "Succeeded"], types
        log = await env.logs(d["id"])
        assert _made_a(log) == 1
        assert "worker lost: took over its container" in log
        state = (await env.client.get("/workspaces/ended/state")).json()
        assert {r["name"] for r in state["resources"]} == {"a", "b"}


@pytest.mark.docker
async def test_sigterm_lets_the_running_deploy_finish_and_exits_0(database_url, tmp_path, runner_image):
    """Scenario 5: SIGTERM mid-deploy: no new job is taken, the running one ends succeeded,
    the worker process exits 0."""
    async with environment(database_url, tmp_path, runner_image) as env:
        proc = env.spawn_worker("graceful")
        d = await env.submit({"main.tf": A_THEN_SLOW_B % {"sleep": 6}}, workspace="graceful")
        env.deploy_ids = [d["id"]]
        await env.wait_log(d["id"], "B-STARTS")
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while "Stop requested" not in env.worker_log("graceful"):
            assert time.monotonic() < deadline, env.worker_log("graceful")[-3000:]
            await asyncio.sleep(0.1)
        # Queued after the stop request: the stopping worker must not take it.
        later = await env.submit({"main.tf": A_THEN_SLOW_B % {"sleep": 0}}, workspace="later")
        env.deploy_ids.append(later["id"])
        rc = await asyncio.to_thread(proc.wait, 180)
        assert rc == 0, env.worker_log("graceful")[-3000:]
        done = await env.get(d["id"])
        assert done["status"] == "succeeded", done
        types = [e["type"] for e in await env.events(d["id"])]
        assert types == ["Requested", "Started", "StatePersisted", "Succeeded"], types
        assert (await env.get(later["id"]))["status"] == "queued"


@pytest.mark.parametrize(
    ("runner", "trigger"),
    [pytest.param("docker", "grace", marks=pytest.mark.docker), ("local", "second-signal")],
)
async def test_sigterm_past_the_grace_hands_the_running_deploy_over_with_its_state(
    database_url, tmp_path, runner_image, runner: str, trigger: str
):
    """Scenario 5, past the grace: SIGTERM while terraform runs B (A made); when the grace is
    over (TFDEPLOY_SHUTDOWN_GRACE=1) -- or at a second SIGTERM, with the default grace of an
    hour -- the worker interrupts terraform, persists the state it wrote, records
    Failed(worker_stopped) that does not spend the budget (attempt 1 of 1 goes on as attempt 2
    of 2), queues the next attempt and exits 0. Another worker then goes on from that state:
    A made once."""
    import shutil

    if runner == "local" and not shutil.which("terraform"):
        pytest.skip("no terraform on PATH")
    async with environment(database_url, tmp_path, runner_image, runner=runner) as env:
        grace = {"TFDEPLOY_SHUTDOWN_GRACE": "1"} if trigger == "grace" else {}
        proc = env.spawn_worker("stopping", extra_env=grace)
        d = await env.submit(
            {"main.tf": A_THEN_SLOW_B % {"sleep": 8}}, workspace="handed", max_attempts=1
        )
        env.deploy_ids = [d["id"]]
        await env.wait_log(d["id"], "B-STARTS")
        os.kill(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        if trigger == "second-signal":
            await asyncio.sleep(1)
            # Still running: the first signal alone waits (an hour, by default).
            assert [e["type"] for e in await env.events(d["id"])] == ["Requested", "Started"]
            os.kill(proc.pid, signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 120)
        exited_after = time.monotonic() - signalled
        assert rc == 0, env.worker_log("stopping")[-3000:]
        events = await env.events(d["id"])
        assert [e["type"] for e in events] == [
            "Requested", "Started", "StatePersisted", "Failed", "Retried"
        ], events
        failed = events[3]["data"]
        assert (failed["reason"], failed["final"], failed["counted"]) == ("worker_stopped", False, False)
        assert events[4]["data"]["attempt"] == 2 and events[4]["data"]["max_attempts"] == 2
        view = await env.get(d["id"])
        assert (view["status"], view["attempt"], view["max_attempts"]) == ("retrying", 2, 2)
        state = (await env.client.get("/workspaces/handed/state")).json()
        # A made; B interrupted in its provisioner, so terraform keeps it as tainted (the next
        # attempt replaces it).
        status = {r["name"]: r["instances"][0].get("status") for r in state["resources"]}
        assert status == {"a": None, "b": "tainted"}, status
        assert "worker stopping: interrupting terraform" in await env.logs(d["id"])

        env.spawn_worker("next")
        done = await env.wait(d["id"])
        assert done["status"] == "succeeded", done
        types = [e["type"] for e in await env.events(d["id"])]
        assert types[5:] == ["Started", "StatePersisted", "Succeeded"], types
        log = await env.logs(d["id"])
        assert _made_a(log) == 1, log
        state = (await env.client.get("/workspaces/handed/state")).json()
        status = {r["name"]: r["instances"][0].get("status") for r in state["resources"]}
        assert status == {"a": None, "b": None}, status
        print(f"\nscenario 5 ({runner}, {trigger}): SIGTERM -> worker exited {exited_after:.1f}s, "
              "deploy handed over and finished by another worker")


async def test_a_worker_at_its_cap_takes_nothing_and_sigterm_leaves_the_queue_to_others(
    database_url, tmp_path, runner_image
):
    """Scenario 5 with a full host: a worker with cap 1 runs one deploy and takes no second job
    while it does (a host at its cap takes nothing off the queue: service/dispatch.py). After
    SIGTERM the running deploy finishes and the worker exits; the second deploy's job was never
    taken, and another worker runs it."""
    import shutil

    if not shutil.which("terraform"):
        pytest.skip("no terraform on PATH")
    async with environment(database_url, tmp_path, runner_image, runner="local") as env:
        proc = env.spawn_worker("stopping", extra_env={"TFDEPLOY_MAX_CONCURRENCY": "1"})
        first = await env.submit({"main.tf": A_THEN_SLOW_B % {"sleep": 4}}, workspace="p1")
        await env.wait_log(first["id"], "B-STARTS")
        second = await env.submit({"main.tf": A_THEN_SLOW_B % {"sleep": 0}}, workspace="p2")
        env.deploy_ids = [first["id"], second["id"]]

        async def jobs() -> dict[str, str]:
            async with env.services.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT args->>'deploy_id', status FROM procrastinate_jobs"
                    " WHERE status IN ('todo', 'doing')"
                )
                return {r[0]: r[1] for r in await cur.fetchall()}

        for _ in range(15):  # 1.5 s while the first one runs: the second is never taken
            assert (await jobs()).get(second["id"]) == "todo"
            await asyncio.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 180)
        assert rc == 0, env.worker_log("stopping")[-3000:]
        assert (await env.get(first["id"]))["status"] == "succeeded"
        assert [e["type"] for e in await env.events(second["id"])] == ["Requested"]
        assert (await jobs()).get(second["id"]) == "todo"
        env.spawn_worker("next")
        done = await env.wait(second["id"])
        assert done["status"] == "succeeded", done
        types = [e["type"] for e in await env.events(second["id"])]
        assert types == ["Requested", "Started", "StatePersisted", "Succeeded"], types


async def test_local_runner_worker_killed_mid_apply_its_terraform_is_taken_over(
    database_url, tmp_path, runner_image
):
    """Scenario 1 with the local runner: the dead worker's terraform process group (named in
    <data dir>/local-runs) is interrupted by the recovering worker on the same host, the state
    it wrote is kept, and attempt 2 goes on from it: A once."""
    import shutil

    if not shutil.which("terraform"):
        pytest.skip("no terraform on PATH")
    async with environment(database_url, tmp_path, runner_image, runner="local") as env:
        first = env.spawn_worker("first")
        until = int(time.time()) + 45
        d = await env.submit({"main.tf": A_THEN_B_UNTIL % {"until": until}}, workspace="local-killed")
        await env.wait_log(d["id"], "B-STARTS")
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        first.wait(30)
        records = list((env.data_dir / "local-runs").glob("*.json"))
        assert len(records) == 1  # the orphan is on record
        worker, task = await _in_process_worker(env)
        restarted_after = None
        try:
            deadline = time.monotonic() + 240
            while restarted_after is None:
                assert time.monotonic() < deadline, "no second attempt started"
                types = [e["type"] for e in await env.events(d["id"])]
                if types.count("Started") >= 2:
                    restarted_after = time.monotonic() - killed_at
                await asyncio.sleep(0.2)
            done = await env.wait(d["id"], limit=300)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 120)
            await worker.close()
        print(f"\nscenario 1, local runner: kill -> next Started in {restarted_after:.1f}s")
        assert done["status"] == "succeeded", done
        events = await env.events(d["id"])
        types = [e["type"] for e in events]
        assert types == [
            "Requested", "Started", "StatePersisted", "Failed", "Retried",
            "Started", "StatePersisted", "Succeeded",
        ], types
        assert next(e for e in events if e["type"] == "Failed")["data"]["reason"] == "worker_lost"
        log = await env.logs(d["id"])
        assert _made_a(log) == 1, log
        assert list((env.data_dir / "local-runs").glob("*.json")) == []
        state = (await env.client.get("/workspaces/local-killed/state")).json()
        assert {r["name"] for r in state["resources"]} == {"a", "b"}


SLOW_PROBED = """
variable "probe" {}
resource "terraform_data" "slow" {
  input = var.probe
  provisioner "local-exec" { command = "echo SLOW-STARTS; sleep 8" }
}
"""


def _applies_running(marker: str) -> int:
    """terraform apply processes on this host that run one of this test's deploys (their
    environment carries TF_VAR_probe=<marker>): local sandboxes and containers alike. A child
    that terraform is forking (a provisioner's shell, before its exec) still shows terraform's
    command line and environment: it is not another apply, so children of a counted process are
    not counted."""
    wanted = f"TF_VAR_probe={marker}".encode()
    applies: dict[int, int] = {}  # pid -> parent pid
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if len(argv) < 2 or not argv[0].endswith(b"terraform") or argv[1] != b"apply":
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if wanted not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                applies[int(entry)] = int(f.read().rsplit(b")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return sum(1 for parent in applies.values() if parent not in applies)


@pytest.mark.parametrize(
    "runner", [pytest.param("local"), pytest.param("docker", marks=pytest.mark.docker)]
)
async def test_two_workers_one_killed_never_more_applies_than_the_cap(
    database_url, tmp_path, runner_image, runner
):
    """Issue 12.8: two workers on one host, cap 2; one is SIGKILLed while it runs terraform.
    Its terraform goes on (an orphan) and keeps its place: the other worker starts nothing
    beyond the cap until recovery has interrupted it. terraform apply processes are sampled
    every 50 ms; all deploys end succeeded."""
    import secrets as _secrets
    import shutil
    import socket

    if runner == "local" and not shutil.which("terraform"):
        pytest.skip("no terraform on PATH")
    async with environment(database_url, tmp_path, runner_image, runner=runner) as env:
        marker = _secrets.token_hex(6)
        label = f"tfdeploy-test-{marker}" if runner == "docker" else None
        cap = {"TFDEPLOY_MAX_CONCURRENCY": "2"}
        a = env.spawn_worker("a", extra_env=cap, docker_label=label)
        b = env.spawn_worker("b", extra_env=cap, docker_label=label)
        # The worker that runs a deploy first is the one killed (either may take all the places
        # of their shared host while the other waits).
        workers = {f"{socket.gethostname()}-{p.pid}": p for p in (a, b)}
        ids = []
        for i in range(6):
            d = await env.submit({"main.tf": SLOW_PROBED}, workspace=f"cap-{i}",
                                 variables={"probe": marker})
            ids.append(d["id"])
        env.deploy_ids = ids
        samples: list[int] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                samples.append(await asyncio.to_thread(_applies_running, marker))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        try:
            deadline = time.monotonic() + 120
            running_a: list[str] = []
            victim = None
            while not running_a:  # kill a worker while its terraform sleeps (8 s left)
                assert time.monotonic() < deadline, "no worker ran a deploy"
                for deploy_id in ids:
                    events = await env.events(deploy_id)
                    if (events[-1]["type"] == "Started"
                            and events[-1]["data"]["worker"] in workers
                            and "SLOW-STARTS" in await env.logs(deploy_id)):
                        victim = victim or workers[events[-1]["data"]["worker"]]
                        if workers[events[-1]["data"]["worker"]] is victim:
                            running_a.append(deploy_id)
                await asyncio.sleep(0.05)
            assert victim is not None
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(30)
            killed_at = time.monotonic()
            done = [await env.wait(deploy_id, limit=300) for deploy_id in ids]
            ended_after = time.monotonic() - killed_at
        finally:
            stop.set()
            await sampler
        print(f"\ntwo workers, one killed ({runner}): {len(samples)} samples, most applies at "
              f"once {max(samples)}, orphaned deploys {len(running_a)}, all ended "
              f"{ended_after:.1f}s after the kill")
        assert [d["status"] for d in done] == ["succeeded"] * 6, done
        assert max(samples) <= 2, samples
        assert max(samples) == 2  # the cap was used
        # Recovery concluded each orphan: from the result it collected (a container that had
        # exited well: Succeeded) or as worker_lost and retried; either way once.
        for deploy_id in running_a:
            types = [e["type"] for e in await env.events(deploy_id)]
            assert types.count("Succeeded") == 1 and types.count("Started") <= 2, types
        assert all(p.poll() is None for p in workers.values() if p is not victim)


async def _wait_tolerant(env: Env, deploy_id: str, limit: float) -> dict:
    """Like Env.wait, but PostgreSQL may be coming back: errors and 503s are waited out."""
    deadline = time.monotonic() + limit
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = await env.client.get(f"/deploys/{deploy_id}")
            if r.status_code == 200 and r.json()["status"] in TERMINAL:
                return r.json()
            last = r.status_code, r.text[:200]
        except Exception as exc:  # the pool's connections died with the server
            last = exc
        await asyncio.sleep(0.3)
    raise AssertionError(f"deploy {deploy_id} not ended after {limit}s: {last}")


async def test_postgres_restarted_while_a_deploy_runs(tmp_path, runner_image):
    """Scenario 2 (the worker's part): PostgreSQL goes away while terraform runs and comes back
    after terraform ended: the worker (a subprocess) reconnects by itself and the outcome is
    recorded, once, with no spurious worker_lost. Then a `pg_ctl restart` in the middle of a
    second deploy: it succeeds too. A dedicated cluster, not the session's shared one."""
    import shutil

    from service.embedded import EmbeddedPostgres
    from service.migrate import migrate

    if not shutil.which("terraform"):
        pytest.skip("no terraform on PATH")
    pg = EmbeddedPostgres(tmp_path / "pg")
    url = pg.start()
    try:
        migrate(pg.owner_url)
        async with environment(url, tmp_path, runner_image, runner="local") as env:
            proc = env.spawn_worker("pg-worker")
            d = await env.submit({"main.tf": A_THEN_SLOW_B % {"sleep": 3}}, workspace="pg1")
            await env.wait_log(d["id"], "B-STARTS")
            await asyncio.to_thread(pg.stop, "fast")
            await asyncio.sleep(15)  # terraform ends (about 3 s in) while PostgreSQL is down
            await asyncio.to_thread(pg.start)
            back_at, back_wall = time.monotonic(), datetime.now(UTC)
            done = await _wait_tolerant(env, d["id"], 180)
            seen_after = time.monotonic() - back_at
            events = await env.events(d["id"])
            recorded = datetime.fromisoformat(events[-1]["recorded_at"])
            print(
                f"\nscenario 2: PostgreSQL back -> outcome recorded in "
                f"{(recorded - back_wall).total_seconds():.1f}s (seen through the API in {seen_after:.1f}s)"
            )
            assert done["status"] == "succeeded", done
            types = [e["type"] for e in events]
            assert types == ["Requested", "Started", "StatePersisted", "Succeeded"], types
            log = await env.logs(d["id"])
            assert "B-DONE" in log and _made_a(log) == 1

            # The worker reconnected by itself: it takes the next deploy, and survives a
            # `pg_ctl restart` in the middle of it.
            d2 = await env.submit({"main.tf": A_THEN_SLOW_B % {"sleep": 4}}, workspace="pg2")
            await _wait_log_tolerant(env, d2["id"], "B-STARTS", 180)
            await asyncio.to_thread(_pg_ctl_restart, pg)
            done2 = await _wait_tolerant(env, d2["id"], 180)
            assert done2["status"] == "succeeded", done2
            types = [e["type"] for e in await env.events(d2["id"])]
            assert types == ["Requested", "Started", "StatePersisted", "Succeeded"], types
            assert proc.poll() is None, env.worker_log("pg-worker")[-3000:]
    finally:
        pg.stop("immediate")


async def _wait_log_tolerant(env: Env, deploy_id: str, text: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while True:
        with contextlib.suppress(Exception):
            if text in await env.logs(deploy_id):
                return
        assert time.monotonic() < deadline, f"{text!r} never appeared in the log"
        await asyncio.sleep(0.2)


def _pg_ctl_restart(pg) -> None:  # type: ignore[no-untyped-def]
    """`pg_ctl restart` with a log file: without -l the server keeps pg_ctl's stdout open, so
    a captured run (EmbeddedPostgres.restart) never returns."""
    log = pg.directory / "postgres.log"
    subprocess.run(
        pg._cmd("pg_ctl", "restart", "-w", "-t", "120", "-m", "fast", "-D", str(pg.pgdata), "-l", str(log)),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd="/", check=True, timeout=180,
    )


async def _wait_container_exited(deploy_id: str, limit: float = 120) -> None:
    import docker

    client = docker.from_env()
    try:
        deadline = time.monotonic() + limit
        while True:
            rows = await asyncio.to_thread(
                client.api.containers, all=True, filters={"label": f"tfdeploy.deploy={deploy_id}"}
            )
            if rows and all(r["State"] == "exited" for r in rows):
                return
            assert time.monotonic() < deadline, rows
            await asyncio.sleep(0.2)
    finally:
        client.close()
