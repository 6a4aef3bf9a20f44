"""The audit query over the event table: ``GET /events``.

A user sees the events of the deploys they may see (their own, and those of the workspaces they
own or are a member of) and the streams of the workspaces they own; an admin sees all
(service.api.access). ``?workspace=`` (a ref the caller may read, else 404) narrows to one
workspace: its deploys' events, and its own stream's for its owner and admins. Pages are keyset
on the global ``position``: ``next`` is the ``after`` of the following page, null on the last
one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from litestar import Controller, get
from litestar.openapi.spec import OpenAPIFormat, OpenAPIType, Schema
from litestar.params import Parameter

from service import store
from service.api import access
from service.api.auth import SECURITY
from service.api.errors import Malformed, check_limit, check_text
from service.api.schemas import EventOut, EventPage, error_responses
from service.auth import Principal
from service.projection import StoredEvent
from service.services import Services


# "" is taken as "not given" (as an HTML form sends an empty field): documented as such.
def _or_empty(format_: OpenAPIFormat) -> dict[str, Any]:
    return {
        "one_of": [
            Schema(type=OpenAPIType.STRING, format=format_),
            Schema(type=OpenAPIType.STRING, max_length=0),
        ]
    }


EVENTS_LIMIT_MAX = 1000
EVENTS_LIMIT_DEFAULT = 100


def parse_instant(name: str, value: str | None) -> datetime | None:
    """An ISO 8601 timestamp; one without an offset is UTC. Malformed (400) otherwise.

    A ``+`` in an unencoded query string arrives as a space (``...T10:00:00 01:00``); put it back.
    """
    if value is None or value == "":
        return None
    text = value.strip()
    candidates = [text]
    if " " in text:
        head, _, tail = text.rpartition(" ")
        candidates.append(f"{head}+{tail}")
    for candidate in candidates:
        try:
            instant = datetime.fromisoformat(candidate)
            break
        except ValueError:
            continue
    else:
        raise Malformed(f"{name} must be an ISO 8601 timestamp")
    return instant if instant.tzinfo else instant.replace(tzinfo=UTC)


# For the audit query's transaction only (set_config(..., true) is SET LOCAL):
# - a plan for each page's own filter values: psycopg prepares a query it has run 5 times on a
#   connection, and PostgreSQL may then settle on one generic plan for every value, which cannot
#   use the index that suits the filters given (it would scan the table for a rare type);
# - no JIT and no parallel workers: the query has three ways to read a page and runs one (see
#   queries.sql), but its estimated cost counts all three; that can cross jit_above_cost, or
#   make a parallel plan look worth it -- and compiling, or starting workers for a branch that is
#   then skipped, costs more than the page itself.
AUDIT_SETTINGS = (
    "SELECT set_config('plan_cache_mode', 'force_custom_plan', true),"
    " set_config('jit', 'off', true),"
    " set_config('max_parallel_workers_per_gather', '0', true)"
)


async def audit_page(conn: Any, **filters: Any) -> list[StoredEvent]:
    """``store.audit_page`` with AUDIT_SETTINGS, in a transaction of its own (docs/audit.md)."""
    async with conn.transaction():
        await conn.execute(AUDIT_SETTINGS)
        return await store.audit_page(conn, **filters)


class EventController(Controller):
    path = "/events"
    tags = ["events"]
    security = SECURITY

    @get(
        "/",
        summary="Audit query over all events, in position order",
        responses=error_responses(400, 404, 422),
    )
    async def audit(
        self,
        services: Services,
        principal: Principal,
        deploy_id: str | None = Parameter(
            required=False,
            description="A deploy's id.",
            schema_extra=_or_empty(OpenAPIFormat.UUID),
        ),
        workspace: str | None = Parameter(
            required=False, description="A workspace you may see: `name` or `owner:name`."
        ),
        type_: str | None = Parameter(query="type", required=False, description="Event type."),
        actor: str | None = Parameter(
            required=False, description="E.g. `user:ann`, `admin:root`, `worker:<id>`."
        ),
        since: str | None = Parameter(
            required=False,
            description="ISO 8601; events recorded at or after it.",
            schema_extra=_or_empty(OpenAPIFormat.DATE_TIME),
        ),
        until: str | None = Parameter(
            required=False,
            description="ISO 8601; events recorded before it.",
            schema_extra=_or_empty(OpenAPIFormat.DATE_TIME),
        ),
        after: int = Parameter(default=0, ge=0, description="Only events after this position."),
        limit: int = Parameter(
            default=EVENTS_LIMIT_DEFAULT,
            description=f"1-{EVENTS_LIMIT_MAX}.",
            schema_extra={"minimum": 1, "maximum": EVENTS_LIMIT_MAX},
        ),
    ) -> EventPage:
        check_limit(limit, EVENTS_LIMIT_MAX)
        check_text("workspace", workspace)
        check_text("type", type_)
        check_text("actor", actor)
        if deploy_id:
            try:
                deploy_id = str(UUID(deploy_id))
            except ValueError:
                raise Malformed("deploy_id must be a UUID") from None
        since_at, until_at = parse_instant("since", since), parse_instant("until", until)
        workspace_id, workspace_stream = None, False
        if workspace:
            found = await access.workspace(services, principal, workspace)
            workspace_id, workspace_stream = found.workspace.id, access.may_manage(found.standing)
        async with services.pool.connection() as conn:
            events = await audit_page(
                conn,
                after=after,
                limit=limit + 1,
                deploy_id=deploy_id or None,
                workspace_id=workspace_id,
                workspace_stream=workspace_stream,
                type=type_ or None,
                actor=actor or None,
                viewer=None if principal.admin else principal.name,
                since=since_at,
                until=until_at,
            )
        page = events[:limit]
        more = len(events) > limit
        return EventPage(
            items=[EventOut.of(e) for e in page],
            next=page[-1].position if more else None,
        )
