"""Who is asking: the ``principal`` dependency, from ``Authorization: Bearer <token>`` or, for
EventSource (which cannot set headers), ``?access_token=<token>``.

A route that declares a ``principal: Principal`` parameter is authenticated; one that does not
(``/health``, ``/metrics``, ``/schema``) is open.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from litestar import Request
from litestar.openapi.spec import Reference, SecurityRequirement, SecurityScheme

from service.api.errors import PermissionDenied, Unauthorized
from service.auth import Principal, authenticate
from service.db import autocommit
from service.deploys import NotFound
from service.projection import DeployView
from service.services import Services

BEARER_SCHEME = "BearerToken"
QUERY_SCHEME = "AccessTokenQuery"

SECURITY_SCHEMES: dict[str, SecurityScheme | Reference] = {
    BEARER_SCHEME: SecurityScheme(
        type="http",
        scheme="bearer",
        bearer_format="tfd_…",
        description="An API token from `tfdeploy token create`: `Authorization: Bearer <token>`.",
    ),
    QUERY_SCHEME: SecurityScheme(
        type="apiKey",
        name="access_token",
        security_scheme_in="query",
        description="The same token as a query parameter, for EventSource (SSE) clients.",
    ),
}

# Either scheme will do.
SECURITY: list[SecurityRequirement] = [{BEARER_SCHEME: []}, {QUERY_SCHEME: []}]


def token_of(request: Request[Any, Any, Any]) -> str | None:
    """The token the request carries, header first; "" for a malformed Authorization header."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""
    return request.query_params.get("access_token")


async def current_principal(request: Request[Any, Any, Any], services: Services) -> Principal:
    """The ``principal`` dependency: 401 when the token is missing, unknown or revoked."""
    token = token_of(request)
    if token is None:
        raise Unauthorized("missing token: send Authorization: Bearer <token>")
    if not token:
        raise Unauthorized("invalid token")
    # One statement: autocommit spares the BEGIN and COMMIT round trips of every request.
    async with autocommit(services.pool) as conn:
        principal = await authenticate(conn, token)
    if principal is None:
        raise Unauthorized("invalid token")
    return principal


def require_admin(principal: Principal, what: str = "this") -> None:
    if not principal.admin:
        raise PermissionDenied(f"only an admin may do {what}")


def can_see(principal: Principal, deploy: DeployView) -> bool:
    return principal.admin or deploy.owner == principal.name


async def visible_deploy(services: Services, principal: Principal, deploy_id: str) -> DeployView:
    """The deploy ``deploy_id`` names, if ``principal`` may see it; else NotFound (a malformed id,
    an unknown one and another user's all look the same: 404)."""
    try:
        uid = UUID(deploy_id)
    except ValueError:
        raise NotFound("deploy not found") from None
    deploy = await services.deploys.get(uid)
    if deploy is None or not can_see(principal, deploy):
        raise NotFound("deploy not found")
    return deploy
