"""Talking to the Docker engine: one client per runner, short calls in worker threads, engine
errors as RunnerError, and riding out an engine that went away (restart, crash) for at most
``engine_wait`` seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import docker
import docker.errors
import requests

from service.runners._common import in_thread
from service.runners.base import RunnerError

log = logging.getLogger("tfdeploy.runner.docker")

ENGINE_POLL_MAX = 2.0  # the longest pause between checks for an engine that went away
REMOVE_WAIT = 30.0  # the longest a slot's release waits for the engine to remove its container

ENGINE_ERRORS: tuple[type[BaseException], ...] = (
    docker.errors.DockerException,
    requests.RequestException,
    OSError,
)


def engine_unreachable(exc: BaseException) -> bool:
    """Whether a RunnerError means the engine is away (connection refused, socket gone, the
    engine failing while it shuts down) rather than refusing the request itself."""
    cause = exc.__cause__
    if cause is None:
        return False
    if isinstance(cause, docker.errors.APIError):
        return bool(cause.is_server_error()) and not isinstance(cause, docker.errors.NotFound)
    return isinstance(cause, ENGINE_ERRORS)


class Engine:
    """A Docker client, made on first use (an injected one is the caller's to close)."""

    def __init__(self, client: docker.DockerClient | None, engine_wait: float) -> None:
        self._client = client
        self._owns_client = client is None
        self._lock = threading.Lock()
        self.engine_wait = engine_wait

    def client(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = docker.from_env()
                except ENGINE_ERRORS as exc:
                    raise RunnerError(f"no Docker engine: {exc}") from exc
            return self._client

    @property
    def api(self) -> docker.APIClient:
        return self.client().api

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A short blocking SDK call in a worker thread; engine errors become RunnerError."""

        def call() -> Any:
            self.client()
            return fn(*args)

        try:
            return await asyncio.to_thread(call)
        except RunnerError:
            raise
        except ENGINE_ERRORS as exc:
            raise RunnerError(f"Docker engine error: {exc}") from exc

    async def riding_out(
        self, say: Callable[[str, str], Awaitable[None]], fn: Callable[..., Any], *args: Any
    ) -> Any:
        """``fn(*args)`` in a thread, tried again while the engine does not answer, for at
        most ``engine_wait`` seconds (noted in the run's output)."""
        down_since: float | None = None
        pause = 0.5
        while True:
            try:
                return await self.call(fn, *args)
            except RunnerError as exc:
                if not engine_unreachable(exc):
                    raise
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    await say("system", "Docker engine unreachable; waiting for it to come back")
                if now - down_since >= self.engine_wait:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, ENGINE_POLL_MAX)

    async def signal(self, container_id: str, signal: str) -> None:
        try:
            await self.call(lambda: self.api.kill(container_id, signal=signal))
        except RunnerError as exc:  # already gone or stopped: nothing to signal
            log.debug("kill %s %s: %s", signal, container_id, exc)

    def remove_sync(self, container_id: str) -> None:
        try:
            self.api.remove_container(container_id, v=True, force=True)
        except docker.errors.NotFound:
            pass
        except Exception:
            log.warning("could not remove container %s", container_id, exc_info=True)

    async def remove(self, container_id: str) -> None:
        """Remove a container and its volume. An engine in the middle of shutting down may
        hold the request: nobody waits on it past REMOVE_WAIT (an exited leftover holds no
        place)."""
        try:
            await asyncio.wait_for(
                asyncio.shield(in_thread(self.remove_sync, container_id)), REMOVE_WAIT
            )
        except TimeoutError:
            log.warning("removing container %s is taking long; leaving it", container_id)

    async def close(self) -> None:
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await asyncio.to_thread(client.close)
