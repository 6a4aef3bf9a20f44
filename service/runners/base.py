"""The runner interface: run terraform for one attempt of a deploy, somewhere isolated.

A runner takes the deploy's files, the workspace's latest state and the variables, runs
``terraform init`` then ``terraform apply -auto-approve`` (or ``destroy -auto-approve``), streams
output line by line, and hands back the exit code and the state terraform left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

import msgspec

# Called for every output line while terraform runs: (stream, line) with stream
# "stdout" | "stderr" | "system" (the runner's own notes, e.g. "interrupted after timeout").
LineSink = Callable[[str, str], Awaitable[None]]


class RunRequest(msgspec.Struct, frozen=True, kw_only=True):
    deploy_id: str
    attempt: int
    workspace: str
    action: Literal["apply", "destroy"]
    files: dict[str, str]  # relative file name -> content
    state: bytes | None = None  # the tfstate to start from (written as terraform.tfstate)
    variables: dict[str, str] = {}  # reach terraform as TF_VAR_<name>
    secrets: dict[str, str] = {}  # reach terraform as TF_VAR_<name>, in its environment only
    timeout: float = 3600.0  # past this, SIGINT (terraform writes its state), then SIGKILL


class RunResult(msgspec.Struct, frozen=True, kw_only=True):
    exit_code: int
    state: bytes | None  # terraform.tfstate after the run; None if terraform wrote none
    timed_out: bool = False
    interrupted: bool = False  # stopped because ``cancel`` was set
    error: str = ""  # the last error lines, for Failed.message
    duration: float = 0.0


class Slot(Protocol):
    """A held place under the concurrency cap, prepared for one request (for Docker: the
    created, labelled, not yet started container with the files in it). ``release()`` gives the
    place back and removes what was prepared; it is idempotent."""

    request: RunRequest

    async def release(self) -> None: ...


class Runner(Protocol):
    name: str  # "docker" | "local"

    async def acquire_slot(self, request: RunRequest) -> Slot:
        """Wait, without busy-looping, until fewer runs than the cap hold slots, then hold one
        and prepare the run. Raises RunnerError if the runner cannot work at all."""
        ...

    async def run(self, slot: Slot, on_line: LineSink, cancel: asyncio.Event) -> RunResult:
        """Run ``terraform init`` then apply/destroy in the slot, to the end, streaming output
        to ``on_line``; then release the slot. Terraform's own failure is a non-zero exit code,
        not an exception. Setting ``cancel`` interrupts terraform (SIGINT, then SIGKILL after a
        grace period) and the result has ``interrupted=True`` and whatever state was written."""
        ...

    async def running(self) -> int:
        """How many runs hold slots now. Docker: labelled containers counted through the Docker
        API (any state but exited/dead), leftovers of a crashed worker included."""
        ...

    async def close(self) -> None: ...


class RunnerError(Exception):
    """The runner could not run terraform at all (engine down, image missing, ...)."""
