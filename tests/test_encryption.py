"""Encryption at rest (issue 11, part 4): what terraform writes into a state is nowhere at rest in
plain text, neither in PostgreSQL (pg_dump) nor in S3 (moto, versioned); data of the previous
version is sealed by `tfdeploy migrate`; `tfdeploy keys rotate` re-seals everything under the
first key, and a run killed half-way is finished by the next."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from uuid import uuid4

import httpx
import psycopg
import pytest
from cryptography.fernet import Fernet
from moto.server import ThreadedMotoServer

from service import planning, rotation
from service.migrate import migrate, migrations_dir
from service.secrets import KeyRing, SecretBox, generate_key
from service.settings import Settings, from_env
from service.statestores import PostgresStateStore, index
from service.statestores.s3 import S3StateStore

ROOT = Path(__file__).resolve().parent.parent
SECRET = "Zq8-vault-SeNsItIvE-41x"  # what terraform writes into the state
_buckets = itertools.count()

SENSITIVE_IN_STATE = """
variable "db_password" {
  type      = string
  sensitive = true
}
resource "terraform_data" "db" {
  input = var.db_password
}
output "password" {
  value     = var.db_password
  sensitive = true
}
"""


def tfstate(serial: int = 1, **attrs: str) -> bytes:
    return json.dumps({"version": 4, "serial": serial, "lineage": "lin", "outputs": {},
                       "resources": [{"type": "terraform_data", "attributes": attrs}]}).encode()


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def assert_nowhere(secret: str, blob: bytes, where: str) -> None:
    """Neither as text nor as the hex pg_dump writes bytea in (nor its upper-case form)."""
    for needle in (secret.encode(), secret.encode().hex().encode(), secret.encode().hex().upper().encode()):
        assert needle not in blob, f"{needle[:40]!r} found in {where}"


# -- S3 on loopback ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


AWS_ENV = {"AWS_ACCESS_KEY_ID": "dummy-access", "AWS_SECRET_ACCESS_KEY": "dummy-secret",
           "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def s3_values(moto_url: str) -> dict[str, Any]:
    return dict(state_store="s3", s3_bucket=f"vault-{next(_buckets)}", s3_endpoint_url=moto_url,
                s3_region="us-east-1", s3_prefix="tfdeploy")


async def versioned_bucket(store: S3StateStore) -> None:
    await store.ensure_bucket()
    store.client.put_bucket_versioning(
        Bucket=store.bucket, VersioningConfiguration={"Status": "Enabled"}
    )


def object_versions(store: S3StateStore) -> list[tuple[str, bytes]]:
    """Every version of every object in the bucket: (key, bytes)."""
    out = []
    listed = store.client.list_object_versions(Bucket=store.bucket)
    for v in listed.get("Versions", []):
        body = store.client.get_object(Bucket=store.bucket, Key=v["Key"], VersionId=v["VersionId"])
        out.append((v["Key"], body["Body"].read()))
    return out


# -- a deploy end to end ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_service(database_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    from service.api.app import create_app
    from service.auth import create_token
    from service.services import open_services
    from service.worker import Worker

    services = await open_services(settings, database_url)
    worker = Worker(services, name="vault-worker")
    task = asyncio.create_task(worker.run())
    async with services.pool.connection() as conn:
        token = await create_token(conn, "ann")
    transport = httpx.ASGITransport(app=create_app(services))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers={"Authorization": f"Bearer {token}"}
        ) as client:
            yield client
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
        await worker.close()
        await services.close()


async def deploy_and_wait(client: httpx.AsyncClient, body: dict[str, Any], timeout: float = 90) -> dict:
    r = await client.post("/deploys", json=body)
    assert r.status_code == 202, r.text
    deploy_id = r.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = (await client.get(f"/deploys/{deploy_id}")).json()
        if d["status"] in ("succeeded", "failed", "cancelled"):
            return d
        await asyncio.sleep(0.1)
    raise AssertionError(f"deploy {deploy_id} did not end")


@pytest.mark.parametrize("store", ["postgres", "s3"])
async def test_a_sensitive_value_in_the_state_is_nowhere_at_rest(
    store: str, database_url: str, pg_cluster: Any, moto_url: str, tmp_path: Path
) -> None:
    if not shutil.which("terraform"):
        pytest.skip("no terraform on PATH")
    values: dict[str, Any] = dict(data_dir=str(tmp_path / "data"), runner="local",
                                  runner_network="none", retry_delay=0.05)
    if store == "s3":
        values.update(s3_values(moto_url))
    settings = from_env({}, **values)
    s3 = S3StateStore(settings, keyring=KeyRing.from_settings(settings)) if store == "s3" else None
    if s3 is not None:
        await versioned_bucket(s3)
    async with running_service(database_url, settings) as client:
        body = {"workspace": "vault", "files": {"main.tf": SENSITIVE_IN_STATE},
                "secrets": {"db_password": SECRET}}
        d = await deploy_and_wait(client, body)
        assert d["status"] == "succeeded", d
        again = await deploy_and_wait(client, body)  # a second version of the state
        assert again["status"] == "succeeded", again
        # The owner reads the plain state through the API: the value is in it...
        r = await client.get("/workspaces/vault/state")
        assert r.status_code == 200 and SECRET in r.text
        versions = (await client.get("/workspaces/vault/states")).json()["items"]
        assert len(versions) == 2
        # ...and the recorded digest is the plaintext's.
        assert versions[0]["sha256"] == sha(r.content)
    # ...and nowhere at rest: not in the database, in any form pg_dump writes,
    dump = pg_cluster.pg_dump(database_url.rsplit("/", 1)[1])
    assert b"state_blobs" in dump and len(dump) > 10_000
    assert_nowhere(SECRET, dump, "pg_dump")
    if s3 is not None:
        # nor in any version of any object in the bucket.
        objects = object_versions(s3)
        assert len(objects) == 2
        for key, blob in objects:
            assert_nowhere(SECRET, blob, f"s3 object {key}")
            assert blob.startswith(s3.keyring.primary_prefix)


# -- rotation --------------------------------------------------------------------------------------


class Stored:
    """A bit of everything, sealed under ``ring``: state versions in PostgreSQL and S3 (with
    their index rows), emergency copies, secrets, saved plans."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, int], bytes] = {}
        self.s3_states: dict[tuple[str, int], tuple[str, bytes]] = {}
        self.emergency: dict[str, bytes] = {}
        self.secrets: dict[str, dict[str, str]] = {}
        self.plans: dict[str, bytes] = {}


