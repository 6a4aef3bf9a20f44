"""The crash window of scenario 1 (docs/reliability.md): a worker SIGKILLed after terraform
ended but before the state it left was persisted.

The worker is a subprocess whose state store blocks on ``put`` (a small wrapper script around
``python -m service.cli worker``): once it writes its marker, terraform has exited and the
state is only in the runner's keeping (the exited container / the local temp dir). The worker
is then SIGKILLed. The recovery of a second worker must find what the killed one kept, persist
its state, and the next attempt must start from it: a resource created in the killed attempt is
not created again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability import ROOT, Env, _in_process_worker, _made_a, environment

# A is made, then B fails: the attempt fails with A in its state. Every attempt fails the same
# way, so the deploy ends failed after max_attempts; what matters is that A is made once.
A_THEN_B_FAILS = """
resource "terraform_data" "a" {
  provisioner "local-exec" { command = "echo MADE-A" }
}
resource "terraform_data" "b" {
  depends_on = [terraform_data.a]
  provisioner "local-exec" { command = "echo B-FAILS; exit 3" }
}
"""

# The worker's state store hangs on put: the deployer holds the state terraform left and
# nothing else has it yet. The marker tells the test the window is open.
BLOCKING_WORKER = """
import asyncio, os, sys
import service.deployer_outcome as outcome

async def blocked(*args, **kwargs):
    with open(os.environ["CRASH_WINDOW_MARKER"], "w") as f:
        f.write("blocked")
    await asyncio.sleep(3600)

outcome.put_with_retries = blocked
from service.cli import main
sys.exit(main(["worker"]))
"""


def _spawn_blocking_worker(env: Env, marker: Path) -> subprocess.Popen[bytes]:
    script = env.tmp_path / "blocking_worker.py"
    script.write_text(BLOCKING_WORKER)
    return env.spawn_worker(
        "blocking",
        argv=[sys.executable, str(script)],
        extra_env={"CRASH_WINDOW_MARKER": str(marker), "PYTHONPATH": str(ROOT)},
    )


def _containers_of(deploy_id: str) -> list[dict]:
    import docker

    client = docker.from_env()
    try:
        return client.api.containers(all=True, filters={"label": f"tfdeploy.deploy={deploy_id}"})
    finally:
        client.close()


@pytest.mark.parametrize(
    "runner", [pytest.param("docker", marks=pytest.mark.docker), pytest.param("local")]
)
async def test_worker_killed_between_terraform_exit_and_state_persisted(
    database_url, tmp_path, runner_image, runner
):
    if runner == "local" and not shutil.which("terraform"):
        pytest.skip("no terraform on PATH")
    async with environment(database_url, tmp_path, runner_image, runner=runner) as env:
        marker = tmp_path / "put-blocked"
        first = _spawn_blocking_worker(env, marker)
        d = await env.submit({"main.tf": A_THEN_B_FAILS}, workspace="window", max_attempts=2)
        env.deploy_ids = [d["id"]]
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert first.poll() is None, (env.tmp_path / "blocking.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the state put was never reached"
            await asyncio.sleep(0.1)
        # The window is open: terraform has exited, the state is not persisted.
        await env.wait_log(d["id"], "B-FAILS", limit=30)  # log lines are written in batches
        assert [e["type"] for e in await env.events(d["id"])] == ["Requested", "Started"]
        if runner == "docker":
            rows = _containers_of(d["id"])
            assert [r["State"] for r in rows] == ["exited"], rows  # kept, not counted
        else:
            assert len(list((env.data_dir / "local-runs").glob("*.json"))) == 1
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        first.wait(30)

        worker, task = await _in_process_worker(env)
        try:
            done = await env.wait(d["id"], limit=240)
            ended_after = time.monotonic() - killed_at
        finally:
            worker.stop()
            await asyncio.wait_for(task, 120)
            await worker.close()
        print(f"\ncrash window ({runner}): kill -> deploy ended in {ended_after:.1f}s")

        events = await env.events(d["id"])
        types = [e["type"] for e in events]
        # Attempt 1's state was collected from what the killed worker kept and persisted
        # before its Failed(worker_lost).
        assert types[:5] == ["Requested", "Started", "StatePersisted", "Failed", "Retried"], types
        first_failed = next(e for e in events if e["type"] == "Failed")
        assert first_failed["data"]["reason"] == "worker_lost"
        assert types.count("Started") == 2
        assert done["status"] == "failed", done  # B fails in every attempt (max_attempts=2)
        log = await env.logs(d["id"])
        assert log.count("B-FAILS") >= 2
        assert _made_a(log) == 1, log  # attempt 2 started from the recovered state
        state = (await env.client.get("/workspaces/window/state")).json()
        assert "a" in {r["name"] for r in state["resources"]}
        if runner == "docker":
            assert _containers_of(d["id"]) == []  # removed once concluded
        else:
            assert list((env.data_dir / "local-runs").glob("*.json")) == []
