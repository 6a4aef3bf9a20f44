"""SSE fan-out: N subscribers of ``GET /events/stream`` on one API process, over real HTTP.

    .venv/bin/python bench/fanout.py [--quick] [--subscribers N] [--appends K] [--profile]

The API runs alone under uvicorn in its own process (bench/_serve.py). This process opens N
keep-alive connections to the admin event stream, then appends one ``Requested`` event at a
time through ``service.store.append`` on its own connection (as any writer does) and notes the
time its COMMIT returned; each subscriber notes when the event's ``id:`` reaches it. Latency
per append: commit -> first and -> last subscriber's receipt; p50/p99 over the appends.

Memory per subscriber: the server's VmRSS (/proc/<pid>/status) with N streams open minus with
one open (the LISTEN hub already started), divided by N - 1.

The subscribers and the server share this machine's cores: the client's own reading is part of
the figure (its share is shown by the first-receipt latency).
"""

from __future__ import annotations

import argparse
import asyncio
import pstats
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    ApiProcess,
    cluster,
    make_token,
    median,
    new_database,
    pct,
    pyspy_report,
    pyspy_start,
    table,
)

ID = re.compile(rb"\nid: (\d+)\r?\n")


class Subscriber:
    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.seen: dict[int, float] = {}
        self.connected = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        self.writer = writer
        writer.write(
            f"GET /events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.token}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"stream refused: {head[:200]!r}")
        self.connected.set()
        buf = b"\n"
        while True:
            data = await reader.read(65536)
            if not data:
                return
            now = time.perf_counter()
            buf += data
            last = 0
            for m in ID.finditer(buf):
                self.seen.setdefault(int(m.group(1)), now)
                last = m.end() - 1
            buf = buf[last:] if last else buf[-256:]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.task is not None:
            self.task.cancel()


async def append_one(conn: psycopg.AsyncConnection) -> tuple[int, float]:
    from service import store
    from service.events import Requested

    event = Requested(workspace="fan", action="apply", max_attempts=3, owner="bench", files={})
    async with conn.transaction():
        new = await store.append(conn, str(uuid.uuid4()), 0, [event], "user:bench")
    return new[0].position, time.perf_counter()


async def measure(server: ApiProcess, url: str, token: str, n: int, appends: int,
                  pyspy: float = 0.0) -> dict[str, object]:
    subs: list[Subscriber] = []

    async def connect(count: int) -> None:
        batch = [Subscriber(server.port, token) for _ in range(count)]
        for s in batch:
            s.task = asyncio.create_task(s.run())
        await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in batch)), 60)
        subs.extend(batch)

    writer = await psycopg.AsyncConnection.connect(url)
    try:
        await connect(1)
        pos, _ = await append_one(writer)  # starts the hub; the first subscriber sees it
        await _until(lambda: pos in subs[0].seen, 10)
        await asyncio.sleep(0.5)
        rss_one = server.rss_kib()
        t0 = time.perf_counter()
        for start in range(1, n, 50):
            await connect(min(50, n - start))
        connect_s = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        rss_all = server.rss_kib()
        for s in subs:
            if s.task is not None and s.task.done():
                raise RuntimeError(f"a subscriber ended: {s.task.exception()!r}")
        first: list[float] = []
        last: list[float] = []
        commits0 = await _commits(writer)
        cpu0 = server.cpu_seconds()
        spy = None
        spy_out = str(Path(tempfile.gettempdir()) / f"fanout-spy-{server.pid}.txt")
        for i in range(appends + 2):  # two warm-up appends
            if i == 2 and pyspy:
                spy = pyspy_start(server.pid, pyspy, spy_out)
            pos, t_commit = await append_one(writer)
            await _until(lambda p=pos: all(p in s.seen for s in subs), 30)
            times = [s.seen[pos] - t_commit for s in subs]
            if i >= 2:
                first.append(min(times) * 1000)
                last.append(max(times) * 1000)
            await asyncio.sleep(0.3)
        cpu_ms = (server.cpu_seconds() - cpu0) * 1000 / (appends + 2)
        per_append = (await _commits(writer) - commits0) / (appends + 2)
        pyspy_report(spy, spy_out)
        return {
            "commits_per_append": per_append, "server_cpu_ms": cpu_ms,
            "first": first, "last": last, "rss_one": rss_one, "rss_all": rss_all,
            "per_sub_kib": (rss_all - rss_one) / max(1, n - 1), "connect_s": connect_s,
        }
    finally:
        for s in subs:
            s.close()
        await writer.close()


async def _commits(conn: psycopg.AsyncConnection) -> int:
    """Committed transactions in this database so far (pg_stat_database, flushed first)."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.commit()
    cur = await conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    row = await cur.fetchone()
    await conn.commit()
    return int(row[0]) if row else 0


async def _until(cond, limit: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError("subscribers did not all receive the event in time")
        await asyncio.sleep(0.001)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--subscribers", type=int)
    ap.add_argument("--appends", type=int)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--pyspy", type=float, default=0.0, help="py-spy the server for S seconds of appends")
    args = ap.parse_args()
    n = args.subscribers or (50 if args.quick else 1000)
    k = args.appends or (5 if args.quick else 30)
    with cluster() as pg, tempfile.TemporaryDirectory() as data_dir:
        url = new_database(pg)
        token = asyncio.run(make_token(url, "root", admin=True))
        prof = str(Path(data_dir) / "api.prof") if args.profile else None
        with ApiProcess(url, data_dir, profile=prof) as server:
            m = asyncio.run(measure(server, url, token, n, k, args.pyspy))
        # Loaded here: the file goes with the temp dir.
        stats = pstats.Stats(prof) if prof else None
    first, last = m["first"], m["last"]
    assert isinstance(first, list) and isinstance(last, list)
    table(
        ["subscribers", "appends", "commit -> first p50 (ms)", "commit -> last p50 (ms)",
         "commit -> last p99 (ms)", "max (ms)", "RSS 1 stream (MiB)", f"RSS {n} streams (MiB)",
         "KiB / subscriber"],
        [[n, k, median(first), median(last), pct(last, 99), max(last), m["rss_one"] / 1024,  # type: ignore[operator]
          m["rss_all"] / 1024, m["per_sub_kib"]]],  # type: ignore[operator]
        title="SSE fan-out (target p99 <= 250 ms)",
    )
    print(f"connecting {n - 1} subscribers took {m['connect_s']:.1f} s")
    print(f"database transactions committed per append (pg_stat_database.xact_commit): "
          f"{m['commits_per_append']:.0f}")
    print(f"API process CPU per append (user + system, all {n} deliveries): "
          f"{m['server_cpu_ms']:.0f} ms")
    if stats is not None:
        print("\nAPI process, cProfile, top 30 by internal time:")
        stats.sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