async def store_some(pool: Any, ring: KeyRing, s3: S3StateStore | None, n: int = 3) -> Stored:
    out = Stored()
    pg = PostgresStateStore(pool, ring)
    async with pool.connection() as conn:
        for i in range(1, n + 1):
            content = tfstate(i, password=f"pw-{i}")
            await pg.put("site", i, content, sha(content))
            out.states[("site", i)] = content
            async with conn.transaction():
                loc = await index.save_emergency(conn, "site", str(uuid4()), i, content,
                                                 sha(content), "test", keyring=ring)
            out.emergency[loc] = content
            deploy_id = str(uuid4())
            secrets = {"token": f"tok-{i}"}
            await conn.execute("INSERT INTO deploy_secrets VALUES (%s, %s)",
                               (deploy_id, SecretBox(ring).encrypt(secrets)))
            out.secrets[deploy_id] = secrets
            plan = f"plan file {i} with a variable value pw-{i}".encode()
            async with conn.transaction():
                plan_id, _ = await planning.save_plan(
                    conn, ring, deploy_id=deploy_id, attempt=1, plan=plan, lock_file=None,
                    base_state_version=i,
                )
            out.plans[f"{deploy_id}/{plan_id}"] = plan
            if s3 is not None:
                stored = await s3.put("bucketed", i, content, sha(content))
                async with conn.transaction():
                    await index.record_version(conn, "bucketed", i, str(uuid4()), 1, stored, i,
                                               "lin", sha(content), len(content))
                out.s3_states[("bucketed", i)] = (stored.location, content)
    return out


