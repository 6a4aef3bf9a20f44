"""service.migrate against a real PostgreSQL: an empty database gets procrastinate's schema and
every migrations/*.sql, recorded once; a second run applies nothing; concurrent runs (threads and
processes) both succeed with everything applied exactly once."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from service.migrate import MIGRATE_LOCK, _procrastinate_schema, migrate, migrations_dir

ROOT = Path(__file__).resolve().parent.parent


def all_names() -> list[str]:
    return ["procrastinate", *sorted(p.name for p in migrations_dir().glob("*.sql"))]


@pytest.fixture
def empty_url(empty_database_url: str) -> str:
    """A new, EMPTY database (not from the migrated template), as the owner role."""
    return empty_database_url


def recorded(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT name, sha256 FROM schema_migrations ORDER BY name").fetchall()


def expected_records() -> list[tuple[str, str]]:
    out = [("procrastinate", hashlib.sha256(_procrastinate_schema().encode()).hexdigest())]
    for p in sorted(migrations_dir().glob("*.sql")):
        out.append((p.name, hashlib.sha256(p.read_text(encoding="utf-8").encode()).hexdigest()))
    return sorted(out)


def assert_schema(url: str) -> None:
    with psycopg.connect(url) as conn:
        for rel in ("events", "deploys", "deploy_logs", "state_versions", "procrastinate_jobs"):
            assert conn.execute("SELECT to_regclass(%s)", (rel,)).fetchone()[0] is not None, rel
        triggers = {
            r[0]
            for r in conn.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'events'::regclass AND NOT tgisinternal"
            )
        }
        assert triggers == {
            "events_no_update_delete", "events_no_truncate", "events_notify", "events_dispatch_notify",
            "events_position_generated",
        }
        # every table created once: no duplicate or leftover objects from a second run
        n = conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'events' AND relkind = 'r'")
        assert n.fetchone()[0] == 1


def lock_waiters(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            """SELECT count(*) FROM pg_locks
               WHERE locktype = 'advisory' AND NOT granted AND classid = 0 AND objid = %s
                 AND objsubid = 1 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())""",
            (MIGRATE_LOCK,),
        ).fetchone()[0]


def wait_for_waiters(url: str, n: int, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while lock_waiters(url) < n:
        assert time.monotonic() < deadline, f"fewer than {n} migrations waiting for the lock"
        time.sleep(0.02)


def test_migrate_an_empty_database_then_nothing(empty_url):
    assert migrate(empty_url) == all_names()
    assert recorded(empty_url) == expected_records()
    assert_schema(empty_url)
    with psycopg.connect(empty_url) as conn:
        applied_at = conn.execute(
            "SELECT name, applied_at FROM schema_migrations ORDER BY name"
        ).fetchall()

    assert migrate(empty_url) == []  # up to date: applies nothing
    with psycopg.connect(empty_url) as conn:
        assert (
            conn.execute("SELECT name, applied_at FROM schema_migrations ORDER BY name").fetchall()
            == applied_at
        )
    assert_schema(empty_url)


def test_the_test_databases_are_fully_migrated(owner_database_url):
    assert migrate(owner_database_url) == []
    assert recorded(owner_database_url) == expected_records()


def test_two_threads_migrating_at_once(empty_url):
    results: list[list[str]] = []
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        try:
            start.wait()
            results.append(migrate(empty_url))
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    assert len(results) == 2
    assert sorted(results, key=len) == [
        [],
        all_names(),
    ]  # one applied everything, the other nothing
    assert recorded(empty_url) == expected_records()
    assert_schema(empty_url)


def test_migrations_waiting_on_each_other_apply_everything_once(empty_url):
    """Hold the migration lock so that two threads and two processes are all certainly
    waiting at once; release it: all succeed and each migration is applied exactly once."""
    results: list[list[str]] = []
    failures: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(empty_url))
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    code = "import sys; from service.migrate import migrate; print(','.join(migrate(sys.argv[1])))"
    with psycopg.connect(empty_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, empty_url],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        try:
            wait_for_waiters(empty_url, 4)
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))
        for t in threads:
            t.join(60)
        outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    assert not failures
    results += [out.strip().split(",") if out.strip() else [] for out, _ in outputs]
    assert sorted(results, key=len) == [[], [], [], all_names()]
    assert recorded(empty_url) == expected_records()
    assert_schema(empty_url)


def test_a_new_migration_is_applied_alone_and_a_broken_one_not_at_all(
    empty_url, tmp_path, monkeypatch
):
    directory = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), directory)
    monkeypatch.setenv("TFDEPLOY_MIGRATIONS_DIR", str(directory))
    assert migrate(empty_url) == all_names()

    (directory / "0900_extra.sql").write_text(
        "CREATE TABLE extra (x int);\nINSERT INTO extra VALUES (1);\n"
    )
    assert migrate(empty_url) == ["0900_extra.sql"]

    # A failing migration: none of its statements stay, it is not recorded, the lock is released.
    (directory / "0901_broken.sql").write_text("CREATE TABLE half (x int);\nSELECT 1 / 0;\n")
    with pytest.raises(psycopg.errors.DivisionByZero):
        migrate(empty_url)
    with psycopg.connect(empty_url) as conn:
        assert conn.execute("SELECT to_regclass('half')").fetchone()[0] is None
        names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations")]
        assert "0901_broken.sql" not in names and "0900_extra.sql" in names
    with psycopg.connect(empty_url, autocommit=True) as conn:
        assert conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATE_LOCK,)).fetchone()[0]

    (directory / "0901_broken.sql").write_text("CREATE TABLE half (x int);\n")
    assert migrate(empty_url) == ["0901_broken.sql"]
    assert migrate(empty_url) == []
