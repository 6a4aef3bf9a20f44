"""Shared fixtures: a real PostgreSQL cluster for the whole session, a fresh migrated database
per test (copied from a template, so it costs milliseconds), dropped again after the test.

The cluster is the embedded one, locked down as in production (service/embedded.py): the
template is migrated as the schema's owner, and ``database_url`` connects as the SERVICE role,
so a grant that a migration forgot fails the tests that need it. Tests that need more use
``owner_database_url`` (the same database as the owner: DDL, migrations) or
``superuser_url(pg_cluster, database)`` (anything else: a superuser; keep it rare).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from service.embedded import OWNER_ROLE, SERVICE_ROLE, SUPERUSER, EmbeddedPostgres
from service.migrate import migrate

TEMPLATE = "tfdeploy_template"
_counter = itertools.count()


# The session's cluster holds nothing worth keeping: no fsync, and a small WAL, so a run costs
# little disk (a CI run once died of a full disk with ~900 databases and 1 GB of WAL left behind).
TEST_PG_SETTINGS = {"fsync": "off", "full_page_writes": "off", "max_wal_size": "96MB", "min_wal_size": "32MB"}


def _scratch_parent() -> str | None:
    """Where the session's cluster lives: ``TFDEPLOY_TEST_PG_PARENT``, else /dev/shm when it is a
    roomy tmpfs (faster, and no disk at all), else the usual temp dir."""
    explicit = os.environ.get("TFDEPLOY_TEST_PG_PARENT")
    if explicit:
        return explicit
    shm = "/dev/shm"
    with contextlib.suppress(OSError):
        st = os.statvfs(shm)
        if os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize >= 4 * 2**30:
            return shm
    return None


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[EmbeddedPostgres]:
    directory = tempfile.mkdtemp(prefix="tfdeploy-test-pg-", dir=_scratch_parent())
    pg = EmbeddedPostgres(directory, settings=TEST_PG_SETTINGS)
    try:
        pg.start()
        with _maintenance(pg) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE} OWNER {OWNER_ROLE}")
        migrate(pg.url_for(OWNER_ROLE, TEMPLATE))
        yield pg
    finally:
        with contextlib.suppress(Exception):
            pg.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)


def superuser_url(pg: EmbeddedPostgres, database: str = "postgres") -> str:
    """The cluster's superuser on ``database``: for what neither role may do (creating and
    dropping databases, other roles' sessions, server settings)."""
    return pg.url_for(SUPERUSER, database)


def _maintenance(pg: EmbeddedPostgres) -> psycopg.Connection[Any]:
    return psycopg.connect(superuser_url(pg), autocommit=True)


def _database_names(conn: psycopg.Connection[Any]) -> set[str]:
    return {r[0] for r in conn.execute("SELECT datname FROM pg_database")}


@pytest.fixture(autouse=True)
def _drop_databases_made_by_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every database a test made on the session's cluster (``database_url``, bench scripts,
    empty ones) is dropped after it. Autouse, so it is torn down after the test's pools close."""
    if "pg_cluster" not in request.fixturenames:
        yield
        return
    pg: EmbeddedPostgres = request.getfixturevalue("pg_cluster")
    with _maintenance(pg) as conn:
        before = _database_names(conn)
    yield
    with _maintenance(pg) as conn:
        for name in _database_names(conn) - before:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_database(pg: EmbeddedPostgres, role: str = SERVICE_ROLE) -> str:
    """A fresh database with every migration applied, owned by the owner role; returns its URL
    for ``role`` (the service role unless said otherwise)."""
    name = f"t_{os.getpid()}_{next(_counter)}"
    with _maintenance(pg) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} OWNER {OWNER_ROLE}")
    return pg.url_for(role, name)


def empty_database(pg: EmbeddedPostgres, prefix: str = "empty") -> str:
    """A new EMPTY database owned by the owner role (not from the migrated template); returns
    the owner's URL of it."""
    name = f"{prefix}_{os.getpid()}_{next(_counter)}"
    with _maintenance(pg) as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER {OWNER_ROLE}")
    return pg.url_for(OWNER_ROLE, name)


def as_role(url: str, pg: EmbeddedPostgres, role: str) -> str:
    """The same database as ``url``, as ``role`` (``tfdeploy_owner``, ``tfdeploy_service`` or
    ``superuser``)."""
    return pg.url_for(role, url.rsplit("/", 1)[1])


@pytest.fixture
def database_url(pg_cluster: EmbeddedPostgres) -> str:
    """A fresh migrated database, as the service role."""
    return new_database(pg_cluster)


@pytest.fixture
def superuser_database_url(database_url: str, pg_cluster: EmbeddedPostgres) -> str:
    """``database_url``'s database as the cluster's superuser (administrators' SQL)."""
    return as_role(database_url, pg_cluster, SUPERUSER)


@pytest.fixture
def empty_database_url(pg_cluster: EmbeddedPostgres) -> str:
    """A new EMPTY database (no migration applied), as the owner role."""
    return empty_database(pg_cluster)


@pytest.fixture
def owner_database_url(database_url: str, pg_cluster: EmbeddedPostgres) -> str:
    """``database_url``'s database as the schema's owner."""
    return as_role(database_url, pg_cluster, OWNER_ROLE)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(database_url, min_size=1, max_size=20, open=False) as p:
        yield p


@pytest.fixture(scope="session")
def runner_image() -> str:
    """The terraform runner image built by scripts/build-runner-image.sh."""
    return os.environ.get("TFDEPLOY_TEST_RUNNER_IMAGE", "local/terraform:1.11.4")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    """In CI (TFDEPLOY_REQUIRE_DOCKER / TFDEPLOY_REQUIRE_BROWSER set), a test that skips because
    Docker or Chromium is missing fails instead: a green run must have run them."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped:
        return
    for marker, env in (("docker", "TFDEPLOY_REQUIRE_DOCKER"), ("browser", "TFDEPLOY_REQUIRE_BROWSER")):
        if item.get_closest_marker(marker) and os.environ.get(env):
            report.outcome = "failed"
            report.longrepr = f"{marker} is required here ({env} is set) but the test skipped: {report.longrepr}"


# ---------------------------------------------------------------- the app's services and users


@pytest.fixture
async def services(database_url: str, tmp_path: Any) -> AsyncIterator[Any]:
    """Everything the API needs, on a fresh database (a small body limit for the size tests)."""
    from service.services import open_services
    from service.settings import from_env

    # Per-user limits no test of another concern reaches (tests/test_limits.py tests them).
    settings = from_env(
        {}, data_dir=str(tmp_path), max_request_bytes=64 * 1024, rate_limit="1000000/s",
        max_streams_per_user=100_000,
    )
    opened = await open_services(settings, database_url, pool_size=10)
    yield opened
    await opened.close()  # closes the SSE hub too


@pytest.fixture
async def tokens(services: Any) -> dict[str, str]:
    """Users ann, bob and cat, and the admin root."""
    from service.auth import create_token

    async with services.pool.connection() as conn:
        return {
            "ann": await create_token(conn, "ann"),
            "bob": await create_token(conn, "bob"),
            "cat": await create_token(conn, "cat"),
            "root": await create_token(conn, "root", admin=True),
        }


@pytest.fixture
async def client(services: Any) -> AsyncIterator[Any]:
    """An httpx client on the app, in the pool's event loop (Litestar's AsyncTestClient runs
    another loop, which the psycopg pool cannot share)."""
    import httpx

    from service.api.app import create_app

    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://tfdeploy.test") as c:
        yield c
