"""Orchestration overhead: end to end ``POST /deploys`` -> ``succeeded`` for a one-resource
``terraform_data`` config, against the same init + apply run by hand, same run.

    .venv/bin/python bench/overhead.py [--quick] [--runs N] [--runner local|docker|both]
                                       [--instrument] [--poll SECONDS]

- local: tfdeploy with the local runner vs bare ``terraform init`` then ``terraform apply`` in a
  fresh temp dir (same flags and minimal environment as the runner).
- docker: tfdeploy with the Docker runner vs two ``docker run --rm --network none`` of the same
  runner image (init, then apply) on a bind-mounted temp dir.

tfdeploy runs the API (in-process) and a worker in this process, as ``tfdeploy up`` does; the
clock starts before the POST and stops when the read model says ``succeeded`` (polled every 5
ms). Each deploy uses a new workspace (no prior state), like the fresh dir by hand. Runs
alternate tfdeploy and by-hand; medians of N runs, ratio = tfdeploy / by hand.

``--instrument`` (local runner): wraps the deployer's and the local runner's steps from here (no
change under service/) and prints, per phase, the median ms of a tfdeploy run next to the
by-hand init and apply, plus the CPU time terraform's processes used in each. ``--poll`` sets
the client's polling of the read model (default 5 ms; on 2 cores it steals CPU from terraform).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import os
import resource
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
            t1 = time.perf_counter()
            subprocess.run(["terraform", *args], cwd=d, env=env, check=True, capture_output=True)
            HAND_SPLIT.setdefault(args[0], []).append((time.perf_counter() - t1) * 1000)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)


HAND_SPLIT: dict[str, list[float]] = {}


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


# ---------------------------------------------------------------- --instrument (local runner)

MARKS: list[tuple[str, float]] = []  # (label, time.time()) of the deploy in flight
FLUSHES: list[tuple[float, float, int]] = []  # LogWriter flushes: start, end, lines
POLLS: list[tuple[float, float]] = []  # the client's status reads: start, end
POPEN: dict[str, list[float]] = {}  # Popen() durations: in the event loop (tfdeploy), by hand


def _mark(label: str) -> None:
    MARKS.append((label, time.time()))


def _wrap(owner: object, name: str, label: str | None = None) -> None:
    """Mark ``label>`` / ``label<`` around ``owner.name`` (a class's or a module's)."""
    fn = getattr(owner, name)
    label = label or name
    if inspect.iscoroutinefunction(fn):
        async def timed_async(*a, __fn=fn, __label=label, **kw):  # type: ignore[no-untyped-def]
            _mark(__label + ">")
            try:
                return await __fn(*a, **kw)
            finally:
                _mark(__label + "<")
        setattr(owner, name, functools.wraps(fn)(timed_async))
    else:
        def timed_sync(*a, __fn=fn, __label=label, **kw):  # type: ignore[no-untyped-def]
            _mark(__label + ">")
            try:
                return __fn(*a, **kw)
            finally:
                _mark(__label + "<")
        setattr(owner, name, functools.wraps(fn)(timed_sync))


def instrument_local() -> None:
    """Time the deployer's and the local runner's steps (wrapping them here, in the bench)."""
    from service import deployer as dep
    from service import deployer_outcome, store
    from service.deploys import Deploys
    from service.runners import local
    from service.statestores import index

    _wrap(dep.Deployer, "handle")
    _wrap(store, "read_stream")
    _wrap(dep.Deployer, "prepare")
    _wrap(local.LocalRunner, "reserve")
    _wrap(local.LocalRunner, "prepare", "runner_prepare")
    _wrap(local.LocalRunner, "_prepare_dir")
    _wrap(local.LocalRunner, "run")
    _wrap(local.LocalRunner, "_write_record")
    _wrap(dep.Deployer, "conclude")
    _wrap(deployer_outcome.Outcomes, "_wait_for_db")
    _wrap(index, "next_version")
    _wrap(deployer_outcome, "put_with_retries")
    _wrap(index, "record_version")
    _wrap(dep.LogWriter, "flush")
    _wrap(local.LocalSlot, "release")

    orig_execute = Deploys.execute

    async def execute(self, deploy_id, command, actor):  # type: ignore[no-untyped-def]
        label = "execute:" + type(command).__name__
        _mark(label + ">")
        try:
            return await orig_execute(self, deploy_id, command, actor)
        finally:
            _mark(label + "<")
    Deploys.execute = execute  # type: ignore[method-assign]

    orig_spawn = asyncio.create_subprocess_exec

    async def spawn(*a, **kw):  # type: ignore[no-untyped-def]
        _mark("spawn>")
        proc = await orig_spawn(*a, **kw)
        _mark("spawn<")
        orig_wait = proc.wait

        async def wait():  # type: ignore[no-untyped-def]
            rc = await orig_wait()
            _mark("exited")
            return rc
        proc.wait = wait  # type: ignore[method-assign]
        return proc
    asyncio.create_subprocess_exec = spawn

    import threading

    orig_popen_init = subprocess.Popen.__init__

    def popen_init(self, *a, **kw):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        orig_popen_init(self, *a, **kw)
        who = "main" if threading.current_thread() is threading.main_thread() else "hand"
        POPEN.setdefault(who, []).append((time.perf_counter() - t0) * 1000)
    subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]

    orig_waitpid = os.waitpid

    def waitpid(pid, options):  # type: ignore[no-untyped-def]
        r = orig_waitpid(pid, options)
        if threading.current_thread() is not threading.main_thread() and r[0] and \
                threading.current_thread().name.startswith("asyncio-waitpid-"):
            _mark("reaped")  # asyncio's child watcher thread: the process really ended here
        return r
    os.waitpid = waitpid

    orig_line = dep.LogWriter.line

    async def line(self, stream, text):  # type: ignore[no-untyped-def]
        _mark("line:" + stream)
        await orig_line(self, stream, text)
    dep.LogWriter.line = line  # type: ignore[method-assign]

    orig_flush_locked = dep.LogWriter._flush_locked

    async def flush_locked(self):  # type: ignore[no-untyped-def]
        n = len(self._buffer)
        t0 = time.time()
        try:
            await orig_flush_locked(self)
        finally:
            if n:
                FLUSHES.append((t0, time.time(), n))
    dep.LogWriter._flush_locked = flush_locked  # type: ignore[method-assign]


def _first(label: str, after: float = 0.0) -> float:
    return next((t for lab, t in MARKS if lab == label and t >= after), float("nan"))


def _last(label: str) -> float:
    return next((t for lab, t in reversed(MARKS) if lab == label), float("nan"))


STEPS: dict[str, list[float]] = {}
STEP_ORDER: list[str] = []


def _step(name: str, ms: float) -> None:
    if name not in STEPS:
        STEP_ORDER.append(name)
    STEPS.setdefault(name, []).append(ms)


def record_steps(wall0: float, req: float, started: float, persisted: float, succeeded: float,
                 wall1: float, cpu_ours: float, cpu_hand: float) -> None:
    """One deploy's timeline from MARKS (and its events' recorded_at) into STEPS."""
    def ms(a: float, b: float) -> float:
        return (b - a) * 1000

    handle = _first("handle>")
    # The run's steps (init, validate, apply) run in ONE sandboxed process (service/runners/
    # script.py): spawned once, exits once.
    spawned, exited = _first("spawn<", _first("run>")), _first("exited", _first("run>"))
    run_e = _last("run<")
    _step("POST sent -> Requested (event)", ms(wall0, req))
    _step("Requested -> job handled (queue: defer, NOTIFY, fetch)", ms(req, handle))
    _step("  handle: read_stream + fold", ms(handle, _first("prepare>")))
    _step("  prepare (inputs, secrets, index.latest)", ms(_first("prepare>"), _first("prepare<")))
    _step("  reserve (a place: flock)", ms(_first("reserve>"), _first("reserve<")))
    _step("  runner prepare (run dir, files)", ms(_first("runner_prepare>"), _first("runner_prepare<")))
    _step("    of which _prepare_dir", ms(_first("_prepare_dir>"), _first("_prepare_dir<")))
    _step("  execute StartAttempt", ms(_first("execute:StartAttempt>"), _first("execute:StartAttempt<")))
    _step("job handled -> Started (sum of the 4 above)", ms(handle, started))
    _step("Started -> runner.run entered", ms(started, _first("run>")))
    _step("run> -> sandbox spawned (env, script, fork/exec)", ms(_first("run>"), spawned))
    _step("sandbox: spawned -> exit noticed (init, validate, apply)", ms(spawned, exited))
    _step("  reaped (waitpid) -> exit noticed in the loop", ms(_first("reaped", spawned), exited))
    _step("exit -> run returns (output drained, state read, record)", ms(exited, run_e))
    _step("run returns -> StatePersisted (conclude)", ms(run_e, persisted))
    _step("  conclude: _wait_for_db", ms(_first("_wait_for_db>"), _first("_wait_for_db<")))
    _step("  conclude: next_version", ms(_first("next_version>"), _first("next_version<")))
    _step("  conclude: state store put", ms(_first("put_with_retries>"), _first("put_with_retries<")))
    _step("  conclude: record_version", ms(_first("record_version>"), _first("record_version<")))
    _step("  conclude: writer.flush", ms(_first("flush>"), _first("flush<")))
    _step("  conclude: execute AttemptSucceeded", ms(_first("execute:AttemptSucceeded>"),
                                                     _first("execute:AttemptSucceeded<")))
    _step("StatePersisted -> Succeeded", ms(persisted, succeeded))
    _step("Succeeded -> client sees it", ms(succeeded, wall1))
    polls = [(a, b) for a, b in POLLS if b > succeeded]
    if polls:
        _step("  Succeeded -> the poll that saw it began", ms(succeeded, polls[-1][0]))
        _step("  that poll's query", ms(*polls[-1]))
    _step("  Succeeded -> slot.release done", ms(succeeded, _last("release<")))
    _step("  client poll query, each (median)", median([ms(a, b) for a, b in POLLS]) if POLLS else float("nan"))
    POLLS.clear()
    _step("= Started -> StatePersisted", ms(started, persisted))
    _step("= the sandboxed run (spawn -> exit)", ms(spawned, exited))
    hand_tf = sum(v[-1] for v in HAND_SPLIT.values() if v) if HAND_SPLIT else float("nan")
    _step("the run: tfdeploy - terraform by hand (paired)", ms(spawned, exited) - hand_tf)
    _step("= Started -> StatePersisted - the run", ms(started, persisted) - ms(spawned, exited))
    _step("Popen() in the event loop, each (median)",
          median(POPEN["main"]) if POPEN.get("main") else float("nan"))
    _step("Popen() by hand, each (median)",
          median(POPEN["hand"]) if POPEN.get("hand") else float("nan"))
    POPEN.clear()
    _step("log flushes during the run (count)", float(sum(1 for a, _, _ in FLUSHES if a < run_e)))
    _step("log flush duration (each, median)", median([ms(a, b) for a, b, _ in FLUSHES]) if FLUSHES else float("nan"))
    _step("terraform CPU user+sys, tfdeploy run", cpu_ours)
    _step("terraform CPU user+sys, by hand", cpu_hand)
    MARKS.clear()
    FLUSHES.clear()


def children_cpu_ms() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * 1000


def self_cpu_ms() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) * 1000


PG_DIR: Path | None = None


def pg_cpu_ms() -> float:
    """user + system CPU of the bench cluster's postmaster and its children (backends)."""
    if PG_DIR is None:
        return float("nan")
    try:
        master = int((PG_DIR / "pgdata" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(stat.parent.name) == master or int(f[1]) == master:
            total += int(f[11]) + int(f[12])
    return total * 1000 / os.sysconf("SC_CLK_TCK")


INSTRUMENT = False
POLL = 0.005  # the client's polling of the read model (--poll)


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


async def timed_wait(h, deploy_id: str) -> str:  # type: ignore[no-untyped-def]
    """``h.wait`` (same query, same sleep), recording when each read began and ended."""
    while True:
        t0 = time.time()
        cur = await h.watch.execute("SELECT status FROM deploys WHERE id = %s", (deploy_id,))
        row = await cur.fetchone()
        POLLS.append((t0, time.time()))
        if row and row[0] in ("succeeded", "failed", "cancelled"):
            return str(row[0])
        await asyncio.sleep(POLL)


async def measure(url: str, data_dir: str, runner: str, runs: int) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    hand: list[float] = []
    split: list[list[float]] = []
    by_hand = by_hand_local if runner == "local" else by_hand_docker
    async with harness(url, data_dir, runner) as h:
        for i in range(runs + 1):  # round 0 warms both up and is not counted
            cpu0 = self0 = pg0 = self1 = pg1 = 0.0
            MARKS.clear()
            FLUSHES.clear()
            if INSTRUMENT:
                cpu0, self0, pg0 = children_cpu_ms(), self_cpu_ms(), pg_cpu_ms()
            t0 = time.perf_counter()
            wall0 = time.time()
            deploy_id = await h.submit({"main.tf": ONE_RESOURCE}, workspace=f"{runner}{i}")
            status = await (timed_wait(h, deploy_id) if INSTRUMENT else h.wait(deploy_id, poll=POLL))
            t_ours = time.perf_counter() - t0
            wall1 = time.time()
            if INSTRUMENT:
                self1, pg1 = self_cpu_ms(), pg_cpu_ms()
            if status != "succeeded":
                raise RuntimeError(f"deploy {deploy_id} {status}")
            if INSTRUMENT:
                await asyncio.sleep(0.2)  # the slot's release and last flush, before the CPU reading
            cpu1 = children_cpu_ms() if INSTRUMENT else 0.0
            t_hand = await asyncio.to_thread(by_hand)
            cpu2 = children_cpu_ms() if INSTRUMENT else 0.0
            if i:
                ours.append(t_ours)
                hand.append(t_hand)
                split.append(await phases(h, deploy_id, wall0, wall1))
                if INSTRUMENT and runner == "local":
                    p = split[-1]
                    req = wall0 + p[0] / 1000
                    started = req + p[1] / 1000
                    persisted = started + sum(p[2:5]) / 1000
                    succeeded = persisted + p[5] / 1000
                    record_steps(wall0, req, started, persisted, succeeded, wall1, cpu1 - cpu0, cpu2 - cpu1)
                    _step("bench process CPU (API, worker, client), tfdeploy run", self1 - self0)
                    _step("PostgreSQL CPU (all backends), tfdeploy run", pg1 - pg0)
            elif runner == "local":
                HAND_SPLIT.clear()
    BREAKDOWN[runner] = [median([s[k] for s in split]) for k in range(len(PHASES))]
    return ours, hand


BREAKDOWN: dict[str, list[float]] = {}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--runner", default="both", choices=["local", "docker", "both"])
    ap.add_argument("--poll", type=float, default=0.005,
                    help="seconds between the client's reads of the deploy's status (default 0.005)")
    ap.add_argument("--instrument", action="store_true",
                    help="time the deployer's and the local runner's steps (local runner)")
    args = ap.parse_args()
    global INSTRUMENT, POLL, PG_DIR
    POLL = args.poll
    if args.instrument:
        INSTRUMENT = True
        instrument_local()
    runs = args.runs or (1 if args.quick else 10)
    kinds = ["local", "docker"] if args.runner == "both" else [args.runner]
    rows: list[list[object]] = []
    notes = []
    with cluster() as pg, tempfile.TemporaryDirectory() as data_dir:
        PG_DIR = pg.directory
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
    if STEPS:
        rows2 = [[k, median(STEPS[k])] for k in STEP_ORDER]
        rows2 += [[f"by hand: terraform {k}", median(v)] for k, v in HAND_SPLIT.items()]
        table(["step (local runner, median ms)", "ms"], rows2,
              title="--instrument: the local runner's steps, from inside the worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
