"""State stores: where tfstate content lives (PostgreSQL or S3), chosen by settings; sealed with
the key ring either way."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from service.statestores.base import StateStore, StateStoreError, StoredState
from service.statestores.postgres import PostgresStateStore, StateConflict

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from service.secrets import KeyRing
    from service.settings import Settings

__all__ = [
    "PostgresStateStore",
    "StateConflict",
    "StateStore",
    "StateStoreError",
    "StoredState",
    "make_state_store",
    "put_with_retries",
]


def make_state_store(
    settings: Settings, pool: AsyncConnectionPool, keyring: KeyRing | None = None
) -> StateStore:
    """The store ``TFDEPLOY_STATE_STORE`` names, sealing with ``keyring`` (the process's,
    ``services.extras["keyring"]``; by default the one the settings name: the same keys)."""
    if keyring is None:
        from service.secrets import KeyRing

        keyring = KeyRing.from_settings(settings)
    if settings.state_store == "s3":
        from service.statestores.s3 import S3StateStore  # boto3 only when it is used

        return S3StateStore(settings, keyring=keyring)
    return PostgresStateStore(pool, keyring)


async def put_with_retries(
    store: StateStore,
    workspace: str,
    version: int,
    content: bytes,
    sha256: str,
    attempts: int = 3,
    delay: float = 0.2,
) -> StoredState:
    """``store.put`` with a few quick retries (``delay``, doubling); raises the last
    StateStoreError. A StateConflict (another content holds the version) is not retried."""
    last: StateStoreError | None = None
    for i in range(max(1, attempts)):
        if i:
            await asyncio.sleep(delay * 2 ** (i - 1))
        try:
            return await store.put(workspace, version, content, sha256)
        except StateConflict:
            raise
        except StateStoreError as exc:
            last = exc
    assert last is not None
    raise last
