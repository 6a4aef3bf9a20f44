"""The runners against real terraform and a real Docker engine (no mocks).

Docker tests are marked ``docker`` and skip when no engine (or no runner image) answers; local
tests skip when terraform is not on PATH."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from service import settings as settings_mod
from service.runners import RunnerError, RunRequest, make_runner, steps_for
from service.runners.docker import DockerRunner
from service.runners.docker_archive import LAYOUT
from service.runners.local import LocalRunner
from service.runners.output import LineCutter

IMAGE = os.environ.get("TFDEPLOY_TEST_RUNNER_IMAGE", "local/terraform:1.11.4")

WEB = """
resource "terraform_data" "web" {
  input = "v1"
  provisioner "local-exec" {
    command = "echo creating web"
  }
  provisioner "local-exec" {
    when    = destroy
    command = "echo destroying web"
  }
}
"""

FAILING = """
resource "terraform_data" "bad" {
  provisioner "local-exec" {
    command = "echo about to fail; exit 3"
  }
}
"""

A_THEN_B = """
variable "fail_b" {
  type    = bool
  default = true
}
resource "terraform_data" "a" {
  provisioner "local-exec" {
    command = "echo creating a"
  }
}
resource "terraform_data" "b" {
  depends_on = [terraform_data.a]
  provisioner "local-exec" {
    command = var.fail_b ? "echo b fails; exit 3" : "echo creating b"
  }
}
"""

SLOW = """
resource "terraform_data" "slow" {
  provisioner "local-exec" {
    command = "echo slow-start; sleep 30; echo slow-end"
  }
}
"""


def concurrent_config(n: int) -> str:
    return f"""
resource "terraform_data" "c" {{
  provisioner "local-exec" {{
    command = "echo begin-{n}; sleep 2; echo end-{n}"
  }}
}}
"""


# -- fixtures -------------------------------------------------------------------------------


def _docker_client():
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
        client.images.get(IMAGE)
        return client
    except Exception:
        return None


@pytest.fixture(scope="module")
def docker_client():
    client = _docker_client()
    if client is None:
        pytest.skip(f"no Docker engine answers (or image {IMAGE} is missing)")
    yield client
    client.close()


def make_settings(tmp_path: Path, **overrides):
    overrides.setdefault("max_concurrency", 4)
    overrides.setdefault("runner_network", "none")
    return settings_mod.from_env({}, runner_image=IMAGE, data_dir=str(tmp_path), **overrides)


def unique_service() -> str:
    """Docker tests label their containers ``tfdeploy.service=<this>``, not the default
    ``tfdeploy``: the engine may be shared (with other test runs, a live service), and a label
    of its own makes each test's cap its own, neither disturbed by nor disturbing others."""
    return f"tfdeploy-test-{secrets.token_hex(4)}"


def new_runner(kind: str, settings, service: str | None = None, **kwargs):
    if kind == "docker":
        return DockerRunner(settings, service_name=service or unique_service(), **kwargs)
    return LocalRunner(settings, **kwargs)


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def kind(request) -> str:
    if request.param == "docker":
        request.getfixturevalue("docker_client")
    elif not (os.environ.get("TFDEPLOY_TERRAFORM") or shutil.which("terraform")):
        pytest.skip("terraform is not on PATH")
    return request.param


@pytest.fixture
async def runner(kind, tmp_path):
    r = new_runner(kind, make_settings(tmp_path))
    yield r
    await r.close()


class Run:
    def __init__(self, result, lines):
        self.result = result
        self.lines = lines

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    @property
    def state(self) -> dict:
        assert self.result.state is not None, "no state returned"
        return json.loads(self.result.state)

    def resources(self) -> dict[str, dict]:
        return {f"{r['type']}.{r['name']}": r for r in self.state["resources"]}


async def run_tf(
    runner,
    files,
    *,
    action="apply",
    steps=None,
    state=None,
    lock_file=None,
    saved_plan=None,
    providers=None,
    variables=None,
    secrets=None,
    timeout=120.0,  # noqa: ASYNC109 - the RunRequest's timeout, not this call's
    cancel=None,
    on_line=None,
    deploy_id=None,
    **limits,
) -> Run:
    if isinstance(files, str):
        files = {"main.tf": files}
    request = RunRequest(
        deploy_id=deploy_id or f"d-{secrets_token()}",
        attempt=1,
        workspace="ws",
        steps=steps if steps is not None else steps_for(action),
        files=files,
        state=state,
        lock_file=lock_file,
        saved_plan=saved_plan,
        providers=providers,
        variables=variables or {},
        secrets=secrets or {},
        timeout=timeout,
        **limits,
    )
    lines: list[tuple[str, str]] = []

    async def sink(stream: str, line: str) -> None:
        lines.append((stream, line))
        if on_line is not None:
            await on_line(stream, line)

    slot = await runner.acquire_slot(request)
    try:
        result = await runner.run(slot, sink, cancel or asyncio.Event())
    finally:
        await slot.release()  # run() keeps the container / temp dir until the caller is done
    return Run(result, lines)


