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
