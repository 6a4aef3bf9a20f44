"""Apply ``migrations/*.sql`` in order, and procrastinate's schema: recorded, idempotent, and safe
when several processes migrate at once (a session advisory lock serialises them).

Migrations run as the OWNER of the schema (docs/operations.md, "Database roles"): the role that
owns ``events``, or on an empty database the role connecting. A superuser (or a member of the
owner role) that connects switches to the owner for them, so every object keeps one owner and
the default privileges of migration 0008 apply to it. Any other role is refused.

``seal_plaintext`` is the data step that follows (``tfdeploy migrate``, ``tfdeploy up``): it
seals what an earlier version stored in plain text (``service.rotation``).
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    from service.rotation import Report
    from service.secrets import KeyRing
    from service.statestores.s3 import S3StateStore

# Any constant works; it only has to differ from the other advisory locks we take.
MIGRATE_LOCK = 7_310_001


class MigrationError(RuntimeError):
    """The database cannot be migrated as asked (wrong role)."""


def migrations_dir() -> Path:
    explicit = os.environ.get("TFDEPLOY_MIGRATIONS_DIR")
    if explicit:
        return Path(explicit)
    return Path(__file__).resolve().parent.parent / "migrations"


def _procrastinate_schema() -> str:
    return (resources.files("procrastinate.sql") / "schema.sql").read_text(encoding="utf-8")


def pending(conn: psycopg.Connection) -> list[str]:
    applied = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
    names = [p.name for p in sorted(migrations_dir().glob("*.sql"))]
    out = [n for n in names if n not in applied]
    if not any(a.startswith("procrastinate") for a in applied):
        out.insert(0, "procrastinate")
    return out


def _become_owner(conn: psycopg.Connection[Any]) -> None:
    """Run as the owner of ``events`` (see the module's docstring)."""
    row = conn.execute(
        "SELECT pg_get_userbyid(relowner), current_user, pg_has_role(relowner, 'MEMBER') "
        "FROM pg_class WHERE oid = to_regclass('public.events')"
    ).fetchone()
    if row is None or row[0] == row[1]:
        return
    owner, me, member = row
    if not member:
        raise MigrationError(
            f"migrations run as the schema's owner: events belongs to {owner}, and {me} is "
            "neither that role nor a member of it (TFDEPLOY_MIGRATE_DATABASE_URL names the "
            "owner; docs/operations.md)"
        )
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(owner)))


def migrate(url: str) -> list[str]:
    """Apply what is missing; returns the names applied now (empty when up to date)."""
    done: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
        try:
            _become_owner(conn)
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       name text PRIMARY KEY,
                       sha256 text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            for name in pending(conn):
                if name == "procrastinate":
                    sql, record = _procrastinate_schema(), "procrastinate"
                else:
                    sql, record = (migrations_dir() / name).read_text(encoding="utf-8"), name
                digest = hashlib.sha256(sql.encode()).hexdigest()
                with conn.transaction():
                    conn.execute(sql.encode())  # bytes: run as one multi-statement script
                    conn.execute(
                        "INSERT INTO schema_migrations (name, sha256) VALUES (%s, %s)",
                        (record, digest),
                    )
                done.append(record)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))
    return done


def seal_plaintext(
    url: str, keyring: KeyRing, s3: S3StateStore | None = None
) -> list[Report]:
    """The data step after the SQL migrations: seal the tfstate versions and emergency copies an
    earlier version stored in plain text, and the S3 objects migration 0008 listed (with
    ``s3``; without it they wait, and the report says so). Resumable; cheap when done."""
    from service.rotation import seal_plaintext as seal

    with psycopg.connect(url, autocommit=True) as conn:
        _become_owner(conn)
        return seal(conn, keyring, s3)
