"""What the API answers: msgspec Structs, built from the read models, never from raw rows.

Pages are ``{"items": [...], "next": cursor-or-null}``; ``next`` is null on the last page.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example

from service.api.errors import Malformed
from service.projection import DeployView, StoredEvent
from service.statestores.index import StateVersion


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
    503: "Database unavailable.",
}


def error_responses(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI documentation of the error answers a route may give (401 and 503 always).

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
        for code in sorted({401, 503, *codes})
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

    @classmethod
    def of(cls, view: DeployView) -> DeployOut:
        return msgspec.convert(view, cls, from_attributes=True)


class DeployPage(msgspec.Struct, frozen=True):
    items: list[DeployOut]
    next: str | None


class EventOut(msgspec.Struct, frozen=True, kw_only=True):
    position: int
    deploy_id: str
    version: int
    type: str
    data: dict[str, Any]
    recorded_at: datetime
    actor: str

    @classmethod
    def of(cls, event: StoredEvent) -> EventOut:
        return msgspec.convert(event, cls, from_attributes=True)


class EventList(msgspec.Struct, frozen=True):
    """One deploy's events, in version order."""

    items: list[EventOut]


class EventPage(msgspec.Struct, frozen=True):
    """A page of the audit query; ``next`` is the ``after`` for the next page."""

    items: list[EventOut]
    next: int | None


class StateVersionOut(msgspec.Struct, frozen=True, kw_only=True):
    workspace: str
    version: int
    deploy_id: str
    attempt: int
    store: str
    serial: int
    lineage: str
    sha256: str
    size: int
    created_at: datetime

    @classmethod
    def of(cls, v: StateVersion) -> StateVersionOut:
        return msgspec.convert(v, cls, from_attributes=True)


class StateVersionPage(msgspec.Struct, frozen=True):
    """State versions, newest first; ``next`` is the ``before`` for the next page."""

    items: list[StateVersionOut]
    next: int | None


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
