"""Dispatch latency: from ``Requested`` committed to ``Started`` committed, with free slots.

    .venv/bin/python bench/dispatch.py [--quick] [--deploys N] [--runner local|docker]

The API (in-process) and a worker (local runner, cap 4) share this process, as ``tfdeploy up``
runs them. Deploys of a trivial config (``terraform_data`` with no provisioner) are sent one at a
time, each once the previous one has ended, so a slot is always free and the worker idle. The
latency is ``Started.recorded_at - Requested.recorded_at`` from the events table (both stamped
by PostgreSQL's clock_timestamp() inside their short append transactions). Also shown: the
client's view, POST sent -> ``Started`` visible, and the whole deploy.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import cluster, harness, new_database, pct, table  # noqa: E402
from service.dispatch import Dispatcher  # noqa: E402

TRIVIAL = 'resource "terraform_data" "x" {}\n'


async def measure(url: str, data_dir: str, runner: str, n: int) -> list[list[object]]:
    lat: list[float] = []
    total: list[float] = []
    # When the dispatcher claimed each deploy's job (wall clock, as PostgreSQL's on this host): a
    # succeeded job's row is deleted, so the claim is timed here rather than read back.
    claimed: dict[str, float] = {}
    original = Dispatcher._claim_once

    async def timed_claim(self: Dispatcher) -> Any:
        job = await original(self)
        if job is not None:
            claimed.setdefault(str(job.task_kwargs.get("deploy_id")), time.time())
        return job

    Dispatcher._claim_once = timed_claim  # type: ignore[method-assign]
    async with harness(url, data_dir, runner) as h:
        ids = []
        for i in range(n + 1):  # the first deploy warms up terraform's and Python's caches
            t0 = time.perf_counter()
            deploy_id = await h.submit({"main.tf": TRIVIAL}, workspace=f"d{i}")
            status = await h.wait(deploy_id)
            if status != "succeeded":
                raise RuntimeError(f"deploy {deploy_id} {status}")
            if i:
                ids.append(deploy_id)
                total.append(time.perf_counter() - t0)
        cur = await h.watch.execute(
            """SELECT r.deploy_id::text, extract(epoch FROM r.recorded_at), extract(epoch FROM s.recorded_at)
               FROM events r JOIN events s ON s.deploy_id = r.deploy_id
               WHERE r.type = 'Requested' AND s.type = 'Started' AND s.version = 2
                 AND r.deploy_id = ANY(%s::uuid[])""",
            (ids,),
        )
        rows = await cur.fetchall()
    Dispatcher._claim_once = original  # type: ignore[method-assign]
    lat = [(float(s) - float(r)) * 1000 for _, r, s in rows]
    to_job = [(claimed[d] - float(r)) * 1000 for d, r, _ in rows if d in claimed]
    job_to_started = [(float(s) - claimed[d]) * 1000 for d, _, s in rows if d in claimed]
    if len(lat) != n:
        raise RuntimeError(f"expected {n} latencies, got {len(lat)}")
    return [
        [runner, n, "Requested -> Started (ms)", pct(lat, 50), pct(lat, 99), max(lat), "20 / 100"],
        [runner, len(to_job), "  of which Requested -> job claimed", pct(to_job, 50), pct(to_job, 99),
         max(to_job, default=float("nan")), "-"],
        [runner, len(job_to_started), "  of which job claimed -> Started", pct(job_to_started, 50),
         pct(job_to_started, 99), max(job_to_started, default=float("nan")), "-"],
        [runner, n, "whole deploy, POST -> succeeded (ms)", pct([t * 1000 for t in total], 50),
         pct([t * 1000 for t in total], 99), max(total) * 1000, "-"],
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--deploys", type=int)
    ap.add_argument("--runner", default="local", choices=["local", "docker"])
    args = ap.parse_args()
    n = args.deploys or (3 if args.quick else 50)
    with cluster() as pg, tempfile.TemporaryDirectory() as data_dir:
        url = new_database(pg)
        rows = asyncio.run(measure(url, data_dir, args.runner, n))
    table(["runner", "n", "measure", "p50", "p99", "max", "target p50/p99"], rows,
          title="Dispatch latency, free slots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
