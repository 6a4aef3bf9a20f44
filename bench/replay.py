"""Projection rebuild: ``store.rebuild_projections`` over 1,000,000 events, in events per second.

    .venv/bin/python bench/replay.py [--quick] [--events N] [--runs R] [--profile]

Generates legal deploy streams straight into the ``events`` table of a throwaway database with
one COPY: 80% succeed at once (Requested, Started, StatePersisted, Succeeded), 10% succeed on
a retry (7 events), 5% fail three times (9 events), 5% are cancelled while queued (2 events).
Then times ``store.rebuild_projections`` (what ``tfdeploy projections rebuild`` runs) in one
transaction, and checks the statuses it wrote against the generated mix.

Anchors, same run, same table:
- ``COPY (SELECT ... ORDER BY deploy_id, version) TO STDOUT``: PostgreSQL handing over every
  event, in stream order, with no Python at all;
- a single-pass rebuild in Python (one ordered server-side cursor, ``view_of`` per stream, the
  read model written with ``executemany`` in pipeline mode), rolled back: the straightforward
  single pass, which ``rebuild_projections`` (itself one pass since issue #7: JSON decoded
  straight into the event types, rows written by COPY) should beat.
``--profile`` prints cProfile's top functions of one ``rebuild_projections`` run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import random
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import psycopg
from psycopg.rows import dict_row

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import cluster, median, new_database, table  # noqa: E402

T0 = datetime(2025, 1, 1, tzinfo=UTC)
SHA = "0" * 64


def _requested(i: int) -> dict[str, object]:
    return {"workspace": f"ws{i % 200}", "action": "apply", "max_attempts": 3, "owner": f"user{i % 40}",
            "files": {"main.tf": SHA}, "variables": {}, "secret_names": []}


def _persisted(attempt: int, i: int) -> dict[str, object]:
    return {"attempt": attempt, "workspace": f"ws{i % 200}", "store": "postgres", "location": "postgres",
            "serial": attempt, "lineage": "bench", "sha256": SHA, "size": 1024, "state_version": attempt}


def _failed(attempt: int, final: bool) -> dict[str, object]:
    return {"attempt": attempt, "reason": "apply_failed", "message": "exit status 1", "exit_code": 1, "final": final}


def stream(i: int, kind: str) -> list[tuple[str, str, dict[str, object]]]:
    """(type, actor kind, data) for one deploy."""
    req = ("Requested", "user", _requested(i))
    if kind == "ok":
        return [req, ("Started", "worker", {"attempt": 1, "runner": "local", "worker": "w1"}),
                ("StatePersisted", "worker", _persisted(1, i)), ("Succeeded", "worker", {"attempt": 1})]
    if kind == "retry":
        return [req, ("Started", "worker", {"attempt": 1, "runner": "local", "worker": "w1"}),
                ("Failed", "worker", _failed(1, False)),
                ("Retried", "worker", {"attempt": 2, "max_attempts": 3, "by": "worker", "delay_seconds": 10.0}),
                ("Started", "worker", {"attempt": 2, "runner": "local", "worker": "w1"}),
                ("StatePersisted", "worker", _persisted(2, i)), ("Succeeded", "worker", {"attempt": 2})]
    if kind == "fail":
        out = [req]
        for a in (1, 2, 3):
            out.append(("Started", "worker", {"attempt": a, "runner": "local", "worker": "w1"}))
            out.append(("Failed", "worker", _failed(a, a == 3)))
            if a < 3:
                out.append(("Retried", "worker",
                            {"attempt": a + 1, "max_attempts": 3, "by": "worker", "delay_seconds": 10.0}))
        return out
    return [req, ("Cancelled", "user", {"by": f"user:user{i % 40}", "attempt": None})]


KINDS = [("ok", 0.80), ("retry", 0.10), ("fail", 0.05), ("cancel", 0.05)]
STATUS = {"ok": "succeeded", "retry": "succeeded", "fail": "failed", "cancel": "cancelled"}


def generate(url: str, target: int) -> dict[str, int]:
    """COPY about ``target`` events; returns the expected count of each final status."""
    rng = random.Random(7)
    expected: dict[str, int] = {}
    buf = io.StringIO()
    made = i = 0
    with psycopg.connect(url) as conn:
        with conn.cursor() as cur, cur.copy(
            "COPY events (deploy_id, version, type, data, actor, recorded_at) FROM STDIN"
        ) as copy:
            while made < target:
                kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
                did = uuid.UUID(int=rng.getrandbits(128), version=4)
                at = T0 + timedelta(seconds=i * 30)
                for v, (typ, actor, data) in enumerate(stream(i, kind), start=1):
                    who = f"user:user{i % 40}" if actor == "user" else "worker:w1"
                    ts = (at + timedelta(seconds=v)).isoformat()
                    buf.write(f"{did}\t{v}\t{typ}\t{json.dumps(data)}\t{who}\t{ts}\n")
                    made += 1
                expected[STATUS[kind]] = expected.get(STATUS[kind], 0) + 1
                i += 1
                if buf.tell() > 1 << 20:
                    copy.write(buf.getvalue())
                    buf = io.StringIO()
            copy.write(buf.getvalue())
        conn.commit()
        conn.execute("ANALYZE events")
        conn.commit()
    return expected


async def rebuild(url: str, profile: bool) -> tuple[float, int, str]:
    from service import store

    async with await psycopg.AsyncConnection.connect(url) as conn:
        prof = cProfile.Profile() if profile else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        async with conn.transaction():
            n = await store.rebuild_projections(conn)
        if prof:
            prof.disable()
        elapsed = time.perf_counter() - t0
    text = ""
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
        text = out.getvalue()
    return elapsed, n, text


def copy_out(url: str) -> float:
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        t0 = time.perf_counter()
        with cur.copy("COPY (SELECT position, deploy_id, version, type, data, recorded_at, actor FROM events "
                      "ORDER BY deploy_id, version) TO STDOUT") as copy:
            for _ in copy:
                pass
        return time.perf_counter() - t0


async def single_pass(url: str) -> float:
    """The same rebuild as one ordered scan and pipelined writes (rolled back)."""
    from service.projection import view_of
    from service.queries import q
    from service.store import _stored

    def params(view) -> dict[str, object]:  # type: ignore[no-untyped-def]
        p = msgspec.structs.asdict(view)
        error = p.pop("error")
        p["error_reason"] = error.reason if error else None
        p["error_message"] = error.message if error else None
        return p

    async with await psycopg.AsyncConnection.connect(url) as conn:
        t0 = time.perf_counter()
        await conn.execute(q("lock_appends"))
        await conn.execute(q("clear_deploys"))
        out: list[dict[str, object]] = []
        group: list = []  # type: ignore[type-arg]
        async with conn.cursor("scan", row_factory=dict_row) as cur:
            cur.itersize = 10_000
            await cur.execute("SELECT position, deploy_id, version, type, data, recorded_at, actor "
                              "FROM events ORDER BY deploy_id, version")
            async for row in cur:
                if group and row["deploy_id"] != group[0].deploy_id and str(row["deploy_id"]) != group[0].deploy_id:
                    out.append(params(view_of(group)))
                    group = []
                group.append(_stored(row))
        if group:
            out.append(params(view_of(group)))
        async with conn.cursor() as wcur:
            await wcur.executemany(q("upsert_deploy"), out)
        elapsed = time.perf_counter() - t0
        await conn.rollback()
    return elapsed


def check(url: str, expected: dict[str, int]) -> None:
    with psycopg.connect(url) as conn:
        got = dict(conn.execute("SELECT status, count(*) FROM deploys GROUP BY status").fetchall())
    if got != expected:
        raise RuntimeError(f"rebuilt statuses {got} != generated {expected}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--events", type=int)
    ap.add_argument("--runs", type=int)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    target = args.events or (20_000 if args.quick else 1_000_000)
    runs = args.runs or (1 if args.quick else 3)
    with cluster() as pg, tempfile.TemporaryDirectory():
        url = new_database(pg)
        t0 = time.perf_counter()
        expected = generate(url, target)
        load_s = time.perf_counter() - t0
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM events").fetchone()
            events = int(row[0]) if row else 0
        deploys = sum(expected.values())
        ours, copies, singles = [], [], []
        profile_text = ""
        for r in range(runs):
            copies.append(copy_out(url))
            elapsed, n, text = asyncio.run(rebuild(url, args.profile and r == runs - 1))
            if n != deploys:
                raise RuntimeError(f"rebuild reported {n} deploys, generated {deploys}")
            check(url, expected)
            if not (args.profile and r == runs - 1):
                ours.append(elapsed)
            profile_text = text or profile_text
            singles.append(asyncio.run(single_pass(url)))
        if not ours:
            ours = [elapsed]
    print(f"replay: {events} events in {deploys} deploys (loaded by COPY in {load_s:.1f} s)")
    rows = [
        ["store.rebuild_projections", median(ours), events / median(ours), 1.0],
        ["anchor: single-pass fold in Python (rolled back)", median(singles), events / median(singles),
         median(ours) / median(singles)],
        ["anchor: COPY out in stream order (no Python)", median(copies), events / median(copies),
         median(ours) / median(copies)],
    ]
    table(["what", "median (s)", "events/s", "rebuild time / this"], rows,
          title=f"Projection rebuild, {events} events, {runs} run(s)")
    if profile_text:
        print("\ncProfile of one rebuild_projections, top 20 by internal time:")
        print(profile_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