def secrets_token() -> str:
    return secrets.token_hex(4)


def labelled_count(client, service: str) -> int:
    """Straight from the Docker API: labelled containers not exited/dead (one being removed
    counts only while it still runs: Docker shows any container being removed as "removing")."""
    active = 0
    for row in client.api.containers(all=True, filters={"label": f"tfdeploy.service={service}"}):
        if row["State"] in ("exited", "dead"):
            continue
        if row["State"] == "removing":
            try:
                if not client.api.inspect_container(row["Id"])["State"]["Running"]:
                    continue
            except Exception:
                continue
        active += 1
    return active


# -- both runners ---------------------------------------------------------------------------


async def test_apply_one_resource(runner):
    run = await run_tf(runner, WEB)
    assert run.result.exit_code == 0, run.text
    assert run.result.error == ""
    assert not run.result.timed_out and not run.result.interrupted
    assert "terraform_data.web (local-exec): creating web" in run.text
    assert "Terraform has been successfully initialized!" in run.text
    assert "Apply complete! Resources: 1 added, 0 changed, 0 destroyed." in run.text
    assert {s for s, _ in run.lines} <= {"stdout", "stderr", "system"}
    assert list(run.resources()) == ["terraform_data.web"]
    assert run.result.duration > 0


async def test_rerun_from_state_creates_nothing(runner):
    first = await run_tf(runner, WEB)
    assert first.result.exit_code == 0, first.text
    web_id = first.resources()["terraform_data.web"]["instances"][0]["attributes"]["id"]
    second = await run_tf(runner, WEB, state=first.result.state)
    assert second.result.exit_code == 0, second.text
    assert "creating web" not in second.text
    assert "No changes." in second.text
    assert second.resources()["terraform_data.web"]["instances"][0]["attributes"]["id"] == web_id


async def test_failing_config(runner):
    run = await run_tf(runner, FAILING)
    assert run.result.exit_code != 0
    assert "exit status 3" in run.result.error
    assert "local-exec provisioner error" in run.result.error
    assert len(run.result.error.splitlines()) <= 20


async def test_partial_failure_keeps_state_and_retry_does_not_recreate(runner):
    first = await run_tf(runner, A_THEN_B)
    assert first.result.exit_code != 0
    assert "creating a" in first.text
    resources = first.resources()
    assert "terraform_data.a" in resources
    assert resources["terraform_data.a"]["instances"][0].get("status") != "tainted"

    retry = await run_tf(runner, A_THEN_B, state=first.result.state, variables={"fail_b": "false"})
    assert retry.result.exit_code == 0, retry.text
    assert "creating a" not in retry.text
    assert "creating b" in retry.text
    assert set(retry.resources()) == {"terraform_data.a", "terraform_data.b"}
    a_before = resources["terraform_data.a"]["instances"][0]["attributes"]["id"]
    assert retry.resources()["terraform_data.a"]["instances"][0]["attributes"]["id"] == a_before


async def test_destroy_removes_resources(runner):
    applied = await run_tf(runner, WEB)
    assert applied.result.exit_code == 0, applied.text
    destroyed = await run_tf(runner, WEB, action="destroy", state=applied.result.state)
    assert destroyed.result.exit_code == 0, destroyed.text
    assert "destroying web" in destroyed.text
    assert "Destroy complete! Resources: 1 destroyed." in destroyed.text
    assert destroyed.state["resources"] == []


async def test_timeout_interrupts_and_keeps_state(runner):
    started = time.monotonic()
    run = await run_tf(runner, SLOW, timeout=3)
    elapsed = time.monotonic() - started
    assert run.result.timed_out and not run.result.interrupted
    assert run.result.exit_code != 0
    assert elapsed < 10, elapsed
    assert "(local-exec): slow-start" in run.text
    assert "(local-exec): slow-end" not in run.text
    assert any(s == "system" and "timed out" in line for s, line in run.lines)
    # Terraform was interrupted, not killed: it wrote the state (the resource, tainted).
    assert "terraform_data.slow" in run.resources()


async def test_cancel_interrupts(runner):
    cancel = asyncio.Event()
    seen_at: list[float] = []

    async def on_line(stream, line):
        if "slow-start" in line and not cancel.is_set():
            seen_at.append(time.monotonic())
            cancel.set()

    run = await run_tf(runner, SLOW, cancel=cancel, on_line=on_line)
    assert run.result.interrupted and not run.result.timed_out
    assert run.result.exit_code != 0
    assert time.monotonic() - seen_at[0] < 5
    assert "(local-exec): slow-end" not in run.text
    assert any(s == "system" and "cancel" in line for s, line in run.lines)
    assert "terraform_data.slow" in run.resources()