async def check_all_under(pool: Any, ring: KeyRing, s3: S3StateStore | None, stored: Stored) -> None:
    """Everything opens with ``ring`` alone, and was sealed by its primary key."""
    pg = PostgresStateStore(pool, ring)
    for (ws, v), content in stored.states.items():
        assert await pg.get(ws, v, "") == content
    async with pool.connection() as conn:
        for loc, content in stored.emergency.items():
            row = await index.get_emergency(conn, loc, ring)
            assert row is not None and row["content"] == content
        for deploy_id, secrets in stored.secrets.items():
            cur = await conn.execute("SELECT ciphertext FROM deploy_secrets WHERE deploy_id = %s",
                                     (deploy_id,))
            blob = (await cur.fetchone())[0]
            assert ring.sealed_with_primary(blob) and SecretBox(ring).decrypt(blob) == secrets
        for key, plan in stored.plans.items():
            deploy_id, plan_id = key.split("/")
            assert (await planning.load_plan(conn, ring, deploy_id, plan_id)).plan == plan
        for col in rotation.SEALED_COLUMNS:
            cur = await conn.execute(f"SELECT {col.column} FROM {col.table}")
            assert all(ring.sealed_with_primary(b) for (b,) in await cur.fetchall()), col.table
    if s3 is not None:
        reader = S3StateStore(s3_settings_of(s3), client=s3.client, keyring=ring)
        for (ws, v), (loc, content) in stored.s3_states.items():
            assert await reader.get(ws, v, loc) == content
        versions = object_versions(s3)
        assert len(versions) == len(stored.s3_states)  # the replaced versions are gone
        assert all(ring.sealed_with_primary(b) for _, b in versions)


def s3_settings_of(store: S3StateStore) -> Settings:
    return Settings(state_store="s3", s3_bucket=store.bucket, s3_prefix=store.prefix,
                    s3_region="us-east-1")


async def test_rotate_reseals_every_kind_under_the_first_key(pool: Any, database_url: str,
                                                             moto_url: str) -> None:
    old, new = generate_key(), generate_key()
    old_ring, both = KeyRing(old), KeyRing(f"{new},{old}")
    s3 = S3StateStore(Settings(**s3_values(moto_url)), keyring=old_ring)
    await versioned_bucket(s3)
    stored = await store_some(pool, old_ring, s3)
    # Data from before the key ring: a plain-text state, a Fernet secret.
    legacy_state, legacy_deploy = tfstate(9, password="pw-9"), str(uuid4())
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO state_blobs VALUES ('old', 1, %s)", (legacy_state,))
        await conn.execute("INSERT INTO deploy_secrets VALUES (%s, %s)",
                           (legacy_deploy, Fernet(old.encode()).encrypt(b'{"token":"fernet"}')))
    stored.states[("old", 1)] = legacy_state
    stored.secrets[legacy_deploy] = {"token": "fernet"}

    new_s3 = S3StateStore(s3_settings_of(s3), client=s3.client, keyring=both)
    with psycopg.connect(database_url, autocommit=True) as conn:
        reports = rotation.rotate(conn, both, new_s3)
        assert {r.kind: r.resealed for r in reports} == {
            rotation.STATE_BLOBS.kind: 4, rotation.EMERGENCY_COPIES.kind: 3,
            rotation.SECRETS.kind: 4, rotation.SAVED_PLANS.kind: 3, rotation.S3_KIND: 3,
        }
        assert all(r.finished for r in reports)
        again = rotation.rotate(conn, both, new_s3)  # nothing left: a second run does nothing
        assert [r.resealed for r in again] == [0] * 5 and all(r.finished for r in again)
    await check_all_under(pool, KeyRing(new), s3, stored)


async def test_rotate_reports_what_no_key_opens_and_goes_on(pool: Any, database_url: str) -> None:
    old, stranger = generate_key(), KeyRing(generate_key())
    await store_some(pool, KeyRing(old), None, n=2)
    lost = tfstate(5)
    await PostgresStateStore(pool, stranger).put("lost", 1, lost, sha(lost))
    ring = KeyRing(f"{generate_key()},{old}")
    with psycopg.connect(database_url, autocommit=True) as conn:
        blobs, *_ = rotation.rotate(conn, ring, None)
    assert blobs.resealed == 2 and not blobs.finished
    assert blobs.failed == [
        f"state_blobs workspace=lost version=1: sealed with key {stranger.primary_id.hex()}, "
        "which is not in TFDEPLOY_SECRETS_KEY (secrets.key): add the old key after the new one "
        "until `tfdeploy keys rotate` has run"
    ]
    assert blobs.line() == f"{rotation.STATE_BLOBS.kind}: 2 re-sealed, 1 failed"


async def test_two_rotations_at_once_reseal_each_row_once(pool: Any, database_url: str) -> None:
    old = generate_key()
    await store_some(pool, KeyRing(old), None, n=40)
    ring = KeyRing(f"{generate_key()},{old}")

    def run() -> rotation.Report:
        with psycopg.connect(database_url, autocommit=True) as conn:
            return rotation.reseal_state_blobs(conn, ring)

    first, second = await asyncio.gather(asyncio.to_thread(run), asyncio.to_thread(run))
    assert first.resealed + second.resealed == 40
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT content FROM state_blobs")
        assert all(ring.sealed_with_primary(b) for (b,) in await cur.fetchall())


