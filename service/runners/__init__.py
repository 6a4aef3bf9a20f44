"""Runners: where terraform runs. ``make_runner(settings)`` picks one."""

from __future__ import annotations

from service.runners.base import LineSink, Runner, RunnerError, RunRequest, RunResult, Slot
from service.settings import Settings

__all__ = [
    "LineSink",
    "RunRequest",
    "RunResult",
    "Runner",
    "RunnerError",
    "Slot",
    "docker_available",
    "make_runner",
]


def docker_available(timeout: float = 3.0) -> bool:
    """Whether a Docker engine answers (``docker.from_env().ping()``) within ``timeout``."""
    try:
        import docker

        client = docker.from_env(timeout=timeout)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def make_runner(settings: Settings) -> Runner:
    """``settings.runner`` "docker" or "local"; unset: docker when an engine answers, else local."""
    kind = settings.runner
    if kind is None:
        kind = "docker" if docker_available() else "local"
    if kind == "docker":
        from service.runners.docker import DockerRunner

        return DockerRunner(settings)
    if kind == "local":
        from service.runners.local import LocalRunner

        return LocalRunner(settings)
    raise RunnerError(f"unknown runner {kind!r}")
