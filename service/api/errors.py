"""The one place where exceptions become HTTP answers.

Handlers raise domain exceptions (``deploys.NotFound``, ``lifecycle.IllegalTransition``, ...) or
the few API-level ones below, never build error responses themselves. ``EXCEPTION_HANDLERS`` maps
each to its status; every answer is JSON ``{"status_code", "detail"}`` (CONTRACT), never a stack
trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any

import psycopg
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from psycopg_pool import PoolTimeout

from service.db import DatabaseAway
from service.deploys import IdempotencyMismatch, NotFound
from service.lifecycle import IllegalTransition
from service.statestores.base import StateStoreError
from service.store import VersionConflict
from service.validation import InvalidRequest
from service.workspaces import WorkspaceNotFound

log = logging.getLogger("tfdeploy.api")


class ApiError(Exception):
    """An error of the HTTP layer itself; subclasses fix the status."""

    status_code = 400

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers


class Malformed(ApiError):
    """A request that cannot be read (a garbage cursor, a bad date)."""

    status_code = 400


class Unauthorized(ApiError):
    """No token, or a token that is unknown or revoked."""

    status_code = 401


class PermissionDenied(ApiError):
    """Authenticated, but not allowed to do this."""

    status_code = 403


class TooLarge(ApiError):
    status_code = 413


class UnsupportedMediaType(ApiError):
    """A request body in a media type the route does not read (``POST /deploys`` takes JSON)."""

    status_code = 415


class TooManyRequests(ApiError):
    """Past a per-user limit (requests, open streams): say when to try again (``Retry-After``
    among ``headers``)."""

    status_code = 429


class Unprocessable(ApiError):
    """Readable, but not a valid value (an unknown status filter, a limit out of range)."""

    status_code = 422


def check_limit(limit: int, maximum: int, name: str = "limit") -> int:
    """A page size, 422 when outside 1..maximum."""
    if not 1 <= limit <= maximum:
        raise Unprocessable(f"{name} must be between 1 and {maximum}")
    return limit


def check_text(name: str, value: str | None) -> str | None:
    """A free-text filter (a workspace, an actor, ...), 400 when it holds a NUL character, which
    no stored value can hold (PostgreSQL text refuses it) and psycopg would not even send."""
    if value is not None and "\x00" in value:
        raise Malformed(f"{name} must not contain a NUL character")
    return value


async def refuse_repeated_query_parameters(request: Request[Any, Any, Any]) -> None:
    """``before_request`` of the app: no route takes a query parameter twice, so ``?limit=1&limit=
    500`` is refused (400) rather than silently read as one of its values."""
    seen: set[str] = set()
    for key, _ in request.query_params.multi_items():
        if key in seen:
            raise Malformed(f"query parameter {key!r} given more than once")
        seen.add(key)


def error_response(
    status_code: int,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    extra: Any = None,
) -> Response[dict[str, Any]]:
    content: dict[str, Any] = {"status_code": status_code, "detail": detail}
    if extra:
        content["extra"] = extra
    return Response(content, status_code=status_code, media_type=MediaType.JSON, headers=headers)


def _api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[Any]:
    headers = dict(exc.headers or {})
    if exc.status_code == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tfdeploy"'
    return error_response(exc.status_code, exc.detail, headers=headers or None)


def _not_found(_: Request[Any, Any, Any], exc: NotFound) -> Response[Any]:
    # Our own raises carry a sentence; a bare id (from Deploys.execute) becomes "not found".
    message = str(exc)
    return error_response(404, message if " " in message else "deploy not found")


def _workspace_not_found(_: Request[Any, Any, Any], exc: WorkspaceNotFound) -> Response[Any]:
    return error_response(404, str(exc) or "workspace not found")


def _illegal(_: Request[Any, Any, Any], exc: IllegalTransition) -> Response[Any]:
    return error_response(409, str(exc))


def _conflict(_: Request[Any, Any, Any], exc: VersionConflict) -> Response[Any]:
    return error_response(409, "the deploy changed concurrently; try again")


def _idempotency(_: Request[Any, Any, Any], exc: IdempotencyMismatch) -> Response[Any]:
    return error_response(422, str(exc) or "this Idempotency-Key was used with a different request")


def _invalid_request(_: Request[Any, Any, Any], exc: InvalidRequest) -> Response[Any]:
    return error_response(exc.status_code, str(exc.detail))


def _unavailable(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.warning("database unavailable: %s: %s", type(exc).__name__, exc)
    return error_response(503, "database unavailable", headers={"Retry-After": "5"})


# How soon to try again while PostgreSQL is known to be away: the pool tries to reconnect at
# least every second (service.db), and answers again as soon as one succeeds.
AWAY_RETRY_AFTER = 1


def _away(_: Request[Any, Any, Any], exc: DatabaseAway) -> Response[Any]:
    # Answered at once (service.db, FAIL_FAST): no warning per request; the pool logs the outage.
    return error_response(
        503, "database unavailable", headers={"Retry-After": str(AWAY_RETRY_AFTER)}
    )


# A replay of a deploy whose inputs retention removed (migration 0011's trigger).
INPUTS_REMOVED_SQLSTATE = "TD410"


def _database_error(request: Request[Any, Any, Any], exc: psycopg.DatabaseError) -> Response[Any]:
    if exc.sqlstate == INPUTS_REMOVED_SQLSTATE:
        return error_response(
            409,
            "this deploy cannot run again: its files and variables were removed by retention "
            "(TFDEPLOY_INPUT_RETENTION_DAYS)",
        )
    return _unexpected(request, exc)


def _data_error(request: Request[Any, Any, Any], exc: psycopg.DataError) -> Response[Any]:
    # A value the database cannot take (out of range, NUL in text, ...): the handlers refuse such
    # input themselves; this is the net under them, so a missed case is a 400, never a 500.
    log.warning("%s %s: data error: %s", request.method, request.url.path, exc)
    return error_response(400, "malformed request: a value is out of range or not valid text")


def _state_store(_: Request[Any, Any, Any], exc: StateStoreError) -> Response[Any]:
    log.warning("state store unavailable: %s", exc)
    return error_response(503, "state store unavailable", headers={"Retry-After": "5"})


def _validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    return error_response(400, exc.detail, extra=exc.extra)


def _http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if exc.status_code >= 500:
        log.error("%s %s: %r", request.method, request.url.path, exc, exc_info=exc)
        return error_response(exc.status_code, "internal server error")
    return error_response(exc.status_code, exc.detail, headers=exc.headers)


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(HTTP_500_INTERNAL_SERVER_ERROR, "internal server error")


# Looked up along each exception's MRO: the most specific class wins.
EXCEPTION_HANDLERS: MutableMapping[
    int | type[Exception], Callable[[Request[Any, Any, Any], Any], Response[Any]]
] = {
    ApiError: _api_error,
    NotFound: _not_found,
    WorkspaceNotFound: _workspace_not_found,
    IllegalTransition: _illegal,
    VersionConflict: _conflict,
    IdempotencyMismatch: _idempotency,
    InvalidRequest: _invalid_request,
    psycopg.OperationalError: _unavailable,
    psycopg.DataError: _data_error,
    psycopg.DatabaseError: _database_error,
    PoolTimeout: _unavailable,
    DatabaseAway: _away,
    StateStoreError: _state_store,
    ValidationException: _validation,
    HTTPException: _http,
    Exception: _unexpected,
}
