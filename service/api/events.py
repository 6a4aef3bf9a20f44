"""The audit query over the event table: ``GET /events``.

Users see the events of their own deploys; an admin sees all. Pages are keyset on the global
``position``: ``next`` is the ``after`` of the following page, null on the last one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from litestar import Controller, get
from litestar.params import Parameter

from service import store
from service.api.auth import SECURITY
from service.api.errors import Malformed, check_limit
from service.api.schemas import EventOut, EventPage, error_responses
from service.auth import Principal
from service.services import Services

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


class EventController(Controller):
    path = "/events"
    tags = ["events"]
    security = SECURITY

    @get(
        "/",
        summary="Audit query over all events, in position order",
        responses=error_responses(400, 422),
    )
    async def audit(
        self,
        services: Services,
        principal: Principal,
        deploy_id: str | None = Parameter(required=False, description="A deploy's id."),
        workspace: str | None = Parameter(required=False),
        type_: str | None = Parameter(query="type", required=False, description="Event type."),
        actor: str | None = Parameter(
            required=False, description="E.g. `user:ann`, `admin:root`, `worker:<id>`."
        ),
        since: str | None = Parameter(
            required=False,
            description="ISO 8601; events recorded at or after it.",
            schema_extra={"format": "date-time"},
        ),
        until: str | None = Parameter(
            required=False,
            description="ISO 8601; events recorded before it.",
            schema_extra={"format": "date-time"},
        ),
        after: int = Parameter(default=0, ge=0, description="Only events after this position."),
        limit: int = Parameter(
            default=EVENTS_LIMIT_DEFAULT,
            description=f"1-{EVENTS_LIMIT_MAX}.",
            schema_extra={"minimum": 1, "maximum": EVENTS_LIMIT_MAX},
        ),
    ) -> EventPage:
        check_limit(limit, EVENTS_LIMIT_MAX)
        if deploy_id:
            try:
                deploy_id = str(UUID(deploy_id))
            except ValueError:
                raise Malformed("deploy_id must be a UUID") from None
        since_at, until_at = parse_instant("since", since), parse_instant("until", until)
        async with services.pool.connection() as conn:
            events = await store.audit_page(
                conn,
                after=after,
                limit=limit + 1,
                deploy_id=deploy_id or None,
                workspace=workspace or None,
                type=type_ or None,
                actor=actor or None,
                owner=None if principal.admin else principal.name,
                since=since_at,
                until=until_at,
            )
        page = events[:limit]
        more = len(events) > limit
        return EventPage(
            items=[EventOut.of(e) for e in page],
            next=page[-1].position if more else None,
        )
