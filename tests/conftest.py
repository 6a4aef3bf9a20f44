"""Shared fixtures: a real PostgreSQL cluster for the whole session, a fresh migrated database
per test (copied from a template, so it costs milliseconds)."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from service.embedded import EmbeddedPostgres
from service.migrate import migrate

TEMPLATE = "tfdeploy_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[EmbeddedPostgres]:
    directory = tempfile.mkdtemp(prefix="tfdeploy-test-pg-")
    pg = EmbeddedPostgres(directory)
    pg.start()
    base = pg.url.rsplit("/", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    migrate(f"{base}/{TEMPLATE}")
    yield pg
    pg.stop("immediate")


def new_database(pg: EmbeddedPostgres) -> str:
    """A fresh database with every migration applied; returns its URL."""
    name = f"t_{os.getpid()}_{next(_counter)}"
    base = pg.url.rsplit("/", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    return f"{base}/{name}"


@pytest.fixture
def database_url(pg_cluster: EmbeddedPostgres) -> str:
    return new_database(pg_cluster)


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

    settings = from_env({}, data_dir=str(tmp_path), max_request_bytes=64 * 1024)
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
