"""Issue 6, scenario 4 -- object storage flapping, under real deploys.

A worker (local runner, real terraform) stores states in S3 through a small S3-protocol proxy
written here, in front of moto's real S3 server on loopback. The proxy forwards every request,
or, as its schedule says, answers it with a fault: a connection reset before forwarding, a reset
after forwarding (the object is stored but the answer is lost), a 500 or 503 with an S3 error
body, or silence past the client's read timeout. Nothing is asserted on speed; the time from the
store recovering to the state being persisted is printed (-s).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import random
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from service.api.app import create_app
from service.auth import create_token
from service.services import open_services
from service.settings import from_env
from service.statestores.s3 import S3StateStore
from service.worker import Worker

TERMINAL = {"succeeded", "failed", "cancelled"}
BUCKET = "flappy"
READ_TIMEOUT = 1.0  # the store's read timeout in these tests, so a silent server costs ~1 s

DESTROY_TRACED = """
resource "terraform_data" "a" {
  input = "%(tag)s"
  provisioner "local-exec" { command = "echo MADE-A" }
  provisioner "local-exec" {
    when    = destroy
    command = "echo DESTROYING-A"
  }
}
"""

# Fault = what the proxy does with one request instead of (or after) forwarding it.
FAULTS = ("reset", "reset_after", "500", "503", "timeout")
Schedule = Callable[[str, str], str | None]  # (method, path) -> a fault, or None to forward


class S3Proxy:
    """A threaded HTTP/1.1 proxy to ``upstream`` that injects faults on object requests."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.split("://", 1)[1]
        self.schedule: Schedule = lambda method, path: None
        self.log: list[tuple[float, str, str, str]] = []  # (time, method, path, fault or "ok")
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends RST, as a dropped connection does.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _handle(self) -> None:
                body = self._body()
                object_request = self.path.startswith(f"/{BUCKET}/")
                with proxy.lock:
                    fault = proxy.schedule(self.command, self.path) if object_request else None
                    proxy.log.append((time.time(), self.command, self.path, fault or "ok"))
                if fault == "reset":
                    return self._reset()
                if fault == "timeout":
                    time.sleep(READ_TIMEOUT * 1.5)
                    return self._reset()
                if fault in ("500", "503"):
                    code = "InternalError" if fault == "500" else "SlowDown"
                    payload = b"" if self.command == "HEAD" else (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>injected</Message></Error>"
                    ).encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return None
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if fault == "reset_after":  # stored upstream, the answer never arrives
                    return self._reset()
                self.send_response(resp.status)
                # A HEAD answer keeps the object's Content-Length (it has no body of its own).
                skip = {"connection", "transfer-encoding", "keep-alive"}
                if self.command != "HEAD":
                    skip.add("content-length")
                    self.send_header("Content-Length", str(len(data)))
                for k, v in resp.getheaders():
                    if k.lower() not in skip:
                        self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return None

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class Env:
    def __init__(self, client: httpx.AsyncClient, proxy: S3Proxy, direct: Any, services: Any) -> None:
        self.client, self.proxy, self.direct, self.services = client, proxy, direct, services

    async def submit(self, files: dict[str, str], workspace: str) -> str:
        r = await self.client.post("/deploys", json={"files": files, "workspace": workspace})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    async def wait(self, deploy_id: str, limit: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        d: dict[str, Any] = {}
        while time.monotonic() < deadline:
            d = (await self.client.get(f"/deploys/{deploy_id}")).json()
            if d["status"] in TERMINAL:
                return d
            await asyncio.sleep(0.1)
        raise AssertionError(f"deploy {deploy_id} still {d.get('status')} after {limit}s")

    async def events(self, deploy_id: str) -> list[dict[str, Any]]:
        return list((await self.client.get(f"/deploys/{deploy_id}/events")).json()["items"])

    async def logs(self, deploy_id: str) -> str:
        return (await self.client.get(f"/deploys/{deploy_id}/logs")).text

    async def versions(self) -> list[tuple[Any, ...]]:
        async with self.services.pool.connection() as conn:
            # State rows are keyed by the workspace's id; shown here by its name.
            cur = await conn.execute(
                "SELECT w.name, s.version, s.deploy_id::text, s.attempt, s.location, s.sha256,"
                " s.serial, s.lineage, s.workspace FROM state_versions s"
                " JOIN workspaces w ON w.id::text = s.workspace ORDER BY w.name, s.version"
            )
            return list(await cur.fetchall())


@contextlib.asynccontextmanager
async def environment(database_url: str, tmp_path: Path, moto: str, cap: int = 2) -> AsyncIterator[Env]:
    proxy = S3Proxy(moto)
    direct = boto3.session.Session().client("s3", endpoint_url=moto, region_name="us-east-1")
    with contextlib.suppress(direct.exceptions.BucketAlreadyOwnedByYou):
        direct.create_bucket(Bucket=BUCKET)
    settings = from_env(
        {}, data_dir=str(tmp_path / "data"), runner="local", max_concurrency=cap, retry_delay=0.05,
        state_store="s3", s3_bucket=BUCKET, s3_prefix=tmp_path.name, s3_endpoint_url=proxy.url,
        s3_region="us-east-1",
    )
    services = await open_services(settings, database_url)
    worker = Worker(services, name="flap-worker", state_store=S3StateStore(settings, read_timeout=READ_TIMEOUT))
    task = asyncio.create_task(worker.run())
    async with services.pool.connection() as conn:
        token = await create_token(conn, "ann")
    transport = httpx.ASGITransport(app=create_app(services))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers={"Authorization": f"Bearer {token}"}
        ) as client:
            yield Env(client, proxy, direct, services)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
        await worker.close()
        await services.close()
        proxy.close()


