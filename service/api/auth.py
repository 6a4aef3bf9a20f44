"""Who is asking: the ``principal`` dependency, from ``Authorization: Bearer <token>`` or, on
the two stream routes only (EventSource cannot set headers), ``?access_token=<token>``. A token
in the query string ends up in access logs and browser history, so no other route takes one.
The terraform CLI's state backend routes (``service/api/tfstate.py``) also take HTTP Basic auth,
the token as the password (terraform's http backend sends ``username``/``password`` so), and
challenge with ``Basic`` on a 401.

A route that declares a ``principal: Principal`` parameter is authenticated; one that does not
(``/health``, ``/schema``) is open. What the principal may do is ``service.api.access``'s.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from litestar import Request
from litestar.exceptions import NotAuthorizedException
from litestar.openapi.spec import Reference, SecurityRequirement, SecurityScheme

from service.api.errors import PermissionDenied, Unauthorized
from service.auth import Principal, authenticate
from service.db import autocommit
from service.services import Services

BEARER_SCHEME = "BearerToken"
QUERY_SCHEME = "AccessTokenQuery"
BASIC_SCHEME = "BasicToken"

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
    BASIC_SCHEME: SecurityScheme(
        type="http",
        scheme="basic",
        description=(
            "The terraform CLI's http state backend: any user name, the API token as the "
            "password (`/workspaces/{name}/tfstate` routes only)."
        ),
    ),
}

SECURITY: list[SecurityRequirement] = [{BEARER_SCHEME: []}]
# The stream routes: either scheme will do.
STREAM_SECURITY: list[SecurityRequirement] = [{BEARER_SCHEME: []}, {QUERY_SCHEME: []}]
# The state backend's routes: either the bearer token or Basic auth.
BASIC_SECURITY: list[SecurityRequirement] = [{BEARER_SCHEME: []}, {BASIC_SCHEME: []}]
# A route handler's ``opt`` key that lets it take ``?access_token=``.
QUERY_TOKEN_OPT = "query_token"
# A route handler's ``opt`` key that lets it take HTTP Basic auth (the token as the password).
BASIC_AUTH_OPT = "basic_auth"
BASIC_CHALLENGE = 'Basic realm="tfdeploy", charset="UTF-8"'


def basic_password(credentials: str) -> str:
    """The password of Basic credentials (base64 of ``user:password``); "" if malformed."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return ""
    _, sep, password = decoded.partition(":")
    return password.strip() if sep else ""
# Where the request limiter (service.api.limits), which looks the token up as it counts the
# request, leaves who it names: a Principal, or TOKEN_REFUSED.
PRINCIPAL_SCOPE_KEY = "tfdeploy.principal"
TOKEN_REFUSED = "refused"


def token_of(request: Request[Any, Any, Any]) -> str | None:
    """The token the request carries, header first; "" for a malformed Authorization header.
    ``?access_token=`` counts only on routes that allow it (the two streams)."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "basic" and request.route_handler.opt.get(BASIC_AUTH_OPT):
            return basic_password(token)
        return token.strip() if scheme.lower() == "bearer" else ""
    if request.route_handler.opt.get(QUERY_TOKEN_OPT):
        return request.query_params.get("access_token")
    return None


async def current_principal(request: Request[Any, Any, Any], services: Services) -> Principal:
    """The ``principal`` dependency: 401 when the token is missing, unknown or revoked."""
    token = token_of(request)
    basic = bool(request.route_handler.opt.get(BASIC_AUTH_OPT))
    if token is None:
        if basic:
            raise _basic_refusal("missing token: send it as the Basic auth password")
        raise Unauthorized("missing token: send Authorization: Bearer <token>")
    if not token:
        raise _basic_refusal("invalid token") if basic else Unauthorized("invalid token")
    known = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if isinstance(known, Principal):
        return known
    if known == TOKEN_REFUSED:
        raise _basic_refusal("invalid token") if basic else Unauthorized("invalid token")
    # One statement: autocommit spares the BEGIN and COMMIT round trips of every request.
    async with autocommit(services.pool) as conn:
        principal = await authenticate(conn, token)
    if principal is None:
        raise _basic_refusal("invalid token") if basic else Unauthorized("invalid token")
    return principal


def _basic_refusal(detail: str) -> NotAuthorizedException:
    """A 401 that asks for Basic credentials (the state backend's routes)."""
    return NotAuthorizedException(detail=detail, headers={"WWW-Authenticate": BASIC_CHALLENGE})


def require_admin(principal: Principal, what: str = "this") -> None:
    if not principal.admin:
        raise PermissionDenied(f"only an admin may do {what}")

