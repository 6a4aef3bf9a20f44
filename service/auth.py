"""Users and their API tokens. A token is shown once when created and kept only as a SHA-256
hash; it may expire; it is refused once revoked, expired, or its user disabled."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Any

import msgspec
from psycopg import AsyncConnection
from psycopg.errors import UniqueViolation
from psycopg.rows import dict_row

from service.queries import q
from service.validation import USER_NAME

TOKEN_PREFIX = "tfd_"
LABEL_MAX = 200


class Principal(msgspec.Struct, frozen=True):
    name: str
    admin: bool
    token_id: int
    user_id: int = 0

    @property
    def actor(self) -> str:
        return f"{'admin' if self.admin else 'user'}:{self.name}"


class UserError(ValueError):
    """A user command that cannot be done (a bad or taken name, an unknown or disabled user)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_user_name(name: str) -> None:
    if not isinstance(name, str) or USER_NAME.match(name) is None:
        raise UserError(
            "a user name is 1-64 characters of letters, digits, '.', '_', '@' and '-', "
            "starting with a letter or digit"
        )


async def _one(conn: AsyncConnection[Any], name: str, params: dict[str, Any]) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(q(name), params)
        return await cur.fetchone()


async def _all(conn: AsyncConnection[Any], name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(q(name), params or {})
        return await cur.fetchall()


# ---------------------------------------------------------------- users


async def create_user(conn: AsyncConnection[Any], name: str, admin: bool = False) -> int:
    """A new user; UserError if the name is invalid or taken."""
    check_user_name(name)
    try:
        row = await _one(conn, "insert_user", {"name": name, "admin": admin})
    except UniqueViolation:
        raise UserError(f"user {name!r} exists already") from None
    assert row is not None
    return int(row["id"])


async def get_user(conn: AsyncConnection[Any], name: str) -> dict[str, Any] | None:
    return await _one(conn, "get_user", {"name": name})


async def list_users(conn: AsyncConnection[Any]) -> list[dict[str, Any]]:
    return await _all(conn, "list_users")


async def disable_user(conn: AsyncConnection[Any], name: str) -> bool:
    """Disable a user (their tokens are refused from the next request on); False if there is no
    such enabled user."""
    return await _one(conn, "disable_user", {"name": name}) is not None


# ---------------------------------------------------------------- tokens


async def create_user_token(
    conn: AsyncConnection[Any],
    user: str,
    *,
    expires_at: datetime | None = None,
    label: str | None = None,
) -> str:
    """A new token for an existing, enabled user; UserError otherwise. An admin user's tokens
    are admin tokens."""
    if label is not None and (len(label) > LABEL_MAX or not label.isprintable()):
        raise UserError(f"a label is at most {LABEL_MAX} printable characters")
    found = await get_user(conn, user)
    if found is None:
        raise UserError(f"no user {user!r} (tfdeploy user create {user})")
    if found["disabled_at"] is not None:
        raise UserError(f"user {user!r} is disabled")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = await _one(
        conn,
        "insert_token",
        {"user": user, "token_hash": hash_token(token), "label": label, "expires_at": expires_at},
    )
    assert row is not None
    return token


async def create_token(
    conn: AsyncConnection[Any],
    name: str,
    admin: bool = False,
    *,
    expires_at: datetime | None = None,
    label: str | None = None,
) -> str:
    """A token for user ``name``, made (an admin one with ``admin``) if there is none yet: what
    ``tfdeploy token create --name N [--admin]`` always did. Asking for an admin token of an
    existing user who is not an admin is refused (UserError), not a silent promotion."""
    found = await get_user(conn, name)
    if found is None:  # (names of users made before the rules stay usable)
        check_user_name(name)
        await conn.execute(q("ensure_user"), {"name": name, "admin": admin})
        found = await get_user(conn, name)
    assert found is not None
    if admin and not found["admin"]:
        raise UserError(f"user {name!r} exists and is not an admin")
    return await create_user_token(conn, name, expires_at=expires_at, label=label)


async def authenticate(conn: AsyncConnection[Any], token: str) -> Principal | None:
    """The principal of a live token, or None. One statement, which also records the token's
    last use (at most once a minute)."""
    if not token or len(token) > 200:
        return None
    row = await _one(conn, "find_token", {"token_hash": hash_token(token)})
    if row is None:
        return None
    return Principal(row["name"], row["admin"], row["id"], row["user_id"])


async def list_tokens(conn: AsyncConnection[Any]) -> list[dict[str, Any]]:
    """Every token, without hashes: id, user, label, admin, created_at, expires_at,
    last_used_at, revoked_at, disabled_at (the user's), expired."""
    return await _all(conn, "list_tokens")


def token_state(row: dict[str, Any]) -> str:
    """What ``token list`` shows: active, revoked, expired or user disabled."""
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expired"]:
        return "expired"
    if row["disabled_at"] is not None:
        return "user disabled"
    return "active"


async def revoke_token(conn: AsyncConnection[Any], token_id: int) -> bool:
    """Revoke one token by its id; False if there is no such live token."""
    return await _one(conn, "revoke_token", {"id": token_id}) is not None