async def test_unresponsive_terraform_is_killed_after_the_grace_period(kind, tmp_path):
    # The provisioner freezes terraform itself (SIGSTOP to its parent): SIGINT cannot be
    # handled, so after the grace period comes SIGKILL.
    frozen = """
resource "terraform_data" "frozen" {
  provisioner "local-exec" {
    command = "echo freezing; kill -STOP $PPID"
  }
}
"""
    runner = new_runner(kind, make_settings(tmp_path), grace=1.0)
    started = time.monotonic()
    run = await run_tf(runner, frozen, timeout=2)
    elapsed = time.monotonic() - started
    await runner.close()
    assert run.result.timed_out
    assert run.result.exit_code == 128 + 9, run.text
    assert any(s == "system" and "killing" in line for s, line in run.lines), run.lines
    assert 3 <= elapsed < 10, elapsed
    assert await runner.running() == 0


async def test_cancel_before_start_keeps_given_state(runner):
    cancel = asyncio.Event()
    cancel.set()
    run = await run_tf(runner, WEB, state=b'{"version": 4}', cancel=cancel)
    assert run.result.interrupted
    assert run.result.state == b'{"version": 4}'
    assert "creating web" not in run.text
    assert await runner.running() == 0


async def test_secrets_reach_terraform_and_nothing_else(runner, monkeypatch):
    secret = "s3cr3t-" + secrets.token_hex(8)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    # The service's own environment must not leak into terraform's.
    monkeypatch.setenv("TFDEPLOY_SECRETS_KEY", "service-own-secret")
    config = """
variable "token" {
  type = string
}
variable "region" {
  type = string
}
resource "terraform_data" "t" {
  input = sha256(var.token)
  provisioner "local-exec" {
    command = "echo region=$TF_VAR_region service-key=$${TFDEPLOY_SECRETS_KEY:-absent} token-length=$${#TF_VAR_token}"
  }
}
"""
    run = await run_tf(runner, config, variables={"region": "kr-1"}, secrets={"token": secret})
    assert run.result.exit_code == 0, run.text
    assert f"region=kr-1 service-key=absent token-length={len(secret)}" in run.text
    assert (
        run.resources()["terraform_data.t"]["instances"][0]["attributes"]["input"]["value"]
        == digest
    )
    assert secret.encode() not in run.result.state
    assert secret not in run.text and "service-own-secret" not in run.text


async def test_invalid_requests_are_refused(runner):
    with pytest.raises(RunnerError):
        await run_tf(runner, {"../escape.tf": WEB})
    with pytest.raises(RunnerError):
        await run_tf(runner, {"/etc/x.tf": WEB})
    with pytest.raises(RunnerError):
        await run_tf(runner, WEB, variables={"bad name": "x"})
    assert await runner.running() == 0


async def test_files_in_subdirectories(runner):
    files = {
        "main.tf": 'module "m" {\n  source = "./modules/m"\n}\n',
        "modules/m/main.tf": WEB,
    }
    run = await run_tf(runner, files)
    assert run.result.exit_code == 0, run.text
    assert "creating web" in run.text
    assert run.state["resources"][0]["module"] == "module.m"


async def test_cap_across_two_runners(kind, tmp_path):
    settings = make_settings(tmp_path, max_concurrency=2)
    service = unique_service()
    r1, r2 = new_runner(kind, settings, service), new_runner(kind, settings, service)
    client = None
    if kind == "docker":
        import docker

        client = docker.from_env()
    samples: list[int] = []
    api_samples: list[int] = []
    active: set[int] = set()
    max_active = 0
    done = asyncio.Event()

    async def sampler():
        while not done.is_set():
            samples.append(await r1.running())
            if client is not None:
                api_samples.append(await asyncio.to_thread(labelled_count, client, service))
            await asyncio.sleep(0.1)

    def tracker(n):
        async def on_line(stream, line):
            nonlocal max_active
            if line.endswith(f"begin-{n}"):
                active.add(n)
                max_active = max(max_active, len(active))
            elif line.endswith(f"end-{n}"):
                active.discard(n)

        return on_line

    sampling = asyncio.create_task(sampler())
    started = time.monotonic()
    runs = await asyncio.gather(
        *(run_tf(r1 if n % 2 else r2, concurrent_config(n), on_line=tracker(n)) for n in range(6))
    )
    elapsed = time.monotonic() - started
    done.set()
    await sampling
    await r1.close()
    await r2.close()
    if client is not None:
        client.close()
    assert [r.result.exit_code for r in runs] == [0] * 6, [r.text for r in runs]
    assert max(samples) <= 2, (samples, api_samples)
    assert max(api_samples, default=0) <= 2, (samples, api_samples)
    assert max_active <= 2
    assert max(samples) == 2  # the cap was actually used, not just never reached
    assert elapsed >= 3 * 2  # three waves of two 2-second runs
    assert elapsed < 30, elapsed


# -- Docker only ----------------------------------------------------------------------------


