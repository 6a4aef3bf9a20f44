"""Ingest: POST /deploys accepted per second with 32 concurrent clients, against the raw
PostgreSQL rate of single-row insert-and-commit from 32 connections, same run, same cluster.

    .venv/bin/python bench/ingest.py [--quick] [--seconds S] [--rounds N] [--clients C]
                                     [--workers N] [--waits] [--pyspy] [--profile]

The API runs alone (no worker) as deployed: ``tfdeploy serve --workers N`` (N processes on one
socket), N = the machine's cores by default (``--workers 0``: one process, bench/_serve.py, as
``--profile`` always uses); the clients are keep-alive HTTP/1.1 connections in this process,
each sending the next request as soon as the last is answered. The anchors insert one row per transaction into ``bench_ingest``, a table
shaped like ``events`` (identity key, uuid, jsonb, the same unique key and indexes):
``pgbench`` (a C client: the server's own limit) and psycopg from Python (32 async
connections). Rounds alternate anchor and API; the table gives each round and the medians.
``--profile`` runs the API process under cProfile and prints its top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    ApiProcess,
    Conn,
    cluster,
    make_token,
    median,
    new_database,
    owner_url,
    pg_version,
    pyspy_report,
    pyspy_start,
    table,
)

SIMILAR_TABLE = """
CREATE TABLE IF NOT EXISTS bench_ingest (
    position     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    deploy_id    uuid        NOT NULL,
    version      integer     NOT NULL,
    type         text        NOT NULL,
    data         jsonb       NOT NULL,
    actor        text        NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (deploy_id, version)
);
CREATE INDEX IF NOT EXISTS bench_ingest_type ON bench_ingest (type, position);
CREATE INDEX IF NOT EXISTS bench_ingest_actor ON bench_ingest (actor, position);
CREATE INDEX IF NOT EXISTS bench_ingest_at ON bench_ingest (recorded_at, position);
"""

DATA = json.dumps({
    "workspace": "default", "action": "apply", "max_attempts": 3, "owner": "bench",
    "files": {"main.tf": "0" * 64}, "variables": {}, "secret_names": [],
})
INSERT = "INSERT INTO bench_ingest (deploy_id, version, type, data, actor) VALUES (%s, 1, 'Requested', %s, 'user:bench')"
PGBENCH_SCRIPT = (
    "INSERT INTO bench_ingest (deploy_id, version, type, data, actor) "
    f"VALUES (gen_random_uuid(), 1, 'Requested', '{DATA}', 'user:bench');\n"
)


def pgbench_rate(pg, url: str, clients: int, seconds: float) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(PGBENCH_SCRIPT)
        script = f.name
    Path(script).chmod(0o644)
    parts = urlsplit(url)
    db = parts.path.lstrip("/")
    cmd = [
        str(pg.bindir / "pgbench"), "-n", "-h", "127.0.0.1", "-p", str(pg.port),
        "-U", parts.username or "", "-c", str(clients), "-j", "2",
        "-T", str(max(1, round(seconds))), "-f", script, db,
    ]
    # The password in pgbench's environment, not on its command line.
    env = {**os.environ, "PGPASSWORD": parts.password or ""}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    for line in out.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError(f"no tps in pgbench output:\n{out}")


async def psycopg_rate(url: str, clients: int, seconds: float) -> float:
    conns = [await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(clients)]
    done = 0
    stop = time.perf_counter() + seconds

    async def one(conn: psycopg.AsyncConnection) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await conn.execute(INSERT, (uuid.uuid4(), DATA))
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(c) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        await c.close()
    return done / elapsed


async def sample_waits(url: str, stop: asyncio.Event, into: dict[str, int]) -> None:
    """Every 10 ms, what each of the API's PostgreSQL sessions is doing (pg_stat_activity)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            cur = await conn.execute(
                """SELECT state, coalesce(wait_event_type || ':' || wait_event, 'on CPU'),
                          left(regexp_replace(query, '\\s+', ' ', 'g'), 60)
                   FROM pg_stat_activity WHERE application_name = 'tfdeploy'"""
            )
            for state, wait, query in await cur.fetchall():
                key = f"{state} · {wait}" + (f" · {query}" if state == "active" else "")
                into[key] = into.get(key, 0) + 1
            await asyncio.sleep(0.01)


