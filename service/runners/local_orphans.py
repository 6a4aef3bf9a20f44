"""A local run's record, and taking over the run of a worker that died.

Before a run starts, a record ``<data dir>/local-runs/<deploy>-a<attempt>-r<run>.json`` names
its process group, the sandbox's pid 1, its temp dir and its steps (and, once terraform ended,
its exit code). A worker's recovery (service/recovery.py) finds the latest record of an
attempt, interrupts the run if it still goes (SIGINT to the sandbox's pid 1, which passes it on;
SIGKILL to the group after the grace) and reads what it left: the run script's status file, the
artifacts (checked), the tail of its stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from service.runners._common import finish_result
from service.runners.base import RunRequest, RunResult, Step
from service.runners.local_files import read_artifacts, read_tail
from service.runners.output import StepRecord
from service.runners.script import Layout

TAIL_BYTES = 16 * 1024  # of a dead worker's run's stderr, for its error


class RunRecords:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @staticmethod
    def _safe(deploy_id: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_.-]", "-", deploy_id)[:80]

    def path(self, deploy_id: str, attempt: int, run: int) -> Path:
        return self.dir / f"{self._safe(deploy_id)}-a{attempt}-r{run}.json"

    def of_attempt(self, deploy_id: str, attempt: int) -> list[tuple[int, Path]]:
        """The attempt's records, by run number."""
        found = []
        for path in self.dir.glob(f"{self._safe(deploy_id)}-a{attempt}-r*.json"):
            run = path.stem.rsplit("-r", 1)[-1]
            if run.isdigit():
                found.append((int(run), path))
        return sorted(found)

    def write(self, request: RunRequest, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.path(request.deploy_id, request.attempt, request.run)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    async def discard(self, deploy_id: str, attempt: int) -> None:
        """Remove the temp dirs and records of (deploy, attempt), if any."""
        for _, path in self.of_attempt(deploy_id, attempt):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                record = {}
            root = Path(record.get("root", ""))
            if root.name.startswith("tfdeploy-run-"):
                await asyncio.to_thread(shutil.rmtree, root, True)
            with contextlib.suppress(OSError):
                path.unlink()


async def collect(records: RunRecords, deploy_id: str, attempt: int, grace: float) -> RunResult | None:
    """Take over the latest run of (deploy, attempt) that a dead worker left on this host:
    interrupt it if it still runs (SIGINT, grace, SIGKILL) and read what it left. None when
    there is no record (another host, or it never started). The temp dir is kept: discard it
    once the outcome is recorded. The exit code of a process that is not our child is unknown;
    the run script's status file tells which steps ended and how: all well -> 0, a step that
    failed -> its code, else (interrupted) 130."""
    found = records.of_attempt(deploy_id, attempt)
    if not found:
        return None
    started = time.monotonic()
    try:
        record = json.loads(found[-1][1].read_text())
    except (OSError, ValueError):
        return None
    pgid, root = int(record["pgid"]), Path(record["root"])
    recorded = record.get("exit_code")
    # Ended on record: its group id may belong to someone else by now, never signal it.
    was_running = not isinstance(recorded, int) and group_alive(pgid)
    if was_running:
        sandbox_pid = record.get("sandbox_pid")
        if record.get("sandboxed") and not isinstance(sandbox_pid, int):
            sandbox_pid = find_sandbox_pid(pgid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if record.get("sandboxed"):
                if isinstance(sandbox_pid, int):
                    os.kill(sandbox_pid, signal.SIGINT)  # the sandbox's pid 1 passes it on
            else:
                os.killpg(pgid, signal.SIGINT)
        await wait_group(pgid, grace)
        if group_alive(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            await wait_group(pgid, 30)
    steps = [Step(**s) for s in record.get("steps") or [{"name": "apply"}]]
    request = RunRequest(
        deploy_id=deploy_id, attempt=attempt, run=int(record.get("run", 1)), workspace="",
        steps=steps, files={}, state=b"{}" if record.get("start_state") else None,
        max_state_bytes=int(record.get("max_state_bytes") or 64 * 1024 * 1024),
    )
    layout = Layout(str(root / "sandbox"))
    steps_record = StepRecord(steps)
    for line in (await asyncio.to_thread(read_tail, Path(layout.status), 64 * 1024)).splitlines():
        steps_record.record(line)
    artifacts = await asyncio.to_thread(read_artifacts, layout, request, steps_record)
    tail = await asyncio.to_thread(read_tail, root / "stderr", TAIL_BYTES)
    if isinstance(recorded, int):
        # Terraform had ended and its exit code was recorded: the dead worker only missed
        # persisting the state and recording the outcome.
        exit_code = recorded
        error = "" if recorded == 0 else f"worker lost after terraform ended\n{tail}".strip()
    elif steps_record.failed is None and all(s.name in steps_record.done for s in steps):
        # Every step ended well (the run script's own records): it only missed its worker.
        exit_code, error = 0, ""
    else:
        exit_code = steps_record.failed_rc or 130
        what = "interrupted" if was_running else "it had ended"
        error = f"worker lost while terraform ran ({what})\n{tail}".strip()
    failed = steps_record.failed_step(exit_code)
    return finish_result(
        request, exit_code=exit_code, record=steps_record, artifacts=artifacts,
        diagnostics={failed: tail} if failed else {}, error=error, started=started,
    )


async def wait_group(pgid: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while group_alive(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110 - not our child: poll
        await asyncio.sleep(0.2)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader (its parent died and nobody reaped it yet) counts as gone.
    try:
        with open(f"/proc/{pgid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                return other_members(pgid)
    except OSError:
        pass
    return True


def other_members(pgid: int) -> bool:
    """Whether a live (non-zombie) process other than the leader is in group ``pgid``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pgid:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[-1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def find_sandbox_pid(holder: int) -> int | None:
    """The sandbox's pid 1 as the host sees it, when bwrap's --info-fd did not say: the child
    of the child (bwrap) of the holder process."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    bwrap = next((p for p in pids if _ppid(p) == holder), None)
    if bwrap is None:
        return None
    return next((p for p in pids if _ppid(p) == bwrap), None)