@pytest.mark.docker
async def test_docker_container_is_locked_down_and_removed(docker_client, tmp_path):
    import docker.errors

    settings = make_settings(tmp_path)
    service = unique_service()
    runner = DockerRunner(settings, service_name=service)
    secret = "tok-" + secrets.token_hex(8)
    config = f"""
variable "token" {{
  type = string
}}
resource "terraform_data" "t" {{
  input = sha256(var.token)
  provisioner "local-exec" {{
    command = "test -e {LAYOUT.secrets} && echo secrets-file-present || echo secrets-file-gone; echo token-length=$${{#TF_VAR_token}}"
  }}
}}
"""
    request = RunRequest(
        deploy_id="dep-123",
        attempt=2,
        workspace="prod",
        steps=steps_for("apply"),
        files={"main.tf": config},
        variables={"region": "kr-1"},
        secrets={"token": secret},
    )
    slot = await runner.acquire_slot(request)
    try:
        info = docker_client.api.inspect_container(slot.container_id)
        dumped = json.dumps(info)
        assert secret not in dumped
        assert "docker.sock" not in dumped
        assert info["State"]["Status"] == "created"
        labels = info["Config"]["Labels"]
        assert {k: v for k, v in labels.items() if k not in ("tfdeploy.steps", "tfdeploy.place")} == {
            "tfdeploy.service": service,
            "tfdeploy.deploy": "dep-123",
            "tfdeploy.attempt": "2",
            "tfdeploy.run": "1",
            "tfdeploy.workspace": "prod",
        }
        assert [s["name"] for s in json.loads(labels["tfdeploy.steps"])["steps"]] == [
            "init", "validate", "apply"
        ]
        # The engine keeps a bounded copy of the output: a flood cannot fill its disk.
        assert info["HostConfig"]["LogConfig"] == {
            "Type": "local", "Config": {"max-size": "4m", "max-file": "2"}
        }
        assert info["Config"]["Image"] == IMAGE
        assert info["Config"]["User"] == "65534:65534"
        assert "TF_VAR_region=kr-1" in info["Config"]["Env"]
        assert "CHECKPOINT_DISABLE=1" in info["Config"]["Env"]
        assert not any(e.startswith("TF_VAR_token") for e in info["Config"]["Env"])
        host = info["HostConfig"]
        assert host["NetworkMode"] == "none"
        assert host["CapDrop"] == ["ALL"]
        assert host["CapAdd"] in (None, [])
        assert not host["Privileged"]
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["PidsLimit"] == settings.runner_pids
        assert host["Memory"] == 512 * 1024 * 1024
        assert host["NanoCpus"] == 1_000_000_000
        assert host["ReadonlyRootfs"] is True
        assert not host.get("Binds")
        assert [m["Type"] for m in info["Mounts"]] == ["volume"]
        volume = info["Mounts"][0]["Name"]
        # The deploy's directory holds the deploy's files only; the secret is not among them.
        chunks, _ = docker_client.api.get_archive(slot.container_id, LAYOUT.config)
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
            names = sorted(m.name for m in tar if m.isfile())
            contents = b"".join(tar.extractfile(m).read() for m in tar if m.isfile())
        assert names == ["config/main.tf"]
        assert secret.encode() not in contents
        assert await runner.running() == 1
        assert await runner.find_orphans() == []  # held by this runner: not an orphan
    except BaseException:
        await slot.release()
        raise

    lines: list[tuple[str, str]] = []

    async def sink(stream, line):
        lines.append((stream, line))

    result = await runner.run(slot, sink, asyncio.Event())
    text = "\n".join(line for _, line in lines)
    assert result.exit_code == 0, text
    assert "secrets-file-gone" in text
    assert f"token-length={len(secret)}" in text
    assert secret not in text
    # Kept, exited, until the caller has persisted the state: no longer counted toward the cap.
    assert docker_client.api.inspect_container(slot.container_id)["State"]["Status"] == "exited"
    assert await runner.running() == 0
    assert await runner.find_orphans() == []  # still this runner's: not an orphan
    await slot.release()
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(slot.container_id)
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(volume)
    assert await runner.running() == 0
    await slot.release()  # idempotent
    await runner.close()


@pytest.mark.docker
async def test_leftover_container_counts_against_cap(docker_client, tmp_path):
    service = unique_service()
    runner = DockerRunner(make_settings(tmp_path, max_concurrency=1), service_name=service)
    labels = {"tfdeploy.service": service, "tfdeploy.deploy": "crashed"}
    leftover = docker_client.containers.run(
        IMAGE, entrypoint=["/bin/sleep", "60"], labels=labels, network_mode="none", detach=True
    )
    exited = docker_client.containers.run(
        IMAGE,
        entrypoint=["/bin/sh", "-c", "exit 0"],
        labels=labels,
        network_mode="none",
        detach=True,
    )
    try:
        exited.wait(timeout=30)
        assert await runner.running() == 1  # the running leftover counts, the exited one not
        orphans = {o["id"]: o for o in await runner.find_orphans()}
        assert leftover.id in orphans and exited.id in orphans
        assert orphans[leftover.id]["deploy_id"] == "crashed"

        request = RunRequest(
            deploy_id="after-crash",
            attempt=1,
            workspace="w",
            steps=steps_for("apply"),
            files={"main.tf": WEB},
        )
        acquiring = asyncio.create_task(runner.acquire_slot(request))
        await asyncio.sleep(1.5)
        assert not acquiring.done(), "the leftover should hold the only place"

        removed_at = time.monotonic()
        await runner.remove_container(leftover.id)
        slot = await asyncio.wait_for(acquiring, 10)
        waited = time.monotonic() - removed_at
        assert waited < 2.5, f"woken by the Docker event, not by polling ({waited:.2f}s)"
        result = await runner.run(slot, _ignore, asyncio.Event())
        await slot.release()
        assert result.exit_code == 0
    finally:
        for c in (leftover, exited):
            with contextlib.suppress(Exception):
                c.remove(force=True, v=True)
        await runner.close()