async def api_rate(port: int, token: str, clients: int, seconds: float,
                   waits: dict[str, int] | None = None, url: str = "") -> tuple[float, int]:
    conns = [Conn(port, token) for _ in range(clients)]
    for c in conns:
        await c.open()
    accepted = refused = 0
    stop = time.perf_counter() + seconds

    async def one(i: int, conn: Conn) -> None:
        nonlocal accepted, refused
        n = 0
        while time.perf_counter() < stop:
            body = json.dumps({
                "files": {"main.tf": 'resource "terraform_data" "x" {}\n'},
                "workspace": f"ws{i}",
                "variables": {"n": str(n)},
            }).encode()
            status, _ = await conn.request("POST", "/deploys", body)
            n += 1
            if status == 202:
                accepted += 1
            else:
                refused += 1

    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(sample_waits(url, stop_sampling, waits)) if waits is not None else None
    start = time.perf_counter()
    await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
    elapsed = time.perf_counter() - start
    stop_sampling.set()
    if sampler is not None:
        await sampler
    for c in conns:
        await c.close()
    return accepted / elapsed, refused


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="API processes (tfdeploy serve --workers N); default: the machine's cores; "
                         "0 = the single-process bench/_serve.py")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--waits", action="store_true", help="sample pg_stat_activity of the API's sessions")
    ap.add_argument("--pyspy", action="store_true", help="py-spy (CPU samples) the API process in the last API round")
    args = ap.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 10.0)
    rounds = args.rounds or (1 if args.quick else 3)
    c = args.clients

    with cluster() as pg, tempfile.TemporaryDirectory() as data_dir:
        url = new_database(pg)
        with psycopg.connect(owner_url(pg, url), autocommit=True) as conn:
            conn.execute(SIMILAR_TABLE)
        token = asyncio.run(make_token(url))
        prof = str(Path(data_dir) / "api.prof") if args.profile else None
        rows = []
        api: list[float] = []
        raw_c: list[float] = []
        raw_py: list[float] = []
        raw_serial: list[float] = []
        api_cpu: list[float] = []
        waits: dict[str, int] | None = {} if args.waits else None
        refused_total = 0
        workers = 0 if prof else args.workers  # cProfile needs the single-process server
        with ApiProcess(url, data_dir, profile=prof, workers=workers or None) as server:
            asyncio.run(api_rate(server.port, token, c, min(1.0, seconds)))  # warm up
            for r in range(rounds):
                pgb = pgbench_rate(pg, url, c, seconds)
                py = asyncio.run(psycopg_rate(url, c, seconds))
                serial = pgbench_rate(pg, url, 1, seconds)
                raw_serial.append(serial)
                spy = out = None
                if args.pyspy and r == rounds - 1:
                    out = str(Path(data_dir) / "spy.txt")
                    spy = pyspy_start(server.pid, seconds, out, idle=False, subprocesses=bool(workers))
                cpu0 = server.cpu_seconds()
                t_api = time.perf_counter()
                rate, refused = asyncio.run(api_rate(server.port, token, c, seconds, waits, url))
                api_cpu.append((server.cpu_seconds() - cpu0) / (time.perf_counter() - t_api))
                if spy is not None and out is not None:
                    pyspy_report(spy, out)
                refused_total += refused
                raw_c.append(pgb)
                raw_py.append(py)
                api.append(rate)
                rows.append([f"round {r + 1}", pgb, py, serial, rate, rate / pgb, rate / py])
        rows.append(["median", median(raw_c), median(raw_py), median(raw_serial), median(api),
                     median(api) / median(raw_c), median(api) / median(raw_py)])
        served = (f"tfdeploy serve --workers {workers} ({os.cpu_count()} cores here)" if workers
                  else "one process (bench/_serve.py)")
        print(f"ingest: {c} clients, {seconds:.0f} s per measurement, PostgreSQL {pg_version(url)}, "
              f"API: {served}")
        table(
            ["run", "raw pgbench/s", "raw psycopg/s", "1-conn pgbench/s", "POST /deploys 202/s",
             "API/pgbench", "API/psycopg"],
            rows,
            title="Ingest (target API/raw >= 0.50)",
        )
        print(f"API process(es) CPU during the API rounds (median): {100 * median(api_cpu):.0f}% of one core")
        if refused_total:
            print(f"non-202 answers: {refused_total}")
            return 1
        if waits:
            total = sum(waits.values())
            print("\nAPI sessions in pg_stat_activity during the API rounds (10 ms samples):")
            table(["share", "state · wait · query"],
                  [[f"{100 * v / total:.1f}%", k] for k, v in sorted(waits.items(), key=lambda kv: -kv[1])[:12]])
        if prof:
            print("\nAPI process, cProfile, top 25 by cumulative time:")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
