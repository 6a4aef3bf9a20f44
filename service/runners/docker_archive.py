"""Files into and out of a run's container, as tar archives through the Engine API (no host
mounts, so a remote engine works).

In: the job dir (owned by the container's user), the deploy's files and start state under
``config/``, the lock file, the saved plan, the CLI config, and the secrets as a shell file
that the run script sources and deletes. Out: one file at a time with ``get_archive``; the
path's stat (sent before the content) and then the tar member are checked -- a regular file,
within the size cap -- before a byte of it is read, and the archive is read as a stream,
never held whole.
"""

from __future__ import annotations

import io
import shlex
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors

from service.runners._common import Artifacts, read_artifacts_with, safe_relative_path
from service.runners.base import RunRequest
from service.runners.output import StepRecord
from service.runners.script import Layout
from service.runners.statecheck import ArtifactProblem, docker_stat_problem

WORKSPACE = "/workspace"  # an anonymous volume: writable, removed with the container
LAYOUT = Layout(f"{WORKSPACE}/tfdeploy")  # the job dir, owned by RUN_AS, mode 700
RUN_AS_UID = 65534  # nobody
RUN_AS = f"{RUN_AS_UID}:{RUN_AS_UID}"


def build_archive(request: RunRequest, cli_config: str | None = None) -> bytes:
    """The tar put into WORKSPACE."""
    buf = io.BytesIO()
    now = time.time()

    def rel(path: str) -> str:
        return path.removeprefix(WORKSPACE + "/")

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: bytes | None, mode: int) -> None:
            info = tarfile.TarInfo(name)
            info.uid = info.gid = RUN_AS_UID
            info.mtime = now
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        config = rel(LAYOUT.config)
        add(rel(LAYOUT.root), None, 0o700)
        add(config, None, 0o700)
        made: set[str] = set()
        for name, content in sorted(request.files.items()):
            path = safe_relative_path(name)
            for parent in reversed(path.parents[:-1]):
                if str(parent) not in made:
                    made.add(str(parent))
                    add(f"{config}/{parent}", None, 0o700)
            add(f"{config}/{path}", content.encode(), 0o600)
        if request.state is not None:
            add(rel(LAYOUT.state), request.state, 0o600)
        if request.lock_file is not None:
            add(rel(LAYOUT.lock_file), request.lock_file, 0o600)
        if request.saved_plan is not None:
            add(rel(LAYOUT.plan), request.saved_plan, 0o600)
        if cli_config is not None:
            add(rel(LAYOUT.cli_config), cli_config.encode(), 0o600)
        if request.secrets:
            lines = [
                f"export TF_VAR_{k}={shlex.quote(v)}" for k, v in sorted(request.secrets.items())
            ]
            add(rel(LAYOUT.secrets), ("\n".join(lines) + "\n").encode(), 0o600)
    return buf.getvalue()


class _ChunkReader(io.RawIOBase):
    """The archive endpoint's chunk iterator as a file, for tarfile's stream mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def read_file(api: docker.APIClient, container_id: str, path: str, limit: int) -> bytes | None:
    """One file the run left: None if it is not there; ArtifactProblem if it is not a
    regular file within ``limit`` bytes (checked before it is read)."""
    try:
        chunks, path_stat = api.get_archive(container_id, path, chunk_size=1 << 16)
    except docker.errors.NotFound:
        return None
    try:
        problem = docker_stat_problem(path_stat or {}, limit)
        if problem is not None:
            raise ArtifactProblem(problem)
        with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(iter(chunks))), mode="r|") as tar:
            member = tar.next()
            if member is None:
                return None
            if not member.isreg():
                raise ArtifactProblem("it is not a regular file")
            if member.size > limit:
                raise ArtifactProblem(f"it is {member.size} bytes, over the limit of {limit}")
            extracted = tar.extractfile(member)
            data = extracted.read(limit + 1) if extracted else b""
            if len(data) > limit:
                raise ArtifactProblem(f"it is over the limit of {limit} bytes")
            return data
    except tarfile.TarError as exc:
        raise ArtifactProblem(f"its archive could not be read: {exc}") from None
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def read_artifacts(
    api: docker.APIClient, container_id: str, request: RunRequest, record: StepRecord
) -> Artifacts:
    """What the run left, each file checked."""
    return read_artifacts_with(
        lambda path, limit: read_file(api, container_id, path, limit), LAYOUT, request, record
    )


def read_status(api: docker.APIClient, container_id: str, record: StepRecord) -> None:
    """The run script's status file into ``record`` (a dead worker's run)."""
    try:
        data = read_file(api, container_id, LAYOUT.status, 64 * 1024)
    except ArtifactProblem:
        return
    for line in (data or b"").decode(errors="replace").splitlines():
        record.record(line)
