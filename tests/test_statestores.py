"""State stores (PostgreSQL, S3 over a real moto server on loopback) and the PostgreSQL index."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import socket
import time
from collections.abc import Iterator
from uuid import uuid4

import psycopg
import pytest
from moto.server import ThreadedMotoServer
from psycopg_pool import AsyncConnectionPool

from service.secrets import OVERHEAD, KeyRing, SecretsError, generate_key
from service.settings import Settings
from service.statestores import (
    PostgresStateStore,
    StateConflict,
    StateStoreError,
    StoredState,
    index,
    make_state_store,
    put_with_retries,
)
from service.statestores.s3 import S3StateStore

AWS_SECRET = "dummy-secret-key-never-shown"
KEYRING = KeyRing(generate_key())
_buckets = itertools.count()


def tfstate(serial: int = 1, lineage: str = "lin-1", **attrs: str) -> bytes:
    return json.dumps(
        {
            "version": 4,
            "terraform_version": "1.11.4",
            "serial": serial,
            "lineage": lineage,
            "outputs": {},
            "resources": [{"type": "terraform_data", "name": "web", "attributes": attrs}],
        }
    ).encode()


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


# -- moto ---------------------------------------------------------------------------------------


def start_moto(port: int = 0) -> ThreadedMotoServer:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def stop_moto(server: ThreadedMotoServer) -> None:
    """A real outage: werkzeug closes the listening socket, connections are refused."""
    server.stop()


def endpoint(server: ThreadedMotoServer) -> str:
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = start_moto()
    yield endpoint(server)
    stop_moto(server)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dummy-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def s3_settings(url: str, bucket: str | None = None, prefix: str = "tfdeploy") -> Settings:
    return Settings(
        state_store="s3",
        s3_bucket=bucket or f"tfdeploy-test-{next(_buckets)}",
        s3_endpoint_url=url,
        s3_region="us-east-1",
        s3_prefix=prefix,
    )


@pytest.fixture
async def s3_store(moto_url: str) -> S3StateStore:
    store = S3StateStore(s3_settings(moto_url), keyring=KEYRING)
    await store.ensure_bucket()
    return store


# -- PostgreSQL store ---------------------------------------------------------------------------


async def test_postgres_put_get_round_trip(pool: AsyncConnectionPool) -> None:
    store = PostgresStateStore(pool, KEYRING)
    content = tfstate(password="hunter2-in-the-state")
    stored = await store.put("web", 1, content, sha(content))
    assert stored == StoredState(store="postgres", location="postgres:web/1")
    assert await store.get("web", 1, stored.location) == content
    with pytest.raises(StateStoreError, match="not found"):
        await store.get("web", 2, "postgres:web/2")
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT content FROM state_blobs WHERE workspace = 'web'")
        [(blob,)] = await cur.fetchall()
    assert blob.startswith(KEYRING.primary_prefix) and len(blob) == len(content) + OVERHEAD
    assert b"hunter2" not in blob


async def test_postgres_reads_plain_text_rows_and_names_an_unknown_key(
    pool: AsyncConnectionPool,
) -> None:
    store = PostgresStateStore(pool, KEYRING)
    content = tfstate()
    async with pool.connection() as conn:  # a row as the previous version wrote it
        await conn.execute(
            "INSERT INTO state_blobs (workspace, version, content) VALUES ('old', 1, %s)",
            (content,),
        )
    assert await store.get("old", 1, "postgres:old/1") == content
    assert (await store.put("old", 1, content, sha(content))).location == "postgres:old/1"
    await store.put("web", 1, content, sha(content))
    with pytest.raises(StateStoreError, match=f"key {KEYRING.primary_id.hex()}.*not in"):
        await PostgresStateStore(pool, KeyRing(generate_key())).get("web", 1, "postgres:web/1")


async def test_postgres_put_is_idempotent_and_refuses_other_content(
    pool: AsyncConnectionPool,
) -> None:
    store = PostgresStateStore(pool, KEYRING)
    a, b = tfstate(serial=1), tfstate(serial=2)
    first = await store.put("web", 1, a, sha(a))
    assert await store.put("web", 1, a, sha(a)) == first
    with pytest.raises(StateConflict):
        await store.put("web", 1, b, sha(b))
    assert await store.get("web", 1, first.location) == a
    # Same version number, other workspace: independent.
    await store.put("db", 1, b, sha(b))
    assert await store.get("db", 1, "postgres:db/1") == b
    with pytest.raises(StateStoreError, match="sha256"):
        await store.put("web", 2, a, sha(b))


async def test_postgres_store_unreachable_raises_state_store_error() -> None:
    async with AsyncConnectionPool(
        "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", min_size=1, open=False
    ) as dead:
        store = PostgresStateStore(dead, KEYRING, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(StateStoreError):
            await store.put("web", 1, b"{}", sha(b"{}"))
        assert time.monotonic() - started < 5


# -- S3 store -----------------------------------------------------------------------------------


async def test_s3_put_get_round_trip(s3_store: S3StateStore) -> None:
    sent: list[tuple[dict[str, str], bytes]] = []

    def capture(request, **_: object) -> None:
        body = request.body
        if hasattr(body, "read"):  # a file-like body: read it and put it back
            data, _ = body.read(), body.seek(0)
        else:
            data = bytes(body)
        sent.append((dict(request.headers), data))

    s3_store.client.meta.events.register("before-send.s3.PutObject", capture)
    content = tfstate()
    stored = await s3_store.put("web", 3, content, sha(content))
    key = "tfdeploy/web/00000003.tfstate"
    assert stored == StoredState(store="s3", location=f"s3://{s3_store.bucket}/{key}")
    assert await s3_store.get("web", 3, stored.location) == content

    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=key)
    assert head["ContentType"] == "application/octet-stream"
    assert head["ContentLength"] == len(content) + OVERHEAD  # sealed, no base64
    assert head["Metadata"] == {"sha256": sha(content), "tfdeploy-key": KEYRING.primary_id.hex()}
    assert head["ServerSideEncryption"] == "AES256"  # moto offers SSE-S3: asked for
    # The body that left is sealed, and the server gets a Content-MD5 to check it against.
    [(headers, body)] = sent
    assert body.startswith(KEYRING.primary_prefix) and KEYRING.open(body) == content
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    assert headers.get("Content-MD5") in (md5, md5.encode())
    assert headers.get("x-amz-server-side-encryption") in ("AES256", b"AES256")


async def test_s3_reput_is_idempotent_and_keys_are_versioned_per_workspace(
    s3_store: S3StateStore,
) -> None:
    a, b, c = tfstate(serial=1), tfstate(serial=2), tfstate(serial=1, lineage="other")
    first = await s3_store.put("web", 1, a, sha(a))
    assert await s3_store.put("web", 1, a, sha(a)) == first
    await s3_store.put("web", 2, b, sha(b))
    await s3_store.put("db", 1, c, sha(c))
    listed = s3_store.client.list_objects_v2(Bucket=s3_store.bucket)
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "tfdeploy/db/00000001.tfstate",
        "tfdeploy/web/00000001.tfstate",
        "tfdeploy/web/00000002.tfstate",
    ]
    assert await s3_store.get("web", 1, first.location) == a
    assert (
        await s3_store.get("web", 2, f"s3://{s3_store.bucket}/tfdeploy/web/00000002.tfstate") == b
    )
    assert await s3_store.get("db", 1, "") == c  # no location: derived from the settings


async def test_s3_metadata_holds_no_secret(s3_store: S3StateStore) -> None:
    content = tfstate(password="hunter2-very-secret")
    stored = await s3_store.put("web", 1, content, sha(content))
    key = stored.location.split("/", 3)[3]
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=key)
    assert set(head["Metadata"]) == {"sha256", "tfdeploy-key"}
    blob = json.dumps(head["Metadata"]) + json.dumps(
        head.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    )
    assert "hunter2" not in blob
    assert AWS_SECRET not in blob


async def test_s3_get_refuses_corrupted_object(s3_store: S3StateStore) -> None:
    content = tfstate()
    stored = await s3_store.put("web", 1, content, sha(content))
    key = stored.location.split("/", 3)[3]
    sealed = s3_store.client.get_object(Bucket=s3_store.bucket, Key=key)["Body"].read()
    metadata = {"sha256": sha(content)}
    # Someone rewrites the object behind our back, keeping the old metadata: one bit of the
    # sealed body flipped, or a plain-text state in its place.
    for body in (sealed[:-20] + bytes([sealed[-20] ^ 1]) + sealed[-19:],
                 content.replace(b"lin-1", b"lin-X")):
        s3_store.client.put_object(Bucket=s3_store.bucket, Key=key, Body=body, Metadata=metadata)
        with pytest.raises(StateStoreError, match="corrupted"):
            await s3_store.get("web", 1, stored.location)


async def test_s3_reads_a_plain_text_object_from_before_encryption(s3_store: S3StateStore) -> None:
    """Objects the previous version stored in plain text still read (until `keys rotate`)."""
    content = tfstate()
    key = s3_store.key("web", 1)
    s3_store.client.put_object(
        Bucket=s3_store.bucket, Key=key, Body=content, Metadata={"sha256": sha(content)}
    )
    assert await s3_store.get("web", 1, f"s3://{s3_store.bucket}/{key}") == content


async def test_s3_object_sealed_under_an_unknown_key_is_named(s3_store: S3StateStore) -> None:
    content = tfstate()
    stored = await s3_store.put("web", 1, content, sha(content))
    stranger = S3StateStore(
        s3_settings("http://unused", bucket=s3_store.bucket), client=s3_store.client,
        keyring=KeyRing(generate_key()),
    )
    with pytest.raises(StateStoreError, match=f"key {KEYRING.primary_id.hex()}.*not in"):
        await stranger.get("web", 1, stored.location)


class _RefusesSSE:
    """A store that answers an SSE request the way MinIO without a KMS does."""

    def __init__(self, client: object) -> None:
        self.client, self.refused = client, 0

    def put_object(self, **kw: object) -> object:
        if "ServerSideEncryption" in kw:
            self.refused += 1
            raise _client_error(
                400, "InvalidArgument", "Server side encryption specified but KMS is not configured"
            )
        return self.client.put_object(**kw)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.client, name)


async def test_s3_store_without_server_side_encryption_falls_back_once(
    s3_store: S3StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    refusing = _RefusesSSE(s3_store.client)
    store = S3StateStore(
        s3_settings("http://unused", bucket=s3_store.bucket), client=refusing, keyring=KEYRING
    )
    contents = [tfstate(serial=i) for i in (1, 2, 3)]
    for i, content in enumerate(contents, 1):
        await store.put("web", i, content, sha(content))
    assert refusing.refused == 1 and store.sse is False  # asked once, then no more
    assert "refused server-side encryption" in caplog.text
    for i, content in enumerate(contents, 1):
        head = s3_store.client.head_object(Bucket=store.bucket, Key=store.key("web", i))
        assert "ServerSideEncryption" not in head
        assert await store.get("web", i, "") == content
        raw = s3_store.client.get_object(Bucket=store.bucket, Key=store.key("web", i))
        assert raw["Body"].read().startswith(KEYRING.primary_prefix)  # still sealed by us


async def test_s3_other_refusals_are_not_taken_for_sse(s3_store: S3StateStore) -> None:
    class Denies(_RefusesSSE):
        def put_object(self, **kw: object) -> object:
            raise _client_error(403, "AccessDenied")

    store = S3StateStore(
        s3_settings("http://unused", bucket=s3_store.bucket), client=Denies(s3_store.client),
        keyring=KEYRING,
    )
    with pytest.raises(StateStoreError, match="AccessDenied"):
        await store.put("web", 1, b"{}", sha(b"{}"))
    assert store.sse is True


async def test_s3_put_refuses_wrong_sha256(s3_store: S3StateStore) -> None:
    with pytest.raises(StateStoreError, match="sha256"):
        await s3_store.put("web", 1, b"{}", sha(b"[]"))


def test_s3_client_config_is_conservative(moto_url: str) -> None:
    config = S3StateStore(s3_settings(moto_url), keyring=KEYRING).client.meta.config
    assert config.connect_timeout <= 3 and config.read_timeout <= 10
    assert config.retries["total_max_attempts"] <= 3
    assert config.s3["addressing_style"] == "path"  # MinIO, NCP behind an endpoint URL
    aws = S3StateStore(
        Settings(state_store="s3", s3_bucket="b-aws", s3_region="eu-west-1"), keyring=KEYRING
    )
    assert (aws.client.meta.config.s3 or {}).get("addressing_style") in (None, "auto")


async def test_s3_bucket_is_never_created_implicitly(moto_url: str) -> None:
    store = S3StateStore(s3_settings(moto_url), keyring=KEYRING)
    with pytest.raises(StateStoreError, match="NoSuchBucket"):
        await store.put("web", 1, b"{}", sha(b"{}"))
    await store.ensure_bucket()
    await store.ensure_bucket()  # idempotent
    assert (await store.put("web", 1, b"{}", sha(b"{}"))).store == "s3"


async def test_s3_empty_prefix_and_bad_workspace(moto_url: str) -> None:
    store = S3StateStore(s3_settings(moto_url, prefix=""), keyring=KEYRING)
    assert store.key("web", 12) == "web/00000012.tfstate"
    for bad in ("", "../x", "a//b"):
        with pytest.raises(StateStoreError):
            store.key(bad, 1)


async def test_s3_server_down_raises_quickly_without_credentials_in_message() -> None:
    server = start_moto()
    url = endpoint(server)
    store = S3StateStore(s3_settings(url), keyring=KEYRING)
    await store.ensure_bucket()
    stop_moto(server)  # a real outage: nothing listens any more
    started = time.monotonic()
    with pytest.raises(StateStoreError) as err:
        await store.put("web", 1, b"{}", sha(b"{}"))
    assert time.monotonic() - started < 5
    assert AWS_SECRET not in str(err.value) and "dummy-access-key" not in str(err.value)
    assert str(err.value).startswith("s3 put")
    with pytest.raises(StateStoreError):
        await store.get("web", 1, "")


async def test_s3_stuck_server_times_out(moto_url: str) -> None:
    store = S3StateStore(s3_settings(moto_url), keyring=KEYRING)
    await store.ensure_bucket()
    # A server that accepts connections (the kernel does, into the backlog) and never answers.
    with socket.socket() as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(64)
        host, port = stuck.getsockname()
        hung = S3StateStore(
            s3_settings(f"http://{host}:{port}", bucket=store.bucket),
            keyring=KEYRING,
            read_timeout=1,
            max_attempts=1,
        )
        started = time.monotonic()
        with pytest.raises(StateStoreError, match="[Tt]imeout"):
            await hung.put("web", 1, b"{}", sha(b"{}"))
        assert time.monotonic() - started < 8


async def test_put_with_retries_survives_a_real_outage() -> None:
    server = start_moto()
    host, port = server.get_host_and_port()
    store = S3StateStore(s3_settings(endpoint(server)), keyring=KEYRING)
    await store.ensure_bucket()
    stop_moto(server)
    restarted: list[ThreadedMotoServer] = []

    class ComesBack:
        """The S3 store; the server comes back up after the first failed try."""

        name = "s3"
        calls = 0

        async def put(self, workspace, version, content, sha256):
            ComesBack.calls += 1
            try:
                return await store.put(workspace, version, content, sha256)
            except StateStoreError:
                if not restarted:
                    restarted.append(start_moto(port))
                raise

        async def get(self, workspace, version, location):
            return await store.get(workspace, version, location)

    try:
        content = tfstate()
        stored = await put_with_retries(ComesBack(), "web", 1, content, sha(content), delay=0.05)
        assert ComesBack.calls == 2 and restarted
        assert await store.get("web", 1, stored.location) == content
    finally:
        for s in restarted:
            stop_moto(s)


class Flaky:
    name = "flaky"

    def __init__(self, failures: int, error: type[StateStoreError] = StateStoreError) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    async def put(self, workspace, version, content, sha256):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return StoredState(store="flaky", location=f"flaky:{workspace}/{version}")

    async def get(self, workspace, version, location):
        raise NotImplementedError


async def test_put_with_retries_backoff_and_last_error() -> None:
    ok = Flaky(failures=2)
    assert (
        await put_with_retries(ok, "w", 1, b"{}", sha(b"{}"), attempts=3, delay=0.01)
    ).store == "flaky"
    assert ok.calls == 3

    down = Flaky(failures=10)
    started = time.monotonic()
    with pytest.raises(StateStoreError, match="failure 3"):
        await put_with_retries(down, "w", 1, b"{}", sha(b"{}"), attempts=3, delay=0.05)
    assert down.calls == 3
    assert 0.15 <= time.monotonic() - started < 1  # 0.05 + 0.1

    conflict = Flaky(failures=10, error=StateConflict)
    with pytest.raises(StateConflict):
        await put_with_retries(conflict, "w", 1, b"{}", sha(b"{}"), delay=0.01)
    assert conflict.calls == 1


async def test_make_state_store(pool: AsyncConnectionPool, moto_url: str, tmp_path) -> None:
    store = make_state_store(Settings(), pool, KEYRING)
    assert isinstance(store, PostgresStateStore) and store.keyring is KEYRING
    s3 = make_state_store(s3_settings(moto_url), pool, KEYRING)
    assert isinstance(s3, S3StateStore) and s3.name == "s3" and s3.keyring is KEYRING
    # Without one: the key ring the settings name (the data dir's key file, as the services').
    settings = Settings(data_dir=str(tmp_path))
    default = make_state_store(settings, pool)
    assert isinstance(default, PostgresStateStore)
    assert default.keyring.key_ids == KeyRing.from_settings(settings).key_ids


# -- the index ----------------------------------------------------------------------------------


async def persist(pool, store, workspace: str, content: bytes, deploy_id: str | None = None):
    """What the deployer does: number, store, record, in one transaction."""
    serial, lineage, digest, size = index.state_meta(content)
    async with pool.connection() as conn, conn.transaction():
        version = await index.next_version(conn, workspace)
        stored = await put_with_retries(store, workspace, version, content, digest)
        return await index.record_version(
            conn,
            workspace,
            version,
            deploy_id or str(uuid4()),
            1,
            stored,
            serial,
            lineage,
            digest,
            size,
        )


async def test_next_version_is_distinct_and_consecutive_under_concurrency(
    pool: AsyncConnectionPool,
) -> None:
    store = PostgresStateStore(pool, KEYRING)

    async def writer(i: int) -> int:
        row = await persist(pool, store, "busy", tfstate(serial=i))
        await asyncio.sleep(0)
        return row.version

    versions = await asyncio.gather(*(writer(i) for i in range(16)))
    assert sorted(versions) == list(range(1, 17))
    async with pool.connection() as conn:
        rows = await index.list_versions(conn, "busy")
        assert [r.version for r in rows] == list(range(16, 0, -1))
        assert await index.next_version(conn, "busy") == 17
        assert await index.next_version(conn, "quiet") == 1
        await conn.rollback()


async def test_next_version_holds_the_lock_until_commit(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as a, pool.connection() as b:
        async with a.transaction():
            assert await index.next_version(a, "ws") == 1
            waiting = asyncio.create_task(_next_in_tx(b, "ws"))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # blocked on a's lock
            await index.record_version(
                a,
                "ws",
                1,
                str(uuid4()),
                1,
                StoredState(store="postgres", location="postgres:ws/1"),
                1,
                "l",
                "x" * 64,
                2,
            )
        assert await asyncio.wait_for(waiting, 5) == 2


async def _next_in_tx(conn, workspace: str) -> int:
    async with conn.transaction():
        return await index.next_version(conn, workspace)


async def test_next_version_needs_a_transaction(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        with pytest.raises(RuntimeError, match="transaction"):
            await index.next_version(conn, "ws")
        async with conn.transaction():
            assert await index.next_version(conn, "ws") == 1


async def test_next_version_skips_numbers_held_by_orphan_blobs(pool: AsyncConnectionPool) -> None:
    store = PostgresStateStore(pool, KEYRING)
    await store.put("ws", 1, b"{}", sha(b"{}"))  # its index row never committed
    async with pool.connection() as conn, conn.transaction():
        assert await index.next_version(conn, "ws") == 2


async def test_latest_list_and_get_version(pool: AsyncConnectionPool) -> None:
    store = PostgresStateStore(pool, KEYRING)
    deploy = str(uuid4())
    for serial in (1, 2, 3):
        await persist(pool, store, "web", tfstate(serial=serial), deploy)
    await persist(pool, store, "other", tfstate(serial=9))
    async with pool.connection() as conn:
        top = await index.latest(conn, "web")
        assert top is not None and top.version == 3 and top.serial == 3
        assert (
            top.deploy_id == deploy and top.store == "postgres" and top.location == "postgres:web/3"
        )
        assert top.lineage == "lin-1" and top.sha256 == sha(tfstate(serial=3))
        assert top.size == len(tfstate(serial=3)) and top.created_at is not None
        assert [r.version for r in await index.list_versions(conn, "web")] == [3, 2, 1]
        assert [r.version for r in await index.list_versions(conn, "web", limit=2)] == [3, 2]
        assert [r.version for r in await index.list_versions(conn, "web", before=3)] == [2, 1]
        v2 = await index.get_version(conn, "web", 2)
        assert v2 is not None and v2.serial == 2
        assert await store.get("web", 2, v2.location) == tfstate(serial=2)
        assert await index.get_version(conn, "web", 4) is None
        assert await index.latest(conn, "nothing") is None
        assert await index.list_versions(conn, "nothing") == []


async def test_record_version_refuses_a_taken_number(pool: AsyncConnectionPool) -> None:
    stored = StoredState(store="postgres", location="postgres:ws/1")
    async with pool.connection() as conn:
        async with conn.transaction():
            await index.record_version(conn, "ws", 1, str(uuid4()), 1, stored, 1, "l", "a" * 64, 2)
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with conn.transaction():
                await index.record_version(
                    conn, "ws", 1, str(uuid4()), 1, stored, 1, "l", "a" * 64, 2
                )


async def test_s3_store_with_the_index(pool: AsyncConnectionPool, s3_store: S3StateStore) -> None:
    for serial in (1, 2):
        await persist(pool, s3_store, "web", tfstate(serial=serial))
    async with pool.connection() as conn:
        top = await index.latest(conn, "web")
    assert top is not None and top.store == "s3"
    assert top.location == f"s3://{s3_store.bucket}/tfdeploy/web/00000002.tfstate"
    assert await s3_store.get("web", top.version, top.location) == tfstate(serial=2)


async def test_save_emergency(pool: AsyncConnectionPool) -> None:
    content, deploy = tfstate(password="hunter2-rescued"), str(uuid4())
    async with pool.connection() as conn:
        async with conn.transaction():
            loc = await index.save_emergency(
                conn, "web", deploy, 2, content, sha(content), "s3 down", keyring=KEYRING
            )
            loc2 = await index.save_emergency(
                conn, "web", deploy, 3, content, sha(content), "again", keyring=KEYRING
            )
        assert loc.startswith("postgres-emergency:") and loc != loc2
        row = await index.get_emergency(conn, loc, KEYRING)
        assert row is not None
        assert row["content"] == content and row["deploy_id"] == deploy and row["attempt"] == 2
        assert row["reason"] == "s3 down" and row["sha256"] == sha(content)
        assert await index.get_emergency(conn, "postgres-emergency:999999", KEYRING) is None
        cur = await conn.execute("SELECT content FROM state_emergency")
        for (blob,) in await cur.fetchall():
            assert blob.startswith(KEYRING.primary_prefix) and b"hunter2" not in blob
        with pytest.raises(SecretsError):
            await index.get_emergency(conn, loc, KeyRing(generate_key()))
        # One rescued in plain text before encryption at rest reads as it is.
        cur = await conn.execute(
            "INSERT INTO state_emergency (workspace, deploy_id, attempt, sha256, content, reason)"
            " VALUES ('web', %s, 1, %s, %s, 'old') RETURNING id",
            (deploy, sha(content), content),
        )
        old_id = (await cur.fetchone())[0]
        row = await index.get_emergency(conn, f"postgres-emergency:{old_id}", KEYRING)
        assert row is not None and row["content"] == content


def test_state_meta() -> None:
    content = tfstate(serial=7, lineage="abc")
    assert index.state_meta(content) == (7, "abc", sha(content), len(content))
    assert index.state_meta(b"{}") == (0, "", sha(b"{}"), 2)
    for bad in (b"not json", b"\xff\xfe", b"[1, 2]", b'{"serial": "x"}'):
        with pytest.raises(ValueError):
            index.state_meta(bad)


class _FlakyReads:
    """A stand-in S3 client whose first ``failures`` get_object calls fail with ``error``."""

    def __init__(self, failures: int, error: Exception, content: bytes) -> None:
        self.failures, self.error, self.content, self.calls = failures, error, content, 0

    def get_object(self, **_: object) -> dict[str, object]:
        import io

        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return {"Body": io.BytesIO(self.content), "Metadata": {"sha256": sha(self.content)}}


def _client_error(status: int, code: str, message: str = "x") -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


async def test_s3_get_retries_transient_failures_only() -> None:
    """The deployer reads the latest state before every attempt: a blip (5xx, slow down, a
    dropped connection) is retried; a missing object is not."""
    from botocore.exceptions import EndpointConnectionError

    content = tfstate()
    settings = s3_settings("http://127.0.0.1:1", bucket="b")
    for error in (_client_error(503, "SlowDown"), _client_error(500, "InternalError"),
                  EndpointConnectionError(endpoint_url="http://127.0.0.1:1")):
        flaky = _FlakyReads(2, error, content)
        assert await S3StateStore(settings, client=flaky, keyring=KEYRING).get("web", 1, "") == content
        assert flaky.calls == 3
        down = _FlakyReads(10, error, content)
        with pytest.raises(StateStoreError):
            await S3StateStore(settings, client=down, keyring=KEYRING).get("web", 1, "")
        assert down.calls == 3
    missing = _FlakyReads(10, _client_error(404, "NoSuchKey"), content)
    with pytest.raises(StateStoreError, match="NoSuchKey"):
        await S3StateStore(settings, client=missing, keyring=KEYRING).get("web", 1, "")
    assert missing.calls == 1