def _when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["recorded_at"]).astimezone(UTC).timestamp()


def _is_state_put(method: str, path: str) -> bool:
    return method == "PUT" and path.split("?")[0].endswith(".tfstate")


# ---------------------------------------------------------------- (a) fails, then recovers


@pytest.mark.parametrize("fault", FAULTS)
async def test_store_fails_then_recovers_within_the_quick_retries(
    database_url: str, tmp_path: Path, moto: str, fault: str
) -> None:
    """The first state upload's every request fails (both of boto's tries of the first put),
    then the store is back: the state is persisted once, nothing destroyed, the deploy
    succeeds."""
    async with environment(database_url, tmp_path, moto) as env:
        failing = {"n": 2}
        recovered: list[float] = []

        def schedule(method: str, path: str) -> str | None:
            if _is_state_put(method, path) and failing["n"] > 0:
                failing["n"] -= 1
                if failing["n"] == 0:
                    recovered.append(time.time())  # from the next request on, it answers
                return fault
            return None

        env.proxy.schedule = schedule
        d = await env.submit({"main.tf": DESTROY_TRACED % {"tag": fault}}, workspace="back")
        done = await env.wait(d)
        events = await env.events(d)
        assert done["status"] == "succeeded", (done["error"], [r[1:] for r in env.proxy.log])
        assert [e["type"] for e in events] == ["Requested", "Started", "StatePersisted", "Succeeded"]
        log = await env.logs(d)
        assert "MADE-A" in log and "DESTROYING-A" not in log
        versions = await env.versions()
        assert [(v[0], v[1], v[2], v[3]) for v in versions] == [("back", 1, d, 1)]
        persisted = events[2]["data"]
        raw = env.direct.get_object(Bucket=BUCKET, Key=persisted["location"].split("/", 3)[3])["Body"].read()
        stored = env.services.extras["keyring"].open(raw)  # sealed at rest; the digest is the plaintext's
        assert hashlib.sha256(stored).hexdigest() == persisted["sha256"] == versions[0][5]
        puts = [r for r in env.proxy.log if _is_state_put(r[1], r[2])]
        assert [r[3] for r in puts[:2]] == [fault, fault] and puts[-1][3] == "ok"
        took = _when(events[2]) - recovered[0]
        print(f"\nstorage {fault}: store back -> StatePersisted {took * 1000:.0f} ms "
              f"({len(puts)} state PUTs)")


# ---------------------------------------------------------------- (b) fails for good


async def test_store_fails_for_good_destroys_what_the_apply_created(
    database_url: str, tmp_path: Path, moto: str
) -> None:
    async with environment(database_url, tmp_path, moto) as env:
        kinds = iter(FAULTS * 10)
        env.proxy.schedule = lambda method, path: next(kinds) if _is_state_put(method, path) else None
        d = await env.submit({"main.tf": DESTROY_TRACED % {"tag": "lost"}}, workspace="lost")
        done = await env.wait(d)
        assert done["status"] == "failed"
        assert done["error"]["reason"] == "state_not_persisted"
        assert [e["type"] for e in await env.events(d)] == ["Requested", "Started", "Destroyed", "Failed"]
        log = await env.logs(d)
        assert "MADE-A" in log and "DESTROYING-A" in log
        assert await env.versions() == []
        assert (await env.client.get("/workspaces/lost/state")).status_code == 404


# ---------------------------------------------------------------- (c) flapping, many deploys


