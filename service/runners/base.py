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


# Where a run sees the provider mirror and cache (read-only): the Docker runner mounts them
# there, the bubblewrap sandbox binds them there; an unsandboxed local run uses the host paths.
PROVIDERS_ROOT = "/tfdeploy/providers"


class ProviderSetup(msgspec.Struct, frozen=True, kw_only=True):
    """How a run installs providers (service/providers.py builds it, the runners apply it).

    ``cli_config`` is a terraform CLI configuration (written to a file named by
    ``TF_CLI_CONFIG_FILE``) that refers to the in-run paths of ``mounts``; each mount is an
    in-run path -> host path, mounted read-only. ``env`` is extra environment for terraform."""

    mounts: dict[str, str] = {}
    cli_config: str = ""
    env: dict[str, str] = {}

    def with_host_paths(self) -> ProviderSetup:
        """The same setup for a run that sees the host's file system (no mounts): every in-run
        path in the CLI config and the environment replaced by its host path."""
        # Longest first, so a path that is a prefix of another is not replaced inside it.
        pairs = sorted(self.mounts.items(), key=lambda kv: -len(kv[0]))

        def host(text: str) -> str:
            for run_path, host_path in pairs:
                text = text.replace(run_path, host_path)
            return text

        return ProviderSetup(
            mounts={},
            cli_config=host(self.cli_config),
            env={k: host(v) for k, v in self.env.items()},
        )


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
    # Where terraform ran was lost under it (the Docker engine went away, the container
    # vanished): the attempt failed for the runner's sake, not terraform's.
    runner_lost: bool = False


class Slot(Protocol):
    """A held place under the concurrency cap, prepared for one request (for Docker: the
    created, labelled, not yet started container with the files in it).

    ``run()`` gives the place under the cap back when terraform has ended, but keeps what it
    ran in (Docker: the exited container; local: the temp dir and its run record) so that the
    state terraform left can still be collected if this worker dies before it is persisted.
    ``release()`` removes it; the caller calls it once the outcome is recorded (or when the
    slot is abandoned before running). It is idempotent."""

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
        to ``on_line``. It does NOT release the slot: the caller releases it after the state
        is persisted and the outcome recorded (the crash window, docs/reliability.md). Terraform's
        own failure is a non-zero exit code, not an exception. Setting ``cancel`` interrupts terraform (SIGINT, then SIGKILL after a
        grace period) and the result has ``interrupted=True`` and whatever state was written."""
        ...

    async def running(self) -> int:
        """How many runs hold slots now. Docker: labelled containers counted through the Docker
        API (any state but exited/dead), leftovers of a crashed worker included; an exited
        container kept until its outcome is recorded does not count (terraform is done)."""
        ...

    async def close(self) -> None: ...


class RunnerError(Exception):
    """The runner could not run terraform at all (engine down, image missing, ...)."""
