"""The Docker runner: one labelled, locked-down container per run.

The pieces: talking to the engine (``docker_engine``), the cap (``docker_cap``: places are
labelled containers that have not exited plus reservations), archives in and out
(``docker_archive``), and one run's container from create to collect (``docker_run``). This
module ties them together: ``reserve`` / ``prepare`` / ``run``, and what recovery needs to
take over a dead worker's containers.

``run()`` keeps the exited container until the deployer has persisted its state and recorded
the outcome (``slot.release()``); being exited, it no longer counts toward the cap meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors

from service.runners._common import (
    DEFAULT_GRACE,
    SHELL_NAME,
    cancelled_before_start,
    in_thread,
    validate_request,
)
from service.runners.base import (
    LineSink,
    Reservation,
    RunnerError,
    RunRequest,
    RunResult,
    Slot,
)
from service.runners.docker_archive import (
    build_archive,
)
from service.runners.docker_cap import DockerPlaces, DockerReservation, FileLock, count_active
from service.runners.docker_engine import ENGINE_ERRORS, Engine, engine_unreachable
from service.runners.docker_orphans import adopt_leftovers_sync, collect_sync
from service.runners.docker_run import (
    SERVICE_LABEL,
    SERVICE_VALUE,
    ContainerRun,
    container_config,
)
from service.runners.output import RunOutput
from service.runners.script import new_marker
from service.settings import Settings

log = logging.getLogger("tfdeploy.runner.docker")

SERVICE_FILTER = f"{SERVICE_LABEL}={SERVICE_VALUE}"

__all__ = [
    "SERVICE_FILTER",
    "SERVICE_LABEL",
    "SERVICE_VALUE",
    "DockerRunner",
    "DockerSlot",
    "FileLock",
    "count_active",
    "engine_unreachable",
]


@dataclass(eq=False)
class DockerSlot:
    """A place under the cap: the created (not started) container holding the files."""

    runner: DockerRunner
    request: RunRequest
    container_id: str
    marker: str
    notes: list[str] = field(default_factory=list)  # said in the run's log when it starts
    _released: bool = field(default=False, repr=False)

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        await self.runner._remove(self.container_id)


class DockerRunner:
    name = "docker"

    #: How long a run waits for an engine that went away before it gives the attempt up as
    #: ``runner_lost`` (the deploy is then retried or failed, never left ``deploying``).
    engine_wait = 120.0

    def __init__(
        self,
        settings: Settings,
        *,
        client: docker.DockerClient | None = None,
        cap_lock: Callable[[], AbstractAsyncContextManager[Any]] | None = None,
        grace: float = DEFAULT_GRACE,
        service_name: str = SERVICE_VALUE,
    ) -> None:
        """``service_name`` is the value of the ``tfdeploy.service`` label that marks (and
        counts) this service's containers; keep the default outside tests -- a different value
        is a separate cap (tests use one of their own on a shared engine)."""
        self.settings = settings
        self.grace = grace
        self.service_name = service_name
        self.label_filter = f"{SERVICE_LABEL}={service_name}"
        self.engine = Engine(client, self.engine_wait)
        self.places = DockerPlaces(
            self.engine,
            settings.data_path / "docker-places" / service_name,
            settings.max_concurrency,
            self.label_filter,
            cap_lock or FileLock(settings.data_path / "docker-cap.lock"),
        )
        self._image_ok = False
        self._held: set[str] = set()  # container ids of this runner's slots

    @property
    def _api(self) -> docker.APIClient:
        return self.engine.api

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.engine.call(fn, *args)

    # -- the cap ------------------------------------------------------------------------

    async def running(self) -> int:
        """Places held: labelled containers not exited (leftovers included), reservations."""
        return await self.places.count()

    async def reserve(self, *, within: Slot | None = None) -> DockerReservation:
        # ``within`` needs nothing here: its container has exited and holds no place.
        self.engine.engine_wait = self.engine_wait  # a test may lower it on the instance
        return await self.places.reserve(self._ensure_image)

    async def prepare(self, reservation: Reservation, request: RunRequest) -> DockerSlot:
        """Create the run's container with the files in it, then give up the reservation
        (the container holds the place now). Containers of the deploy's earlier attempts still
        on the engine are adopted first (their state may be newer) and removed after."""
        if not isinstance(reservation, DockerReservation):
            raise TypeError("DockerRunner.prepare needs a DockerReservation from its reserve")
        try:
            validate_request(request)
            bad = [k for k in request.secrets if not SHELL_NAME.match(k)]
            if bad:
                raise RunnerError(
                    f"secret names must be shell identifiers for the docker runner: {bad}"
                )
            request, adopted, notes = await self.engine.riding_out(
                _no_say, self._adopt_leftovers_sync, request
            )
            marker = new_marker()
            container_id = await self._create(request, marker, reservation.tag)
            self._held.add(container_id)
        finally:
            await reservation.release()
        # Their state now lives in the new container's volume too. Removed outside the cap
        # lock: other workers' slots need not wait for it.
        for leftover in adopted:
            await self._remove(leftover)
        return DockerSlot(self, request, container_id, marker, notes)

    async def acquire_slot(self, request: RunRequest) -> DockerSlot:
        return await self.prepare(await self.reserve(), request)

    async def _ensure_image(self) -> None:
        if self._image_ok:
            return
        image = self.settings.runner_image
        try:
            await self._call(lambda: self.engine.client().images.get(image))
        except RunnerError as exc:
            if not isinstance(exc.__cause__, docker.errors.ImageNotFound):
                raise
            repo, tag = docker.utils.parse_repository_tag(image)
            log.info("runner image %s not present; pulling it", image)
            try:
                await self._call(
                    lambda: self.engine.client().images.pull(repo, tag=tag or "latest")
                )
            except RunnerError as pull_exc:
                raise RunnerError(
                    f"runner image {image} is missing and could not be pulled: {pull_exc}"
                ) from pull_exc
        self._image_ok = True

    # -- the container ------------------------------------------------------------------

    def container_config(
        self, request: RunRequest, marker: str = "", place: str = ""
    ) -> dict[str, Any]:
        """The keyword arguments for ``containers.create`` (no secrets in them)."""
        return container_config(self.settings, request, self.service_name,
                                marker or new_marker(), place)

    async def _create(self, request: RunRequest, marker: str, place: str) -> str:
        """Create the container and put the files in. Cancelled half-way, it removes what it
        made once the thread is done."""
        config = self.container_config(request, marker, place)
        cli_config = request.providers.cli_config if request.providers is not None else None
        archive = build_archive(request, cli_config)

        def create() -> str:
            client = self.engine.client()
            container = client.containers.create(**config)
            try:
                if not client.api.put_archive(container.id, "/workspace", archive):
                    raise RunnerError("put_archive refused the workspace files")
            except BaseException:
                with contextlib.suppress(Exception):
                    client.api.remove_container(container.id, v=True, force=True)
                raise
            return str(container.id)

        def orphan(container_id: str) -> None:
            threading.Thread(target=self._remove_sync, args=(container_id,), daemon=True).start()

        try:
            return await in_thread(create, orphan=orphan)
        except RunnerError:
            raise
        except docker.errors.ImageNotFound as exc:
            self._image_ok = False
            raise RunnerError(f"runner image {self.settings.runner_image} not found") from exc
        except ENGINE_ERRORS as exc:
            raise RunnerError(f"could not create the runner container: {exc}") from exc

    def _remove_sync(self, container_id: str) -> None:
        self.engine.remove_sync(container_id)
        self._held.discard(container_id)

    async def _remove(self, container_id: str) -> None:
        await self.engine.remove(container_id)
        self._held.discard(container_id)

    # -- the run ------------------------------------------------------------------------

    async def run(self, slot: Any, on_line: LineSink, cancel: asyncio.Event) -> RunResult:
        """Run the slot's container to its end (service/runners/docker_run.py). The container
        is kept (exited: it no longer counts toward the cap) until ``slot.release()``, so a
        dead worker's recovery can still read its state."""
        if not isinstance(slot, DockerSlot):
            raise TypeError("DockerRunner.run needs a DockerSlot from its prepare")
        request = slot.request
        started = time.monotonic()
        limit_hit = asyncio.Event()
        out = RunOutput(on_line, request.steps, max_bytes=request.max_output_bytes,
                        marker=slot.marker + " ", on_limit=limit_hit.set)
        for note in slot.notes:
            await out.say("system", note)
        if cancel.is_set():
            await out.say("system", "cancelled before terraform started")
            return cancelled_before_start(request, started)
        self.engine.engine_wait = self.engine_wait
        return await ContainerRun(self.engine, slot.container_id, request, out, self.grace).go(
            cancel, limit_hit
        )

    # -- housekeeping -------------------------------------------------------------------

    async def find_orphans(self, *, include_own: bool = False) -> list[dict[str, Any]]:
        """Labelled containers on the engine, in any state, except (by default) the ones this
        runner holds right now: after a crash, what a dead worker left behind."""
        rows = await self._call(
            lambda: self._api.containers(all=True, filters={"label": self.label_filter})
        )
        found = []
        for row in rows:
            if not include_own and row["Id"] in self._held:
                continue
            labels = row.get("Labels") or {}
            found.append(
                {
                    "id": row["Id"],
                    "name": (row.get("Names") or ["?"])[0].lstrip("/"),
                    "state": row.get("State"),
                    "status": row.get("Status"),
                    "created": row.get("Created"),
                    "deploy_id": labels.get("tfdeploy.deploy"),
                    "attempt": labels.get("tfdeploy.attempt"),
                    "run": labels.get("tfdeploy.run", "1"),
                    "workspace": labels.get("tfdeploy.workspace"),
                }
            )
        return found

    async def collect_orphan(self, container_id: str) -> RunResult | None:
        """Take over a container a dead worker left behind (recovery, ``service/recovery.py``).

        Still running: SIGINT (terraform stops gracefully and writes its state), then SIGKILL
        after the grace period. Then the exit code and what it left are read (checked). Returns
        None when it never started (nothing ran). The container is not removed here."""
        result: RunResult | None = await self._call(self._collect_sync, container_id)
        return result

    def _adopt_leftovers_sync(self, request: RunRequest) -> tuple[RunRequest, list[str], list[str]]:
        return adopt_leftovers_sync(self._api, self.label_filter, self._held, request, self.grace)

    def _collect_sync(self, container_id: str) -> RunResult | None:
        return collect_sync(self._api, container_id, self.grace)

    async def remove_container(self, container_id: str) -> None:
        """Remove a (leftover) container and its workspace volume, whatever its state."""
        await self._call(self._remove_sync, container_id)

    async def close(self) -> None:
        """Close the client if this runner created it (an injected client is the caller's)."""
        await self.engine.close()


async def _no_say(stream: str, line: str) -> None:
    return None


