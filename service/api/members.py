"""A workspace's members: ``GET /workspaces/{ref}/members``, ``PUT`` and ``DELETE
/workspaces/{ref}/members/{user}``. Its owner and admins only (``service.api.access``); each
change is written with its event (``MemberSet``, ``MemberRemoved``) in the workspace's stream.

A role takes effect on the very next request of the member, and a removal likewise: access is
decided per request (and re-checked by open streams), never cached.
"""

from __future__ import annotations

from litestar import Controller, Response, delete, get, put
from litestar.openapi.datastructures import ResponseSpec

from service.api import access
from service.api.auth import SECURITY
from service.api.errors import Unprocessable
from service.api.schemas import MemberIn, MemberList, MemberOut, error_responses
from service.api.workspaces import REF
from service.auth import Principal, get_user
from service.deploys import NotFound
from service.services import Services
from service.workspaces import members, remove_member, set_member


class MemberController(Controller):
    path = "/workspaces/{name:str}/members"
    tags = ["workspaces"]
    security = SECURITY

    @get("/", summary="A workspace's members (owner or admin)", responses=error_responses(403, 404))
    async def list_members(
        self, services: Services, principal: Principal, name: str = REF
    ) -> MemberList:
        ws = (await access.workspace(services, principal, name, "manage")).workspace
        async with services.pool.connection() as conn:
            found = await members(conn, ws.id)
        return MemberList(
            workspace=ws.ref,
            owner=ws.owner,
            items=[MemberOut(user=m.user, role=m.role, updated_at=m.updated_at) for m in found],
        )

    @put(
        "/{user:str}",
        status_code=200,
        summary="Make a user a member (201), or set their role (200); owner or admin",
        responses={
            201: ResponseSpec(data_container=MemberOut, description="A new member."),
            **error_responses(400, 403, 404, 422),
        },
    )
    async def set_member(
        self,
        services: Services,
        principal: Principal,
        user: str,
        data: MemberIn,
        name: str = REF,
    ) -> Response[MemberOut]:
        ws = (await access.workspace(services, principal, name, "manage")).workspace
        access.member_name(user)
        if user == ws.owner:
            raise Unprocessable("the workspace's owner cannot be a member of it: they hold every right")
        async with services.pool.connection() as conn:
            found = await get_user(conn, user)
        if found is None or found["disabled_at"] is not None:
            raise NotFound("user not found")
        previous, _ = await set_member(services.pool, ws, user, data.role, principal.actor)
        async with services.pool.connection() as conn:
            member = next(m for m in await members(conn, ws.id) if m.user == user)
        return Response(
            MemberOut(user=member.user, role=member.role, updated_at=member.updated_at),
            status_code=201 if previous is None else 200,  # a new member, or a role changed
        )

    @delete(
        "/{user:str}",
        status_code=204,
        summary="Remove a member (owner or admin)",
        responses=error_responses(403, 404),
    )
    async def remove_member(
        self, services: Services, principal: Principal, user: str, name: str = REF
    ) -> None:
        ws = (await access.workspace(services, principal, name, "manage")).workspace
        access.member_name(user)
        _, changed = await remove_member(services.pool, ws, user, principal.actor)
        if not changed:
            raise NotFound("not a member of this workspace")
