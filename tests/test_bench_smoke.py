"""Each bench script still runs: ``--quick`` as a subprocess, exit 0, its table printed.

No figure is checked here (benchmarks are not tests; docs/benchmarks.md holds the figures).
The scripts share the session's PostgreSQL cluster (TFDEPLOY_BENCH_PG_DIR), each in its own
database; their Docker parts skip themselves when no engine answers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPTS = [
    ("ingest.py", [], "## Ingest"),
    ("dispatch.py", [], "## Dispatch latency"),
    ("overhead.py", [], "## Orchestration overhead"),
    ("cap.py", [], "## Cap utilisation"),
    ("fanout.py", [], "## SSE fan-out"),
    ("replay.py", [], "## Projection rebuild"),
    ("providers.py", [], "## Providers"),
    ("plans.py", [], "## Plan-only deploy"),
    ("flood.py", [], "## Flood"),
    ("fairness.py", [], "## Fair turns"),
]


@pytest.mark.parametrize(("script", "args", "header"), SCRIPTS, ids=[s for s, _, _ in SCRIPTS])
def test_bench_script_runs_quick(
    pg_cluster, runner_image: str, script: str, args: list[str], header: str
) -> None:
    env = dict(
        os.environ,
        TFDEPLOY_BENCH_PG_DIR=str(pg_cluster.directory),
        TFDEPLOY_BENCH_RUNNER_IMAGE=runner_image,
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, (
        f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert header in proc.stdout, proc.stdout[-3000:]
    assert "| " in proc.stdout  # a table row
