"""What the API answers: msgspec Structs, built from the read models, never from raw rows.

Pages are ``{"items": [...], "next": cursor-or-null}``; ``next`` is null on the last page.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example

from service.api.errors import Malformed
from service.projection import DeployView, StoredEvent
from service.statestores.index import StateVersion
from service.workspaces import Workspace


class ErrorBody(msgspec.Struct, frozen=True):
    """Every error answer (CONTRACT)."""

    status_code: int
    detail: str


_ERROR_MEANING = {
    400: "Malformed request.",
    401: "No token, or an invalid one.",
    403: "Not allowed.",
    404: "Unknown, or not yours.",
    409: "Conflicts with the deploy's current state.",
    413: "Request too large.",
    415: "The request body is not JSON (send `Content-Type: application/json`).",
    422: "Invalid request.",
    429: "Past a per-user limit (requests, open event streams): try again after Retry-After seconds.",
    503: "Database unavailable.",
}


def error_responses(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI documentation of the error answers a route may give (401, 429 and 503 always).

    Examples are written out: litestar invents missing ones with polyfactory and faker, which
    the service does not install (requirements.lock). Every ResponseSpec with a data container
    needs ``generate_examples=False``."""
    return {
        code: ResponseSpec(
            data_container=ErrorBody,
            description=_ERROR_MEANING[code],
            generate_examples=False,
            examples=[Example(value={"status_code": code, "detail": _ERROR_MEANING[code]})],
        )
        for code in sorted({401, 429, 503, *codes})
    }


class ErrorOut(msgspec.Struct, frozen=True):
    reason: str
    message: str


class DeployOut(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A deploy as clients see it. ``error`` is omitted while there is none; every other field is
    always present (``state_version`` may be null)."""

    id: str
    workspace: str
    action: str
    status: str
    attempt: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    error: ErrorOut | None = None
    owner: str
    version: int
    cancel_requested: bool
    state_version: int | None
    # The workspace's owner and id (``workspace`` is its name; the ref is "owner:name").
    workspace_owner: str = ""
    workspace_id: str = ""

    @classmethod
    def of(cls, view: DeployView) -> DeployOut:
        return msgspec.convert(view, cls, from_attributes=True)


class DeployPage(msgspec.Struct, frozen=True):
    items: list[DeployOut]
    next: str | None


class EventOut(msgspec.Struct, frozen=True, kw_only=True):
    """An event. ``stream`` is "deploy" (``deploy_id`` is its deploy) or "workspace" (a fact of
    the workspace itself: ``deploy_id`` is null); ``workspace_id`` is the workspace's id either
    way (null for a deploy whose workspace is unknown)."""

    position: int
    deploy_id: str | None
    version: int
    type: str
    data: dict[str, Any]
    recorded_at: datetime
    actor: str
    stream: str
    workspace_id: str | None

    @classmethod
    def of(cls, event: StoredEvent) -> EventOut:
        workspace = event.stream == "workspace"
        return cls(
            position=event.position,
            deploy_id=None if workspace else event.deploy_id,
            version=event.version,
            type=event.type,
            data=event.data,
            recorded_at=event.recorded_at,
            actor=event.actor,
            stream=event.stream,
            workspace_id=event.workspace_id or None,
        )


class EventList(msgspec.Struct, frozen=True):
    """One deploy's events, in version order."""

    items: list[EventOut]


class EventPage(msgspec.Struct, frozen=True):
    """A page of the audit query; ``next`` is the ``after`` for the next page."""

    items: list[EventOut]
    next: int | None


class StateVersionOut(msgspec.Struct, frozen=True, kw_only=True):
    workspace: str  # its name
    workspace_owner: str
    workspace_id: str
    version: int
    deploy_id: str | None  # null for a state written by the terraform CLI
    attempt: int | None
    store: str
    serial: int
    lineage: str
    sha256: str
    size: int
    created_at: datetime
    source: str  # "deploy" | "cli"
    written_by: str | None  # the user whose terraform CLI wrote it

    @classmethod
    def of(cls, v: StateVersion, workspace: Workspace) -> StateVersionOut:
        return cls(
            workspace=workspace.name,
            workspace_owner=workspace.owner,
            workspace_id=workspace.id,
            version=v.version,
            deploy_id=v.deploy_id,
            attempt=v.attempt,
            store=v.store,
            serial=v.serial,
            lineage=v.lineage,
            sha256=v.sha256,
            size=v.size,
            created_at=v.created_at,
            source=v.source,
            written_by=v.written_by,
        )


class StateVersionPage(msgspec.Struct, frozen=True):
    """State versions, newest first; ``next`` is the ``before`` for the next page."""

    items: list[StateVersionOut]
    next: int | None


class LatestDeploy(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    action: str
    status: str
    owner: str  # who requested it
    created_at: datetime


class LatestState(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    serial: int
    created_at: datetime


class WorkspaceOut(msgspec.Struct, frozen=True, kw_only=True):
    """A workspace the caller may see. ``ref`` names it in every route (``owner:name``; the
    owner may also use ``name``); ``role``: the caller's standing in it (owner, admin, deploy,
    read)."""

    id: str
    owner: str
    name: str
    ref: str
    role: str
    created_at: datetime
    latest_deploy: LatestDeploy | None
    latest_state: LatestState | None


class WorkspacePage(msgspec.Struct, frozen=True):
    """Workspaces by (owner, name); ``next`` is the ``after`` of the next page (a ref)."""

    items: list[WorkspaceOut]
    next: str | None


class MemberIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["read", "deploy"]


class MemberOut(msgspec.Struct, frozen=True, kw_only=True):
    user: str
    role: str
    updated_at: datetime


class MemberList(msgspec.Struct, frozen=True, kw_only=True):
    """A workspace's members (its owner is not one: they hold every right already)."""

    workspace: str  # the ref
    owner: str
    items: list[MemberOut]


class OutputOut(msgspec.Struct, frozen=True, kw_only=True):
    value: Any  # null when sensitive
    type: Any  # terraform's type expression, as in the state ("string", ["list", "string"], ...)
    sensitive: bool


class OutputsOut(msgspec.Struct, frozen=True, kw_only=True):
    outputs: dict[str, OutputOut]


class ResourceOut(msgspec.Struct, frozen=True, kw_only=True):
    address: str
    type: str
    name: str
    provider: str
    mode: str  # "managed" | "data"
    module: str | None  # the module path ("module.net"), null for the root module


class ResourceList(msgspec.Struct, frozen=True, kw_only=True):
    items: list[ResourceOut]
    # True when the state holds more instances than are listed (100,000): read the state.
    truncated: bool = False


class HealthOut(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    database: str
    state_store: str
    runner: str | None


# ---------------------------------------------------------------- the deploys cursor


def encode_cursor(created_at: datetime, deploy_id: str) -> str:
    """Opaque to clients: base64url of ``<created_at isoformat>|<id>``, unpadded."""
    raw = f"{created_at.isoformat()}|{deploy_id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a cursor stands for; Malformed (400) for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, deploy_id = raw.partition("|")
        created_at = datetime.fromisoformat(at)
        if created_at.tzinfo is None:
            raise ValueError("naive timestamp")
        return created_at, str(UUID(deploy_id))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Malformed("invalid cursor") from None
