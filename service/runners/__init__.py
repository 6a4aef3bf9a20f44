"""Runners: where terraform runs. ``make_runner(settings)`` picks one."""

from __future__ import annotations

import logging
import sys
from typing import Literal

from service.runners.base import (
    LineSink,
    ProviderSetup,
    Reservation,
    Runner,
    RunnerError,
    RunRequest,
    RunResult,
    Slot,
    Step,
    steps_for,
)
from service.settings import Settings

__all__ = [
    "LineSink",
    "ProviderSetup",
    "Reservation",
    "RunRequest",
    "RunResult",
    "Runner",
    "RunnerError",
    "Slot",
    "Step",
    "docker_available",
    "docker_status",
    "make_runner",
    "steps_for",
]

log = logging.getLogger("tfdeploy.runner")

EngineStatus = Literal["up", "slow", "absent"]


def docker_status(timeout: float = 3.0) -> EngineStatus:
    """Whether a Docker engine answers a ping within ``timeout`` ("up"), is there but slow to
    answer ("slow": the connection was made, the answer did not come in time), or is absent
    (no socket, connection refused)."""
    import docker
    import requests

    def status_of(exc: BaseException) -> EngineStatus:
        seen: BaseException | None = exc
        while seen is not None:  # the client wraps the timeout of its version request
            if isinstance(seen, requests.exceptions.ReadTimeout):
                return "slow"
            seen = seen.__cause__ or seen.__context__
        return "absent"

    try:
        client = docker.from_env(timeout=timeout)
    except Exception as exc:
        return status_of(exc)
    try:
        return "up" if client.ping() else "absent"
    except Exception as exc:
        return status_of(exc)
    finally:
        client.close()


def docker_available(timeout: float = 3.0) -> bool:
    """Whether a Docker engine answers (``docker.from_env().ping()``) within ``timeout``."""
    return docker_status(timeout) == "up"


LOCAL_FALLBACK_NOTE = (
    "No Docker engine answers and TFDEPLOY_RUNNER is not set: tfdeploy up runs terraform with "
    "the LOCAL runner on this machine ({how}). Set TFDEPLOY_RUNNER=local to choose it "
    "explicitly, or start Docker."
)


def make_runner(settings: Settings, *, local_fallback: bool = False) -> Runner:
    """``settings.runner`` "docker" or "local". Unset: docker when an engine is there -- also
    when it is slow to answer (it is waited for, never silently replaced) -- else the local
    runner if ``local_fallback`` (``tfdeploy up``: one machine, one operator; said loudly),
    else RunnerError (``tfdeploy worker`` refuses to start)."""
    kind = settings.runner
    if kind is None:
        status = docker_status()
        if status == "slow":
            log.warning("the Docker engine is slow to answer; using it (runs wait for it)")
        if status != "absent":
            kind = "docker"
        elif local_fallback:
            kind = "local"
        else:
            raise RunnerError(
                "no Docker engine answers and TFDEPLOY_RUNNER is not set: start Docker, or set "
                "TFDEPLOY_RUNNER=local to run terraform on this host (sandboxed)"
            )
    if kind == "docker":
        from service.runners.docker import DockerRunner

        return DockerRunner(settings)
    if kind == "local":
        from service.runners.local import LocalRunner

        runner = LocalRunner(settings)
        if settings.runner is None:
            how = "sandboxed with bubblewrap" if runner.sandboxed else "NOT sandboxed"
            note = LOCAL_FALLBACK_NOTE.format(how=how)
            log.warning(note)
            print(f"\n*** {note} ***\n", file=sys.stderr)
        return runner
    raise RunnerError(f"unknown runner {kind!r}")
