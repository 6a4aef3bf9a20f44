"""Orchestration overhead: end to end ``POST /deploys`` -> ``succeeded`` for a one-resource
``terraform_data`` config, against the same init + apply run by hand, same run.

    .venv/bin/python bench/overhead.py [--quick] [--runs N] [--runner local|docker|both]

- local: tfdeploy with the local runner vs bare ``terraform init`` then ``terraform apply`` in a
  fresh temp dir (same flags and minimal environment as the runner).
- docker: tfdeploy with the Docker runner vs two ``docker run --rm --network none`` of the same
  runner image (init, then apply) on a bind-mounted temp dir.

tfdeploy runs the API (in-process) and a worker in this process, as ``tfdeploy up`` does; the
clock starts before the POST and stops when the read model says ``succeeded`` (polled every 5
ms). Each deploy uses a new workspace (no prior state), like the fresh dir by hand. Runs
alternate tfdeploy and by-hand; medians of N runs, ratio = tfdeploy / by hand.
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

from bench._common import RUNNER_IMAGE, cluster, docker_ok, harness, median, new_database, table  # noqa: E402

ONE_RESOURCE = """
variable "name" { default = "web" }
resource "terraform_data" "web" {
  input = var.name
  provisioner "local-exec" { command = "echo creating ${self.input}" }
}
"""


def by_hand_local() -> float:
    d = tempfile.mkdtemp(prefix="tfbench-")
    try:
        Path(d, "main.tf").write_text(ONE_RESOURCE)
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": d, "TMPDIR": d, "LANG": "C.UTF-8",
               "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1"}
        t0 = time.perf_counter()
        for args in (["init", "-input=false", "-no-color"], ["apply", "-auto-approve", "-input=false", "-no-color"]):
            subprocess.run(["terraform", *args], cwd=d, env=env, check=True, capture_output=True)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)


def by_hand_docker() -> float:
    d = tempfile.mkdtemp(prefix="tfbench-")
    try:
        os.chmod(d, 0o777)
        Path(d, "main.tf").write_text(ONE_RESOURCE)
        t0 = time.perf_counter()
        for args in (["init", "-input=false", "-no-color"], ["apply", "-auto-approve", "-input=false", "-no-color"]):
            subprocess.run(
                ["docker", "run", "--rm", "--network", "none", "-v", f"{d}:/workspace", "-w", "/workspace",
                 RUNNER_IMAGE, *args],
                check=True, capture_output=True,
            )
        return time.perf_counter() - t0
    finally:
        subprocess.run(["docker", "run", "--rm", "-v", f"{d}:/w", "--entrypoint", "/bin/rm", RUNNER_IMAGE,
                        "-rf", "/w/.terraform", "/w/.terraform.lock.hcl", "/w/terraform.tfstate"],
                       capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


PHASES = [
    "POST sent -> Requested",
    "Requested -> Started",
    "Started -> first log line",
    "first -> last log line",
    "last log line -> StatePersisted",
    "StatePersisted -> Succeeded",
    "Succeeded -> client sees it",
]


async def phases(h, deploy_id: str, t_sent: float, t_seen: float) -> list[float]:  # type: ignore[no-untyped-def]
    """Where one deploy's time went, from the recorded_at of its events and log lines (the
    database's clock_timestamp(), the same wall clock as this process's time.time())."""
    cur = await h.watch.execute(
        """SELECT extract(epoch FROM max(recorded_at) FILTER (WHERE type = 'Requested')),
                  extract(epoch FROM max(recorded_at) FILTER (WHERE type = 'Started')),
                  extract(epoch FROM max(recorded_at) FILTER (WHERE type = 'StatePersisted')),
                  extract(epoch FROM max(recorded_at) FILTER (WHERE type = 'Succeeded'))
           FROM events WHERE deploy_id = %s""",
        (deploy_id,),
    )
    req, started, persisted, succeeded = (float(x) for x in await cur.fetchone())
    cur = await h.watch.execute(
        "SELECT extract(epoch FROM min(recorded_at)), extract(epoch FROM max(recorded_at)) "
        "FROM deploy_logs WHERE deploy_id = %s AND stream <> 'system'",
        (deploy_id,),
    )
    first, last = (float(x) for x in await cur.fetchone())
    marks = [t_sent, req, started, first, last, persisted, succeeded, t_seen]
    return [(b - a) * 1000 for a, b in zip(marks, marks[1:], strict=False)]


async def measure(url: str, data_dir: str, runner: str, runs: int) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    hand: list[float] = []
    split: list[list[float]] = []
    by_hand = by_hand_local if runner == "local" else by_hand_docker
    async with harness(url, data_dir, runner) as h:
        for i in range(runs + 1):  # round 0 warms both up and is not counted
            t0 = time.perf_counter()
            wall0 = time.time()
            deploy_id = await h.submit({"main.tf": ONE_RESOURCE}, workspace=f"{runner}{i}")
            status = await h.wait(deploy_id)
            t_ours = time.perf_counter() - t0
            wall1 = time.time()
            if status != "succeeded":
                raise RuntimeError(f"deploy {deploy_id} {status}")
            t_hand = await asyncio.to_thread(by_hand)
            if i:
                ours.append(t_ours)
                hand.append(t_hand)
                split.append(await phases(h, deploy_id, wall0, wall1))
    BREAKDOWN[runner] = [median([s[k] for s in split]) for k in range(len(PHASES))]
    return ours, hand


BREAKDOWN: dict[str, list[float]] = {}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--runner", default="both", choices=["local", "docker", "both"])
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 10)
    kinds = ["local", "docker"] if args.runner == "both" else [args.runner]
    rows: list[list[object]] = []
    notes = []
    with cluster() as pg, tempfile.TemporaryDirectory() as data_dir:
        for kind in kinds:
            if kind == "docker" and not docker_ok():
                notes.append(f"docker: skipped (no engine answers or no image {RUNNER_IMAGE})")
                continue
            url = new_database(pg)
            ours, hand = asyncio.run(measure(url, data_dir, kind, runs))
            target = "<= 1.15" if kind == "local" else "<= 1.00"
            rows.append([kind, runs, median(ours) * 1000, median(hand) * 1000,
                         median(ours) / median(hand), (median(ours) - median(hand)) * 1000, target])
    table(["runner", "n", "tfdeploy median (ms)", "by hand median (ms)", "ratio", "overhead (ms)", "target"],
          rows, title="Orchestration overhead, POST -> succeeded vs init+apply by hand")
    for n in notes:
        print(n)
    if BREAKDOWN:
        kinds_done = list(BREAKDOWN)
        table(["phase (median ms)", *kinds_done],
              [[p, *(BREAKDOWN[k][i] for k in kinds_done)] for i, p in enumerate(PHASES)],
              title="Where tfdeploy's time goes (events' and log lines' recorded_at)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
