"""Shared fixtures: a real PostgreSQL cluster for the whole session, a fresh migrated database
per test (copied from a template, so it costs milliseconds)."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Iterator

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
