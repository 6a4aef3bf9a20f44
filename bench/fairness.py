"""Fair turns: user A queues 40 deploys of 1 s, user B sends one every 2 s while A's run.

    .venv/bin/python bench/fairness.py [--quick] [--deploys N] [--cap C] [--runner local|docker]

What it shows (docs/benchmarks.md, "Fair turns"):
- B's wait, ``Requested`` -> ``Started`` (p50, p99), against the ideal: one turnover, the time a
  running deploy takes (the median ``Started`` -> ``Succeeded`` of this run), since B's deploy
  starts when the next place frees. Before the fair claim B waited for all of A's queued deploys.
- A's makespan against the cap benchmark's makespan (bench/cap.py's ``measure``, in the same
  run) for the same work: A's deploys plus the B deploys that ended within A's makespan, all sent
  at once. Fairness must cost no throughput (target: no more than 2% worse); A's makespan grows
  only by the places B's deploys took, as it should.

The API (in-process ASGI) and one worker share this process, as in bench/cap.py; each deploy has
a workspace of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    cluster,
    docker_ok,
    harness,
    make_token,
    median,
    new_database,
    pct,
    table,
)
from bench.cap import SLEEPS, measure  # noqa: E402


async def fair(url: str, data_dir: str, kind: str, n: int, cap: int, every: float) -> dict[str, float]:
    import httpx

    from service.api.app import create_app

    async with harness(url, data_dir, kind, max_concurrency=cap) as h:
        warm = await h.submit({"main.tf": SLEEPS}, workspace="warm")
        await h.wait(warm)
        token_b = await make_token(url, "user-b")
        transport = httpx.ASGITransport(app=create_app(h.services))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://bench",
            headers={"Authorization": f"Bearer {token_b}"}, timeout=60,
        ) as b_client:
            t0 = time.perf_counter()
            anns = [await h.submit({"main.tf": SLEEPS}, workspace=f"a{i}") for i in range(n)]
            bobs: list[str] = []
            done = asyncio.Event()

            async def b_sends() -> None:
                k = 0
                while not done.is_set():
                    r = await b_client.post(
                        "/deploys", json={"files": {"main.tf": SLEEPS}, "workspace": f"b{k}"}
                    )
                    r.raise_for_status()
                    bobs.append(str(r.json()["id"]))
                    k += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), every)

            sender = asyncio.create_task(b_sends())
            statuses = [await h.wait(d) for d in anns]
            a_makespan = time.perf_counter() - t0
            done.set()
            await sender
            statuses += [await h.wait(d) for d in bobs]
            all_makespan = time.perf_counter() - t0
        if any(s != "succeeded" for s in statuses):
            raise RuntimeError(f"not all succeeded: {statuses}")
        cur = await h.watch.execute(
            """SELECT s.deploy_id::text, extract(epoch FROM s.recorded_at - r.recorded_at),
                      extract(epoch FROM e.recorded_at - s.recorded_at),
                      extract(epoch FROM e.recorded_at)
               FROM events s
               JOIN events r ON r.deploy_id = s.deploy_id AND r.type = 'Requested'
               JOIN events e ON e.deploy_id = s.deploy_id AND e.type = 'Succeeded'
               WHERE s.type = 'Started' AND s.deploy_id = ANY(%s::uuid[])""",
            (anns + bobs,),
        )
        rows = {d: (float(w), float(run), float(end)) for d, w, run, end in await cur.fetchall()}
    b_waits = [rows[d][0] for d in bobs]
    turnover = median([r[1] for r in rows.values()])
    a_end = max(rows[d][2] for d in anns)
    return {
        "b_p50": median(b_waits), "b_p99": pct(b_waits, 99), "b_n": len(bobs),
        "b_within": sum(rows[d][2] <= a_end for d in bobs),
        "turnover": turnover, "a_makespan": a_makespan, "all_makespan": all_makespan,
        "a_wait_p50": median([rows[d][0] for d in anns]),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--deploys", type=int)
    ap.add_argument("--cap", type=int, default=4)
    ap.add_argument("--every", type=float, default=2.0, help="B sends one deploy every S seconds")
    ap.add_argument("--runner", default="local", choices=["local", "docker"])
    args = ap.parse_args()
    n = args.deploys or (8 if args.quick else 40)
    cap = 2 if args.quick else args.cap
    kind = args.runner
    if kind == "docker" and not docker_ok():
        print("no Docker engine: nothing to measure")
        return 0
    with cluster() as pg:
        url = new_database(pg)
        with tempfile.TemporaryDirectory() as d1:
            f = asyncio.run(fair(url, d1, kind, n, cap, args.every))
        url = new_database(pg)
        with tempfile.TemporaryDirectory() as d2:
            same_work = n + int(f["b_within"])
            c = asyncio.run(measure(url, d2, kind, same_work, cap))
    table(
        ["measure", "value", "anchor", "ratio"],
        [
            [f"B's wait p50 ({int(f['b_n'])} deploys, one every {args.every:g} s)",
             f"{f['b_p50'] * 1000:.0f} ms", f"one turnover {f['turnover'] * 1000:.0f} ms",
             f"{f['b_p50'] / f['turnover']:.2f}"],
            ["B's wait p99", f"{f['b_p99'] * 1000:.0f} ms", f"one turnover {f['turnover'] * 1000:.0f} ms",
             f"{f['b_p99'] / f['turnover']:.2f}"],
            [f"A's wait p50 ({n} deploys sent at once)", f"{f['a_wait_p50']:.2f} s", "", ""],
            [f"A's makespan ({n}; {int(f['b_within'])} of B's ran meanwhile)",
             f"{f['a_makespan']:.2f} s",
             f"cap bench, {same_work} at once: {c['makespan']:.2f} s",
             f"{f['a_makespan'] / c['makespan']:.3f}"],
        ],
        title=f"Fair turns, {kind} runner, cap {cap}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
