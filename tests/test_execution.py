"""Deploys end to end: HTTP in, a real worker, real terraform (local process or Docker container),
real state stores. Issue 3's "done when" list, one test each."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time

import httpx
import pytest

from service.api.app import create_app
from service.auth import create_token
from service.runners import docker_available
from service.services import open_services
from service.settings import from_env
from service.worker import Worker

TERMINAL = {"succeeded", "failed", "cancelled"}

ONE_RESOURCE = """
variable "name" { default = "web" }
resource "terraform_data" "web" {
  input = var.name
  provisioner "local-exec" { command = "echo creating ${self.input}" }
}
"""

ALWAYS_FAILS = """
resource "terraform_data" "bad" {
  provisioner "local-exec" { command = "echo failing; exit 3" }
}
"""

A_THEN_B_FAILS = """
resource "terraform_data" "a" {
  provisioner "local-exec" { command = "echo MADE-A" }
}
resource "terraform_data" "b" {
  depends_on = [terraform_data.a]
  provisioner "local-exec" { command = "exit 3" }
}
"""

SLOW = """
resource "terraform_data" "slow" {
  provisioner "local-exec" { command = "sleep 2" }
}
"""

USES_SECRET = """
variable "token" {}
resource "terraform_data" "uses" {
  provisioner "local-exec" { command = "echo the token is ${var.token}" }
}
"""

DESTROY_TRACED = """
resource "terraform_data" "a" {
  provisioner "local-exec" { command = "echo MADE-A" }
  provisioner "local-exec" {
    when    = destroy
    command = "echo DESTROYING-A"
  }
}
"""

RUNNERS = [
    pytest.param("local", id="local"),
    pytest.param("docker", id="docker", marks=pytest.mark.docker),
]


class Harness:
    """An API client plus a worker in this event loop, on a fresh database."""

    def __init__(self, services, worker, client, token):
        self.services, self.worker, self.client, self.token = services, worker, client, token

    async def submit(self, files: dict[str, str], **body) -> dict:
        r = await self.client.post("/deploys", json={"files": files, **body})
        assert r.status_code == 202, r.text
        return r.json()

    async def wait(self, deploy_id: str, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = await self.client.get(f"/deploys/{deploy_id}")
            d = r.json()
            if d["status"] in TERMINAL:
                return d
            await asyncio.sleep(0.1)
        raise AssertionError(f"deploy {deploy_id} still {d['status']} after {timeout}s")

    async def events(self, deploy_id: str) -> list[dict]:
        return (await self.client.get(f"/deploys/{deploy_id}/events")).json()["items"]

    async def logs(self, deploy_id: str) -> str:
        return (await self.client.get(f"/deploys/{deploy_id}/logs")).text


@contextlib.asynccontextmanager
async def harness(database_url, tmp_path, runner_kind, runner_image, **overrides):
    if runner_kind == "docker" and not docker_available():
        pytest.skip("no Docker engine")
    values = dict(
        data_dir=str(tmp_path / "data"),
        runner=runner_kind,
        runner_image=runner_image,
        runner_network="none",
        retry_delay=0.05,
        max_concurrency=2,
    )
    values.update(overrides)
    settings = from_env({}, **values)
    services = await open_services(settings, database_url)
    worker = Worker(services, name="test-worker")
    task = asyncio.create_task(worker.run())
    async with services.pool.connection() as conn:
        token = await create_token(conn, "ann")
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers={"Authorization": f"Bearer {token}"}
    ) as client:
        try:
            yield Harness(services, worker, client, token)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 60)
            await worker.close()
            await services.close()


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_deploy_succeeds_with_events_log_and_state(database_url, tmp_path, runner_kind, runner_image):
    async with harness(database_url, tmp_path, runner_kind, runner_image) as h:
        d = await h.submit({"main.tf": ONE_RESOURCE}, workspace="site", variables={"name": "web-1"})
        assert d["status"] == "queued"
        done = await h.wait(d["id"])
        assert done["status"] == "succeeded", done
        assert done["attempt"] == 1
        types = [e["type"] for e in await h.events(d["id"])]
        assert types == ["Requested", "Started", "StatePersisted", "Succeeded"]
        assert "creating web-1" in await h.logs(d["id"])
        state = (await h.client.get("/workspaces/site/state")).json()
        assert [r["type"] for r in state["resources"]] == ["terraform_data"]
        versions = (await h.client.get("/workspaces/site/states")).json()["items"]
        assert len(versions) == 1

        # The next deploy of the workspace starts from that state: nothing is created again.
        d2 = await h.submit({"main.tf": ONE_RESOURCE}, workspace="site", variables={"name": "web-1"})
        assert (await h.wait(d2["id"]))["status"] == "succeeded"
        assert "creating web-1" not in await h.logs(d2["id"])
        assert len((await h.client.get("/workspaces/site/states")).json()["items"]) == 2


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_always_failing_config_makes_three_attempts(database_url, tmp_path, runner_kind, runner_image):
    async with harness(database_url, tmp_path, runner_kind, runner_image) as h:
        d = await h.submit({"main.tf": ALWAYS_FAILS})
        done = await h.wait(d["id"])
        assert done["status"] == "failed"
        assert done["error"]["reason"] == "apply_failed"
        assert done["attempt"] == 3 and done["max_attempts"] == 3
        types = [e["type"] for e in await h.events(d["id"])]
        assert types.count("Started") == 3
        assert types.count("Failed") == 3
        assert types.count("Retried") == 2
        failed = [e for e in await h.events(d["id"]) if e["type"] == "Failed"]
        assert [f["data"]["exit_code"] for f in failed] == [1, 1, 1]  # terraform's exit code
        assert [f["data"]["final"] for f in failed] == [False, False, True]
        assert all("exit status 3" in f["data"]["message"] for f in failed)


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_retry_starts_from_the_state_the_failed_attempt_left(database_url, tmp_path, runner_kind, runner_image):
    async with harness(database_url, tmp_path, runner_kind, runner_image) as h:
        d = await h.submit({"main.tf": A_THEN_B_FAILS}, workspace="ab")
        done = await h.wait(d["id"])
        assert done["status"] == "failed"
        log = await h.logs(d["id"])
        made = [ln for ln in log.splitlines() if ln.rstrip().endswith("(local-exec): MADE-A")]
        assert len(made) == 1, log
        # Each failed attempt's state was kept; A is in the workspace's latest state.
        state = (await h.client.get("/workspaces/ab/state")).json()
        names = {r["name"] for r in state["resources"]}
        assert "a" in names


@pytest.mark.docker
async def test_cap_holds_across_six_slow_deploys(database_url, tmp_path, runner_image):
    async with harness(database_url, tmp_path, "docker", runner_image, max_concurrency=2) as h:
        import docker

        client = docker.from_env()
        deploys = [
            await h.submit({"main.tf": SLOW}, workspace=f"slow{i}") for i in range(6)
        ]
        seen_max = 0
        seen_rows: list[tuple[str, str]] = []
        sampling = True

        async def sample() -> None:
            nonlocal seen_max
            while sampling:
                rows = await asyncio.to_thread(
                    # The low-level call lists in one request (no per-container inspect
                    # that would race with removals).
                    client.api.containers, all=True, filters={"label": "tfdeploy.service=tfdeploy"}
                )
                # An exited container kept until its state is persisted holds no place under
                # the cap (docs/execution.md), nor does it while it is being removed (Docker
                # shows any container being removed as "removing"); only the others count.
                active = [r for r in rows if r["State"] not in ("exited", "dead", "removing")]
                if len(active) > seen_max:
                    seen_max = len(active)
                    seen_rows[:] = [(r["Labels"].get("tfdeploy.deploy"), r["State"]) for r in active]
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        try:
            results = [await h.wait(d["id"], timeout=180) for d in deploys]
        finally:
            sampling = False
            await sampler
            client.close()
        assert [r["status"] for r in results] == ["succeeded"] * 6
        assert 1 <= seen_max <= 2, seen_rows


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_secret_appears_nowhere(database_url, tmp_path, runner_kind, runner_image, pg_cluster):
    secret = "Sup3rSecretValue-41"
    async with harness(database_url, tmp_path, runner_kind, runner_image) as h:
        d = await h.submit({"main.tf": USES_SECRET}, workspace="sec", secrets={"token": secret})
        done = await h.wait(d["id"])
        assert done["status"] == "succeeded"
        log = await h.logs(d["id"])
        assert "the token is ***" in log  # it reached terraform, and was masked in the log
        texts = [
            log,
            (await h.client.get(f"/deploys/{d['id']}")).text,
            (await h.client.get(f"/deploys/{d['id']}/events")).text,
            (await h.client.get("/workspaces/sec/state")).text,
            (await h.client.get("/workspaces/sec/states")).text,
            (await h.client.get("/events")).text,
        ]
        for text in texts:
            assert secret not in text
        async with h.services.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM deploy_secrets")
            assert (await cur.fetchone())[0] == 0  # deleted when the deploy ended
    dump = pg_cluster.pg_dump(database_url.rsplit("/", 1)[1])
    assert len(dump) > 10_000
    assert secret.encode() not in dump


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_state_store_down_destroys_what_was_created(database_url, tmp_path, runner_kind, runner_image, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    import socket

    with socket.socket() as s:  # a port nobody listens on: the S3 server is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with harness(
        database_url, tmp_path, runner_kind, runner_image,
        state_store="s3", s3_bucket="states", s3_endpoint_url=f"http://127.0.0.1:{port}", s3_region="us-east-1",
    ) as h:
        d = await h.submit({"main.tf": DESTROY_TRACED}, workspace="lost")
        done = await h.wait(d["id"])
        assert done["status"] == "failed"
        assert done["error"]["reason"] == "state_not_persisted"
        types = [e["type"] for e in await h.events(d["id"])]
        assert types == ["Requested", "Started", "Destroyed", "Failed"]
        log = await h.logs(d["id"])
        assert "MADE-A" in log and "DESTROYING-A" in log  # the destroy really ran
        assert (await h.client.get("/workspaces/lost/state")).status_code == 404


async def test_cancel_a_running_deploy_keeps_its_state(database_url, tmp_path, runner_image):
    config = """
