"""The state store interface: where a workspace's tfstate versions live.

The PostgreSQL store keeps content in ``state_blobs``; the S3 store keeps it under versioned keys
in a bucket. Either way, every version's metadata is a row of ``state_versions`` in PostgreSQL
(the index that ``GET /workspaces/{name}/states`` serves), written by the caller in the same
transaction as the ``StatePersisted`` event (see ``service.statestores.index``).

Content is sealed with the key ring (``service.secrets.KeyRing``) before it is stored, and opened
by ``get``; the ``sha256`` passed around and recorded is always that of the plaintext.

Implementations: ``postgres.PostgresStateStore(pool, keyring)`` and
``s3.S3StateStore(settings, keyring=...)``; ``make_state_store(settings, pool, keyring)`` picks
one, ``put_with_retries`` retries a put a few times.
"""

from __future__ import annotations

from typing import Protocol

import msgspec


class StoredState(msgspec.Struct, frozen=True, kw_only=True):
    store: str  # "postgres" | "s3"
    location: str  # "postgres:workspace/3" or "s3://bucket/prefix/workspace/00000003.tfstate"


class StateStoreError(Exception):
    """The store refused or could not be reached."""


class StateStore(Protocol):
    name: str

    async def put(self, workspace: str, version: int, content: bytes, sha256: str) -> StoredState:
        """Store one version durably (idempotent for the same workspace/version/content), or
        raise StateStoreError. ``sha256`` is the hex digest of ``content`` (checked; a mismatch is
        a StateStoreError). The PostgreSQL store raises StateConflict (a StateStoreError) when
        another content already holds the version; the S3 store overwrites the key (the index
        never hands out a recorded version twice)."""
        ...

    async def get(self, workspace: str, version: int, location: str) -> bytes:
        """The content of one stored version (integrity checked where the store can); raises
        StateStoreError."""
        ...
