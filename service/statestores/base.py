"""The state store interface: where a workspace's tfstate versions live.

The PostgreSQL store keeps content in ``state_blobs``; the S3 store keeps it under versioned keys
in a bucket. Either way, every version's metadata is a row of ``state_versions`` in PostgreSQL
(the index that ``GET /workspaces/{name}/states`` serves), written by the caller in the same
transaction as the ``StatePersisted`` event.
"""

from __future__ import annotations

from typing import Protocol

import msgspec


class StoredState(msgspec.Struct, frozen=True, kw_only=True):
    store: str  # "postgres" | "s3"
    location: str  # e.g. "postgres:workspace/3" or "s3://bucket/prefix/workspace/3.tfstate"


class StateStoreError(Exception):
    """The store refused or could not be reached."""


class StateStore(Protocol):
    name: str

    async def put(self, workspace: str, version: int, content: bytes, sha256: str) -> StoredState:
        """Store one version durably (idempotent for the same workspace/version/content), or
        raise StateStoreError."""
        ...

    async def get(self, workspace: str, version: int, location: str) -> bytes:
        """The content of one stored version; raises StateStoreError."""
        ...
