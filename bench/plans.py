"""Plans (issue #14): a plan-only deploy end to end against ``terraform init && terraform plan``
by hand, and approve -> ``Started`` of the apply with a free slot.

    .venv/bin/python bench/plans.py [--quick] [--runs N] [--approvals N] [--runner local|docker|both]

1. Plan-only: ``POST /deploys {"action": "plan"}`` -> ``succeeded`` (the plan made, read from
   ``terraform show -json``, recorded as ``Planned``), one ``terraform_data`` with a provisioner,
   a new workspace each time (no prior state). By hand, the same run's minimum: local, bare
   ``terraform init`` then ``terraform plan`` in a fresh temp dir (same flags and minimal
   environment as the runner); Docker, two ``docker run --rm --network none`` of the runner image
   (init, then plan) on a bind-mounted temp dir. tfdeploy runs init, validate, plan -out and show
   -json: two terraform processes more than by hand, in one sandbox / one container. Runs
   alternate tfdeploy and by hand; medians; ratio = tfdeploy / by hand.
2. Approve -> Started: a deploy with ``"auto_approve": false`` (a trivial config) is planned;
   once it is ``planned`` (nothing else running: a free slot, an idle worker),
   ``POST /deploys/{id}/approve``. The latency is ``Started(step apply).recorded_at -
   Approved.recorded_at`` (both PostgreSQL's clock_timestamp(), in their append transactions);
   also the client's view, approve sent -> ``Started`` visible. Each deploy then runs to its end
   before the next. Measured against the worker as it is (procrastinate's fetch); the lead's
   dispatcher replaces that fetch.

The API (in-process) and a worker share this process, as ``tfdeploy up`` runs them.
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
    pct,
    table,
)

ONE_RESOURCE = """
variable "name" { default = "web" }
resource "terraform_data" "web" {
  input = var.name
  provisioner "local-exec" { command = "echo creating ${self.input}" }
}
"""
TRIVIAL = 'resource "terraform_data" "x" {}\n'
TERMINAL = ("succeeded", "failed", "cancelled", "discarded")


def by_hand_local() -> float:
    d = tempfile.mkdtemp(prefix="tfbench-")
    try:
        Path(d, "main.tf").write_text(ONE_RESOURCE)
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": d, "TMPDIR": d, "LANG": "C.UTF-8",
               "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1"}
        t0 = time.perf_counter()
        for args in (["init", "-input=false", "-no-color"], ["plan", "-input=false", "-no-color"]):
            subprocess.run(["terraform", *args], cwd=d, env=env, check=True, capture_output=True)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)


def same_steps_local() -> float:
    """The steps tfdeploy's plan run makes, by hand: init, validate, plan -out, show -json."""
    d = tempfile.mkdtemp(prefix="tfbench-")
    try:
        Path(d, "main.tf").write_text(ONE_RESOURCE)
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": d, "TMPDIR": d, "LANG": "C.UTF-8",
               "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1"}
        t0 = time.perf_counter()
        for args in (
            ["init", "-input=false", "-no-color"],
            ["validate", "-no-color"],
            ["plan", "-input=false", "-no-color", f"-out={d}/plan.tfplan"],
        ):
            subprocess.run(["terraform", *args], cwd=d, env=env, check=True, capture_output=True)
        with open(Path(d, "plan.json"), "wb") as out:
            subprocess.run(["terraform", "show", "-json", "-no-color", f"{d}/plan.tfplan"], cwd=d, env=env,
                           check=True, stdout=out)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)


