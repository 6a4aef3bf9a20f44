"""Dependency lock files kept between deploys of a workspace (docs/providers.md).

The ``.terraform.lock.hcl`` a successful run leaves is stored with the state version that run
persisted (``state_lock_files``, migration 0009, keyed like ``state_versions``), in the same
transaction. The next deploy of the workspace starts from the latest one, so it installs the
same provider versions -- unless it brings its own ``.terraform.lock.hcl``, which wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from psycopg import AsyncConnection

from service.queries import q
from service.validation import LOCK_FILE_NAME, MAX_LOCK_FILE_BYTES

__all__ = ["LOCK_FILE_NAME", "MAX_LOCK_FILE_BYTES", "from_result", "latest", "lock_for_run", "save"]

Conn = AsyncConnection[Any]


def lock_for_run(files: Mapping[str, str], kept: str | None) -> str | None:
    """The lock file a run uses: the deploy's own, else the workspace's kept one."""
    own = files.get(LOCK_FILE_NAME)
    return own if own is not None else kept


def from_result(result: Any) -> bytes | None:
    """The lock file a run left (``RunResult.lock_file``; None from runners that do not
    collect it)."""
    content = getattr(result, "lock_file", None)
    if isinstance(content, str):
        content = content.encode()
    return content if isinstance(content, bytes) and content else None


def _text(content: bytes | str) -> str | None:
    if isinstance(content, bytes):
        if len(content) > MAX_LOCK_FILE_BYTES:
            return None
        try:
            content = content.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if len(content.encode("utf-8", "surrogatepass")) > MAX_LOCK_FILE_BYTES or "\x00" in content:
        return None
    return content


async def save(conn: Conn, workspace: str, version: int, content: bytes | str) -> bool:
    """Keep ``content`` as the lock file of ``workspace``'s state ``version`` (in the caller's
    transaction, after the version's row). False if it is not a plausible lock file (not UTF-8
    text, too large): then nothing is kept and the next deploy resolves providers afresh."""
    text = _text(content)
    if text is None:
        return False
    await conn.execute(
        q("save_lock_file"),
        {
            "workspace": workspace,
            "version": version,
            "content": text,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        },
    )
    return True


async def latest(conn: Conn, workspace: str) -> str | None:
    """The lock file of the workspace's latest state version that has one, or None."""
    cur = await conn.execute(q("latest_lock_file"), {"workspace": workspace})
    row = await cur.fetchone()
    return None if row is None else str(row[1])
