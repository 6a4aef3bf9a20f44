"""The real ``terraform`` binary as a client of tfdeploy's http state backend (issue #15): the app
served by uvicorn on loopback, a worker running deploys with the local runner, terraform run as
a process against ``/workspaces/{ref}/tfstate``. The rules one by one are tests/test_tfstate.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from service.api.app import create_app
from service.auth import create_token
from service.services import Services, open_services
from service.settings import from_env

pytestmark = pytest.mark.skipif(shutil.which("terraform") is None, reason="no terraform on PATH")

BACKEND = 'terraform {\n  backend "http" {}\n}\n'
WEB = """
resource "terraform_data" "web" {
  input = "v1"
}
"""
# Slow to create: its provisioner runs while the state is locked (by a deploy or a CLI).
SLOW = """
resource "terraform_data" "slow" {
  input = "v1"
  provisioner "local-exec" {
    command = "sleep %d"
  }
}
"""
# Replaced by every apply, so every apply is slow.
ALWAYS_SLOW = """
resource "terraform_data" "again" {
  triggers_replace = timestamp()
  provisioner "local-exec" {
    command = "sleep %d"
  }
}
"""


# ---------------------------------------------------------------- the service, served


@dataclass
class Stack:
    base: str
    services: Services
    tokens: dict[str, str]
    api: httpx.AsyncClient  # as ann, Bearer
    tmp: Path
    cli_config: Path

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}


@contextlib.asynccontextmanager
async def serve(services: Services) -> AsyncIterator[str]:
    app = create_app(services)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def stack(database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    """The API on loopback and a worker (local runner, sandboxed, no network), users ann, bob,
    cat and the admin root."""
    from service.worker import Worker

    settings = from_env(
        {},
        data_dir=str(tmp_path / "data"),
        runner="local",
        runner_network="none",
        retry_delay=0.05,
        max_concurrency=2,
    )
    services = await open_services(settings, database_url, pool_size=10)
    worker = Worker(services, name="tfstate-cli-worker")
    task = asyncio.create_task(worker.run())
    async with services.pool.connection() as conn:
        tokens = {
            "ann": await create_token(conn, "ann"),
            "bob": await create_token(conn, "bob"),
            "cat": await create_token(conn, "cat"),
            "root": await create_token(conn, "root", admin=True),
        }
    cli_config = tmp_path / "terraformrc"
    cli_config.write_text("")
    try:
        async with serve(services) as base, httpx.AsyncClient(
            base_url=base, timeout=30, headers={"Authorization": f"Bearer {tokens['ann']}"}
        ) as api:
            yield Stack(base, services, tokens, api, tmp_path, cli_config)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
        await worker.close()
        await services.close()


# ---------------------------------------------------------------- terraform, the client


@dataclass
class Run:
    code: int
    out: str
    started: float
    ended: float


class Terraform:
    """A working directory with a configuration, and its user's backend settings."""

    def __init__(self, stack: Stack, name: str, user: str, ref: str, config: str, **env: str) -> None:
        self.dir = stack.tmp / name
        self.dir.mkdir()
        (self.dir / "main.tf").write_text(BACKEND + config)
        address = f"{stack.base}/workspaces/{ref}/tfstate"
        self.env = {
            **os.environ,
            "CHECKPOINT_DISABLE": "1",
            "TF_IN_AUTOMATION": "1",
            "TF_CLI_CONFIG_FILE": str(stack.cli_config),
            "TF_HTTP_ADDRESS": address,
            "TF_HTTP_LOCK_ADDRESS": f"{address}/lock",
            "TF_HTTP_UNLOCK_ADDRESS": f"{address}/lock",
            "TF_HTTP_USERNAME": user,
            "TF_HTTP_PASSWORD": stack.tokens.get(user, "tfd_unknown"),
            "TF_HTTP_RETRY_MAX": "0",
            **env,
        }

    def write(self, config: str) -> None:
        (self.dir / "main.tf").write_text(BACKEND + config)

    async def __call__(self, *args: str, timeout: float = 120) -> Run:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            "terraform",
            *args,
            cwd=self.dir,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode is not None
        return Run(proc.returncode, out.decode(), started, time.monotonic())

    async def ok(self, *args: str) -> str:
        run = await self(*args)
        assert run.code == 0, f"terraform {' '.join(args)}: {run.out}"
        return run.out

    async def init(self) -> None:
        await self.ok("init", "-input=false", "-no-color")

    async def apply(self, *extra: str) -> Run:
        return await self("apply", "-auto-approve", "-input=false", "-no-color", *extra)

    async def state_list(self) -> list[str]:
        return (await self.ok("state", "list")).split()


