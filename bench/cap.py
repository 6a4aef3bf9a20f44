"""Cap utilisation: 40 deploys of a config that sleeps 1 s, cap 4: makespan against the ideal.

    .venv/bin/python bench/cap.py [--quick] [--deploys N] [--cap C] [--runner local|docker|both]
                                  [--no-prefetch] [--trace] [--instrument] [--steps-anchor]

``--steps-anchor`` adds the runs by hand with a tfdeploy run's own steps (init, validate, apply),
``--instrument`` times the Docker runner's calls and the engine's requests.
``--no-prefetch`` runs the worker with as many dispatch lanes as the cap (no spare lane waiting
for a place while the others record their outcomes); ``--trace`` prints where each slot's time
goes, from the events and log lines' ``recorded_at``.

The API (in-process) and one worker (cap + up to 4 dispatch lanes) share this process. All deploys are
sent at once, each to its own workspace (deploys of one workspace run one at a time by design).
Makespan: first POST sent -> last deploy ``succeeded`` (read model polled every 5 ms).

Anchors: the ideal ``N / cap × 1 s`` (sleep only), and ``N / cap × t1`` where t1 is the median
time of the same config's init + apply run by hand (bare terraform, or one ``docker run`` doing
init && apply), and the makespan of the same N runs by hand, ``cap`` at a time (a thread
pool): what this machine allows at most with that many running at once. Also
shown: the highest number of deploys between ``Started`` and their end at once (from the
events), which must not exceed the cap.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    RUNNER_IMAGE,
    cluster,
    docker_ok,
    harness,
    median,
    new_database,
    pyspy_report,
    pyspy_start,
    table,
)

SPY = 0.0
TRACE = False
SPY_OUT = str(Path(tempfile.gettempdir()) / f"cap-spy-{os.getpid()}.txt")

SLEEPS = """
resource "terraform_data" "nap" {
  provisioner "local-exec" { command = "sleep 1" }
}
"""


def by_hand(kind: str, validate: bool = False) -> float:
    """One init + apply by hand; ``validate``: init + validate + apply, the steps a tfdeploy run
    makes (issue 13: a configuration is validated before anything is applied)."""
    d = tempfile.mkdtemp(prefix="tfbench-")
    try:
        os.chmod(d, 0o777)
        Path(d, "main.tf").write_text(SLEEPS)
        t0 = time.perf_counter()
        if kind == "local":
            env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": d, "TMPDIR": d,
                   "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1"}
            steps = [["init", "-input=false"], ["apply", "-auto-approve", "-input=false"]]
            if validate:
                steps.insert(1, ["validate"])
            for args in steps:
                subprocess.run(["terraform", *args], cwd=d, env=env, check=True, capture_output=True)
        else:
            subprocess.run(
                ["docker", "run", "--rm", "--network", "none", "-v", f"{d}:/workspace", "-w", "/workspace",
                 "--entrypoint", "/bin/sh", RUNNER_IMAGE, "-c",
                 "terraform init -input=false && "
                 + ("terraform validate >/dev/null && " if validate else "")
                 + "terraform apply -auto-approve -input=false; "
                 "rm -rf .terraform .terraform.lock.hcl terraform.tfstate"],
                check=True, capture_output=True,
            )
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)


def by_hand_pool(kind: str, n: int, cap: int, validate: bool = False) -> float:
    """n runs by hand, ``cap`` at a time: the makespan this machine allows at most."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(cap) as pool:
        list(pool.map(lambda _: by_hand(kind, validate), range(n)))
    return time.perf_counter() - t0


TIMINGS: dict[str, list[float]] = {}


