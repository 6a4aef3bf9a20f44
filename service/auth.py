"""API tokens: created once and shown once, kept only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from service.queries import q

TOKEN_PREFIX = "tfd_"


class Principal(msgspec.Struct, frozen=True):
    name: str
    admin: bool
    token_id: int

    @property
    def actor(self) -> str:
        return f"{'admin' if self.admin else 'user'}:{self.name}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(conn: AsyncConnection[Any], name: str, admin: bool = False) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_.@" for c in name):
        raise ValueError("a token name is 1-64 characters of letters, digits, '-', '_', '.', '@'")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    await conn.execute(q("insert_token"), {"name": name, "token_hash": hash_token(token), "admin": admin})
    return token


async def authenticate(conn: AsyncConnection[Any], token: str) -> Principal | None:
    if not token or len(token) > 200:
        return None
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(q("find_token"), {"token_hash": hash_token(token)})
        row = await cur.fetchone()
    return Principal(row["name"], row["admin"], row["id"]) if row else None


async def list_tokens(conn: AsyncConnection[Any]) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(q("list_tokens"))
        return await cur.fetchall()


async def revoke_token(conn: AsyncConnection[Any], ref: str) -> int:
    """Revoke by id or name; returns how many tokens were revoked."""
    async with conn.cursor() as cur:
        await cur.execute(q("revoke_token"), {"ref": ref})
        return len(await cur.fetchall())