def tfdeploy(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_keys_rotate_killed_half_way_is_finished_by_the_next_run(database_url: str,
                                                                 tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    old_ring = KeyRing(old)
    n = 3000
    with psycopg.connect(database_url, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO state_blobs VALUES ('many', %s, %s)",
            [(i, old_ring.seal(tfstate(i))) for i in range(1, n + 1)],
        )
    env = {"TFDEPLOY_DATABASE_URL": database_url, "TFDEPLOY_DATA_DIR": str(tmp_path),
           "TFDEPLOY_SECRETS_KEY": f"{new},{old}"}

    def under_new() -> int:
        prefix = KeyRing(new).primary_prefix
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT count(*) FROM state_blobs WHERE substring(content from 1 "
                               "for %s) = %s", (len(prefix), prefix)).fetchone()
            return int(row[0])

    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "keys", "rotate"],
                            env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "re-sealed so far" in line:
                proc.send_signal(signal.SIGKILL)  # no chance to clean up
                break
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    half = under_new()
    assert 0 < half < n, half  # killed half-way

    done = tfdeploy(env, "keys", "rotate")
    assert done.returncode == 0, done.stderr
    assert f"{rotation.STATE_BLOBS.kind}: {n - half} re-sealed" in done.stdout
    assert "done: every blob is sealed with key" in done.stdout
    assert under_new() == n
    with psycopg.connect(database_url) as conn:
        ring = KeyRing(new)  # the old key can go
        for version, blob in conn.execute("SELECT version, content FROM state_blobs"):
            assert ring.open(blob) == tfstate(version)


# -- the previous version's data --------------------------------------------------------------------


def test_migrate_seals_what_the_previous_version_stored(
    empty_database_url: str, pg_cluster: Any, moto_url: str, tmp_path: Path
) -> None:
    """A database and a bucket as the previous version left them (migrations 0001-0006, states
    in plain text in state_blobs, state_emergency and S3, a Fernet secret): they read, and
    `tfdeploy migrate` seals them all, deleting the plain-text versions from the bucket."""
    owner_url = empty_database_url
    old = tmp_path / "old-migrations"
    old.mkdir()
    for f in sorted(migrations_dir().glob("*.sql")):
        if f.name < "0007":
            shutil.copy(f, old)
    with mock.patch.dict(os.environ, {"TFDEPLOY_MIGRATIONS_DIR": str(old)}):
        migrate(owner_url)
    key = generate_key()
    values = s3_values(moto_url)
    s3 = S3StateStore(Settings(**values), keyring=KeyRing(key))
    asyncio.run(versioned_bucket(s3))
    pg_state, s3_state, rescued = (tfstate(1, password=SECRET), tfstate(2, password=SECRET),
                                   tfstate(3, password=SECRET))
    s3_key = s3.key("site", 2)
    s3.client.put_object(Bucket=s3.bucket, Key=s3_key, Body=s3_state,
                         Metadata={"sha256": sha(s3_state)})  # as the previous version did
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute("INSERT INTO state_blobs VALUES ('site', 1, %s)", (pg_state,))
        for version, where, content in ((1, "postgres:site/1", pg_state),
                                        (2, f"s3://{s3.bucket}/{s3_key}", s3_state)):
            conn.execute(
                "INSERT INTO state_versions (workspace, version, deploy_id, attempt, store, "
                "location, serial, lineage, sha256, size) VALUES ('site', %s, %s, 1, %s, %s, %s, "
                "'lin', %s, %s)",
                (version, str(uuid4()), where.split(":")[0], where, version, sha(content),
                 len(content)),
            )
        conn.execute(
            "INSERT INTO state_emergency (workspace, deploy_id, attempt, sha256, content, reason)"
            " VALUES ('site', %s, 1, %s, %s, 'old')", (str(uuid4()), sha(rescued), rescued))
        conn.execute("INSERT INTO deploy_secrets VALUES (%s, %s)",
                     (str(uuid4()), Fernet(key.encode()).encrypt(b'{"a":"b"}')))

    service_url = pg_cluster.url_for("tfdeploy_service", owner_url.rsplit("/", 1)[1])
    env = {"TFDEPLOY_DATABASE_URL": service_url, "TFDEPLOY_MIGRATE_DATABASE_URL": owner_url,
           "TFDEPLOY_DATA_DIR": str(tmp_path / "data"), "TFDEPLOY_SECRETS_KEY": key,
           **{f"TFDEPLOY_{k.upper()}": v for k, v in values.items()}, **AWS_ENV,
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    # Before the data step the plain-text rows read as they are (the stores accept them).
    assert asyncio.run(s3.get("site", 2, f"s3://{s3.bucket}/{s3_key}")) == s3_state

    first = tfdeploy(env, "migrate")
    assert first.returncode == 0, first.stderr
    assert "0008_roles_and_encryption.sql" in first.stdout
    assert f"sealed at rest: {rotation.STATE_BLOBS.kind}: 1 re-sealed" in first.stdout
    assert f"sealed at rest: {rotation.EMERGENCY_COPIES.kind}: 1 re-sealed" in first.stdout
    assert f"sealed at rest: {rotation.S3_KIND}: 1 re-sealed" in first.stdout
    second = tfdeploy(env, "migrate")
    assert second.returncode == 0 and second.stdout.strip() == "up to date", second.stdout

    assert_nowhere(SECRET, pg_cluster.pg_dump(owner_url.rsplit("/", 1)[1]), "pg_dump")
    versions = object_versions(s3)
    assert len(versions) == 1  # the plain-text version was replaced and deleted
    assert_nowhere(SECRET, versions[0][1], "the S3 object")
    assert asyncio.run(s3.get("site", 2, f"s3://{s3.bucket}/{s3_key}")) == s3_state
    ring = KeyRing(key)
    with psycopg.connect(service_url) as conn:
        assert ring.open(conn.execute("SELECT content FROM state_blobs").fetchone()[0]) == pg_state
        assert ring.open(conn.execute("SELECT content FROM state_emergency").fetchone()[0]) == rescued
        secret = conn.execute("SELECT ciphertext FROM deploy_secrets").fetchone()[0]
        assert SecretBox(ring).decrypt(secret) == {"a": "b"}  # Fernet: left to keys rotate
        assert conn.execute("SELECT count(*) FROM unsealed_s3_objects").fetchone() == (0,)


def test_keys_status_generate_and_open_emergency(database_url: str, tmp_path: Path) -> None:
    key = generate_key()
    ring = KeyRing(key)
    content = tfstate(1, password="rescued-pw")

    async def rescue() -> str:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            return await index.save_emergency(conn, "site", str(uuid4()), 1, content,
                                              sha(content), "test", keyring=ring)

    location = asyncio.run(rescue())
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO state_blobs VALUES ('old', 1, '{}')")
    env = {"TFDEPLOY_DATABASE_URL": database_url, "TFDEPLOY_DATA_DIR": str(tmp_path),
           "TFDEPLOY_SECRETS_KEY": key}
    generated = tfdeploy(env, "keys", "generate").stdout.strip()
    assert KeyRing(generated).primary_id != ring.primary_id

    status = tfdeploy(env, "keys", "status")
    assert status.returncode == 0, status.stderr
    assert f"{ring.primary_id.hex()} (primary)" in status.stdout
    lines = status.stdout.splitlines()
    assert any(rotation.EMERGENCY_COPIES.kind in ln and ring.primary_id.hex() in ln
               and ln.endswith(" 1") for ln in lines), status.stdout
    assert any(rotation.STATE_BLOBS.kind in ln and "unsealed" in ln for ln in lines), status.stdout

    for ref in (location, location.rsplit(":", 1)[1]):
        opened = subprocess.run([sys.executable, "-m", "service.cli", "keys", "open-emergency", ref],
                                env={**os.environ, **env}, capture_output=True, cwd=ROOT, timeout=60)
        assert opened.returncode == 0 and opened.stdout == content, opened.stderr
    wrong = tfdeploy({**env, "TFDEPLOY_SECRETS_KEY": generated}, "keys", "open-emergency", location)
    assert wrong.returncode == 1 and "not in TFDEPLOY_SECRETS_KEY" in wrong.stderr
    assert tfdeploy(env, "keys", "open-emergency", "999999").returncode == 1


def test_seal_plaintext_is_cheap_when_there_is_nothing_to_do(owner_database_url: str) -> None:
    """What `tfdeploy up` pays at every start once everything is sealed: a few small queries."""
    ring = KeyRing(generate_key())
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        started = time.perf_counter()
        reports = rotation.seal_plaintext(conn, ring, None)
        took = time.perf_counter() - started
    assert [r.resealed for r in reports] == [0, 0] and took < 1.0
