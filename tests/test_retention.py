"""Retention as settings (issue 12, part 10; service/maintenance.py, migration 0011): each kind
(logs, inputs, Idempotency-Key records, state versions with their PostgreSQL blobs and S3
objects), the rules that nothing else goes (events never; a workspace's latest state version
never; nothing of a busy workspace; only ended deploys' logs and inputs), the replay of a
deploy whose inputs went, and the periodic job really running in a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import psycopg
import pytest
from moto.server import ThreadedMotoServer

from service.api.app import create_app
from service.auth import create_token
from service.deploys import NewDeploy
from service.lifecycle import AttemptFailed, AttemptSucceeded, PersistedState, Replay, StartAttempt
from service.logs import append_lines
from service.maintenance import Maintenance
from service.queue import Queue
from service.secrets import generate_key
from service.services import Services, open_services
from service.settings import from_env
from service.statestores import PostgresStateStore, put_with_retries
from service.statestores import index as state_index
from service.statestores.s3 import S3StateStore

MAIN_TF = 'resource "terraform_data" "x" {}\n'
WORKER = "worker:retention"
ENDED_LONG_AGO = "30 days"


@contextlib.asynccontextmanager
async def kept(database_url: str, tmp_path: Path, **settings: Any) -> AsyncIterator[Services]:
    values: dict[str, Any] = {"data_dir": str(tmp_path / "data")}
    values.update(settings)
    services = await open_services(from_env({}, **values), database_url, pool_size=6)
    try:
        yield services
    finally:
        await services.close()


@contextlib.asynccontextmanager
async def api(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://tfdeploy.test") as c:
        yield c


async def deploy(services: Services, owner: str = "ann", workspace: str = "default", **kw: Any) -> str:
    new = NewDeploy(workspace=workspace, action="apply", files={"main.tf": MAIN_TF},
                    variables={"name": "v"}, max_attempts=kw.pop("max_attempts", 1), **kw)
    view, _ = await services.deploys.request(new, owner=owner, actor=f"user:{owner}")
    return view.id


async def run(services: Services, deploy_id: str, lines: int = 0) -> None:
    await services.deploys.execute(deploy_id, StartAttempt(worker="w"), WORKER)
    if lines:
        async with services.pool.connection() as conn:
            await append_lines(conn, deploy_id, 1, "stdout", [f"line {i}" for i in range(1, lines + 1)])


async def succeed(services: Services, deploy_id: str, workspace: str = "ws") -> None:
    state = PersistedState(workspace=workspace, store="postgres", location="x", serial=1,
                           lineage="l", sha256="0" * 64, size=2, state_version=1)
    await services.deploys.execute(deploy_id, AttemptSucceeded(state=state), WORKER)


async def fail(services: Services, deploy_id: str) -> None:
    await services.deploys.execute(
        deploy_id, AttemptFailed(reason="apply_failed", message="boom"), WORKER
    )


async def age(services: Services, deploy_id: str, interval: str = ENDED_LONG_AGO) -> None:
    """The deploy's last change was ``interval`` ago."""
    async with services.pool.connection() as conn:
        await conn.execute(
            "UPDATE deploys SET updated_at = updated_at - %s::interval WHERE id = %s",
            (interval, deploy_id),
        )


async def scalar(services: Services, sql: str, params: Any = None) -> Any:
    async with services.pool.connection() as conn:
        cur = await conn.execute(sql, params)
        row = await cur.fetchone()
    return row[0] if row else None


async def log_rows(services: Services, deploy_id: str) -> list[tuple[int, str, str]]:
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT seq, stream, line FROM deploy_logs WHERE deploy_id = %s ORDER BY seq",
            (deploy_id,),
        )
        return [tuple(r) for r in await cur.fetchall()]  # type: ignore[misc]


# ---------------------------------------------------------------- logs


