"""What a Docker run's container tells after its worker is gone: taking over a dead worker's
container (recovery), and adopting the state left in an earlier attempt's container that was
given up while the engine was away."""

from __future__ import annotations

import contextlib
import json
import time

import docker
import docker.errors
import msgspec
import requests

from service.runners._common import finish_result
from service.runners.base import RunRequest, RunResult, Step
from service.runners.docker_archive import read_artifacts, read_status
from service.runners.output import OutputTail, StepRecord
from service.runners.script import MARKER_PREFIX
from service.runners.statecheck import state_shape_problem
from service.statestores.index import state_meta


def adopt_leftovers_sync(
    api: docker.APIClient, label_filter: str, held: set[str], request: RunRequest, grace: float
) -> tuple[RunRequest, list[str], list[str]]:
    """Containers of this deploy's earlier attempts still on the engine: an attempt given up
    as ``runner_lost`` while the engine was away leaves its container, and in its volume the
    state terraform wrote, which was never persisted. Starting from the older persisted
    state would make what that attempt made a second time, so the newest such state (same
    lineage, higher serial) becomes this attempt's start state; it is persisted with this
    attempt's outcome. Returns (the request to run, the leftovers to remove once the new
    container holds the state, notes for the log)."""
    if request.attempt <= 1:  # nothing earlier: no Docker API call on the usual path
        return request, [], []
    rows = api.containers(
        all=True,
        filters={"label": [label_filter, f"tfdeploy.deploy={request.deploy_id}"]},
    )
    leftovers: list[tuple[int, int, str]] = []
    for row in rows:
        labels = row.get("Labels") or {}
        attempt, run = labels.get("tfdeploy.attempt", ""), labels.get("tfdeploy.run", "1")
        if attempt.isdigit() and int(attempt) < request.attempt and row["Id"] not in held:
            leftovers.append((int(attempt), int(run) if run.isdigit() else 1, row["Id"]))
    if not leftovers:
        return request, [], []
    best, best_attempt = request.state, 0
    for attempt, _run, cid in sorted(leftovers):
        try:
            result = collect_sync(api, cid, grace)  # a running one is stopped gracefully first
        except docker.errors.NotFound:  # removed meanwhile (its release went through)
            continue
        if result is not None and result.state is not None and _newer_state(result.state, best):
            best, best_attempt = result.state, attempt
    notes = []
    if best_attempt:
        request = msgspec.structs.replace(request, state=best)
        notes.append(
            f"adopted the state left by attempt {best_attempt}'s container (newer than the "
            "last persisted state): this attempt starts from it"
        )
    return request, [cid for _, _, cid in leftovers], notes

def collect_sync(api: docker.APIClient, container_id: str, grace: float) -> RunResult | None:
    """Take over a container a dead worker left: stopped gracefully if it still runs (SIGINT,
    ``grace``, SIGKILL), then its exit code and what it left, read and checked. None when it
    never started. It is not removed here."""
    started = time.monotonic()
    info = api.inspect_container(container_id)
    st = info["State"]
    if st.get("Status") == "created":
        return None
    was_running = bool(st.get("Running"))
    if was_running:
        with contextlib.suppress(docker.errors.APIError):
            api.kill(container_id, signal="SIGINT")
        try:
            api.wait(container_id, timeout=grace)
        except requests.RequestException:
            with contextlib.suppress(docker.errors.APIError):
                api.kill(container_id, signal="SIGKILL")
            api.wait(container_id, timeout=60)
    exit_code = int(api.inspect_container(container_id)["State"].get("ExitCode", -1))
    labels = (info.get("Config") or {}).get("Labels") or {}
    request = _request_of_labels(labels)
    record = StepRecord(request.steps)
    read_status(api, container_id, record)
    artifacts = read_artifacts(api, container_id, request, record)
    tail = OutputTail()
    with contextlib.suppress(Exception):
        logs = api.logs(container_id, stdout=True, stderr=True, tail=40)
        for line in logs.decode(errors="replace").splitlines():
            if not line.startswith(MARKER_PREFIX):
                tail.add("stderr", line)
    prefix = "worker lost while terraform ran; interrupted" if was_running else (
        "worker lost after terraform ended"
    )
    error = f"{prefix} (exit {exit_code})\n{tail.error()}" if exit_code != 0 else ""
    failed = record.failed_step(exit_code)
    return finish_result(
        request, exit_code=exit_code, record=record, artifacts=artifacts,
        diagnostics={failed: tail.error()} if failed else {}, error=error, started=started,
    )


def _request_of_labels(labels: dict[str, str]) -> RunRequest:
    """Enough of a run's request, from its container's labels, to read what it left."""
    try:
        meta = json.loads(labels.get("tfdeploy.steps") or "{}")
        steps = [Step(**s) for s in meta.get("steps") or []]
    except (ValueError, TypeError):
        meta, steps = {}, []
    return RunRequest(
        deploy_id=labels.get("tfdeploy.deploy", ""),
        attempt=int(labels.get("tfdeploy.attempt", "0") or 0),
        workspace=labels.get("tfdeploy.workspace", ""),
        steps=steps or [Step(name="init"), Step(name="apply")],
        files={},
        state=b"{}" if meta.get("start_state") else None,
        max_state_bytes=int(meta.get("max_state_bytes") or 64 * 1024 * 1024),
    )


def _newer_state(candidate: bytes, than: bytes | None) -> bool:
    """Whether tfstate ``candidate`` goes further than ``than``: same lineage, higher serial
    (anything readable beats no state at all)."""
    if state_shape_problem(candidate) is not None:
        return False
    meta = _meta(candidate)
    if meta is None:
        return False
    if than is None:
        return True
    old = _meta(than)
    if old is None:
        return True
    return meta[1] == old[1] and meta[0] > old[0]


def _meta(content: bytes) -> tuple[int, str] | None:
    # Serial and lineage only: nothing else of a (hostile, up to 64 MiB) state is built.
    try:
        serial, lineage, _, _ = state_meta(content)
    except (ValueError, RecursionError):
        return None
    return serial, lineage
