"""The runner interface: run terraform for one run of a deploy's attempt, somewhere isolated.

A run is a short list of terraform steps (``Step``) that the deployer composes and a runner
executes in ONE place (a container, a sandbox), in order, stopping at the first failure. It
takes the deploy's files, the workspace's start state, variables, secrets, and optionally a lock
file and a saved plan; it streams output line by line and hands back named artifacts: the
state (checked), the plan file, the plan as JSON, the lock file.

The cap has two halves: ``reserve()`` takes a host-wide place under
``TFDEPLOY_MAX_CONCURRENCY`` (waiting without a busy loop), and ``prepare(reservation,
request)`` turns it into a ``Slot`` for one request. A caller reserves BEFORE it takes a deploy:
a host at its cap takes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

import msgspec

# Called for every output line while terraform runs: (stream, line) with stream
# "stdout" | "stderr" | "system" (the runner's own notes, e.g. "interrupted after timeout").
# It may wait (backpressure): the runner reads no further output meanwhile.
LineSink = Callable[[str, str], Awaitable[None]]

StepName = Literal["init", "validate", "plan", "show_plan", "apply", "destroy", "apply_plan"]
STEP_NAMES: tuple[StepName, ...] = (
    "init", "validate", "plan", "show_plan", "apply", "destroy", "apply_plan"
)
# Steps after which terraform has written the state it manages (the run's state must then be
# there and be a tfstate).
STATE_STEPS: frozenset[str] = frozenset({"apply", "destroy", "apply_plan"})

# Why a step failed, from terraform's own diagnostics (service/runners/diagnostics.py):
# "config": the configuration itself (no retry can fix it); "network": a registry, mirror or
# provider API could not be reached; "other": anything else.
FailureKind = Literal["config", "network", "other"]

DEFAULT_MAX_OUTPUT_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_STATE_BYTES = 64 * 1024 * 1024

# Where a run sees the provider mirror and cache (read-only): the Docker runner mounts them
# there, the bubblewrap sandbox binds them there; an unsandboxed local run uses the host paths.
PROVIDERS_ROOT = "/tfdeploy/providers"


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One terraform command of a run.

    - ``init``: ``terraform init``; ``validate``: ``terraform validate``;
    - ``plan``: ``terraform plan -out`` to the run's plan file (``destroy``: a destroy plan;
      ``detailed_exitcode``: exit code 2 means "changes", which is not a failure);
    - ``show_plan``: ``terraform show -json`` of the plan file, kept as ``plan_json``;
    - ``apply`` / ``destroy``: with ``-auto-approve``;
    - ``apply_plan``: apply the saved plan (``RunRequest.saved_plan``, or this run's plan)."""

    name: StepName
    destroy: bool = False
    detailed_exitcode: bool = False


def steps_for(action: str) -> list[Step]:
    """The steps of a whole run of ``action`` (today's behaviour for apply/destroy)."""
    if action == "apply":
        return [Step(name="init"), Step(name="validate"), Step(name="apply")]
    if action == "destroy":
        return [Step(name="init"), Step(name="validate"), Step(name="destroy")]
    if action == "plan":
        return [
            Step(name="init"),
            Step(name="validate"),
            Step(name="plan", detailed_exitcode=True),
            Step(name="show_plan"),
        ]
    raise ValueError(f"unknown action {action!r}")


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
    # A sequence number within the deploy: the plan and the apply of one attempt are two runs
    # (two containers / sandboxes). Labels and run records carry it; recovery takes the
    # attempt's latest run.
    run: int = 1
    workspace: str  # the workspace's key (its id)
    steps: list[Step]
    files: dict[str, str]  # relative file name -> content
    state: bytes | None = None  # the tfstate to start from (written as terraform.tfstate)
    # .terraform.lock.hcl to install providers by (written after the files, so it wins).
    lock_file: bytes | None = None
    saved_plan: bytes | None = None  # for ``apply_plan`` (and ``show_plan`` without a plan step)
    variables: dict[str, str] = {}  # reach terraform as TF_VAR_<name>
    secrets: dict[str, str] = {}  # reach terraform as TF_VAR_<name>, in its environment only
    timeout: float = 3600.0  # past this, SIGINT (terraform writes its state), then SIGKILL
    providers: ProviderSetup | None = None
    # Past this many bytes of output terraform is interrupted (state kept): ``output_limited``.
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    # The largest state (and plan, plan JSON: 4x) taken back from the run.
    max_state_bytes: int = DEFAULT_MAX_STATE_BYTES