async def test_the_logs_of_deploys_that_ended_long_ago_go_and_a_marker_keeps_the_last_seq(
    database_url, tmp_path
) -> None:
    async with kept(database_url, tmp_path, log_retention_days=7) as services:
        old_ok, old_failed, recent, running = [
            await deploy(services, workspace=w) for w in ("a", "b", "c", "d")
        ]
        for d in (old_ok, old_failed, recent, running):
            await run(services, d, lines=5)
        await succeed(services, old_ok)
        await fail(services, old_failed)
        await succeed(services, recent)
        for d in (old_ok, old_failed, running):
            await age(services, d)
        events = await scalar(services, "SELECT count(*) FROM events")

        report = await Maintenance(services, batch=2).run()  # several batches
        assert report.logs == 2 and report.finished

        marker = (5, "system", "[5 lines of output removed by log retention]")
        assert await log_rows(services, old_ok) == [marker]
        assert await log_rows(services, old_failed) == [marker]
        assert len(await log_rows(services, recent)) == 5  # ended lately
        assert len(await log_rows(services, running)) == 5  # not ended, however old
        assert await scalar(services, "SELECT count(*) FROM events") == events  # never
        # A second run finds nothing more to do.
        assert (await Maintenance(services).run()).logs == 0

        async with services.pool.connection() as conn:
            root = await create_token(conn, "root", admin=True)
        async with api(services) as c:
            r = await c.get(f"/deploys/{old_ok}/logs", headers={"Authorization": f"Bearer {root}"})
            assert r.text == marker[2] and r.headers["x-last-seq"] == "5"
            # A replay of the failed one (its inputs are kept): its lines go on after the marker.
            r = await c.post(f"/deploys/{old_failed}/replay",
                             headers={"Authorization": f"Bearer {root}"})
            assert r.status_code == 202, r.text
        await services.deploys.execute(old_failed, StartAttempt(worker="w"), WORKER)
        async with services.pool.connection() as conn:
            assert await append_lines(conn, old_failed, 2, "stdout", ["again"]) == 6


# ---------------------------------------------------------------- inputs


async def test_the_inputs_of_deploys_that_ended_long_ago_go_and_they_cannot_be_replayed(
    database_url, tmp_path
) -> None:
    async with kept(database_url, tmp_path, input_retention_days=7) as services:
        old_failed, recent_failed, queued = [
            await deploy(services, workspace=w) for w in ("a", "b", "c")
        ]
        for d in (old_failed, recent_failed):
            await run(services, d)
            await fail(services, d)
        await age(services, old_failed)
        await age(services, queued)
        report = await Maintenance(services).run()
        assert report.inputs == 1
        inputs = "SELECT count(*) FROM deploy_inputs WHERE deploy_id = %s"
        assert await scalar(services, inputs, (old_failed,)) == 0
        assert await scalar(services, inputs, (recent_failed,)) == 1
        assert await scalar(services, inputs, (queued,)) == 1  # it still has to run

        async with services.pool.connection() as conn:
            root = await create_token(conn, "root", admin=True)
        async with api(services) as c:
            r = await c.post(f"/deploys/{old_failed}/replay",
                             headers={"Authorization": f"Bearer {root}"})
            assert r.status_code == 409, r.text
            assert "removed by retention" in r.json()["detail"]
            r = await c.post(f"/deploys/{recent_failed}/replay",
                             headers={"Authorization": f"Bearer {root}"})
            assert r.status_code == 202
        # Refused in the database itself, whoever appends it (the CLI's replay too).
        with pytest.raises(psycopg.DatabaseError) as refused:
            await services.deploys.execute(old_failed, Replay(by="admin:root", budget=3), "admin:root")
        assert refused.value.sqlstate == "TD410"
        assert await scalar(services, "SELECT status FROM deploys WHERE id = %s", (old_failed,)) == "failed"


async def test_a_deploy_being_written_to_is_left_for_a_later_run(database_url, tmp_path) -> None:
    """Retention takes each deploy under the lock its appends take (and skips it when busy), and
    checks again under it that the deploy is ended: a replay committed first keeps its inputs."""
    async with kept(database_url, tmp_path, input_retention_days=7) as services:
        d = await deploy(services)
        await run(services, d)
        await fail(services, d)
        await age(services, d)
        conn = await psycopg.AsyncConnection.connect(services.database_url)
        async with conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7310004, hashtext(%s))", (d,))
            assert (await Maintenance(services).run()).inputs == 0
        inputs = "SELECT count(*) FROM deploy_inputs WHERE deploy_id = %s"
        assert await scalar(services, inputs, (d,)) == 1
        # Once it is free, the next run takes it.
        assert (await Maintenance(services).run()).inputs == 1
        assert await scalar(services, inputs, (d,)) == 0


# ---------------------------------------------------------------- idempotency keys


async def test_idempotency_keys_older_than_the_retention_go(database_url, tmp_path) -> None:
    async with kept(database_url, tmp_path, idempotency_retention_days=1) as services:
        async with services.pool.connection() as conn:
            token = await create_token(conn, "ann")
        headers = {"Authorization": f"Bearer {token}"}
        body = {"files": {"main.tf": MAIN_TF}}
        async with api(services) as c:
            first = await c.post("/deploys", json=body, headers={**headers, "Idempotency-Key": "old"})
            recent = await c.post("/deploys", json=body, headers={**headers, "Idempotency-Key": "new"})
            async with services.pool.connection() as conn:
                await conn.execute(
                    "UPDATE idempotency_keys SET created_at = now() - interval '2 days' WHERE key = 'old'"
                )
            assert (await Maintenance(services).run()).idempotency_keys == 1
            again = await c.post("/deploys", json=body, headers={**headers, "Idempotency-Key": "old"})
            assert again.status_code == 202 and "idempotent-replayed" not in again.headers
            assert again.json()["id"] != first.json()["id"]  # a new deploy: the key was forgotten
            same = await c.post("/deploys", json=body, headers={**headers, "Idempotency-Key": "new"})
            assert same.headers["idempotent-replayed"] == "true"
            assert same.json()["id"] == recent.json()["id"]


