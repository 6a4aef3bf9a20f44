"""Live status over Server-Sent Events (sse-starlette, served from Litestar): the routes and the
HTTP responses that write the streams. What a stream reads and sends -- the shared feeds, the
catch-up reads, the ids and the order -- is service.api.feeds.

- ``GET /deploys/{id}/stream`` (whoever may see the deploy: service.api.access): the deploy's
  events, each with the deploy's status after it, and terraform's output as ``event: log``,
  merged in one order;
- ``GET /events/stream`` (admin): every event of every deploy in global ``position`` order.

Both replay what the client has not seen yet (``Last-Event-ID`` header, or ``?last_event_id=`` for
clients that cannot set headers; the header wins, since a browser's EventSource keeps the URL it
was opened with and sends the newer id in the header on reconnect), then follow new rows as they
commit. A resume id that is not ``v`` or ``v.s`` (deploy stream) or a position (global stream),
or a ``v`` above the deploy's last version, is 400. docs/streams.md is the frontend authors'
description of the format.

Each open stream holds one of its user's stream slots (``TFDEPLOY_MAX_STREAMS_PER_USER``,
counted across API processes: service.api.limits); past it, opening one is 429. Sends time out
(``send_timeout``), so a frozen client is dropped instead of holding anything, and a disconnect
ends the generator, which releases its hub subscription; the slot is released when the response
ends, however it ends. Open streams re-check their token (and a member's access) every
``auth_recheck`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from litestar import Request, get
from litestar.params import Parameter
from litestar.types import ASGIApp
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError

from service.api import access
from service.api.auth import QUERY_TOKEN_OPT, STREAM_SECURITY, require_admin, token_of
from service.api.errors import Malformed
from service.api.feeds import (
    DATABASE_AWAY,
    SEP,
    DeployCursor,
    StreamOptions,
    all_event_messages,
    deploy_messages,
)
from service.api.limits import stream_slots
from service.api.schemas import error_responses
from service.auth import Principal, authenticate
from service.notify import hub_of
from service.projection import DeployView
from service.services import Services

__all__ = ["STREAM_ROUTES", "StreamOptions", "deploy_stream", "events_stream"]

log = logging.getLogger("tfdeploy.api.streams")

_DEPLOY_ID_RE = re.compile(r"^([0-9]{1,18})(?:\.([0-9]{1,18}))?$")
_POSITION_RE = re.compile(r"^[0-9]{1,18}$")


# ---------------------------------------------------------------- resume ids


def last_event_id(request: Request[Any, Any, Any], query_value: str | None) -> str | None:
    """The id to resume after: the ``Last-Event-ID`` header, else ``?last_event_id=``."""
    header = request.headers.get("last-event-id")
    for value in (header, query_value):
        if value is not None and value.strip():
            return value.strip()
    return None


def parse_deploy_cursor(raw: str | None) -> DeployCursor:
    if raw is None:
        return DeployCursor()
    match = _DEPLOY_ID_RE.match(raw)
    if not match:
        raise Malformed('Last-Event-ID must be "<version>" or "<version>.<seq>"')
    version, seq = match.groups()
    return DeployCursor(int(version), int(seq) if seq is not None else None)


def parse_position(raw: str | None) -> int:
    if raw is None:
        return 0
    if not _POSITION_RE.match(raw):
        raise Malformed("Last-Event-ID must be an event position (an integer)")
    return int(raw)


# ---------------------------------------------------------------- routes


class StreamResponse(EventSourceResponse):
    """An EventSourceResponse that takes a dropped slow client as the normal event it is (the
    stream ends, its subscription is released) rather than an application error, and calls
    ``on_close`` when it ends, however it ends."""

    def __init__(self, *args: Any, on_close: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info("dropped an SSE client that did not read for %s s", self.send_timeout)
        finally:
            if self.on_close is not None:
                self.on_close()


class TokenChecks:
    """Whether stream tokens are still valid, shared by every stream of the process: at most one
    query per token per ``every`` seconds, however many streams use it (a thousand streams of
    one token would otherwise query the token table hundreds of times a second)."""

    def __init__(self, services: Services, every: float) -> None:
        self.services = services
        self.every = every
        self._known: dict[str, tuple[float, bool]] = {}  # token -> (checked at, valid)
        self._running: dict[str, asyncio.Future[bool]] = {}

    async def valid(self, token: str) -> bool:
        loop = asyncio.get_running_loop()
        known = self._known.get(token)
        if known is not None and loop.time() - known[0] < self.every:
            return known[1]
        running = self._running.get(token)
        if running is None:
            running = self._running[token] = asyncio.ensure_future(self._query(token))
        # One stream leaving must not cancel the check the others wait for.
        return await asyncio.shield(running)

    async def _query(self, token: str) -> bool:
        loop = asyncio.get_running_loop()
        try:
            async with self.services.pool.connection() as conn:
                ok = await authenticate(conn, token) is not None
        except Exception:  # the database is away: keep the stream; the check runs again
            ok = True
        finally:
            self._running.pop(token, None)
        now = loop.time()
        # Forget tokens no stream asked about for a while.
        for gone in [t for t, (at, _) in self._known.items() if now - at > 60 * self.every]:
            del self._known[gone]
        self._known[token] = (now, ok)
        return ok


def _token_check(
    services: Services, request: Request[Any, Any, Any], options: StreamOptions
) -> Callable[[], Awaitable[bool]]:
    token = token_of(request) or ""
    checks = services.extras.get("stream_tokens")
    if not isinstance(checks, TokenChecks) or checks.every != options.auth_recheck:
        checks = services.extras["stream_tokens"] = TokenChecks(services, options.auth_recheck)
    loop = asyncio.get_running_loop()
    checked_at = loop.time()  # the request was just authenticated

    async def valid() -> bool:
        if loop.time() - checked_at < options.auth_recheck:
            return True
        return await checks.valid(token)

    return valid


def _access_check(
    services: Services,
    principal: Principal,
    deploy: DeployView,
    options: StreamOptions,
    token_valid: Callable[[], Awaitable[bool]],
) -> Callable[[], Awaitable[bool]]:
    """``token_valid``, and, for a caller who sees the deploy only as a member of its workspace,
    whether they still are (every ``auth_recheck`` seconds): a member removed from the
    workspace loses its streams at once. Its requester, its workspace's owner and admins lose
    access only with their token."""
    if principal.admin or principal.name in (deploy.owner, deploy.workspace_owner):
        return token_valid
    loop = asyncio.get_running_loop()
    checked_at = loop.time()  # access was just checked

    async def valid() -> bool:
        nonlocal checked_at
        if not await token_valid():
            return False
        if loop.time() - checked_at < options.auth_recheck:
            return True
        try:
            ok = await access.still_sees_deploy(services, principal, deploy)
        except DATABASE_AWAY:  # keep the stream; the check runs again
            return True
        checked_at = loop.time()
        return ok

    return valid


def _options(request: Request[Any, Any, Any]) -> StreamOptions:
    options = request.app.state.get("stream_options")
    return options if isinstance(options, StreamOptions) else StreamOptions()


async def _open_slot(services: Services, principal: Principal, options: StreamOptions) -> Callable[[], None]:
    """One of the caller's stream slots (429 when they hold them all); returns its release."""
    slots = stream_slots(services, lease=options.slot_lease, refresh=options.slot_refresh)
    stream = await slots.acquire(principal.name)
    return lambda: slots.release(stream)