def by_hand_docker() -> float:
    d = tempfile.mkdtemp(prefix="tfbench-")
    try:
        os.chmod(d, 0o777)
        Path(d, "main.tf").write_text(ONE_RESOURCE)
        t0 = time.perf_counter()
        for args in (["init", "-input=false", "-no-color"], ["plan", "-input=false", "-no-color"]):
            subprocess.run(
                ["docker", "run", "--rm", "--network", "none", "-v", f"{d}:/workspace", "-w", "/workspace",
                 RUNNER_IMAGE, *args],
                check=True, capture_output=True,
            )
        return time.perf_counter() - t0
    finally:
        subprocess.run(["docker", "run", "--rm", "-v", f"{d}:/w", "--entrypoint", "/bin/rm", RUNNER_IMAGE,
                        "-rf", "/w/.terraform", "/w/.terraform.lock.hcl"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


async def wait_status(h, deploy_id: str, wanted: tuple[str, ...], poll: float = 0.005) -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        cur = await h.watch.execute("SELECT status FROM deploys WHERE id = %s", (deploy_id,))
        row = await cur.fetchone()
        if row and row[0] in wanted:
            return str(row[0])
        await asyncio.sleep(poll)
    raise RuntimeError(f"deploy {deploy_id} not {wanted} after 300 s")


async def plan_only(
    url: str, data_dir: str, runner: str, runs: int
) -> tuple[list[float], list[float], list[float]]:
    ours: list[float] = []
    hand: list[float] = []
    same: list[float] = []
    by_hand = by_hand_local if runner == "local" else by_hand_docker
    async with harness(url, data_dir, runner) as h:
        for i in range(runs + 1):  # round 0 warms both up and is not counted
            t0 = time.perf_counter()
            deploy_id = await h.submit({"main.tf": ONE_RESOURCE}, workspace=f"plan-{runner}{i}", action="plan")
            status = await h.wait(deploy_id)
            t_ours = time.perf_counter() - t0
            if status != "succeeded":
                raise RuntimeError(f"plan {deploy_id} {status}")
            cur = await h.watch.execute(
                "SELECT count(*) FROM events WHERE deploy_id = %s AND type = 'Planned'", (deploy_id,)
            )
            if (await cur.fetchone())[0] != 1:
                raise RuntimeError(f"plan {deploy_id} has no Planned event")
            t_hand = await asyncio.to_thread(by_hand)
            t_same = await asyncio.to_thread(same_steps_local) if runner == "local" else float("nan")
            if i:
                ours.append(t_ours)
                hand.append(t_hand)
                same.append(t_same)
    return ours, hand, same


class Phases:
    """Where approve -> Started goes, timed around the worker's deployer and runner (wrapped on
    the instances here, no change under service/): the job handled, the run's inputs (the saved
    plan read and opened), the runner's place made (Docker: the container with the files),
    Started appended."""

    def __init__(self, worker, queue) -> None:  # type: ignore[no-untyped-def]
        self.marks: dict[str, dict[str, float]] = {}
        deployer, runner = worker.deployer, worker.runner

        def timed(owner, name: str, label: str):  # type: ignore[no-untyped-def]
            fn = getattr(owner, name)

            async def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
                deploy_id = str(a[0]) if a and isinstance(a[0], str) else str(getattr(a[1], "deploy_id", ""))
                marks = self.marks.setdefault(deploy_id, {})
                marks.setdefault(label + ">", time.time())
                try:
                    return await fn(*a, **kw)
                finally:
                    marks[label + "<"] = time.time()

            setattr(owner, name, wrapper)

        timed(deployer, "handle", "handle")
        timed(deployer, "prepare", "prepare")
        timed(runner, "prepare", "runner.prepare")
        queue.set_handler(deployer.handle)  # the queue holds the handler it was given

    def split(self, deploy_id: str, approved: float, started: float) -> list[float]:
        m = self.marks.get(deploy_id, {})
        # The apply run's marks are the last ones (the plan run set the first "...>" marks).
        points = [approved, m.get("handle>", float("nan")), m.get("prepare<", float("nan")),
                  m.get("runner.prepare<", float("nan")), started]
        return [(b - a) * 1000 for a, b in zip(points, points[1:], strict=False)]


APPROVE_PHASES = [
    "Approved -> job handled (defer, NOTIFY, fetch)",
    "handle -> inputs ready (stream, inputs, saved plan)",
    "inputs -> runner's place made",
    "place -> Started appended",
]


async def approvals(
    url: str, data_dir: str, runner: str, n: int
) -> tuple[list[float], list[float], list[list[float]]]:
    server: list[float] = []
    client: list[float] = []
    splits: list[list[float]] = []
    async with harness(url, data_dir, runner) as h:
        phases = Phases(h.worker, h.services.queue)
        for i in range(n + 1):  # the first warms up
            deploy_id = await h.submit({"main.tf": TRIVIAL}, workspace=f"approve-{runner}{i}", auto_approve=False)
            if await wait_status(h, deploy_id, ("planned", *TERMINAL)) != "planned":
                raise RuntimeError(f"deploy {deploy_id} was not planned")
            await asyncio.sleep(0.05)  # the plan run's slot is released, the worker idle
            phases.marks.pop(deploy_id, None)  # only the apply run's marks
            t0 = time.perf_counter()
            r = await h.client.post(f"/deploys/{deploy_id}/approve")
            if r.status_code != 202:
                raise RuntimeError(f"approve: {r.status_code} {r.text}")
            while True:
                cur = await h.watch.execute(
                    "SELECT count(*) FROM events WHERE deploy_id = %s AND type = 'Started'", (deploy_id,)
                )
                if (await cur.fetchone())[0] >= 2:
                    break
                await asyncio.sleep(0.001)
            t_client = time.perf_counter() - t0
            if await wait_status(h, deploy_id, TERMINAL) != "succeeded":
                raise RuntimeError(f"deploy {deploy_id} did not succeed")
            cur = await h.watch.execute(
                """SELECT extract(epoch FROM max(recorded_at) FILTER (WHERE type = 'Approved')),
                          extract(epoch FROM max(recorded_at) FILTER (WHERE type = 'Started'))
                   FROM events WHERE deploy_id = %s""",
                (deploy_id,),
            )
            approved, started = (float(x) for x in await cur.fetchone())
            if i:
                server.append((started - approved) * 1000)
                client.append(t_client * 1000)
                splits.append(phases.split(deploy_id, approved, started))
    return server, client, splits


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, help="plan-only runs per runner (default 10)")
    ap.add_argument("--approvals", type=int, help="approvals per runner (default 50)")
    ap.add_argument("--runner", default="both", choices=["local", "docker", "both"])
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 10)
    n = args.approvals or (2 if args.quick else 50)
    kinds = ["local", "docker"] if args.runner == "both" else [args.runner]
    plan_rows: list[list[object]] = []
    approve_rows: list[list[object]] = []
    breakdown: dict[str, list[list[float]]] = {}
    notes: list[str] = []
    with cluster() as pg, tempfile.TemporaryDirectory() as data_dir:
        for kind in kinds:
            if kind == "docker" and not docker_ok():
                notes.append(f"docker: skipped (no engine answers or no image {RUNNER_IMAGE})")
                continue
            ours, hand, same = asyncio.run(plan_only(new_database(pg), data_dir, kind, runs))
            target = "<= 1.15" if kind == "local" else "<= 1.00"
            plan_rows.append([kind, runs, median(ours) * 1000, median(hand) * 1000,
                              median(ours) / median(hand), (median(ours) - median(hand)) * 1000, target,
                              median(same) * 1000, median(ours) / median(same)])
            server, client, splits = asyncio.run(approvals(new_database(pg), data_dir, kind, n))
            approve_rows.append([kind, n, pct(server, 50), pct(server, 99), max(server),
                                 pct(client, 50), pct(client, 99), "20 / 100"])
            breakdown[kind] = splits
    table(["runner", "n", "tfdeploy median (ms)", "by hand median (ms)", "ratio", "overhead (ms)", "target",
           "same 4 steps by hand (ms)", "ratio to those"],
          plan_rows, title="Plan-only deploy, POST -> succeeded vs terraform init && terraform plan by hand")
    table(["runner", "n", "p50 (ms)", "p99 (ms)", "max (ms)", "client p50 (ms)", "client p99 (ms)",
           "target p50 / p99"],
          approve_rows, title="Approve -> Started (Approved.recorded_at -> Started.recorded_at), a free slot")
    if breakdown:
        kinds_done = list(breakdown)
        table(["approve -> Started, phase (median ms)", *kinds_done],
              [[p, *(median([s[k] for s in breakdown[kind]]) for kind in kinds_done)]
               for k, p in enumerate(APPROVE_PHASES)],
              title="Where approve -> Started goes")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