async def test_flapping_store_under_concurrent_deploys_loses_and_mixes_nothing(
    database_url: str, tmp_path: Path, moto: str
) -> None:
    """Four workspaces, four deploys each (two run at once, cap 2), while a third of the
    object requests fail at random (every kind of fault, seeded). Every deploy ends either
    succeeded with its state or failed(state_not_persisted) with what it made destroyed; every
    indexed version is in the bucket with its own content, under its own workspace, numbered
    1..k, each workspace one lineage; no deploy starts from another workspace's state."""
    async with environment(database_url, tmp_path, moto) as env:
        rng = random.Random(6)

        def schedule(method: str, path: str) -> str | None:
            if rng.random() < 0.33:
                return rng.choice(("reset", "reset_after", "500", "503", "reset", "timeout"))
            return None

        env.proxy.schedule = schedule
        workspaces = [f"ws{i}" for i in range(4)]
        ids: dict[str, list[str]] = {w: [] for w in workspaces}
        for round_ in range(4):
            for w in workspaces:
                ids[w].append(await env.submit({"main.tf": DESTROY_TRACED % {"tag": f"{w}-{round_}"}}, w))
        outcomes = {d: await env.wait(d, limit=240) for ds in ids.values() for d in ds}
        env.proxy.schedule = lambda method, path: None
        faults = sum(1 for r in env.proxy.log if r[3] != "ok")
        print(f"\nflapping: {len(env.proxy.log)} object requests, {faults} faulted; "
              f"{sum(o['status'] == 'succeeded' for o in outcomes.values())} of {len(outcomes)} succeeded")
        assert faults > 0

        versions = await env.versions()
        by_deploy = {(v[2], v[3]): v for v in versions}
        for w, ds in ids.items():
            mine = [v for v in versions if v[0] == w]
            assert [v[1] for v in mine] == list(range(1, len(mine) + 1))
            assert len({v[7] for v in mine}) <= 1, "one lineage per workspace"
            assert [v[6] for v in mine] == sorted(v[6] for v in mine), "serials never go back"
            for v in mine:
                key = v[4].split("/", 3)[3]
                assert key.endswith(f"/{v[8]}/{v[1]:08d}.tfstate")  # keyed by the workspace's id
                raw = env.direct.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                content = env.services.extras["keyring"].open(raw)
                assert hashlib.sha256(content).hexdigest() == v[5]
                doc = json.loads(content)
                tags = {r["instances"][0]["attributes"]["input"]["value"] for r in doc["resources"]}
                assert tags <= {f"{w}-{n}" for n in range(4)}, (w, tags)
            for d in ds:
                events = await env.events(d)
                types = [e["type"] for e in events]
                if outcomes[d]["status"] == "succeeded":
                    assert types == ["Requested", "Started", "StatePersisted", "Succeeded"], types
                    sp = events[2]["data"]
                    assert by_deploy[(d, 1)][1] == sp["state_version"] and by_deploy[(d, 1)][5] == sp["sha256"]
                else:
                    assert outcomes[d]["error"]["reason"] == "state_not_persisted", outcomes[d]
                    assert types == ["Requested", "Started", "Destroyed", "Failed"], types
                    assert (d, 1) not in by_deploy
        assert len({(v[2], v[3]) for v in versions}) == len(versions), "one version per attempt"
        lineages = [v[7] for v in versions]
        assert len(set(lineages)) == len({v[0] for v in versions}), "lineages not shared"


# ---------------------------------------------------------------- the store down as an attempt starts


async def test_store_down_when_an_attempt_starts_keeps_the_deploy_queued_until_it_is_back(
    database_url: str, tmp_path: Path, moto: str
) -> None:
    """Reading the workspace's latest state fails (past S3StateStore.get's own retries) before
    the attempt starts: no attempt is spent, the deploy stays queued and its job is run again
    later (service/queue.py, StoreUnavailableRetry); once the store answers, it succeeds."""
    async with environment(database_url, tmp_path, moto) as env:
        first = await env.submit({"main.tf": DESTROY_TRACED % {"tag": "one"}}, workspace="cold")
        assert (await env.wait(first))["status"] == "succeeded"
        env.proxy.schedule = lambda method, path: "503" if method == "GET" else None
        second = await env.submit({"main.tf": DESTROY_TRACED % {"tag": "two"}}, workspace="cold")
        deadline = time.monotonic() + 60
        # Two runs of the job: each reads 3 times (S3StateStore.get), boto trying twice each time.
        while sum(1 for r in env.proxy.log if r[1] == "GET" and r[3] != "ok") < 12:
            assert time.monotonic() < deadline, env.proxy.log
            await asyncio.sleep(0.1)
        assert (await env.client.get(f"/deploys/{second}")).json()["status"] == "queued"
        assert [e["type"] for e in await env.events(second)] == ["Requested"]
        env.proxy.schedule = lambda method, path: None
        back = time.time()
        done = await env.wait(second, limit=120)
        events = await env.events(second)
        assert done["status"] == "succeeded", done
        assert [e["type"] for e in events] == ["Requested", "Started", "StatePersisted", "Succeeded"]
        assert events[2]["data"]["state_version"] == 2
        print(f"\nstore readable again -> Started {(_when(events[1]) - back):.1f} s")