def instrument_docker() -> None:
    """Time the Docker runner's engine calls (wrapping its methods here, in the bench)."""
    import functools
    import inspect

    from service.runners.docker import DockerRunner

    for name in ("_ensure_image", "running", "_create", "_remove", "reserve", "prepare"):
        fn = getattr(DockerRunner, name)
        if inspect.iscoroutinefunction(fn):
            async def timed_async(*a, __fn=fn, __name=name, **kw):  # type: ignore[no-untyped-def]
                t0 = time.perf_counter()
                try:
                    return await __fn(*a, **kw)
                finally:
                    TIMINGS.setdefault(__name, []).append((time.perf_counter() - t0) * 1000)
            setattr(DockerRunner, name, functools.wraps(fn)(timed_async))
        else:
            def timed_sync(*a, __fn=fn, __name=name, **kw):  # type: ignore[no-untyped-def]
                t0 = time.perf_counter()
                try:
                    return __fn(*a, **kw)
                finally:
                    TIMINGS.setdefault(__name, []).append((time.perf_counter() - t0) * 1000)
            setattr(DockerRunner, name, functools.wraps(fn)(timed_sync))
    # The engine's own requests (thread-side) and the outcome's recording (state, events).
    import docker

    from service.deployer_outcome import Outcomes

    for name in ("create_container", "put_archive", "start", "attach", "wait", "inspect_container",
                 "get_archive", "remove_container", "containers"):
        fn = getattr(docker.APIClient, name)

        def timed_api(*a, __fn=fn, __name=name, **kw):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return __fn(*a, **kw)
            finally:
                TIMINGS.setdefault(f"api.{__name}", []).append((time.perf_counter() - t0) * 1000)
        setattr(docker.APIClient, name, functools.wraps(fn)(timed_api))
    conclude = Outcomes.conclude

    async def timed_conclude(*a, **kw):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return await conclude(*a, **kw)
        finally:
            TIMINGS.setdefault("Outcomes.conclude", []).append((time.perf_counter() - t0) * 1000)
    Outcomes.conclude = functools.wraps(conclude)(timed_conclude)  # type: ignore[method-assign]


async def measure(url: str, data_dir: str, kind: str, n: int, cap: int) -> dict[str, float]:
    async with harness(url, data_dir, kind, max_concurrency=cap) as h:
        # Warm-up: one deploy, so imports and terraform's first start are not in the makespan.
        warm = await h.submit({"main.tf": SLEEPS}, workspace="warm")
        await h.wait(warm)
        t0 = time.perf_counter()
        ids = [await h.submit({"main.tf": SLEEPS}, workspace=f"cap{i}") for i in range(n)]
        t_sent = time.perf_counter() - t0
        spy = None
        if SPY:
            spy = pyspy_start(os.getpid(), SPY, SPY_OUT)
        statuses = [await h.wait(i) for i in ids]
        pyspy_report(spy, SPY_OUT)
        makespan = time.perf_counter() - t0
        if any(s != "succeeded" for s in statuses):
            raise RuntimeError(f"not all succeeded: {statuses}")
        cur = await h.watch.execute(
            """SELECT extract(epoch FROM s.recorded_at), extract(epoch FROM e.recorded_at)
               FROM events s JOIN events e ON e.deploy_id = s.deploy_id AND e.type = 'Succeeded'
               WHERE s.type = 'Started' AND s.deploy_id = ANY(%s::uuid[])""",
            (ids,),
        )
        spans = [(float(a), float(b)) for a, b in await cur.fetchall()]
        if TRACE:
            await trace(h.watch, ids, cap)
    # Hand-over: the k-th Started (k > cap) got the slot the (k - cap)-th Succeeded freed.
    starts = sorted(a for a, _ in spans)
    ends = sorted(b for _, b in spans)
    gaps = [(starts[k] - ends[k - cap]) * 1000 for k in range(cap, len(starts))]
    points = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    busy = sum(b - a for a, b in spans)
    return {"makespan": makespan, "sent": t_sent, "peak": peak, "busy": busy,
            "gap": median(gaps) if gaps else float("nan"),
            "run": median([(b - a) for a, b in spans])}