def _response(
    messages: AsyncIterator[bytes], options: StreamOptions, on_close: Callable[[], None]
) -> ASGIApp:
    return StreamResponse(
        messages,
        ping=options.ping,
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep=SEP),
        sep=SEP,
        send_timeout=options.send_timeout,
        headers={"Cache-Control": "no-store"},
        on_close=on_close,
    )


LAST_EVENT_ID_HEADER = Parameter(
    header="Last-Event-ID",
    required=False,
    description="Resume after this id (sent by EventSource itself when it reconnects).",
)


@get(
    "/deploys/{deploy_id:str}/stream",
    summary="Follow a deploy live (SSE)",
    tags=["deploys"],
    security=STREAM_SECURITY,
    opt={QUERY_TOKEN_OPT: True},
    media_type="text/event-stream",
    responses=error_responses(400, 404),
    description=(
        "Server-Sent Events: one message per event (`id:` its version, `event:` its type, "
        '`data:` `{"event", "deploy"}` with the status after it) and terraform output as '
        "`event: log` (`id:` `<after_version>.<seq>`), in one order; `event: end` after the "
        "last event of a finished deploy, then the stream closes. Resumes after `Last-Event-ID` "
        "or `?last_event_id=`. At most TFDEPLOY_MAX_STREAMS_PER_USER streams open per user "
        "(429 past it). See docs/streams.md."
    ),
)
async def deploy_stream(
    request: Request[Any, Any, Any],
    services: Services,
    principal: Principal,
    deploy_id: str = Parameter(description="The deploy's id (a UUID)."),
    last_event_id_header: str | None = LAST_EVENT_ID_HEADER,
    last_event_id_query: str | None = Parameter(
        query="last_event_id", required=False, description="Like Last-Event-ID; the header wins."
    ),
) -> ASGIApp:
    cursor = parse_deploy_cursor(last_event_id(request, last_event_id_query))
    deploy = await access.visible_deploy(services, principal, deploy_id)
    if cursor.version > deploy.version:
        # Not an id this stream sent (versions only grow): another stream's, or made up.
        raise Malformed(f"Last-Event-ID is beyond this deploy's last event ({deploy.version})")
    options = _options(request)
    valid = _access_check(
        services, principal, deploy, options, _token_check(services, request, options)
    )
    release = await _open_slot(services, principal, options)
    return _response(
        deploy_messages(services, hub_of(services), deploy.id, cursor, options, valid),
        options,
        release,
    )


@get(
    "/events/stream",
    summary="Every event live, in position order (SSE, admin)",
    tags=["events"],
    security=STREAM_SECURITY,
    opt={QUERY_TOKEN_OPT: True},
    media_type="text/event-stream",
    responses=error_responses(400, 403),
    description=(
        "Server-Sent Events: every event of every deploy and workspace, `id:` its global "
        "position, `event:` its type, `data:` the event. Gap-free and ordered; resumes after `Last-Event-ID` or "
        "`?last_event_id=` (a position). Counts among the caller's open streams (429 past "
        "TFDEPLOY_MAX_STREAMS_PER_USER)."
    ),
)
async def events_stream(
    request: Request[Any, Any, Any],
    services: Services,
    principal: Principal,
    last_event_id_header: str | None = LAST_EVENT_ID_HEADER,
    last_event_id_query: str | None = Parameter(
        query="last_event_id", required=False, description="Like Last-Event-ID; the header wins."
    ),
) -> ASGIApp:
    require_admin(principal, "the event stream")
    after = parse_position(last_event_id(request, last_event_id_query))
    options = _options(request)
    valid = _token_check(services, request, options)
    release = await _open_slot(services, principal, options)
    return _response(
        all_event_messages(services, hub_of(services), after, options, valid), options, release
    )


STREAM_ROUTES = [deploy_stream, events_stream]
