"""Flood: one user's deploy prints 50 MB while another user reads their own deploy.

    .venv/bin/python bench/flood.py [--quick] [--megabytes M] [--line-bytes B] [--idle S]

A worker (``tfdeploy worker``, local runner) and the API (``tfdeploy serve``, the default
per-user limits) run as processes of their own. User A's deploy runs a ``local-exec`` that
prints M MB (``yes <a line of B bytes> | head -c M*10^6``; ``--line-bytes 2`` is the issue's
``yes | head -c 50000000``), and A follows it live (``GET /deploys/{id}/stream``, as the status
page does; from a process of its own, unless ``--no-follow``). User B asks for one deploy of theirs (``GET /deploys/{id}``) every 50 ms, first
with nothing else going on (idle), then while A's flood runs, until it has ended. Figures: B's
latency p50/p99 idle and during the flood (target: p99 during the flood within 2x of idle); how
long the flood took to be stored and what was stored; the worker's and the API's peak RSS
during the flood (VmHWM, reset when the flood starts).

Everything shares this machine's cores: the worker, terraform, PostgreSQL, the API and this
client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    PYTHON,
    ROOT,
    ApiProcess,
    cluster,
    make_token,
    median,
    new_database,
    pct,
    table,
)

POLL = 0.05  # B's pace: 20 requests a second, well under the default limit of 50/s

# User A's live view of the flood: read the stream to its end; print how many bytes came.
FOLLOWER = """
import sys, httpx
total = 0
with httpx.stream("GET", sys.argv[1], timeout=None) as r:
    for chunk in r.iter_raw(1 << 16):
        total += len(chunk)
print(total)
"""


def flood_config(megabytes: float, line_bytes: int) -> str:
    line = ("tfdeploy flood " * (line_bytes // 15 + 1))[: max(1, line_bytes - 1)].strip() or "y"
    total = int(megabytes * 1_000_000)
    return (
        'resource "terraform_data" "flood" {\n'
        '  provisioner "local-exec" {\n'
        f"    command = \"yes '{line}' | head -c {total}\"\n"
        "  }\n"
        "}\n"
    )


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU of a process (and of its waited-for children: terraform, the shell)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU of ``root`` and every live process under it (PostgreSQL: the postmaster's backends)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu_seconds(pid, children=True)
        todo += [child for child, ppid in parent.items() if ppid == pid]
    return total


def reset_peak(pid: int) -> None:
    """Start the process's peak RSS (VmHWM) again from its current RSS."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