resource "terraform_data" "first" {
  provisioner "local-exec" { command = "echo MADE-FIRST" }
}
resource "terraform_data" "slow" {
  depends_on = [terraform_data.first]
  provisioner "local-exec" { command = "sleep 30" }
}
"""
    async with harness(database_url, tmp_path, "local", runner_image) as h:
        d = await h.submit({"main.tf": config}, workspace="c")
        deadline = time.monotonic() + 30
        while "MADE-FIRST" not in await h.logs(d["id"]):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        r = await h.client.post(f"/deploys/{d['id']}/cancel")
        assert r.status_code == 202
        done = await h.wait(d["id"], timeout=40)
        assert done["status"] == "cancelled"
        types = [e["type"] for e in await h.events(d["id"])]
        assert types[-3:] == ["CancelRequested", "StatePersisted", "Cancelled"]
        state = (await h.client.get("/workspaces/c/state")).json()
        assert "first" in {r["name"] for r in state["resources"]}


async def test_queued_deploy_cancelled_before_it_runs(database_url, tmp_path, runner_image):
    async with harness(database_url, tmp_path, "local", runner_image, max_concurrency=1) as h:
        first = await h.submit({"main.tf": SLOW}, workspace="q")
        second = await h.submit({"main.tf": ONE_RESOURCE}, workspace="q")  # waits: same workspace
        r = await h.client.post(f"/deploys/{second['id']}/cancel")
        assert r.status_code == 202 and r.json()["status"] == "cancelled"
        assert (await h.wait(first["id"]))["status"] == "succeeded"
        types = [e["type"] for e in await h.events(second["id"])]
        assert types == ["Requested", "Cancelled"]




async def test_deploy_with_s3_state_store(database_url, tmp_path, runner_image, monkeypatch):
    """The S3 store end to end, against moto's real S3 server on loopback."""
    from moto.server import ThreadedMotoServer

    from service.statestores.s3 import S3StateStore

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        overrides = dict(
            state_store="s3", s3_bucket="tfstates", s3_endpoint_url=f"http://{host}:{port}",
            s3_region="us-east-1",
        )
        await S3StateStore(from_env({}, data_dir=str(tmp_path), **overrides)).ensure_bucket()
        async with harness(database_url, tmp_path, "local", runner_image, **overrides) as h:
            d = await h.submit({"main.tf": ONE_RESOURCE}, workspace="s3ws")
            done = await h.wait(d["id"])
            assert done["status"] == "succeeded"
            persisted = [e for e in await h.events(d["id"]) if e["type"] == "StatePersisted"]
            assert persisted[0]["data"]["store"] == "s3"
            # The object is keyed by the workspace's id, never by a name a user chose.
            key = f"s3://tfstates/tfdeploy/{done['workspace_id']}/"
            assert persisted[0]["data"]["location"].startswith(key)
            state = (await h.client.get("/workspaces/s3ws/state")).json()
            assert state["resources"][0]["type"] == "terraform_data"
            # The next deploy of the workspace starts from the state read back from S3.
            d2 = await h.submit({"main.tf": ONE_RESOURCE}, workspace="s3ws")
            assert (await h.wait(d2["id"]))["status"] == "succeeded"
            assert "creating web" not in await h.logs(d2["id"])
    finally:
        server.stop()


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_health_names_the_runner_in_use(database_url, tmp_path, runner_kind, runner_image):
    async with harness(database_url, tmp_path, runner_kind, runner_image) as h:
        body = (await h.client.get("/health")).json()
        assert body["runner"] == runner_kind