# ---------------------------------------------------------------- state versions


async def persist(services: Services, store: Any, workspace: str, serial: int) -> int:
    content = json.dumps({"version": 4, "serial": serial, "lineage": "lin", "resources": []}).encode()
    serial_, lineage, digest, size = state_index.state_meta(content)
    async with services.pool.connection() as conn, conn.transaction():
        version = await state_index.next_version(conn, workspace)
        stored = await put_with_retries(store, workspace, version, content, digest)
        await state_index.record_version(conn, workspace, version, str(uuid4()), 1, stored,
                                         serial_, lineage, digest, size)
        await conn.execute(
            "INSERT INTO state_lock_files (workspace, version, content, sha256) VALUES (%s, %s, %s, %s)",
            (workspace, version, "# lock", hashlib.sha256(b"# lock").hexdigest()),
        )
    return version


async def age_states(services: Services, workspace: str, interval: str = ENDED_LONG_AGO) -> None:
    async with services.pool.connection() as conn:
        await conn.execute(
            "UPDATE state_versions SET created_at = created_at - %s::interval WHERE workspace = %s",
            (interval, workspace),
        )


async def versions(services: Services, workspace: str, table: str = "state_versions") -> list[int]:
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT version FROM {table} WHERE workspace = %s ORDER BY version", (workspace,)
        )
        return [r[0] for r in await cur.fetchall()]


async def workspace_of(services: Services, deploy_id: str) -> str:
    return str(await scalar(services, "SELECT workspace_id FROM deploys WHERE id = %s", (deploy_id,)))


async def test_old_state_versions_go_but_never_the_latest_nor_a_busy_workspaces(
    database_url, tmp_path
) -> None:
    async with kept(database_url, tmp_path, state_retention_days=7) as services:
        store = PostgresStateStore(services.pool, services.extras["keyring"])
        idle_deploy = await deploy(services, workspace="idle")
        await run(services, idle_deploy)
        await succeed(services, idle_deploy)
        busy_deploy = await deploy(services, workspace="busy")  # queued: it will need its state
        locked_deploy = await deploy(services, workspace="locked")
        await run(services, locked_deploy)
        await succeed(services, locked_deploy)
        idle, busy, locked = [await workspace_of(services, d)
                              for d in (idle_deploy, busy_deploy, locked_deploy)]
        for ws in (idle, busy, locked):
            for serial in range(1, 5):
                await persist(services, store, ws, serial)
            await age_states(services, ws)
        await persist(services, store, idle, 5)  # a recent one: the latest
        async with services.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO workspace_locks (workspace_id, lock_id, info, holder) "
                "VALUES (%s, 'cli-lock', '{}', 'ann')",
                (locked,),
            )
            await conn.execute(
                "INSERT INTO state_emergency (workspace, deploy_id, attempt, sha256, content, reason) "
                "VALUES (%s, %s, 1, 'x', '\\x00', 'test')",
                (idle, idle_deploy),
            )
        events = await scalar(services, "SELECT count(*) FROM events")

        report = await Maintenance(services, batch=2).run()
        assert report.state_versions == 4
        assert await versions(services, idle) == [5]
        assert await versions(services, idle, "state_blobs") == [5]
        assert await versions(services, idle, "state_lock_files") == [5]
        assert await versions(services, busy) == [1, 2, 3, 4]  # a queued deploy will need it
        assert await versions(services, locked) == [1, 2, 3, 4]  # the CLI holds it
        assert await scalar(services, "SELECT count(*) FROM state_emergency") == 1
        assert await scalar(services, "SELECT count(*) FROM events") == events

        # Only old ones go; and the latest, however old, stays.
        await age_states(services, idle)
        async with services.pool.connection() as conn:
            await conn.execute("DELETE FROM workspace_locks")
        await services.deploys.execute(busy_deploy, StartAttempt(worker="w"), WORKER)
        await succeed(services, busy_deploy)
        assert (await Maintenance(services).run()).state_versions == 6
        for ws in (idle, busy, locked):
            assert await versions(services, ws) == [5 if ws == idle else 4]
        # The numbering goes on after the latest.
        assert await persist(services, store, idle, 6) == 6