@pytest.mark.docker
async def test_cancelled_acquire_leaves_nothing(docker_client, tmp_path):
    runner = DockerRunner(make_settings(tmp_path, max_concurrency=1), service_name=unique_service())
    request = RunRequest(
        deploy_id="x", attempt=1, workspace="w", steps=steps_for("apply"), files={"main.tf": WEB}
    )
    slot = await runner.acquire_slot(request)
    waiting = asyncio.create_task(runner.acquire_slot(request))
    await asyncio.sleep(0.5)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await slot.release()
    assert await runner.running() == 0
    # The lock is free again: another acquisition goes through at once.
    slot = await asyncio.wait_for(runner.acquire_slot(request), 5)
    await slot.release()
    await runner.close()


@pytest.mark.docker
async def test_missing_image_is_a_runner_error(docker_client, tmp_path):
    settings = settings_mod.from_env(
        {}, runner_image="local/no-such-image:0", runner_network="none", data_dir=str(tmp_path)
    )
    runner = DockerRunner(settings, service_name=unique_service())
    with pytest.raises(RunnerError, match="no-such-image"):
        await runner.acquire_slot(
            RunRequest(
                deploy_id="x", attempt=1, workspace="w", steps=steps_for("apply"), files={"main.tf": WEB}
            )
        )
    await runner.close()


@pytest.mark.docker
def test_make_runner(docker_client, tmp_path):
    assert isinstance(make_runner(make_settings(tmp_path, runner="local")), LocalRunner)
    docker_runner = make_runner(make_settings(tmp_path, runner="docker"))
    assert isinstance(docker_runner, DockerRunner)
    assert docker_runner.label_filter == "tfdeploy.service=tfdeploy"
    request = RunRequest(deploy_id="d", attempt=3, workspace="w", steps=steps_for("destroy"), files={})
    config = docker_runner.container_config(request)
    assert config["labels"]["tfdeploy.service"] == "tfdeploy"
    assert (config["labels"]["tfdeploy.deploy"], config["labels"]["tfdeploy.attempt"]) == ("d", "3")
    script = config["entrypoint"][2]
    assert "terraform destroy -auto-approve" in script and "terraform apply" not in script
    assert make_runner(make_settings(tmp_path)).name == "docker"  # an engine answers


def test_without_an_engine_up_falls_back_to_local_loudly_and_a_worker_refuses(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(RunnerError, match="no Docker engine answers"):
        make_runner(make_settings(tmp_path))  # tfdeploy worker
    runner = make_runner(make_settings(tmp_path), local_fallback=True)  # tfdeploy up
    assert isinstance(runner, LocalRunner)
    assert "LOCAL runner" in capsys.readouterr().err


def test_a_slow_engine_is_waited_for_not_replaced(tmp_path, monkeypatch):
    """An engine that accepts the connection but is slow to answer is still the engine: the
    worker must not fall back to the local runner (it did, after 3 s)."""
    import socket
    import threading

    path = tmp_path / "slow.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])  # and never answer

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    try:
        from service.runners import docker_status

        assert docker_status(timeout=0.5) == "slow"
        assert make_runner(make_settings(tmp_path)).name == "docker"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


# -- local only -----------------------------------------------------------------------------


async def test_local_slot_held_by_another_process(tmp_path):
    if not shutil.which("terraform"):
        pytest.skip("terraform is not on PATH")
    settings = make_settings(tmp_path, max_concurrency=1)
    runner = LocalRunner(settings)
    slots = settings.data_path / "local-slots"
    slots.mkdir(parents=True)
    holder = hold_lock_in_another_process(slots / "slot-0.lock")
    try:
        assert holder.stdout.readline().strip() == "held"
        assert await runner.running() == 1
        request = RunRequest(
            deploy_id="x", attempt=1, workspace="w", steps=steps_for("apply"), files={"main.tf": WEB}
        )
        acquiring = asyncio.create_task(runner.acquire_slot(request))
        await asyncio.sleep(1)
        assert not acquiring.done()
        holder.kill()  # a crashed process: the kernel drops its lock
        holder.wait()
        slot = await asyncio.wait_for(acquiring, 5)
        result = await runner.run(slot, _ignore, asyncio.Event())
        assert result.exit_code == 0
        # Terraform ended, but the attempt is not concluded: place and state are both kept ...
        assert await runner.running() == 1
        assert (slot.config_dir / "terraform.tfstate").exists()
        await slot.release()
        assert await runner.running() == 0  # ... until release
        assert not slot.root.exists()  # the private temp dir is gone
    finally:
        holder.kill()
        holder.wait()


def hold_lock_in_another_process(path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(path)!r}, 'a')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_line_splitter():
    s = LineCutter()
    assert s.feed(b"a\r\nb") == ["a"]
    assert s.feed("ü\nc".encode()[:1]) == []
    assert s.feed("ü\nc".encode()[1:]) == ["bü"]
    assert s.flush() == ["c"]
    assert s.flush() == []