async def trace(conn, ids: list[str], cap: int) -> None:  # type: ignore[no-untyped-def]
    """Per deploy: Started, first/last log line, StatePersisted, Succeeded (``recorded_at``,
    PostgreSQL's clock). The runner frees its slot right after terraform's last line (state read,
    temp dir removed), so the k-th Started (k > cap) is compared with the (k - cap)-th last line:
    the time a slot stood empty."""
    cur = await conn.execute(
        """SELECT e.deploy_id::text,
                  extract(epoch FROM max(e.recorded_at) FILTER (WHERE e.type = 'Started')),
                  extract(epoch FROM max(e.recorded_at) FILTER (WHERE e.type = 'StatePersisted')),
                  extract(epoch FROM max(e.recorded_at) FILTER (WHERE e.type = 'Succeeded')),
                  (SELECT extract(epoch FROM min(l.recorded_at)) FROM deploy_logs l
                    WHERE l.deploy_id = e.deploy_id AND l.stream <> 'system'),
                  (SELECT extract(epoch FROM max(l.recorded_at)) FROM deploy_logs l
                    WHERE l.deploy_id = e.deploy_id AND l.stream <> 'system')
           FROM events e WHERE e.deploy_id = ANY(%s::uuid[]) GROUP BY e.deploy_id""",
        (ids,),
    )
    rows = [[float(x) for x in r[1:]] for r in await cur.fetchall()]
    ms = lambda xs: median(xs) * 1000  # noqa: E731
    starts = sorted(r[0] for r in rows)
    lasts = sorted(r[4] for r in rows)
    empty = [starts[k] - lasts[k - cap] for k in range(cap, len(starts))]
    table(
        ["phase (median)", "ms"],
        [["Started -> first terraform line", ms([r[3] - r[0] for r in rows])],
         ["first -> last terraform line", ms([r[4] - r[3] for r in rows])],
         ["last line -> StatePersisted", ms([r[1] - r[4] for r in rows])],
         ["StatePersisted -> Succeeded", ms([r[2] - r[1] for r in rows])],
         ["slot empty: a last line -> the next Started", ms(empty)],
         ["slot empty, p90", sorted(empty)[int(0.9 * (len(empty) - 1))] * 1000]],
        title="Where a slot's time goes (from recorded_at)",
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--deploys", type=int)
    ap.add_argument("--cap", type=int, default=4)
    ap.add_argument("--runner", default="both", choices=["local", "docker", "both"])
    ap.add_argument("--hand-runs", type=int)
    ap.add_argument("--steps-anchor", action="store_true",
                    help="also the runs by hand with the run's own steps (init, validate, apply)")
    ap.add_argument("--instrument", action="store_true", help="time the Docker runner's engine calls")
    ap.add_argument("--pyspy", type=float, default=0.0, help="py-spy this process for S seconds of the run")
    ap.add_argument("--no-prefetch", action="store_true", help="dispatch lanes = cap (no spare lane)")
    ap.add_argument("--trace", action="store_true", help="where each slot's time goes")
    args = ap.parse_args()
    global SPY, TRACE
    SPY, TRACE = args.pyspy, args.trace
    if args.no_prefetch:
        import service.worker

        service.worker.lane_count = lambda cap: cap
    if args.instrument:
        instrument_docker()
    cap = args.cap
    kinds = ["local", "docker"] if args.runner == "both" else [args.runner]
    rows: list[list[object]] = []
    extra: list[list[object]] = []
    notes = []
    with cluster() as pg, tempfile.TemporaryDirectory() as data_dir:
        for kind in kinds:
            if kind == "docker" and not docker_ok():
                notes.append(f"docker: skipped (no engine answers or no image {RUNNER_IMAGE})")
                continue
            n = args.deploys or ((8 if kind == "local" else 4) if args.quick else 40)
            hand_runs = args.hand_runs or (1 if args.quick else 5)
            t1 = median([by_hand(kind) for _ in range(hand_runs)])
            url = new_database(pg)
            m = asyncio.run(measure(url, data_dir, kind, n, cap))
            pooled = by_hand_pool(kind, n, cap)
            if args.steps_anchor:
                with_steps = by_hand_pool(kind, n, cap, validate=True)
                notes.append(
                    f"{kind}: by hand with the run's steps (init, validate, apply), {cap} at a time: "
                    f"{with_steps:.1f} s; tfdeploy / those: {m['makespan'] / with_steps:.2f}"
                )
            waves = -(-n // cap)
            ideal, ideal_tf = waves * 1.0, waves * t1
            rows.append([kind, n, cap, m["makespan"], ideal, m["makespan"] / ideal, t1, ideal_tf,
                         pooled, m["makespan"] / pooled, m["busy"] / (cap * m["makespan"]), m["peak"]])
            extra.append([kind, m["run"], t1, m["gap"]])
    table(["runner", "deploys", "cap", "makespan (s)", "ideal (s)", "ratio", "by hand t1 (s)",
           "waves × t1 (s)", f"by hand, {cap} at a time (s)", "ratio to by hand", "slot use",
           "peak running"],
          rows, title="Cap utilisation (target makespan <= 1.10 × ideal)")
    if extra:
        table(["runner", "Started -> Succeeded median (s)", "by hand t1 (s)",
               "slot hand-over: Succeeded -> next Started median (ms)"], extra,
              title="Where a slot's time goes")
    if TIMINGS:
        table(["DockerRunner call", "calls", "median (ms)", "p90 (ms)"],
              [[k, len(v), median(v), sorted(v)[int(0.9 * (len(v) - 1))]] for k, v in TIMINGS.items()],
              title="Docker runner calls (timed in the bench; reserve includes the wait for a place)")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