# -- S3


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dummy-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "dummy-secret")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def test_the_s3_objects_of_deleted_versions_go_every_version_of_them(
    database_url, tmp_path, moto_url, aws_env
) -> None:
    bucket = f"retention-{uuid4().hex[:12]}"
    s3 = {"state_store": "s3", "s3_bucket": bucket, "s3_endpoint_url": moto_url,
          "s3_region": "us-east-1", "secrets_key": generate_key()}
    async with kept(database_url, tmp_path, state_retention_days=7, **s3) as services:
        store = S3StateStore(services.settings, keyring=services.extras["keyring"])
        await store.ensure_bucket()
        store.client.put_bucket_versioning(
            Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
        )
        d = await deploy(services, workspace="s3")
        await run(services, d)
        await succeed(services, d)
        ws = await workspace_of(services, d)
        for serial in range(1, 4):
            await persist(services, store, ws, serial)
        # Version 1 written twice (as a re-seal does): two object versions behind one key.
        await put_with_retries(store, ws, 1, *_content(1))
        await age_states(services, ws)

        def object_versions() -> dict[str, int]:
            out: dict[str, int] = {}
            listing = store.client.list_object_versions(Bucket=bucket)
            for v in [*listing.get("Versions", []), *listing.get("DeleteMarkers", [])]:
                out[v["Key"]] = out.get(v["Key"], 0) + 1
            return out

        before = object_versions()
        assert sorted(before.values()) == [1, 1, 2]
        # The store is away when the run comes: the versions go from the index, their objects
        # wait in the outbox for the next run.
        broken = Maintenance(services, state_store=_Unreachable(store))
        report = await broken.run()
        assert report.state_versions == 2 and report.state_objects == 0
        assert report.state_objects_left == 2
        assert await versions(services, ws) == [3]
        assert len(object_versions()) == 3
        report = await Maintenance(services, state_store=store).run()
        assert report.state_objects == 2 and report.state_objects_left == 0
        assert list(object_versions()) == [store.key(ws, 3)]
        assert await scalar(services, "SELECT count(*) FROM state_objects_to_delete") == 0


def _content(serial: int) -> tuple[bytes, str]:
    content = json.dumps({"version": 4, "serial": serial, "lineage": "lin", "resources": []}).encode()
    return content, hashlib.sha256(content).hexdigest()


class _Unreachable:
    """An S3 store whose deletes fail as a store that does not answer."""

    def __init__(self, store: S3StateStore) -> None:
        self.store = store

    async def delete(self, workspace: str, version: int, location: str) -> None:
        from service.statestores import StateStoreError

        raise StateStoreError("s3 delete failed (EndpointConnectionError)")


# ---------------------------------------------------------------- defaults, housekeeping


async def test_by_default_everything_is_kept(services: Services) -> None:
    d = await deploy(services)
    await run(services, d, lines=3)
    await fail(services, d)
    await age(services, d, "3650 days")
    report = await Maintenance(services).run()
    assert report.logs == report.inputs == report.state_versions == report.idempotency_keys == 0
    assert len(await log_rows(services, d)) == 3


async def test_quiet_request_counters_and_dead_api_processes_are_forgotten(
    services: Services,
) -> None:
    async with services.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO request_counts (key, window_no, hits) VALUES "
            "('user:1', floor(extract(epoch FROM now()))::bigint, 3), "
            "('user:2', floor(extract(epoch FROM now()))::bigint - 7200, 9)"
        )
        await conn.execute(
            "INSERT INTO api_processes (id, seen_at) VALUES (%s, now()), (%s, now() - interval '2 hours')",
            (str(uuid4()), str(uuid4())),
        )
    await Maintenance(services).run()
    assert await scalar(services, "SELECT string_agg(key, ',') FROM request_counts") == "user:1"
    assert await scalar(services, "SELECT count(*) FROM api_processes") == 1


# ---------------------------------------------------------------- the periodic job


async def test_the_periodic_maintenance_job_runs_in_the_worker(
    database_url, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """procrastinate's periodic deferrer (in the worker) defers the maintenance job on its
    cron, the worker runs it from the `maintenance` queue, and retention happens."""
    from service.worker import Worker

    monkeypatch.setattr(Queue, "maintenance_cron", "* * * * * */1")  # every second
    async with kept(database_url, tmp_path, log_retention_days=7, runner="local") as services:
        d = await deploy(services)
        await run(services, d, lines=4)
        await succeed(services, d)
        await age(services, d)
        worker = Worker(services, name="maintenance-test")
        task = asyncio.create_task(worker.run())
        try:
            deadline = time.monotonic() + 30
            while len(await log_rows(services, d)) != 1:
                assert time.monotonic() < deadline, "the maintenance job did not run"
                await asyncio.sleep(0.2)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
            await worker.close()
        defers = await scalar(
            services,
            "SELECT count(*) FROM procrastinate_periodic_defers WHERE task_name = 'tfdeploy.maintenance'",
        )
        assert defers >= 1
        assert await scalar(
            services,
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'tfdeploy.maintenance' "
            "AND status NOT IN ('succeeded', 'todo', 'doing')",
        ) == 0