async def _ignore(stream: str, line: str) -> None:
    return None


@pytest.mark.docker
async def test_docker_container_stopped_from_outside_is_runner_lost(docker_client, tmp_path):
    """``docker stop`` (what an engine shutdown does to its containers): SIGTERM from outside.
    Terraform is interrupted gracefully, writes its state, and the run reports runner_lost
    with that state — not as terraform's own failure."""
    runner = DockerRunner(make_settings(tmp_path), service_name=unique_service())
    request = RunRequest(
        deploy_id=f"d-{secrets_token()}",
        attempt=1,
        workspace="w",
        steps=steps_for("apply"),
        files={"main.tf": A_THEN_B.replace("echo b fails; exit 3", "echo b-slow; sleep 60")},
    )
    slot = await runner.acquire_slot(request)
    stopper: list[asyncio.Task] = []

    async def on_line(stream: str, line: str) -> None:
        if line.endswith("b-slow") and not stopper:
            stopper.append(
                asyncio.create_task(asyncio.to_thread(docker_client.api.stop, slot.container_id, 30))
            )

    try:
        result = await runner.run(slot, on_line, asyncio.Event())
        await asyncio.gather(*stopper)
        assert stopper, "b never started"
        assert result.runner_lost, result
        assert not result.interrupted and not result.timed_out
        assert result.exit_code != 0
        assert "stopped from outside" in result.error
        assert result.state is not None
        names = {r["name"] for r in json.loads(result.state)["resources"]}
        assert "a" in names  # the state terraform wrote on the way out was collected
    finally:
        await slot.release()
        await runner.close()


# -- why a step failed: the classifier over terraform 1.11's own messages --------------------

# Captured from terraform 1.11.4 offline (the live test below makes them again).
REAL = {
    "unknown provider, no network": ("init", "network", """
Error: Failed to query available provider packages

Could not retrieve the list of available versions for provider
hashicorp/nosuchprovider: could not connect to registry.terraform.io: failed
to request discovery document: Get
"https://registry.terraform.io/.well-known/terraform.json": dial tcp: lookup
registry.terraform.io on 10.255.255.53:53: dial udp 10.255.255.53:53:
connect: network is unreachable
"""),
    "registry module, no network": ("init", "network", """
Error: Error accessing remote module registry

  on main.tf line 1:
   1: module "m" { source = "hashicorp/consul/aws" }

Failed to retrieve available versions for module "m" (main.tf:1) from
registry.terraform.io: failed to request discovery document: Get
"https://registry.terraform.io/.well-known/terraform.json": dial tcp: lookup
registry.terraform.io on 10.255.255.53:53: dial udp 10.255.255.53:53:
connect: network is unreachable.
"""),
    "git module, no DNS": ("init", "network", """
Error: Failed to download module

  on main.tf line 1:
   1: module "m" { source = "git::https://example.com/repo.git" }

Could not download module "m" (main.tf:1) source code from
"git::https://example.com/repo.git": error downloading
'https://example.com/repo.git': /usr/bin/git exited with 128: Cloning into
'.terraform/modules/m'...
fatal: unable to access 'https://example.com/repo.git/': Could not resolve
host: example.com
"""),
    "mirror refused": ("init", "network", """
Error: Failed to query available provider packages

Could not retrieve the list of available versions for provider
hashicorp/null: failed to query provider mirror https://127.0.0.1:1/ for
registry.terraform.io/hashicorp/null: the request failed after 2 attempts,
please try again later: Get
"https://127.0.0.1:1/registry.terraform.io/hashicorp/null/index.json": dial
tcp 127.0.0.1:1: connect: connection refused
"""),
    "mirror TLS": ("init", "network", """
Error: Failed to query available provider packages

Could not retrieve the list of available versions for provider
hashicorp/null: failed to query provider mirror https://localhost:18443/ for
registry.terraform.io/hashicorp/null: the request failed, please try again
later: Get
"https://localhost:18443/registry.terraform.io/hashicorp/null/index.json":
tls: failed to verify certificate: x509: certificate relies on legacy Common
Name field, use SANs instead
"""),
    "unknown provider, mirror only": ("init", "config", """
Error: Failed to query available provider packages

Could not retrieve the list of available versions for provider
hashicorp/nosuchprovider: provider
registry.terraform.io/hashicorp/nosuchprovider was not found in any of the
search locations

  - /tmp/tfmsg-mirror
"""),
    "no matching version": ("init", "config", """
Error: Failed to query available provider packages

Could not retrieve the list of available versions for provider
hashicorp/null: no available releases match the given constraints >= 3.0.0
"""),
    "invalid provider source": ("init", "config", """
Error: Terraform encountered problems during initialisation, including problems
with the configuration, described below.

The Terraform configuration must be valid before initialization so that
Terraform can determine which modules and providers need to be installed.


Error: Invalid provider source string

  on main.tf line 3, in terraform:
   3:     x = { source = "a/b/c/d" }

The "source" attribute must be in the format "[hostname/][namespace/]name"
"""),
    "missing local module": ("init", "config", """
Error: Unreadable module directory

Unable to evaluate directory symlink: lstat nope: no such file or directory

Error: Unreadable module directory

The directory  could not be read for module "m" at main.tf:1.
"""),
    "invalid syntax": ("init", "config", """
Error: Terraform encountered problems during initialisation, including problems
with the configuration, described below.

Error: Invalid expression

  on main.tf line 2, in resource "terraform_data" "x":
   2:   input =
   3: }

Expected the start of an expression, but found an invalid expression token.
"""),
    "validate": ("validate", "config", """
Error: Unsupported argument

  on main.tf line 2, in resource "terraform_data" "x":
   2:   bogus = 1

An argument named "bogus" is not expected here.
"""),
    "apply error": ("apply", "other", """
Error: local-exec provisioner error

  with terraform_data.bad,
  on main.tf line 3, in resource "terraform_data" "bad":
   3:   provisioner "local-exec" {

Error running command 'echo about to fail; exit 3': exit status 3. Output:
about to fail
"""),
    "apply, provider API away": ("apply", "network", """
Error: creating server: Post "https://api.example.com/v2/servers": dial tcp: lookup
api.example.com: no such host
"""),
    "init, both kinds": ("init", "config", """
Error: Invalid provider source string

The "source" attribute must be in the format "[hostname/][namespace/]name"

Error: Failed to query available provider packages

could not connect to registry.terraform.io: dial tcp: i/o timeout
"""),
}


