"""The local runner's files: a run's private temp dir made, its output tailed (holes punched
behind the reader), what it left read back with the file checks."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from service.runners import sandbox
from service.runners._common import Artifacts, read_artifacts_with, safe_relative_path
from service.runners.base import RunRequest
from service.runners.output import RunOutput, StepRecord
from service.runners.script import MARKER_PREFIX, Layout
from service.runners.statecheck import read_local_artifact

TAIL_POLL = 0.05
TAIL_CHUNK = 64 * 1024


async def read_child_pid(fd: int) -> int | None:
    """The sandbox's pid 1 as the host sees it, from bwrap's --info-fd (closes ``fd``)."""

    def read() -> int | None:
        data = b""
        with os.fdopen(fd, "rb", buffering=0) as f:
            while b"}" not in data:
                chunk = f.read(4096)
                if not chunk:
                    return None
                data += chunk
        pid = json.loads(data[: data.index(b"}") + 1]).get("child-pid")
        return pid if isinstance(pid, int) else None

    try:
        return await asyncio.wait_for(asyncio.to_thread(read), 30)
    except (TimeoutError, ValueError):
        return None


def read_artifacts(layout: Layout, request: RunRequest, record: StepRecord) -> Artifacts:
    """The run's files, each with the file checks (statecheck)."""
    return read_artifacts_with(
        lambda path, limit: read_local_artifact(path, limit, root=layout.root),
        layout, request, record,
    )


_libc: Any = None
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _punch(fd: int, length: int) -> None:
    """Free the disk blocks of an output file's first ``length`` bytes (already read), so a
    flood does not fill the disk while it is tailed. Best effort: not every file system can."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    with contextlib.suppress(Exception):
        _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        ctypes.c_long(0), ctypes.c_long(length))


async def tail_file(path: Path, name: str, out: RunOutput, ended: asyncio.Event) -> None:
    """Follow an output file until the process ended and the file is read to its end. Each
    chunk is handed on (and waited for: backpressure) before the next is read."""
    read = 0
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)  # RDWR: to punch holes
    try:
        while True:
            data = os.read(fd, TAIL_CHUNK)
            if data:
                await out.feed(name, data)
                read += len(data)
                if read >= 1 << 20:
                    _punch(fd, read & ~0xFFFF)
                continue
            if ended.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), TAIL_POLL)
    finally:
        os.close(fd)


def read_tail(path: Path, size: int) -> str:
    """The last ``size`` bytes of a file, as text (the file may be huge, or holed), without
    the run script's step records (bookkeeping, not output)."""
    try:
        # The status file lies in the run's own directory: no link followed, no FIFO waited on,
        # nothing but a regular file read.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return ""
        with os.fdopen(fd, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - size, 0))
            text = f.read(size).decode(errors="replace").replace("\x00", "")
    except OSError:
        return ""
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith(MARKER_PREFIX))


def prepare_dir(request: RunRequest, *, sandboxed: bool) -> Path:
    """The run's private temp dir: sandbox/ with config/ (the files, the start state, the lock
    file), home/, the saved plan and the CLI config; handed to the sandbox's user."""
    root = Path(tempfile.mkdtemp(prefix="tfdeploy-run-"))  # mode 700
    try:
        run_dir = root / "sandbox"
        layout = Layout(str(run_dir))
        config = Path(layout.config)
        run_dir.mkdir(mode=0o700)
        config.mkdir(mode=0o700)
        Path(layout.home).mkdir(mode=0o700)

        def write(path: Path | str, data: bytes) -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)

        for name, content in request.files.items():
            path = config / safe_relative_path(name)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write(path, content.encode())
        if request.state is not None:
            write(layout.state, request.state)
        if request.lock_file is not None:
            write(layout.lock_file, request.lock_file)
        if request.saved_plan is not None:
            write(layout.plan, request.saved_plan)
        if request.providers is not None:
            setup = request.providers if sandboxed else request.providers.with_host_paths()
            write(layout.cli_config, setup.cli_config.encode())
        if sandboxed:
            sandbox.prepare_run_dir(run_dir)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root