INVALID = """
resource "terraform_data" "x" {
  bogus = 1
}
"""


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_an_invalid_configuration_fails_with_its_diagnostics(
    database_url, tmp_path, runner_kind, runner_image
):
    """terraform validate refuses it: the attempt fails as invalid_config, with terraform's
    own diagnostics as the message (the lifecycle makes that reason final)."""
    async with harness(database_url, tmp_path, runner_kind, runner_image) as h:
        d = await h.submit({"main.tf": INVALID}, workspace="invalid")
        done = await h.wait(d["id"])
        assert done["status"] == "failed", done
        assert done["error"]["reason"] == "invalid_config", done
        assert "Unsupported argument" in done["error"]["message"]
        assert 'An argument named "bogus" is not expected here.' in done["error"]["message"]
        assert "Unsupported argument" in await h.logs(d["id"])


def test_a_worker_refuses_to_start_without_an_engine_or_a_runner_setting(database_url, tmp_path):
    """TFDEPLOY_RUNNER unset and no Docker engine: `tfdeploy worker` refuses (it used to fall
    back to the local runner silently, also when Docker was only slow to answer)."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TFDEPLOY_")}
    env.update(
        TFDEPLOY_DATABASE_URL=database_url,
        TFDEPLOY_DATA_DIR=str(tmp_path / "data"),
        DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker"], env=env, capture_output=True, text=True,
        timeout=60, cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no Docker engine answers and TFDEPLOY_RUNNER is not set" in proc.stderr


async def test_a_dispatcher_reserves_first_and_hands_the_place_to_the_deployer(
    database_url, tmp_path, runner_image
):
    """The interface the dispatcher builds on: it holds a place (``runner.reserve()``) before
    it takes a deploy; ``Deployer.handle(..., reservation=)`` runs the attempt in that place, or
    gives it back if the deploy no longer wants that attempt. (This test is the dispatcher: no
    queue worker runs.)"""
    settings = from_env({}, data_dir=str(tmp_path / "data"), runner="local", retry_delay=0.05,
                        max_concurrency=1)
    services = await open_services(settings, database_url)
    worker = Worker(services, name="dispatched-worker")  # not run: its deployer is called
    async with services.pool.connection() as conn:
        token = await create_token(conn, "ann")
    transport = httpx.ASGITransport(app=create_app(services))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test",
            headers={"Authorization": f"Bearer {token}"},
        ) as client:
            h = Harness(services, worker, client, token)
            runner, deployer = worker.runner, worker.deployer
            d = await h.submit({"main.tf": ONE_RESOURCE}, workspace="dispatched")
            stale = await h.submit({"main.tf": ONE_RESOURCE}, workspace="stale")
            assert (await client.post(f"/deploys/{stale['id']}/cancel")).status_code in (200, 202)

            place = await runner.reserve()
            assert await runner.running() == 1
            await deployer.handle(stale["id"], 1, reservation=place)  # cancelled: nothing runs
            assert await runner.running() == 0

            place = await runner.reserve()
            await deployer.handle(d["id"], 1, reservation=place)
            assert (await h.wait(d["id"]))["status"] == "succeeded"
            assert await runner.running() == 0  # the place went with the slot, once concluded
    finally:
        await worker.close()
        await services.close()