@pytest.mark.parametrize("case", list(REAL))
def test_classifier_over_real_messages(case):
    from service.runners.diagnostics import classify

    step, kind, text = REAL[case]
    assert classify(step, text) == kind


LIVE = {
    # Without a network, the registry cannot say the provider does not exist: network.
    "unknown provider, no network": ({}, """
terraform {
  required_providers {
    nosuch = { source = "hashicorp/nosuchprovider" }
  }
}
""", "network"),
    "unknown provider, mirror only": ({"mirror": True}, """
terraform {
  required_providers {
    nosuch = { source = "hashicorp/nosuchprovider" }
  }
}
""", "config"),
    "no matching version": ({"mirror": True}, """
terraform {
  required_providers {
    null = { source = "hashicorp/null", version = ">= 3.0" }
  }
}
""", "config"),
    "refused mirror": ({"refused": True}, """
terraform {
  required_providers {
    null = { source = "hashicorp/null" }
  }
}
""", "network"),
    "invalid provider source": ({}, """
terraform {
  required_providers {
    x = { source = "a/b/c/d" }
  }
}
""", "config"),
    "missing local module": ({}, 'module "m" { source = "./nope" }\n', "config"),
    "invalid syntax": ({}, 'resource "terraform_data" "x" {\n  input =\n}\n', "config"),
}


