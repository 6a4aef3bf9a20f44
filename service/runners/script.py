"""The run script: a run's steps as one POSIX shell script, for busybox ``sh`` (the Docker
runner image) and dash (the local runner) alike.

The script runs the steps in order in ``<root>/config`` and stops at the first failure. It
writes a record before and after each step -- ``<marker> begin NAME`` / ``<marker> end NAME RC``
on stderr (the runner attributes stderr lines to steps by them and does not log them) and the
same without the marker in ``<root>/status`` (read back for a dead worker's run). SIGINT and
SIGTERM stop it gracefully: no further step starts, terraform gets SIGINT (through ``forward``:
``kill -INT -1``, every other process of the container's / sandbox's pid namespace; empty where
the runner signals the whole process group itself) and writes its state. Stopped by SIGTERM --
only ever sent from outside (``docker stop``, an engine shutting down) -- a failed run exits
``EXIT_STOPPED_OUTSIDE``.

The marker carries a per-run nonce: a configuration can print it only by reading the script,
and it can only mislead its own run's bookkeeping, never another's.
"""

from __future__ import annotations

import secrets
import shlex
from dataclasses import dataclass

from service.runners.base import Step

EXIT_STOPPED_OUTSIDE = 143
MARKER_PREFIX = "::tfdeploy-step-"
FORWARD_IN_NAMESPACE = "kill -INT -1 2>/dev/null"

TF = "terraform"
COMMON = "-input=false -no-color"


@dataclass(frozen=True)
class Layout:
    """Where a run's files are, as the run sees them (in-run paths)."""

    root: str

    @property
    def config(self) -> str:  # terraform's working directory: the deploy's files, the state
        return f"{self.root}/config"

    @property
    def state(self) -> str:
        return f"{self.config}/terraform.tfstate"

    @property
    def lock_file(self) -> str:
        return f"{self.config}/.terraform.lock.hcl"

    @property
    def plan(self) -> str:  # the saved plan: written by ``plan``, read by ``apply_plan``
        return f"{self.root}/plan.tfplan"

    @property
    def plan_json(self) -> str:
        return f"{self.root}/plan.json"

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def cli_config(self) -> str:  # TF_CLI_CONFIG_FILE, when the run has a ProviderSetup
        return f"{self.root}/cli.tfrc"

    @property
    def secrets(self) -> str:  # Docker: sourced, then deleted before terraform starts
        return f"{self.root}/secrets.env"

    @property
    def home(self) -> str:
        return f"{self.root}/home"


def new_marker() -> str:
    """The prefix of this run's marker lines (followed by one space)."""
    return f"{MARKER_PREFIX}{secrets.token_hex(8)}::"


def command_of(step: Step, layout: Layout) -> str:
    q = shlex.quote
    match step.name:
        case "init":
            return f"{TF} init {COMMON}"
        case "validate":
            return f"{TF} validate -no-color"
        case "plan":
            extra = (" -destroy" if step.destroy else "") + (
                " -detailed-exitcode" if step.detailed_exitcode else ""
            )
            return f"{TF} plan {COMMON} -out={q(layout.plan)}{extra}"
        case "show_plan":
            return f"{TF} show -json -no-color {q(layout.plan)} > {q(layout.plan_json)}"
        case "apply":
            return f"{TF} apply -auto-approve {COMMON}"
        case "destroy":
            return f"{TF} destroy -auto-approve {COMMON}"
        case "apply_plan":
            return f"{TF} apply {COMMON} {q(layout.plan)}"
    raise ValueError(f"unknown step {step.name!r}")  # pragma: no cover


def build_script(
    steps: list[Step], layout: Layout, *, marker: str, forward: str, secrets_file: bool
) -> str:
    q = shlex.quote
    lines = [f"cd {q(layout.config)} || exit 70"]
    if secrets_file:
        lines += [
            f"if [ -f {q(layout.secrets)} ]; then . {q(layout.secrets)}; fi",
            f"rm -f {q(layout.secrets)}",
        ]
    lines += [
        "stopping=0",
        "terminated=0",
        f"trap 'stopping=1; {forward}' INT",
        f"trap 'stopping=1; terminated=1; {forward}' TERM",
        # Wait for the child through signals: `wait` returns early when a trapped signal
        # arrives, while terraform is still writing its state.
        'run() {',
        '  "$@" &',
        '  child=$!',
        '  while :; do',
        '    wait "$child"; rc=$?',
        '    kill -0 "$child" 2>/dev/null || break',
        '  done',
        '  return "$rc"',
        '}',
        'finish() {',
        f'  [ "$terminated" = 0 ] || [ "$1" = 0 ] || exit {EXIT_STOPPED_OUTSIDE}',
        '  exit "$1"',
        '}',
        'begin() {',
        '  [ "$stopping" = 0 ] || finish 130',
        f'  echo "begin $1" >> {q(layout.status)}',
        f'  echo {q(marker)}" begin $1" >&2',
        '}',
        'ended() {',
        f'  echo "end $1 $2" >> {q(layout.status)}',
        f'  echo {q(marker)}" end $1 $2" >&2',
        '}',
    ]
    for step in steps:
        ok = '[ "$rc" = 0 ]'
        if step.name == "plan" and step.detailed_exitcode:
            ok = '{ [ "$rc" = 0 ] || [ "$rc" = 2 ]; }'
        lines.append(
            f"begin {step.name}; run {command_of(step, layout)}; rc=$?; ended {step.name} $rc; "
            f'{ok} || finish "$rc"'
        )
    lines.append("finish 0")
    return "\n".join(lines) + "\n"
