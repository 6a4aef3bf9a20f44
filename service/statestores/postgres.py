"""The PostgreSQL state store: each tfstate version's content is a row of ``state_blobs``,
sealed with the key ring (``service.secrets.KeyRing``); ``get`` opens it, and still reads a row
stored in plain text before encryption at rest (``tfdeploy migrate`` seals those).

``put`` runs in its own short transaction on a pooled connection, before the caller records the
version in ``state_versions`` (see ``service.statestores.index``). A blob whose index row never
committed is harmless: ``index.next_version`` counts it, so its number is not handed out again.
"""

from __future__ import annotations

import hashlib

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from service.secrets import KeyRing, SecretsError
from service.statestores.base import StateStoreError, StoredState

INSERT_BLOB = (
    "INSERT INTO state_blobs (workspace, version, content) VALUES (%s, %s, %s) "
    "ON CONFLICT (workspace, version) DO NOTHING"
)
SELECT_BLOB = "SELECT content FROM state_blobs WHERE workspace = %s AND version = %s"


class StateConflict(StateStoreError):
    """A different content already holds this workspace/version. Permanent: retrying won't help."""


def location_of(workspace: str, version: int) -> str:
    return f"postgres:{workspace}/{version}"


def _check(content: bytes, sha256: str) -> None:
    if hashlib.sha256(content).hexdigest() != sha256:
        raise StateStoreError("state content does not match its sha256")


class PostgresStateStore:
    name = "postgres"

    def __init__(self, pool: AsyncConnectionPool, keyring: KeyRing, timeout: float = 10.0) -> None:
        self.pool = pool
        self.keyring = keyring
        self.timeout = timeout  # waiting for a pooled connection

    async def put(self, workspace: str, version: int, content: bytes, sha256: str) -> StoredState:
        _check(content, sha256)
        sealed = self.keyring.seal(content)
        try:
            async with self.pool.connection(timeout=self.timeout) as conn, conn.transaction():
                cur = await conn.execute(INSERT_BLOB, (workspace, version, sealed))
                if cur.rowcount != 1:
                    # Sealing is randomised: an earlier put of the same content left other
                    # bytes, so compare what they hold.
                    cur = await conn.execute(SELECT_BLOB, (workspace, version))
                    row = await cur.fetchone()
                    if row is None or self._open(row[0], workspace, version) != content:
                        raise StateConflict(
                            f"state {workspace}/{version} already exists with another content"
                        )
        except (psycopg.Error, PoolTimeout) as exc:
            raise StateStoreError(f"postgres state store: {type(exc).__name__}") from exc
        return StoredState(store=self.name, location=location_of(workspace, version))

    def _open(self, blob: bytes | memoryview, workspace: str, version: int) -> bytes:
        try:
            return self.keyring.open(blob, legacy_plaintext=True)
        except SecretsError as exc:
            raise StateStoreError(f"state {workspace}/{version}: {exc}") from None

    async def get(self, workspace: str, version: int, location: str) -> bytes:
        try:
            async with self.pool.connection(timeout=self.timeout) as conn:
                cur = await conn.execute(SELECT_BLOB, (workspace, version))
                row = await cur.fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            raise StateStoreError(f"postgres state store: {type(exc).__name__}") from exc
        if row is None:
            raise StateStoreError(f"state {workspace}/{version} not found")
        return self._open(row[0], workspace, version)
