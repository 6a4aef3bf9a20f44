"""Where the ``tfdeploy`` command connects: the database (a configured one, or the embedded
cluster under the data dir), its migrations (``tfdeploy migrate``), the key ring and the state
store the migrations' data step needs, and the services opened on it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

from service.settings import Settings


class Database(NamedTuple):
    """Where the service connects (``url``: the service role) and where migrations run
    (``owner_url``: the schema's owner)."""

    url: str
    owner_url: str


@contextlib.contextmanager
def database(settings: Settings, *, quiet: bool = False) -> Iterator[Database]:
    """The database: TFDEPLOY_DATABASE_URL (and TFDEPLOY_MIGRATE_DATABASE_URL for migrations,
    else the same), or the embedded cluster under the data dir (started here if it is not
    running, and then stopped here at the end), with its two roles."""
    if settings.database_url:
        yield Database(settings.database_url, settings.migrate_database_url or settings.database_url)
        return
    from service.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(settings.data_path / "postgres")
    pg.start()
    if not quiet:
        print(
            f"embedded PostgreSQL at {pg.display_url()} (data in {pg.pgdata}; "
            f"passwords in {pg.credentials})",
            file=sys.stderr,
        )
    try:
        yield Database(pg.url, pg.owner_url)
    finally:
        if pg._started_here:
            pg.stop()


def migrate_all(settings: Settings, owner_url: str, keyring: Any) -> list[str]:
    """The SQL migrations, then the data step that seals what an earlier version stored in
    plain text; returns what was done, for printing."""
    from service.migrate import migrate, seal_plaintext

    done = [f"migrated: {', '.join(applied)}"] if (applied := migrate(owner_url)) else []
    s3 = s3_state_store(settings, keyring)
    for report in seal_plaintext(owner_url, keyring, s3):
        if report.resealed or not report.finished:
            done.append(f"sealed at rest: {report.line()}")
        done += [f"  cannot seal {f}" for f in report.failed[:20]]
    return done


def s3_state_store(settings: Settings, keyring: Any) -> Any:
    if settings.state_store != "s3":
        return None
    from service.statestores.s3 import S3StateStore

    return S3StateStore(settings, keyring=keyring)


def load_keyring(settings: Settings) -> Any:
    from service.secrets import KeyRing

    return KeyRing.from_settings(settings)


@contextlib.asynccontextmanager
async def services_for(settings: Settings, url: str, **kw: Any) -> AsyncIterator[Any]:
    from service.services import open_services

    services = await open_services(settings, url, **kw)
    try:
        yield services
    finally:
        await services.close()


async def connect(url: str) -> Any:
    import psycopg

    return await psycopg.AsyncConnection.connect(url, autocommit=True)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from service.migrate import MigrationError

    keyring = load_keyring(settings)
    with database(settings) as db:
        try:
            lines = migrate_all(settings, db.owner_url, keyring)
        except MigrationError as exc:
            print(f"tfdeploy: {exc}", file=sys.stderr)
            return 1
    print("\n".join(lines) if lines else "up to date")
    return 0