@pytest.mark.parametrize("case", list(LIVE))
def test_classifier_over_messages_made_now_by_terraform(case, tmp_path):
    """The same messages, made by the real binary offline: a proxy that refuses stands for no
    network; an (empty) filesystem mirror is the only source where the case needs one."""
    if not shutil.which("terraform"):
        pytest.skip("terraform is not on PATH")
    from service.runners.diagnostics import classify

    opts, config, kind = LIVE[case]
    (tmp_path / "main.tf").write_text(config)
    mirror = tmp_path / "mirror" / "registry.terraform.io" / "hashicorp" / "null" / "2.1.2" / "linux_amd64"
    mirror.mkdir(parents=True)
    (mirror / "terraform-provider-null_v2.1.2_x4").write_text("#!/bin/sh\n")
    rc = tmp_path / "cli.tfrc"
    if opts.get("mirror"):
        rc.write_text(f'provider_installation {{\n  filesystem_mirror {{ path = "{tmp_path}/mirror" }}\n}}\n')
    elif opts.get("refused"):
        rc.write_text('provider_installation {\n  network_mirror { url = "https://127.0.0.1:1/" }\n}\n')
    else:
        rc.write_text("")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CHECKPOINT_DISABLE": "1",
           "TF_CLI_CONFIG_FILE": str(rc), "HTTPS_PROXY": "http://127.0.0.1:1",
           "HTTP_PROXY": "http://127.0.0.1:1"}
    proc = subprocess.run(["terraform", "init", "-input=false", "-no-color"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert classify("init", proc.stderr) == kind, proc.stderr


async def test_a_failed_step_is_named_and_classified(runner):
    invalid = await run_tf(runner, 'resource "terraform_data" "x" {\n  bogus = 1\n}\n')
    assert invalid.result.failed_step == "validate"
    assert invalid.result.failure_kind == "config"
    assert "Unsupported argument" in invalid.result.diagnostics
    assert invalid.result.steps_done == ["init"]
    module = await run_tf(runner, 'module "m" { source = "./nope" }\n')
    assert (module.result.failed_step, module.result.failure_kind) == ("init", "config")
    assert "Unreadable module directory" in module.result.diagnostics
    # No network (network "none"): the registry cannot be reached.
    offline = await run_tf(runner, LIVE["unknown provider, no network"][1])
    assert (offline.result.failed_step, offline.result.failure_kind) == ("init", "network")
    failing = await run_tf(runner, FAILING)
    assert (failing.result.failed_step, failing.result.failure_kind) == ("apply", "other")
    assert failing.result.steps_done == ["init", "validate"]
    for run in (invalid, module, offline, failing):  # the step records are not output
        assert "::tfdeploy-step-" not in run.text


# -- steps and artifacts --------------------------------------------------------------------


async def test_plan_show_and_apply_the_saved_plan(runner):
    from service.runners import Step

    planned = await run_tf(runner, WEB, action="plan")
    result = planned.result
    assert result.ok, planned.text
    assert result.steps_done == ["init", "validate", "plan", "show_plan"]
    assert result.plan_changes is True
    assert result.plan and result.plan.startswith(b"PK")  # a saved plan is a zip
    changes = json.loads(result.plan_json)["resource_changes"]
    assert [(c["address"], c["change"]["actions"]) for c in changes] == [
        ("terraform_data.web", ["create"])
    ]
    assert result.state is None  # a plan changes no state
    assert "creating web" not in planned.text

    applied = await run_tf(runner, WEB, saved_plan=result.plan,
                           steps=[Step(name="init"), Step(name="apply_plan")])
    assert applied.result.ok, applied.text
    assert "creating web" in applied.text
    assert list(applied.resources()) == ["terraform_data.web"]

    # The same plan against the state it made is stale: refused, nothing done twice.
    stale = await run_tf(runner, WEB, state=applied.result.state, saved_plan=result.plan,
                         steps=[Step(name="init"), Step(name="apply_plan")])
    assert stale.result.failed_step == "apply_plan"
    assert "Saved plan is stale" in stale.result.diagnostics
    assert "creating web" not in stale.text

    destroy = await run_tf(runner, WEB, state=applied.result.state, steps=[
        Step(name="init"), Step(name="plan", destroy=True, detailed_exitcode=True),
        Step(name="show_plan")])
    assert destroy.result.ok, destroy.text
    changes = json.loads(destroy.result.plan_json)["resource_changes"]
    assert [c["change"]["actions"] for c in changes] == [["delete"]]


async def test_a_plan_without_changes_is_not_a_failure(runner):
    first = await run_tf(runner, WEB)
    again = await run_tf(runner, WEB, state=first.result.state, action="plan")
    assert again.result.ok and again.result.plan_changes is False


async def test_the_lock_file_goes_in_and_comes_back(runner):
    lock = b'# This file is maintained automatically by "terraform init".\n'
    run = await run_tf(runner, WEB, lock_file=lock)
    assert run.result.ok, run.text
    assert run.result.lock_file == lock


async def test_invalid_step_lists_are_refused(runner):
    from service.runners import Step

    for steps in ([], [Step(name="init"), Step(name="apply_plan")], [Step(name="apply", destroy=True)]):
        with pytest.raises(RunnerError):
            await run_tf(runner, WEB, steps=steps)
    assert await runner.running() == 0


async def test_a_provider_setup_is_applied_read_only(kind, tmp_path):
    """The ProviderSetup's mounts appear read-only at their in-run paths, its CLI config is
    the run's TF_CLI_CONFIG_FILE, its environment reaches terraform."""
    from service.runners import ProviderSetup

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "marker.txt").write_text("from-the-mirror")
    os.chmod(mirror, 0o755)
    os.chmod(mirror / "marker.txt", 0o644)
    setup = ProviderSetup(
        mounts={"/tfdeploy/providers/mirror": str(mirror)},
        cli_config='provider_installation {\n  filesystem_mirror { path = "/tfdeploy/providers/mirror" }\n  direct {}\n}\n',
        env={"TFDEPLOY_TEST_MIRROR": "/tfdeploy/providers/mirror"},
    )
    config = """
resource "terraform_data" "p" {
  provisioner "local-exec" {
    command = "cat $TFDEPLOY_TEST_MIRROR/marker.txt; echo; grep -c filesystem_mirror $TF_CLI_CONFIG_FILE; touch $TFDEPLOY_TEST_MIRROR/x 2>/dev/null && echo WRITABLE || echo read-only"
  }
}
"""
    runner = new_runner(kind, make_settings(tmp_path / "data"))
    try:
        run = await run_tf(runner, config, providers=setup)
    finally:
        await runner.close()
    assert run.result.ok, run.text
    assert "(local-exec): from-the-mirror" in run.text
    assert "(local-exec): 1" in run.text
    assert "(local-exec): read-only" in run.text and "(local-exec): WRITABLE" not in run.text
    assert not (mirror / "x").exists()