# ---------------------------------------------------------------- helpers


async def deploy(stack: Stack, workspace: str, config: str) -> str:
    r = await stack.api.post("/deploys", json={"workspace": workspace, "files": {"main.tf": config}})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def status(stack: Stack, deploy_id: str) -> str:
    return str((await stack.api.get(f"/deploys/{deploy_id}")).json()["status"])


async def wait_status(stack: Stack, deploy_id: str, wanted: set[str], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = await status(stack, deploy_id)
        if now in wanted:
            return now
        await asyncio.sleep(0.05)
    raise AssertionError(f"deploy {deploy_id} is {await status(stack, deploy_id)}, not {wanted}")


async def latest_state(stack: Stack, ref: str) -> dict[str, Any]:
    r = await stack.api.get(f"/workspaces/{ref}/state")
    assert r.status_code == 200, r.text
    return dict(r.json())


def ids_of(state: dict[str, Any]) -> dict[str, str]:
    return {
        f"{r['type']}.{r['name']}": r["instances"][0]["attributes"]["id"]
        for r in state.get("resources", [])
    }


async def workspace_events(stack: Stack, ref: str, user: str = "ann") -> list[dict[str, Any]]:
    r = await stack.api.get("/events", params={"workspace": ref, "limit": 500}, headers=stack.headers(user))
    assert r.status_code == 200, r.text
    return [e for e in r.json()["items"] if e["stream"] == "workspace"]


async def lock_rows(stack: Stack) -> int:
    async with stack.services.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM workspace_locks")
        row = await cur.fetchone()
        return int(row[0]) if row else 0


# ---------------------------------------------------------------- the tests


async def test_init_apply_state_list_mv_rm_and_push_through_the_backend(stack: Stack) -> None:
    tf = Terraform(stack, "ann", "ann", "prod", WEB)
    await tf.init()
    applied = await tf.apply()
    assert applied.code == 0 and "1 added" in applied.out, applied.out
    assert await tf.state_list() == ["terraform_data.web"]
    await tf.ok("state", "mv", "terraform_data.web", "terraform_data.site")
    assert await tf.state_list() == ["terraform_data.site"]
    pulled = json.loads(await tf.ok("state", "pull"))
    await tf.ok("state", "rm", "terraform_data.site")
    assert await tf.state_list() == []
    assert await lock_rows(stack) == 0  # every lock released
    # Each write is a state version of the workspace the CLI made, by ann's terraform.
    versions = (await stack.api.get("/workspaces/prod/states")).json()["items"]
    assert [v["version"] for v in versions] == [3, 2, 1]
    assert {(v["source"], v["written_by"], v["deploy_id"]) for v in versions} == {("cli", "ann", None)}
    assert len({v["lineage"] for v in versions}) == 1
    assert [v["serial"] for v in versions] == sorted((v["serial"] for v in versions), reverse=True)
    types = [(e["type"], e["actor"]) for e in await workspace_events(stack, "ann:prod")]
    assert types[0] == ("WorkspaceCreated", "cli:ann")
    assert types.count(("StateWritten", "cli:ann")) == 3
    assert types.count(("StateLocked", "cli:ann")) == types.count(("StateUnlocked", "cli:ann")) == 3
    # A state brought from elsewhere goes into a workspace of its own, by `state push` to a new
    # name. (Into an empty backend terraform itself writes it under a new lineage.)
    other = Terraform(stack, "other", "ann", "imported", WEB)
    await other.init()
    (other.dir / "prod.tfstate").write_text(json.dumps(pulled))
    await other.ok("state", "push", "prod.tfstate")
    assert await other.state_list() == ["terraform_data.site"]
    assert ids_of(await latest_state(stack, "imported")) == ids_of(pulled)
    # Another lineage cannot replace a workspace's state, even forced.
    (tf.dir / "foreign.tfstate").write_text(json.dumps({**pulled, "lineage": "foreign", "serial": 99}))
    refused = await tf("state", "push", "-force", "foreign.tfstate")
    assert refused.code != 0 and "409" in refused.out, refused.out
    assert await tf.state_list() == []
    assert await lock_rows(stack) == 0


async def test_a_deploy_after_a_cli_apply_starts_from_the_cli_state(stack: Stack) -> None:
    tf = Terraform(stack, "ann", "ann", "prod", WEB)
    await tf.init()
    assert (await tf.apply()).code == 0
    cli_state = await latest_state(stack, "prod")
    made = ids_of(cli_state)
    d = await deploy(stack, "prod", WEB)
    assert await wait_status(stack, d, {"succeeded", "failed"}) == "succeeded"
    logs = (await stack.api.get(f"/deploys/{d}/logs")).text
    assert "0 added" in logs or "No changes" in logs, logs
    after = await latest_state(stack, "prod")
    assert ids_of(after) == made  # nothing made twice
    assert after["lineage"] == cli_state["lineage"] and after["serial"] >= cli_state["serial"]
    # ... and the CLI, in turn, plans from the deploy's state (nothing to do), and applies a
    # change on top of it: the next version, by the CLI.
    plan = await tf("plan", "-detailed-exitcode", "-input=false", "-no-color")
    assert plan.code == 0, plan.out
    tf.write(WEB.replace('"v1"', '"v2"'))
    assert (await tf.apply()).code == 0
    top = (await stack.api.get("/workspaces/prod/states")).json()["items"][:2]
    assert [(v["source"], v["deploy_id"]) for v in top] == [("cli", None), ("deploy", d)]
    assert top[0]["serial"] > top[1]["serial"] and top[0]["lineage"] == top[1]["lineage"]


async def test_plan_during_a_running_deploy_fails_on_the_lock_or_waits_for_it(stack: Stack) -> None:
    tf = Terraform(stack, "ann", "ann", "prod", WEB)
    await tf.init()
    assert (await tf.apply()).code == 0
    d = await deploy(stack, "prod", WEB + SLOW % 4)
    assert await wait_status(stack, d, {"deploying"}) == "deploying"
    at_once = await tf("plan", "-lock-timeout=0s", "-input=false", "-no-color")
    assert at_once.code == 1 and "Error acquiring the state lock" in at_once.out, at_once.out
    assert f"ID=deploy:{d}" in at_once.out
    waited = await tf("plan", "-lock-timeout=30s", "-input=false", "-no-color")
    assert waited.code == 0, waited.out
    # It got the lock only once the deploy had ended (it plans from the deploy's state: the
    # slow resource is there, and is to be destroyed since the CLI's configuration lacks it).
    assert await status(stack, d) == "succeeded"
    assert "terraform_data.slow will be destroyed" in waited.out, waited.out
    assert waited.ended - waited.started > 1


async def test_a_lost_lock_answer_is_retried_with_the_same_id(stack: Stack) -> None:
    proxy = DropFirstLockAnswer(stack.base)
    async with proxy.serving() as via:
        tf = Terraform(
            stack, "ann", "ann", "prod", WEB,
            TF_HTTP_RETRY_MAX="2", TF_HTTP_RETRY_WAIT_MIN="0", TF_HTTP_RETRY_WAIT_MAX="1",
        )
        for name in ("TF_HTTP_ADDRESS", "TF_HTTP_LOCK_ADDRESS", "TF_HTTP_UNLOCK_ADDRESS"):
            tf.env[name] = tf.env[name].replace(stack.base, via)
        await tf.init()
        applied = await tf.apply()
    assert applied.code == 0, applied.out
    # The first LOCK took the lock but its answer never arrived; terraform sent it again, with
    # the same LockInfo, and was answered 200: locked once, unlocked once.
    assert len(proxy.locks) == 2 and proxy.locks[0] == proxy.locks[1]
    assert proxy.dropped
    types = [e["type"] for e in await workspace_events(stack, "ann:prod")]
    assert types.count("StateLocked") == 1 and types.count("StateUnlocked") == 1
    assert await lock_rows(stack) == 0


async def test_two_clis_racing_for_the_lock(stack: Stack) -> None:
    one = Terraform(stack, "one", "ann", "prod", ALWAYS_SLOW % 2)
    await one.init()
    assert (await one.apply()).code == 0
    two = Terraform(stack, "two", "ann", "prod", ALWAYS_SLOW % 2)
    await two.init()
    # Without waiting: one applies, the other is refused on the lock.
    runs = await asyncio.gather(one.apply("-lock-timeout=0s"), two.apply("-lock-timeout=0s"))
    assert sorted(r.code for r in runs) == [0, 1], [r.out for r in runs]
    loser = next(r for r in runs if r.code == 1)
    assert "Error acquiring the state lock" in loser.out, loser.out
    before = (await latest_state(stack, "prod"))["serial"]
    # Waiting: both apply, one after the other; no write lost.
    runs = await asyncio.gather(one.apply("-lock-timeout=60s"), two.apply("-lock-timeout=60s"))
    assert [r.code for r in runs] == [0, 0], [r.out for r in runs]
    first, second = sorted(runs, key=lambda r: r.ended)
    assert second.ended - first.ended > 1.5  # the second waited for the first's lock
    assert (await latest_state(stack, "prod"))["serial"] > before + 1
    assert await lock_rows(stack) == 0


async def test_force_unlock_by_an_admin_and_refused_for_others(stack: Stack) -> None:
    tf = Terraform(stack, "ann", "ann", "prod", WEB)
    await tf.init()
    assert (await tf.apply()).code == 0
    # A terraform that died holding the lock: its LOCK went through, its UNLOCK never came.
    stale = {"ID": "0c5e3f9a-dead-beef-0000-5a1e5a1e5a1e", "Operation": "OperationTypeApply",
             "Who": "ann@crashed", "Version": "1.11.4"}
    r = await stack.api.request("LOCK", "/workspaces/prod/tfstate/lock", json=stale)
    assert r.status_code == 200, r.text
    blocked = await tf("plan", "-lock-timeout=0s", "-input=false", "-no-color")
    assert blocked.code == 1 and stale["ID"] in blocked.out, blocked.out
    # The owner may not force it (403); another user learns nothing (404).
    own = await tf("force-unlock", "-force", stale["ID"])
    assert own.code != 0 and "403" in own.out, own.out
    bob = Terraform(stack, "bob", "bob", "ann:prod", WEB)
    await bob.init()
    theirs = await bob("force-unlock", "-force", stale["ID"])
    assert theirs.code != 0 and "404" in theirs.out, theirs.out
    assert await lock_rows(stack) == 1
    root = Terraform(stack, "root", "root", "ann:prod", WEB)
    await root.init()
    forced = await root("force-unlock", "-force", stale["ID"])
    assert forced.code == 0, forced.out
    assert await lock_rows(stack) == 0
    assert (await tf("plan", "-lock-timeout=0s", "-input=false", "-no-color")).code == 0
    last = [e for e in await workspace_events(stack, "ann:prod") if e["type"] == "StateForceUnlocked"]
    assert [(e["actor"], e["data"]["lock_id"], e["data"]["holder"]) for e in last] == [
        ("cli:root", stale["ID"], "ann")
    ]


async def test_another_users_token_is_refused(stack: Stack) -> None:
    tf = Terraform(stack, "ann", "ann", "prod", WEB)
    await tf.init()
    assert (await tf.apply()).code == 0
    before = await workspace_events(stack, "ann:prod")
    # bob is not a member: ann's workspace does not exist for him.
    bob = Terraform(stack, "bob", "bob", "ann:prod", WEB)
    await bob.init()
    unseen = await bob("state", "list")  # no state he can see
    assert unseen.code == 1 and "No state file was found" in unseen.out, unseen.out
    applied = await bob.apply()
    assert applied.code == 1 and "404" in applied.out, applied.out
    # A token that is not one: refused before anything is looked at.
    nobody = Terraform(stack, "nobody", "ann", "prod", WEB, TF_HTTP_PASSWORD="tfd_not-a-token")
    refused = await nobody("init", "-input=false", "-no-color")
    planned = refused if refused.code != 0 else await nobody("plan", "-input=false", "-no-color")
    assert planned.code == 1 and "requires auth" in planned.out, planned.out
    assert await workspace_events(stack, "ann:prod") == before  # nothing recorded, nothing written
    # Made a member who may read, bob sees the state but may not lock it.
    assert (
        await stack.api.put("/workspaces/prod/members/bob", json={"role": "read"})
    ).status_code == 201
    assert await bob.state_list() == ["terraform_data.web"]
    refused = await bob.apply()
    assert refused.code == 1 and "invalid auth" in refused.out, refused.out  # 403


async def test_a_deploy_submitted_while_the_cli_holds_the_lock_runs_after_unlock(stack: Stack) -> None:
    tf = Terraform(stack, "ann", "ann", "prod", WEB)
    await tf.init()
    assert (await tf.apply()).code == 0
    made = ids_of(await latest_state(stack, "prod"))
    # A slow CLI apply holds the lock for a few seconds...
    tf.write(WEB + SLOW % 5)
    cli = asyncio.create_task(tf.apply())
    deadline = time.monotonic() + 30
    while await lock_rows(stack) == 0:
        assert time.monotonic() < deadline and not cli.done()
        await asyncio.sleep(0.05)
    # ... a deploy submitted meanwhile stays queued, without a busy loop, until it ends.
    d = await deploy(stack, "prod", WEB + SLOW % 5)
    seen = set()
    while not cli.done():
        seen.add(await status(stack, d))
        await asyncio.sleep(0.1)
    assert (await cli).code == 0
    assert seen == {"queued"}, seen
    # Then it runs, from the CLI's state: the CLI made the slow resource, the deploy makes nothing.
    cli_ids = ids_of(await latest_state(stack, "prod"))
    assert await wait_status(stack, d, {"succeeded", "failed"}) == "succeeded"
    after = ids_of(await latest_state(stack, "prod"))
    assert after == cli_ids and after["terraform_data.web"] == made["terraform_data.web"]


# ---------------------------------------------------------------- a connection that loses answers


class DropFirstLockAnswer:
    """A loopback HTTP/1.1 proxy that passes requests to the service and answers back, except
    the answer to the first LOCK: the service locked, then the connection drops before terraform
    hears it (as when a network or a load balancer fails at that moment)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.locks: list[bytes] = []
        self.dropped = False

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.close()
            await server.wait_closed()

    @staticmethod
    async def _message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        return head, await reader.readexactly(length) if length else b""

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            while True:
                try:
                    head, body = await self._message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                up_writer.write(head + body)
                await up_writer.drain()
                answer_head, answer_body = await self._message(up_reader)
                if head.startswith(b"LOCK "):
                    self.locks.append(body)
                    if not self.dropped:
                        self.dropped = True
                        return  # the service answered; terraform never hears it
                writer.write(answer_head + answer_body)
                await writer.drain()
        finally:
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
