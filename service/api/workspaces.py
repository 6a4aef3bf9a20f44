"""The workspaces resource: the persisted tfstate versions of a workspace.

A workspace is visible to a user who owns at least one deploy in it; an admin sees all. An
invisible workspace and one without state look the same: 404.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from service import store
from service.api.auth import SECURITY
from service.api.errors import check_limit
from service.api.schemas import StateVersionOut, StateVersionPage, error_responses
from service.auth import Principal
from service.deploys import NotFound
from service.services import Services
from service.statestores import index
from service.validation import WORKSPACE_NAME

STATES_LIMIT_MAX = 200
VERSION_MAX = 2**31 - 1  # state_versions.version is an integer
STATE_MEDIA_TYPE = "application/json"


def _state_responses() -> dict[int, ResponseSpec]:
    """The handlers answer raw bytes (the tfstate as stored); document them as the JSON object
    they are."""
    return {
        200: ResponseSpec(
            data_container=dict[str, Any],
            description="The tfstate, as terraform wrote it (a JSON object).",
            generate_examples=False,
        ),
        **error_responses(400, 404),
    }


async def _check_visible(conn: Any, principal: Principal, name: str) -> None:
    """NotFound unless ``principal`` may see workspace ``name``. A name no deploy may carry
    (service.validation.WORKSPACE_NAME) names no workspace: 404 at once, without a query."""
    if WORKSPACE_NAME.match(name) is None:
        raise NotFound("workspace not found")
    if principal.admin:
        return
    mine = await store.list_deploys(conn, owner=principal.name, workspace=name, limit=1)
    if not mine:
        raise NotFound("workspace not found")


def _state_response(version: index.StateVersion, content: bytes) -> Response[bytes]:
    return Response(
        content,
        media_type=STATE_MEDIA_TYPE,
        headers={
            "ETag": f'"{version.sha256}"',
            "X-State-Version": str(version.version),
            "X-State-Serial": str(version.serial),
        },
    )


# ``state_store`` is a service.statestores.StateStore; annotated Any because Litestar checks
# dependency values with isinstance, which a typing.Protocol refuses.


class WorkspaceController(Controller):
    path = "/workspaces"
    tags = ["workspaces"]
    security = SECURITY

    @get(
        "/{name:str}/state",
        summary="The latest persisted tfstate",
        media_type=STATE_MEDIA_TYPE,
        responses=_state_responses(),
    )
    async def latest_state(
        self, services: Services, principal: Principal, state_store: Any, name: str
    ) -> Response[bytes]:
        async with services.pool.connection() as conn:
            await _check_visible(conn, principal, name)
            version = await index.latest(conn, name)
        if version is None:
            raise NotFound("workspace has no persisted state")
        content = await state_store.get(name, version.version, version.location)
        return _state_response(version, content)

    @get(
        "/{name:str}/states",
        summary="State versions, newest first",
        responses=error_responses(400, 404, 422),
    )
    async def state_versions(
        self,
        services: Services,
        principal: Principal,
        name: str,
        limit: int = Parameter(
            default=50,
            description=f"1-{STATES_LIMIT_MAX}.",
            schema_extra={"minimum": 1, "maximum": STATES_LIMIT_MAX},
        ),
        before: int | None = Parameter(
            required=False, description="The `next` of the previous page.", ge=1, le=VERSION_MAX
        ),
    ) -> StateVersionPage:
        check_limit(limit, STATES_LIMIT_MAX)
        async with services.pool.connection() as conn:
            await _check_visible(conn, principal, name)
            versions = await index.list_versions(conn, name, limit=limit + 1, before=before)
        page = versions[:limit]
        more = len(versions) > limit
        return StateVersionPage(
            items=[StateVersionOut.of(v) for v in page],
            next=page[-1].version if more else None,
        )

    @get(
        "/{name:str}/states/{version:int}",
        summary="One state version's tfstate",
        responses=_state_responses(),
        media_type=STATE_MEDIA_TYPE,
    )
    async def state_version(
        self,
        services: Services,
        principal: Principal,
        state_store: Any,
        name: str,
        version: int,
    ) -> Response[bytes]:
        async with services.pool.connection() as conn:
            await _check_visible(conn, principal, name)
            found = (
                await index.get_version(conn, name, version) if 1 <= version <= VERSION_MAX else None
            )
        if found is None:
            raise NotFound("state version not found")
        content = await state_store.get(name, found.version, found.location)
        return _state_response(found, content)