class Worker:
    """``tfdeploy worker`` with the local runner, its output in a file."""

    def __init__(self, url: str, data_dir: str, max_output: int, nice: int = 0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TFDEPLOY_")}
        env.update(
            TFDEPLOY_DATABASE_URL=url, TFDEPLOY_DATA_DIR=data_dir, TFDEPLOY_RUNNER="local",
            TFDEPLOY_LOG_LEVEL="warning", TFDEPLOY_MAX_OUTPUT_BYTES=str(max_output),
            TFDEPLOY_DEPLOY_TIMEOUT="1800", CHECKPOINT_DISABLE="1",
        )
        self.log_path = Path(data_dir) / "worker.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*(["nice", "-n", str(nice)] if nice else []), PYTHON, "-m", "service.cli", "worker"],
            cwd=str(ROOT), env=env,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


async def deploy(c: httpx.AsyncClient, token: str, files: dict[str, str], workspace: str) -> str:
    r = await c.post("/deploys", json={"files": files, "workspace": workspace, "max_attempts": 1},
                     headers={"Authorization": f"Bearer {token}"})
    if r.status_code != 202:
        raise RuntimeError(f"POST /deploys: {r.status_code} {r.text}")
    return str(r.json()["id"])


async def status(watch: psycopg.AsyncConnection, deploy_id: str) -> str:
    cur = await watch.execute("SELECT status FROM deploys WHERE id = %s", (deploy_id,))
    row = await cur.fetchone()
    return str(row[0]) if row else "?"


async def wait_ended(watch: psycopg.AsyncConnection, deploy_id: str, limit: float) -> str:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        s = await status(watch, deploy_id)
        if s in ("succeeded", "failed", "cancelled"):
            return s
        await asyncio.sleep(0.1)
    raise RuntimeError(f"deploy {deploy_id} not ended after {limit} s")


async def measure(
    api: ApiProcess, worker: Worker, url: str, args: argparse.Namespace, postmaster: int
) -> dict[str, object]:
    flooder = await make_token(url, "flooder")
    reader = await make_token(url, "reader")
    files = {"main.tf": 'resource "terraform_data" "x" {}\n'}
    async with (
        httpx.AsyncClient(base_url=api.base, timeout=60) as c,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as watch,
    ):
        mine = await deploy(c, reader, files, "reader")
        if await wait_ended(watch, mine, 120) != "succeeded":
            raise RuntimeError(f"the reader's deploy did not succeed: {worker.log_path.read_text()[-2000:]}")
        phase = "idle"
        latencies: dict[str, list[float]] = {"idle": [], "flood": []}
        refused: dict[int, int] = {}
        polling = True

        async def poll() -> None:
            async with httpx.AsyncClient(base_url=api.base, timeout=60) as b:
                headers = {"Authorization": f"Bearer {reader}"}
                while polling:
                    sent = time.perf_counter()
                    r = await b.get(f"/deploys/{mine}", headers=headers)
                    took = time.perf_counter() - sent
                    if r.status_code == 200:
                        latencies[phase].append(took)
                    else:
                        refused[r.status_code] = refused.get(r.status_code, 0) + 1
                    await asyncio.sleep(max(0.0, POLL - took))

        poller = asyncio.create_task(poll())
        await asyncio.sleep(args.idle)

        def follow(deploy_id: str) -> subprocess.Popen[bytes]:
            # In a process of its own, as A's browser would be: reading 100+ MB here would
            # hold up this process's loop, and with it the timing of B's requests.
            url = f"{api.base}/deploys/{deploy_id}/stream?access_token={flooder}"
            return subprocess.Popen([PYTHON, "-c", FOLLOWER, url], stdout=subprocess.PIPE)

        reset_peak(worker.proc.pid)
        api_pids = api.pids()
        for pid in api_pids:
            reset_peak(pid)
        worker_rss0 = proc_kib(worker.proc.pid, "VmRSS")
        cpu0 = {"worker + terraform": cpu_seconds(worker.proc.pid, children=True),
                "API": api.cpu_seconds(), "PostgreSQL": tree_cpu(postmaster)}
        started = time.monotonic()
        phase = "flood"
        flood = await deploy(c, flooder, {"main.tf": flood_config(args.megabytes, args.line_bytes)}, "flood")
        follower = None if args.no_follow else follow(flood)
        ended = await wait_ended(watch, flood, args.limit)
        took = time.monotonic() - started
        cpu = {"worker + terraform": cpu_seconds(worker.proc.pid, children=True),
               "API": api.cpu_seconds(), "PostgreSQL": tree_cpu(postmaster)}
        cores = {k: (cpu[k] - cpu0[k]) / took for k in cpu}
        worker_peak = proc_kib(worker.proc.pid, "VmHWM")
        api_peak = max(proc_kib(pid, "VmHWM") for pid in api_pids)
        polling = False
        await poller
        streamed = 0
        if follower is not None:
            try:
                out, _ = await asyncio.to_thread(follower.communicate, timeout=120)
                streamed = int(out or 0)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()
        cur = await watch.execute(
            "SELECT count(*), coalesce(sum(octet_length(line)), 0) FROM deploy_logs WHERE deploy_id = %s",
            (flood,),
        )
        row = await cur.fetchone()
        assert row is not None
        lines, stored = row
        cur = await watch.execute("SELECT error_reason FROM deploys WHERE id = %s", (flood,))
        reason = (await cur.fetchone() or [None])[0]
    return {
        "idle": latencies["idle"], "flood": latencies["flood"], "ended": ended, "reason": reason,
        "took": took, "lines": lines, "stored": stored, "streamed": streamed,
        "worker_rss0": worker_rss0, "worker_peak": worker_peak, "api_peak": api_peak,
        "refused": refused, "cores": cores,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--megabytes", type=float)
    ap.add_argument("--line-bytes", type=int, default=100)
    ap.add_argument("--idle", type=float, help="seconds of B's requests before the flood")
    ap.add_argument("--limit", type=float, default=1200.0, help="seconds the flood may take")
    ap.add_argument("--profile", action="store_true",
                    help="run the API (one process, bench/_serve.py) under cProfile; print its top")
    ap.add_argument("--nice-worker", type=int, default=0,
                    help="run the worker (and so terraform) at this nice level")
    ap.add_argument("--no-follow", action="store_true",
                    help="user A does not follow the flood live (no SSE stream)")
    args = ap.parse_args()
    args.megabytes = args.megabytes or (2.0 if args.quick else 50.0)
    args.idle = args.idle or (2.0 if args.quick else 15.0)
    with cluster() as pg, tempfile.TemporaryDirectory() as data_dir:
        url = new_database(pg)
        worker = Worker(url, data_dir, max_output=int(args.megabytes * 1_000_000 * 2) + (1 << 20),
                        nice=args.nice_worker)
        try:
            # The per-user limits as a user gets them (the defaults).
            prof = str(Path(data_dir) / "api.prof") if args.profile else None
            with ApiProcess(url, data_dir, workers=None if prof else 1, profile=prof, limits={}) as api:
                postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
                m = asyncio.run(measure(api, worker, url, args, postmaster))
            if prof:
                import pstats

                pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        finally:
            worker.stop()
    idle, flood = m["idle"], m["flood"]
    assert isinstance(idle, list) and isinstance(flood, list)
    ratio = pct(flood, 99) / pct(idle, 99)
    print(
        f"flood: {args.megabytes:g} MB in lines of {args.line_bytes} bytes"
        f"{f', worker at nice {args.nice_worker}' if args.nice_worker else ''}; the flooding deploy "
        f"{m['ended']}{' (' + str(m['reason']) + ')' if m['reason'] else ''} after "
        f"{m['took']:.1f} s: {m['lines']} lines ({int(m['stored']) / 1e6:.1f} MB) stored, "  # type: ignore[call-overload]
        f"{int(m['streamed']) / 1e6:.1f} MB streamed to its owner"  # type: ignore[call-overload]
    )
    table(
        ["phase", "B's GETs", "p50 (ms)", "p99 (ms)", "max (ms)"],
        [["idle", len(idle), 1000 * median(idle), 1000 * pct(idle, 99), 1000 * max(idle)],
         ["flood", len(flood), 1000 * median(flood), 1000 * pct(flood, 99), 1000 * max(flood)]],
        title=f"Flood (target: p99 during the flood <= 2x idle; here {ratio:.2f}x)",
    )
    table(
        ["process", "RSS before (MiB)", "peak during the flood (MiB)"],
        [["worker", int(m["worker_rss0"]) / 1024, int(m["worker_peak"]) / 1024],  # type: ignore[call-overload]
         ["API", "-", int(m["api_peak"]) / 1024]],  # type: ignore[call-overload]
    )
    cores = m["cores"]
    assert isinstance(cores, dict)
    print(f"CPU during the flood, in cores ({os.cpu_count()} here; the follower and this client "
          "not counted): " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items()))
    if m["refused"]:
        print(f"B's refused requests: {m['refused']}")
    return 0 if m["ended"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
