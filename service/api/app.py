"""The HTTP application: resources, dependencies, the error table and the OpenAPI document.

``create_app`` takes an opened ``Services``; the caller owns its lifetime (the app never opens or
closes it; pass ``on_shutdown`` to have the app's shutdown call something).

Dependencies every handler may declare:
- ``services``: the ``Services`` instance;
- ``principal``: the authenticated caller (401 when missing or invalid);
- ``state_store``: the configured tfstate store.

The SSE routes (service.api.streams) share the process's LISTEN hub (service.notify), kept in
``services.extras["hub"]``: started on the first stream, closed on the app's shutdown.

Middleware: every HTTP request's database work fails fast while PostgreSQL is known to be away
(``fail_fast``: 503 at once, service.db); requests that carry a token are counted per user
(service.api.limits, ``TFDEPLOY_RATE_LIMIT``). The process's stream slots and validation threads
(service.api.limits) are closed on the app's shutdown.

Every response, errors and unknown paths included, carries ``X-Content-Type-Options: nosniff``
and, unless it sets a stricter policy of its own (the status page), ``Content-Security-Policy:
frame-ancestors 'none'`` (``security_headers``, a hook on the ASGI send).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, Tag
from litestar.types import ASGIApp, ControllerRouterHandler, Message, Receive, Scope, Send

from service.api.auth import SECURITY_SCHEMES, current_principal
from service.api.deploys import DeployController
from service.api.errors import EXCEPTION_HANDLERS, refuse_repeated_query_parameters
from service.api.events import EventController
from service.api.health import HealthController
from service.api.limits import StreamSlots, ValidationGate, request_limit
from service.api.members import MemberController
from service.api.plans import PlanController
from service.api.streams import STREAM_ROUTES, StreamOptions
from service.api.tfstate import LockMethodsApp, TfstateController
from service.api.web import WebController
from service.api.workspaces import WorkspaceController
from service.db import FAIL_FAST
from service.services import Services
from service.statestores import StateStore, make_state_store
from service.validation import body_limit, warm_up

API_VERSION = "1"

_NOSNIFF = (b"x-content-type-options", b"nosniff")
_FRAME_ANCESTORS = (b"content-security-policy", b"frame-ancestors 'none'")


async def security_headers(message: Message, scope: Scope) -> None:
    """``before_send`` hook: the headers every response carries (a response that sets its own
    Content-Security-Policy, like the status page's stricter one, keeps it)."""
    if message["type"] != "http.response.start":
        return
    headers = list(message.get("headers") or [])
    names = {bytes(name).lower() for name, _ in headers}
    for name, value in (_NOSNIFF, _FRAME_ANCESTORS):
        if name not in names:
            headers.append((name, value))
    message["headers"] = headers


def fail_fast(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: the request's database work fails fast while PostgreSQL is known to be
    away (service.db.FAIL_FAST; answered 503 with Retry-After by service.api.errors). Set in
    the request's own task: a worker in the same process (``tfdeploy up``) keeps waiting."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        # Undone after: a server runs each request in a task of its own, but an in-process
        # client (tests) runs the app in its caller's task.
        token = FAIL_FAST.set(True)
        try:
            await app(scope, receive, send)
        finally:
            FAIL_FAST.reset(token)

    return middleware


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="tfdeploy",
        version=API_VERSION,
        description=(
            "Terraform deploys over HTTP: queued, retried, event-sourced. Authenticate with "
            "`Authorization: Bearer <token>` (or `?access_token=` on the two stream routes, for "
            'EventSource). Errors are `{"status_code", "detail"}`. A workspace is named by '
            "`name` (your own) or `owner:name` (another user's, for its members and admins)."
        ),
        path="/schema",
        components=Components(security_schemes=SECURITY_SCHEMES),
        tags=[
            Tag(name="deploys", description="Request, follow, cancel and replay deploys."),
            Tag(
                name="workspaces",
                description="Your workspaces, their members, tfstate versions, outputs and resources.",
            ),
            Tag(
                name="terraform CLI",
                description="Terraform's `http` state backend on a workspace (docs/terraform-cli.md).",
            ),
            Tag(name="events", description="The audit query over every event."),
            Tag(name="operations", description="Health (no token needed) and metrics (admin)."),
        ],
        # The document only, as JSON and YAML: no renderer loading third-party scripts into
        # this origin, where the status page keeps the user's token.
        render_plugins=[JsonRenderPlugin(), YamlRenderPlugin()],
    )


def create_app(
    services: Services,
    *,
    extra_route_handlers: Sequence[ControllerRouterHandler] = (),
    on_shutdown: Callable[..., Any] | None = None,
    stream_options: StreamOptions | None = None,
    debug: bool = False,
) -> Litestar:
    state_store = make_state_store(services.settings, services.pool)

    def provide_services() -> Services:
        return services

    def provide_state_store() -> StateStore:
        return state_store

    async def close_hub() -> None:
        # The LISTEN connection of the SSE streams (a later stream would start it again).
        hub = services.extras.get("hub")
        if hub is not None:
            await hub.close()

    async def close_limits() -> None:
        # This process's streams stop counting now; its validation threads end.
        slots = services.extras.get("stream_slots")
        if isinstance(slots, StreamSlots):
            await slots.close()
        gate = services.extras.pop("validation_gate", None)
        if isinstance(gate, ValidationGate):
            gate.close()

    # LockMethodsApp: terraform's LOCK/UNLOCK on a workspace's tfstate/lock path (the state
    # backend, service/api/tfstate.py) reach its POST/DELETE handlers.
    return LockMethodsApp(
        route_handlers=[
            DeployController,
            PlanController,
            WorkspaceController,
            TfstateController,
            MemberController,
            EventController,
            HealthController,
            *STREAM_ROUTES,
            WebController,
            *extra_route_handlers,
        ],
        dependencies={
            "services": Provide(provide_services, use_cache=True, sync_to_thread=False),
            "state_store": Provide(provide_state_store, use_cache=True, sync_to_thread=False),
            "principal": Provide(current_principal),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[fail_fast, request_limit(services.settings).middleware],
        before_request=refuse_repeated_query_parameters,
        before_send=[security_headers],
        openapi_config=openapi_config(),
        # The deploy handler enforces the same limit itself, with its own message; this one
        # guards every other route.
        request_max_body_size=body_limit(services.settings.max_request_bytes),
        # Build python-hcl2's parser before the first request rather than during it.
        on_startup=[warm_up],
        on_shutdown=[close_hub, close_limits, *([on_shutdown] if on_shutdown else [])],
        state=State(
            {
                "services": services,
                "state_store": state_store,
                "stream_options": stream_options or StreamOptions(),
            }
        ),
        debug=debug,
    )