class RunResult(msgspec.Struct, frozen=True, kw_only=True):
    exit_code: int
    # terraform.tfstate after the run, checked (a regular file, within max_state_bytes, a
    # tfstate's shape); None if there is none or it failed the checks (then state_problem).
    state: bytes | None
    state_problem: str | None = None
    # What a state that failed the checks held, when it could be read within the size cap
    # (garbage, a wrong shape): kept so the deployer can rescue it.
    rejected_state: bytes | None = None
    failed_step: StepName | None = None  # the step that failed (None: none did)
    failure_kind: FailureKind | None = None  # set with failed_step
    diagnostics: str = ""  # terraform's error output of the failed step (not yet masked)
    plan: bytes | None = None  # the plan file, after a plan step
    plan_json: bytes | None = None  # `terraform show -json` of it, after show_plan
    plan_changes: bool | None = None  # plan with detailed_exitcode: exit 2 (changes) or 0
    lock_file: bytes | None = None  # .terraform.lock.hcl as init left it
    steps_done: list[StepName] = []  # the steps that completed, in order
    timed_out: bool = False
    interrupted: bool = False  # stopped because ``cancel`` was set
    # Where terraform ran was lost under it (the Docker engine went away, the container
    # vanished): the attempt failed for the runner's sake, not terraform's.
    runner_lost: bool = False
    # Output went past max_output_bytes: terraform was interrupted (state kept).
    output_limited: bool = False
    output_bytes: int = 0
    error: str = ""  # the last error lines, for Failed.message
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        """Every step completed and nothing stopped the run."""
        return (
            self.exit_code == 0
            and self.failed_step is None
            and not (self.timed_out or self.interrupted or self.runner_lost or self.output_limited)
        )


class Reservation(Protocol):
    """A place under the host's cap, not yet given to a run. ``prepare`` takes it over;
    ``release()`` gives it back unused (idempotent)."""

    async def release(self) -> None: ...


class Slot(Protocol):
    """A held place under the concurrency cap, prepared for one request (for Docker: the
    created, labelled, not yet started container with the files in it).

    ``run()`` gives the place under the cap back when terraform has ended (Docker: the
    container exited), but keeps what it ran in (Docker: the exited container; local: the temp
    dir and its run record) so that the state terraform left can still be collected if this
    worker dies before it is persisted. ``release()`` removes it; the caller calls it once the
    outcome is recorded (or when the slot is abandoned before running). It is idempotent."""

    request: RunRequest

    async def release(self) -> None: ...


class Runner(Protocol):
    name: str  # "docker" | "local"

    async def reserve(self, *, within: Slot | None = None) -> Reservation:
        """Wait, without busy-looping, until the host is below its cap, then hold a place.
        ``within``: a slot of the same attempt that is still held (its state not yet
        persisted), whose place the new run may use (the local runner's place spans its slot
        until release; a Docker slot's exited container holds none). Raises RunnerError if
        the runner cannot work at all."""
        ...

    async def prepare(self, reservation: Reservation, request: RunRequest) -> Slot:
        """Make the run's place (Docker: the container with the files; local: the temp dir).
        Takes the reservation over: on failure its place is given back."""
        ...

    async def acquire_slot(self, request: RunRequest) -> Slot:
        """``reserve()`` then ``prepare()``."""
        ...

    async def run(self, slot: Slot, on_line: LineSink, cancel: asyncio.Event) -> RunResult:
        """Run the request's steps in the slot, to the end, streaming output to ``on_line``.
        It does NOT release the slot: the caller releases it after the state is persisted and
        the outcome recorded (the crash window, docs/reliability.md). Terraform's own failure
        is a result (exit code, ``failed_step``), not an exception. Setting ``cancel``
        interrupts terraform (SIGINT, then SIGKILL after a grace period) and the result has
        ``interrupted=True`` and whatever state was written."""
        ...

    async def running(self) -> int:
        """How many places are held on this host now, by any process (orphans included)."""
        ...

    async def close(self) -> None: ...


class RunnerError(Exception):
    """The runner could not run terraform at all (engine down, image missing, no sandbox)."""
