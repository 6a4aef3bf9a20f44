"""Apply ``migrations/*.sql`` in order, and procrastinate's schema: recorded, idempotent, and safe
when several processes migrate at once (a session advisory lock serialises them)."""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

import psycopg

# Any constant works; it only has to differ from the other advisory locks we take.
MIGRATE_LOCK = 7_310_001


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


def migrate(url: str) -> list[str]:
    """Apply what is missing; returns the names applied now (empty when up to date)."""
    done: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
        try:
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
